"""docs/api.md cannot rot: its ```python blocks run, in order, in a fresh folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tmequant as tq

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _blocks(path: Path) -> list[tuple[int, str]]:
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 2, m.group(1)) for m in FENCE.finditer(text)]


def test_every_public_name_is_documented_with_an_example():
    text = (DOCS / "api.md").read_text()
    code = "\n".join(b for _, b in _blocks(DOCS / "api.md"))
    for name in tq.__all__:
        if name == "__version__":
            continue
        assert f"`{name}`" in text or f"`{name}(" in text, f"docs/api.md does not describe {name}"
        assert re.search(rf"\b(tq\.)?{name}\b", code), f"docs/api.md has no example using {name}"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_api_examples_run(tmp_path, monkeypatch, capsys):
    import fsspec

    monkeypatch.chdir(tmp_path)
    blocks = _blocks(DOCS / "api.md")
    assert len(blocks) >= 10
    ns: dict[str, object] = {"__name__": "__docs__"}
    try:
        for line, src in blocks:
            # compiled with the doc's line numbers: a failure points at docs/api.md:<line>
            code = compile("\n" * (line - 1) + src, str(DOCS / "api.md"), "exec")
            exec(code, ns)  # noqa: S102 - running the documented examples is the test
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists("/example"):
            fs.rm("/example", recursive=True)
    out = capsys.readouterr().out
    assert "vendor" in out  # the examples' own prints ran
