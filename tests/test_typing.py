"""Typing of the public API: annotations everywhere, a py.typed marker, and mypy clean."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tmequant as tq

ROOT = Path(__file__).resolve().parents[1]


def _public_callables():
    for name in tq.__all__:
        obj = getattr(tq, name)
        if inspect.isfunction(obj):
            yield name, obj
        elif inspect.isclass(obj) and not issubclass(obj, BaseException):
            for meth_name, meth in vars(obj).items():
                if isinstance(meth, (classmethod, staticmethod)):
                    meth = meth.__func__
                if inspect.isfunction(meth) and not meth_name.startswith("_"):
                    yield f"{name}.{meth_name}", meth


def test_public_functions_are_fully_annotated():
    missing = []
    for qual, fn in _public_callables():
        sig = inspect.signature(fn)
        for p in sig.parameters.values():
            if p.name in ("self", "cls"):
                continue
            if p.annotation is inspect.Parameter.empty:
                missing.append(f"{qual}({p.name})")
        if sig.return_annotation is inspect.Signature.empty:
            missing.append(f"{qual} -> ?")
    assert not missing, "unannotated: " + ", ".join(missing)


def test_public_dataclasses_have_typed_fields():
    for name in tq.__all__:
        obj = getattr(tq, name)
        if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                assert f.type not in (None, ""), f"{name}.{f.name}"


def test_py_typed_marker_is_shipped():
    pkg = Path(tq.__file__).parent
    assert (pkg / "py.typed").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"py.typed"' in pyproject  # package-data: installed wheels carry it too


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_mypy_is_clean_on_the_package():
    if shutil.which("mypy") is None and subprocess.run(
            [sys.executable, "-c", "import mypy"], capture_output=True, check=False).returncode:
        pytest.skip("mypy is not installed (pip install -e '.[dev]')")
    # the cache lives in the (git-ignored) .mypy_cache: a second run takes seconds
    proc = subprocess.run([sys.executable, "-m", "mypy", "-p", "tmequant"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "Success: no issues found" in out
