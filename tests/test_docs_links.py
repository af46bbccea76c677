"""The documentation is self-contained (issue 15): every relative link in README.md and docs/*.md
resolves inside the repository (files and #anchors), and docs/biomarkers.md agrees with the code
(every biomarker parameter with its default, every QC threshold, every report column)."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE = re.compile(r"```.*?```|`[^`\n]*`", re.DOTALL)


def _links(text: str) -> list[str]:
    return _LINK.findall(_CODE.sub("", text))


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _CODE.sub("", md.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve_inside_the_repository(doc):
    bad = []
    for link in _links(doc.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link):  # http:, https:, mailto:
            continue
        path, _, anchor = link.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if REPO.resolve() not in target.parents and target != REPO.resolve():
            bad.append(f"{link}: outside the repository")
        elif not target.exists():
            bad.append(f"{link}: no such file")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            bad.append(f"{link}: no heading #{anchor} in {target.name}")
    assert not bad, f"{doc.name}: " + "; ".join(bad)


def test_the_link_check_sees_links():
    text = "[a](docs/x.md) ![img](y.png) `[c](z.md)` [d](https://e.org) [f](#g)"
    assert _links(text) == ["docs/x.md", "https://e.org", "#g"]
    assert "README" in {p.stem for p in DOCS} and (REPO / "docs" / "biomarkers.md") in DOCS
    assert any("docs/biomarkers.md" in _links(d.read_text()) for d in DOCS[:1])  # README links it


def _doc() -> str:
    return (REPO / "docs" / "biomarkers.md").read_text(encoding="utf-8")


def _table_rows(text: str, heading: str) -> dict[str, list[str]]:
    section = text[text.index(heading):]
    section = section[: section.find("\n## ", 1) if "\n## " in section[1:] else len(section)]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-z0-9_]+)`\s*\|(.*)\|\s*$", line)
        if m:
            rows[m.group(1)] = [c.strip() for c in m.group(2).split("|")]
    return rows


def test_every_biomarker_parameter_is_documented_with_its_default():
    from tmequant.biomarkers import BiomarkerParams

    rows = _table_rows(_doc(), "## Parameters and defaults")
    fields = {f.name: f.default for f in dataclasses.fields(BiomarkerParams)}
    assert set(rows) == set(fields)
    for name, default in fields.items():
        shown = rows[name][0].split()[0].replace(",", "")
        if isinstance(default, bool):
            assert shown == str(default).lower(), name
        else:
            assert math.isclose(float(shown), float(default), rel_tol=1e-3), (name, shown, default)


def test_every_qc_threshold_and_report_column_is_documented():
    from tmequant.report.glossary import TERMS
    from tmequant.report.qc import QCParams

    text = _doc()
    for f in dataclasses.fields(QCParams):
        assert re.search(rf"`{f.name}` \(", text), f.name  # named with its default
    for column in TERMS:
        assert f"`{column}`" in text, column
