"""QC flags (issue 15): per-slide `qc_flags` with reasons in the cohort table and the report,
every threshold a `[qc]` parameter; and the per-slide pixel size (`--mpp-override` only for
slides without an MPP, `--mpp-override-all` for every slide) on a two-slide batch through the CLI."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_run_helpers import TILE_PX, write_model, write_slides

from tmequant.cli import main
from tmequant.report.qc import QCParams, qc_params_from_file, slide_qc_flags

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """S1.tif with an MPP (1 um/px), NOMPP.tif without one, and a tiny model."""
    from tmequant.wsi import write_pyramid_tiff

    d = tmp_path_factory.mktemp("qc")
    paths = write_slides(d / "slides")
    t = TILE_PX
    img = np.full((12 * t + 40, 12 * t + 40, 3), 240, np.uint8)
    img[2 * t:10 * t, 2 * t:6 * t] = (200, 90, 160)
    paths["NOMPP"] = write_pyramid_tiff(d / "slides" / "NOMPP.tif", img, None, flavor="tiff",
                                        compression="zlib")
    paths["model"] = write_model(d / "model")
    return paths


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["run", *args, "--workers", "1", "--device", "cpu"])
    return rc, capsys.readouterr().err


# --- per-slide pixel size ---------------------------------------------------------------------

def test_mpp_override_only_for_the_slide_without_one(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    common = [str(inputs["S1"]), str(inputs["NOMPP"]), "--out", str(out), "--model", str(inputs["model"])]
    rc, err = _run(common, capsys)
    assert rc == 1  # NOMPP has no MPP: it fails, S1 finishes
    fail = next(ln for ln in err.splitlines() if "FAILED NOMPP" in ln)
    # the message names the manifest `mpp` column before the option
    assert fail.index("`mpp` column") < fail.index("--mpp-override")

    # following the message: the slide that worked keeps its own MPP and is not redone
    rc, err = _run(common + ["--mpp-override", "1.0"], capsys)
    assert rc == 0, err[-2000:]
    assert "S1: tile: store already made with these parameters" in err
    cohort = pd.read_csv(out / "cohort.csv").set_index("slide_id")
    assert list(cohort.index) == ["NOMPP", "S1"]
    assert cohort.loc["S1", "mpp_source"] == "tiff-resolution"
    assert cohort.loc["NOMPP", "mpp_source"] == "override"
    assert "mpp_override: pixel size 1 um/px given by the user (no pixel size read from the file)" in cohort.loc["NOMPP", "qc_flags"]
    assert "mpp_override" not in str(cohort.loc["S1", "qc_flags"])


def test_mpp_override_all_forces_every_slide(inputs, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = _run([str(inputs["S1"]), str(inputs["NOMPP"]), "--out", str(out), "--model",
                    str(inputs["model"]), "--mpp-override", "0.8", "--mpp-override-all"], capsys)
    assert rc == 0, err[-2000:]
    cohort = pd.read_csv(out / "cohort.csv").set_index("slide_id")
    assert set(cohort["mpp_source"]) == {"override"}
    assert cohort["slide_mpp_um"].tolist() == [0.8, 0.8]
    assert "differs from the file's 1 um/px" in cohort.loc["S1", "qc_flags"]


def test_mpp_override_all_without_a_value_is_a_usage_error(inputs, tmp_path, capsys):
    rc, err = _run([str(inputs["S1"]), "--out", str(tmp_path / "o"), "--model", str(inputs["model"]),
                    "--mpp-override-all"], capsys)
    assert rc == 2 and "--mpp-override-all needs --mpp-override" in err


# --- QC flags -----------------------------------------------------------------------------------

def test_qc_flags_with_thresholds_from_the_params_file(inputs, tmp_path, capsys):
    params = tmp_path / "p.toml"
    # thresholds chosen so that each check fires on these tiny slides (S1: 51 tiles, ~0.2 mm^2)
    params.write_text("[qc]\nmin_tiles = 1000\nmin_tissue_mm2_for_density = 0.01\n"
                      "max_lymphocytes_per_mm2 = 0.001\nmin_lymphocytes_per_mm2 = 0\n"
                      "min_nuclei_per_mm2 = 1e6\nmax_nuclei_per_mm2 = 1e7\nmin_tumor_area_mm2 = 100\n")
    out = tmp_path / "out"
    rc, err = _run([str(inputs["S1"]), "--out", str(out), "--model", str(inputs["model"]),
                    "--params", str(params)], capsys)
    assert rc == 0, err[-2000:]
    flags = pd.read_csv(out / "cohort.csv")["qc_flags"][0]
    codes = [f.split(":", 1)[0] for f in flags.split("; ")]
    assert codes == ["nuclei_density", "lymphocyte_density", "no_tumour", "few_tiles"], flags
    assert "51 tissue tiles (< 1000)" in flags
    html = (out / "report.html").read_text()
    assert "QC flags" in html and "few_tiles" in html and "no_tumour" in html

    # the same slide with the default thresholds (min_tiles 50; density checks need 0.5 mm^2
    # of tissue): none of those flags
    out2 = tmp_path / "out2"
    assert _run([str(inputs["S1"]), "--out", str(out2), "--model", str(inputs["model"])], capsys)[0] == 0
    default = str(pd.read_csv(out2 / "cohort.csv")["qc_flags"][0])
    assert "few_tiles" not in default
    assert "lymphocyte_density" not in default and "nuclei_density" not in default


def test_a_misspelt_qc_key_is_a_usage_error(inputs, tmp_path, capsys):
    params = tmp_path / "p.toml"
    params.write_text("[qc]\nmin_tile = 3\n")
    rc, err = _run([str(inputs["S1"]), "--out", str(tmp_path / "o"), "--model", str(inputs["model"]),
                    "--params", str(params)], capsys)
    assert rc == 2 and "[qc] unknown key 'min_tile'" in err


def test_qc_params_are_ranged_and_documented():
    for f in dataclasses.fields(QCParams):
        assert f.metadata["doc"], f.name
    with pytest.raises(ValueError, match="min_nuclei_per_mm2"):
        QCParams(min_nuclei_per_mm2=10, max_nuclei_per_mm2=5)
    assert qc_params_from_file(None) == QCParams()
    doc = (REPO / "docs" / "biomarkers.md").read_text()
    for f in dataclasses.fields(QCParams):  # every threshold in the user's documentation
        assert f"`{f.name}`" in doc, f.name


def test_slide_qc_flags_on_plain_rows():
    ok = {"tissue_area_mm2": 20.0, "tumor_area_mm2": 5.0, "lymphocytes_total": 20000.0,
          "n_tiles": 800, "mpp_source": "vendor"}
    assert slide_qc_flags(ok) == []
    carcinoma_without_lymphocytes = dict(ok, lymphocytes_total=0.0, tumor_area_mm2=0.0, n_tiles=12)
    codes = [c for c, _ in slide_qc_flags(carcinoma_without_lymphocytes)]
    assert codes == ["lymphocyte_density", "no_tumour", "few_tiles"]
    synthetic = slide_qc_flags(ok, card={"name": "phantom-demo", "domain": "synthetic"})
    assert [c for c, _ in synthetic] == ["model_domain"]


def test_detector_cells_count_as_nuclei_for_the_density_flag():
    row = {"tissue_area_mm2": 9.97, "tumor_area_mm2": 2.0, "lymphocytes_total": 2000.0,
           "n_tiles": 833, "mpp_source": "vendor", "count_source": "model_cells"}
    # 419 cells on 9.97 mm^2 (42 / mm^2): the detector missed the tissue's cells
    codes = [c for c, _ in slide_qc_flags(dict(row, n_cells=419))]
    assert codes == ["nuclei_density"]
    assert slide_qc_flags(dict(row, n_cells=40000)) == []
    # a user's cell table is not a nucleus census: no density flag from it
    assert slide_qc_flags(dict(row, n_cells=419, count_source="cell_table")) == []
