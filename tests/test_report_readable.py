"""A report a pathologist reads (issue 15), through `tmequant run`: a summary table with human
labels, units and definitions; the phenotype with its reason; one stated colour scale per
cohort; compressed pictures (<= 500 kB of HTML per slide); checked in headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil

import pandas as pd
import pytest
from PIL import Image
from test_report_html import CHROMIUM, _chromium, _non_blank, needs_chromium
from test_run_helpers import write_model, write_slides

from tmequant.cli import main
from tmequant.report.glossary import SUMMARY_COLUMNS, format_cell, header, phenotype_reason, term

MAX_HTML_BYTES_PER_SLIDE = 500_000


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    d = tmp_path_factory.mktemp("readable")
    slides = write_slides(d / "slides")
    model = write_model(d / "model")
    out = d / "out"
    rc = main(["-q", "run", str(slides["S1"]), str(slides["S2"]), "--out", str(out), "--model", str(model),
               "--workers", "1", "--device", "cpu", "--title", "Readable report"])
    assert rc == 0
    return out


def test_summary_table_has_labels_units_and_definitions(report):
    html = (report / "report.html").read_text()
    table = html[html.index('id="cohort-table"'):]
    table = table[: table.index("</table>")]
    heads = re.findall(r'<th[^>]*data-col="([^"]+)"[^>]*>(.*?)</th>', table)
    cols = [c for c, _ in heads]
    assert cols[:2] == ["slide_id", "qc_flags"]
    assert cols[2:] == [c for c in SUMMARY_COLUMNS if c in cols]  # the summary, in reading order
    for col, inner in heads[2:]:
        t = term(col)
        assert f">{t.label}<" in inner and t.definition  # a label, never the raw snake_case name
        if t.unit:
            assert f'<span class="unit">{t.unit}</span>' in inner
    assert "_per_mm2" not in re.sub(r'(data-col|title)="[^"]*"', "", table)
    # footnotes with every shown column's definition, and the colour scale stated
    for col in cols[2:]:
        assert term(col).definition in html
    assert re.search(r"Colour scale: every lymphocyte-density picture of this cohort uses the same "
                     r"scale, 0 to [0-9,]+ lymphocytes/mm²", html)


def test_phenotype_reason_and_number_formats(report):
    html = (report / "report.html").read_text()
    cohort = pd.read_csv(report / "cohort.csv")
    for rec in cohort.to_dict("records"):
        reason = phenotype_reason(rec)
        assert reason.startswith(rec["immune_phenotype"].replace("_", " "))
        assert reason.split(": ", 1)[1] in html  # in the table and the slide's section
        # one format per unit: the same value prints the same way everywhere
        shown = format_cell("tissue_area_mm2", rec["tissue_area_mm2"])
        assert re.fullmatch(r"[0-9,]+\.[0-9]{2}", shown) and f">{shown}<" in html
    assert format_cell("til_density_stromal_per_mm2", 1234.56) == "1,234.6"
    assert format_cell("stil_score_pct", 7.0) == "7.0" and format_cell("tls_count", 3) == "3"
    assert header("til_density_intratumoral_per_mm2") == "Intratumoural TILs (cells/mm²)"


def test_not_evaluable_says_why():
    row = {"immune_phenotype": "not_evaluable", "bulk_area_mm2": 0.0, "tumor_area_mm2": 0.04,
           "param_bulk_min_area_mm2": 1.5}
    assert phenotype_reason(row) == ("not evaluable: no tumour bulk, i.e. no tumour region of at "
                                     "least 1.5 mm² after closing (tumour area 0.04 mm²)")
    row = {"immune_phenotype": "not_evaluable", "bulk_area_mm2": 3.2, "param_phenotype_min_tumor_fraction": 0.2}
    assert "has at least 20% tumour epithelium" in phenotype_reason(row)
    inflamed = {"immune_phenotype": "inflamed", "phenotype_regions_n": 12,
                "phenotype_inflamed_fraction": 0.5, "phenotype_excluded_fraction": 0.25}
    assert phenotype_reason(inflamed) == ("inflamed: regions with ≥ 130 intratumoural TILs/mm² hold "
                                          "50% of the scored tumour (12 tumour regions; ≥ 33% needed)")


def test_pictures_are_compressed_and_small(report):
    html = (report / "report.html").read_text()
    n_slides = 2
    assert len(html.encode()) <= MAX_HTML_BYTES_PER_SLIDE * n_slides
    uris = re.findall(r'src="data:([^;]+);base64,([^"]+)"', html)
    assert len(uris) == 4 * n_slides
    for mime, data in uris:
        assert mime == "image/webp"
        img = Image.open(io.BytesIO(base64.b64decode(data)))
        assert img.format == "WEBP" and img.width >= 600  # legible, not a stamp


@needs_chromium
def test_report_renders_in_chromium(report, tmp_path):
    res = _chromium(["--dump-dom", (report / "report.html").as_uri()], tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", res.stdout).group(1)
    assert 'data-images-ok="true"' in body and 'data-errors="0"' in body
    shot = tmp_path / "shot.png"
    res = _chromium([f"--screenshot={shot}", "--window-size=1280,1400", (report / "report.html").as_uri()],
                    tmp_path)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    _non_blank(shot)
    assert CHROMIUM and shutil.which(CHROMIUM)
