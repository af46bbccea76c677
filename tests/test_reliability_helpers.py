"""Shared helpers of the reliability tests: bad inputs, CLI runs, output-folder checks.

No tests here; imported by tests/test_reliability*.py, test_crash*.py, test_fuzz*.py.
The good slides and the tiny model come from tests/test_run_helpers.py (64 px tiles at 1 um/px).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_run_helpers import write_model, write_slides

REPO = Path(__file__).resolve().parents[1]

__all__ = [
    "REPO", "reference_run", "cli", "cli_subprocess", "corrupt_tiles", "files_outside", "snapshot",
    "stderr_lines", "subprocess_env", "write_model", "write_slides", "write_svs",
]


def write_svs(path: Path, size_px: int = 12 * 64, mpp_um: float | None = 1.0,
              color: tuple[int, int, int] | None = (200, 90, 160), tile_px: int = 64,
              **kw: object) -> Path:
    """An Aperio-like SVS (JPEG tiles) with a tissue-coloured block in the middle half.

    ``color=None``: blank (background only); an RGB colour covering everything when
    ``kw['full']`` is true.
    """
    from tmequant.wsi import write_pyramid_tiff

    full = bool(kw.pop("full", False))
    img = np.full((size_px, size_px, 3), (240, 238, 242), np.uint8)
    if color is not None:
        if full:
            img[:] = color
        else:
            a, b = size_px // 4, 3 * size_px // 4
            img[a:b, a:b] = color
            rng = np.random.default_rng(1)
            for y, x in rng.integers(a + 4, b - 4, (400, 2)):
                img[y - 3:y + 4, x - 3:x + 4] = (60, 30, 110)
    return write_pyramid_tiff(path, img, mpp_um, flavor="svs", tile_px=tile_px, **kw)  # type: ignore[arg-type]


def corrupt_tiles(path: Path, level: int = 0, start_fraction: float = 0.5) -> int:
    """Overwrite the JPEG bytes of the level's tiles from ``start_fraction`` on with zeros.

    The TIFF structure (and so OpenSlide's open) stays intact; decoding those tiles fails.
    Returns the number of tiles corrupted.
    """
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[level]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
    first = int(len(offsets) * start_fraction)
    with open(path, "r+b") as fh:
        for off, n in zip(offsets[first:], counts[first:]):
            fh.seek(off)
            fh.write(b"\x00" * n)
    return len(offsets) - first


def snapshot(root: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file and folder under ``root``, except ``exclude``."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        d = Path(dirpath)
        if exclude is not None and (d == exclude or exclude in d.parents):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            p = d / name
            if exclude is not None and p == exclude:
                continue
            st = p.lstat()
            out[str(p.relative_to(root))] = (st.st_size if not p.is_dir() else 0, st.st_mtime_ns
                                             if not p.is_dir() else 0)
    return out


def files_outside(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> list[str]:
    """Paths that appeared or changed between two snapshots."""
    return sorted(k for k, v in after.items() if before.get(k) != v)


def cli(argv: list[str], capsys: object) -> tuple[int, str, str]:
    """Run ``tmequant`` in-process as a user would: (exit code, stdout, stderr)."""
    from tmequant.cli import main

    rc = main(argv)
    cap = capsys.readouterr()  # type: ignore[attr-defined]
    return rc, cap.out, cap.err


def stderr_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.strip()]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    env.pop("TMEQUANT_FAULT", None)
    env.update(extra)
    return env


def cli_subprocess(argv: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m tmequant ARGV`` in a fresh process (faults, signals, memory)."""
    return subprocess.run([sys.executable, "-m", "tmequant", *argv], capture_output=True, text=True,
                          env=subprocess_env(**env), timeout=timeout)


_REFERENCE: dict[str, Path] = {}
REF_PARAMS = "[tiling]\ntiles_per_shard = 16\ntiles_per_chunk = 4\n"


def run_inputs(factory: object) -> dict[str, Path]:
    """S1, S2, the tiny model and a params file (shards of 16 tiles), once per session."""
    if "inputs" not in _REFERENCE:
        d = factory.mktemp("reference_inputs")  # type: ignore[attr-defined]
        paths = write_slides(d / "slides")
        paths["model"] = write_model(d / "model")
        paths["params"] = d / "params.toml"
        paths["params"].write_text(REF_PARAMS)
        _REFERENCE.update({f"inputs:{k}": v for k, v in paths.items()})
        _REFERENCE["inputs"] = d
    return {k.split(":", 1)[1]: v for k, v in _REFERENCE.items() if k.startswith("inputs:")}


def run_argv(inputs: dict[str, Path], out: Path, *extra: str) -> list[str]:
    """`tmequant run S1 S2` as the crash and determinism tests run it."""
    return ["-q", "run", str(inputs["S1"]), str(inputs["S2"]), "--out", str(out), "--model",
            str(inputs["model"]), "--params", str(inputs["params"]), "--device", "cpu",
            "--workers", "1", *extra]


def reference_run(factory: object) -> Path:
    """The output folder of one uninterrupted `tmequant run` (subprocess), once per session."""
    if "out" not in _REFERENCE:
        inputs = run_inputs(factory)
        out = factory.mktemp("reference_run") / "out"  # type: ignore[attr-defined]
        p = cli_subprocess(run_argv(inputs, out))
        assert p.returncode == 0, p.stderr
        _REFERENCE["out"] = out
    return _REFERENCE["out"]


# Files whose content legitimately differs between runs (start time, the lock's holder).
VOLATILE = {"run.json", ".tmequant.lock", ".tmequant.lock.json"}


def output_files(out: Path) -> dict[str, Path]:
    return {str(p.relative_to(out)): p for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in VOLATILE}


def assert_same_outputs(out: Path, ref: Path) -> None:
    """Same file set and the same bytes; zarr metadata compared as JSON (key order aside)."""
    import json

    got, want = output_files(out), output_files(ref)
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    assert not missing, f"missing: {missing}"
    assert not extra, f"left over (temporary or half-written files): {extra}"
    differ = []
    for rel, p in want.items():
        a, b = got[rel].read_bytes(), p.read_bytes()
        if a == b:
            continue
        if p.name == "zarr.json" and json.loads(a) == json.loads(b):
            continue
        differ.append(rel)
    assert not differ, f"differ from the reference run: {differ}"
