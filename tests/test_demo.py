"""End-to-end: phantom slides of every scenario through the whole pipeline with the shipped
``phantom-demo`` model, compared with the phantoms' truth (``tmequant demo``).

One module-scoped run of :func:`tmequant.demo.run_demo` (three 4.2 x 3.5 mm phantoms) feeds
every end-to-end test; the expected values are read from each phantom's ``truth.json`` (from
the phantom's construction, never from the biomarkers module), the measured ones from the
files the pipeline wrote.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tmequant.demo import CHECKS, DEMO_SCENARIOS, Tolerance, compare, run_demo

SCENARIOS = list(DEMO_SCENARIOS)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    out = tmp_path_factory.mktemp("demo")
    threads = torch.get_num_threads()
    res = run_demo(out, SCENARIOS, seed=0, progress=False, cache=tmp_path_factory.mktemp("cache"))
    assert torch.get_num_threads() == threads  # the demo's one thread is not left behind
    # a later test reruns the demo into this folder: keep what the first run said
    _FIRST_RUN["demo.json"] = json.loads((out / "demo.json").read_text())
    return res


_FIRST_RUN: dict = {}


def _truth(demo, scenario: str) -> dict:
    s = next(s for s in demo.scenarios if s.scenario == scenario)
    return json.loads((s.slide_path.with_name(s.slide_path.stem + ".truth") / "truth.json").read_text())


def _measured(demo, scenario: str) -> dict:
    s = next(s for s in demo.scenarios if s.scenario == scenario)
    return json.loads((demo.out_dir / "results" / s.slide_id / "biomarkers.json").read_text())


def _f(v) -> float:
    return float(v)  # truth.json keeps inf/nan as strings: float() reads both


# --- the required agreement ---------------------------------------------------------------

@pytest.mark.slow
def test_every_slide_ran(demo):
    assert demo.failures == []
    assert [s.scenario for s in demo.scenarios] == SCENARIOS


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_phantom_truth_has_the_scenario_phenotype(demo, scenario):
    # the phantom itself: its truth lands on the phenotype it is named after
    assert _truth(demo, scenario)["expected"]["immune_phenotype"] == scenario


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_phenotype_exact(demo, scenario):
    assert _measured(demo, scenario)["immune_phenotype"] == _truth(demo, scenario)["expected"]["immune_phenotype"]


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tls_count_exact(demo, scenario):
    t, m = _truth(demo, scenario)["expected"], _measured(demo, scenario)
    assert int(m["tls_count"]) == int(t["tls_count"]), (m["tls_count"], t["tls_count"])


def _checked_truth(demo, scenario: str) -> dict:
    return next(s for s in demo.scenarios if s.scenario == scenario).truth


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_truth_comes_from_the_construction(demo, scenario):
    # what the checks compare with is truth.json's construction truth; recomputed here from
    # the spec it is the same; the densities as drawn are reported alongside
    from tmequant.demo import DEMO_SIZE_UM
    from tmequant.phantom import construction_truth, make_layout, scenario_spec

    s = next(s for s in demo.scenarios if s.scenario == scenario)
    tj = _truth(demo, scenario)
    assert tj["truth_source"] == "construction" and s.truth == tj["expected"]
    spec = scenario_spec(scenario, seed=0, width_px=round(DEMO_SIZE_UM[0] / 0.5),
                         height_px=round(DEMO_SIZE_UM[1] / 0.5))
    assert tj["spec"]["width_px"] == spec.width_px and tj["generator"]
    ct = construction_truth(make_layout(spec))
    assert (s.truth["immune_phenotype"], s.truth["tls_count"]) == (ct.row["immune_phenotype"], ct.row["tls_count"])
    for k in ("tumor_area_mm2", "til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2"):
        assert _f(s.truth[k]) == pytest.approx(ct.row[k], rel=1e-9), k
    placed = {c.biomarker: c.placed for c in s.checks}
    assert placed["til_density_stromal_per_mm2"] == pytest.approx(ct.placed["til_density_stromal_per_mm2"])
    assert _FIRST_RUN["demo.json"]["phantoms"][scenario]["from"] == "written"


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("key", ["til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2"])
def test_til_density_within_15_percent(demo, scenario, key):
    t, m = _f(_checked_truth(demo, scenario)[key]), _f(_measured(demo, scenario)[key])
    # 15% of truth; near zero (desert nests, ~10 cells/mm^2) 15 cells/mm^2, a tenth of the
    # inflamed threshold (see tmequant.demo.CHECKS)
    assert abs(m - t) <= max(0.15 * t, 15.0), f"{scenario} {key}: measured {m:.1f}, truth {t:.1f}"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_tumor_area_within_10_percent(demo, scenario):
    t = _f(_truth(demo, scenario)["expected"]["tumor_area_mm2"])
    m = _f(_measured(demo, scenario)["tumor_area_mm2"])
    assert abs(m - t) <= 0.10 * t, f"{scenario}: measured {m:.3f} mm^2, truth {t:.3f} mm^2"


@pytest.mark.slow
def test_demo_verdict_matches_the_checks(demo):
    assert demo.ok
    for s in demo.scenarios:
        req = {c.biomarker for c in s.checks if c.required}
        assert req == {k for k, v in CHECKS.items() if v.required}


# --- the outputs of a real run -----------------------------------------------------------

@pytest.mark.slow
def test_writes_the_outputs_of_a_real_run(demo):
    out = demo.out_dir
    cohort = pd.read_csv(out / "cohort.csv")
    ids = sorted(s.slide_id for s in demo.scenarios)
    assert sorted(cohort["slide_id"]) == ids
    assert (cohort["model_name"] == "phantom-demo").all()
    assert (cohort["count_source"] == "nucleus_counter").all()
    assert (out / "report.html").stat().st_size > 10_000
    for sid in ids:
        gj = list((out / "results" / sid).glob("*.geojson*"))
        assert gj, f"no GeoJSON for {sid}"
    checks = pd.read_csv(out / "demo_checks.csv")
    assert set(checks["slide_id"]) == set(ids)
    assert json.loads((out / "demo.json").read_text())["ok"] is True


@pytest.mark.slow
def test_cli_rerun_reuses_everything_and_prints_the_table(demo, capsys):
    from tmequant.cli import main

    rc = main(["demo", "--out", str(demo.out_dir), "--no-cache"])
    out = capsys.readouterr().out
    assert rc == 0
    for s in SCENARIOS:
        assert s in out
    assert "til_density_intratumoral_per_mm2" in out and "demo: PASS" in out
    run = json.loads((demo.out_dir / "run.json").read_text())
    assert run  # the rerun rewrote the run record
    phantoms = json.loads((demo.out_dir / "demo.json").read_text())["phantoms"]
    assert {v["from"] for v in phantoms.values()} == {"out_dir"}  # nothing was written again


def test_stores_of_a_replaced_phantom_are_seen_as_stale(demo):
    # an older demo's stores (made from another file of the same name) are redone, not failed on
    from tmequant.demo import _stale_store

    a, b = demo.scenarios[0], demo.scenarios[1]
    assert not _stale_store(demo.out_dir, a.slide_id, a.slide_path)
    assert _stale_store(demo.out_dir, a.slide_id, b.slide_path)  # another file: stale
    assert not _stale_store(demo.out_dir, "no-such-slide", a.slide_path)


def test_cli_unknown_scenario_is_a_usage_error(tmp_path, capsys):
    from tmequant.cli import main

    rc = main(["demo", "--out", str(tmp_path), "--scenarios", "inflamed,weird"])
    assert rc == 2
    assert "weird" in capsys.readouterr().err


# --- the shipped model -------------------------------------------------------------------

def test_shipped_model_card_is_honest_and_small():
    from tmequant.models import get_card, list_models, load_model

    card, source = get_card("phantom-demo")
    assert "phantom-demo" in [m.name for m in list_models()]
    assert "phantoms only" in card.description and "synthetic" in card.description
    assert card.tile_px * card.mpp_um == pytest.approx(112.0)  # the truth's grid pitch
    assert not card.has_count_head  # lymphocytes come from the nucleus counter
    assert set(card.tissue_roles.values()) == {"background", "tumor", "stroma", "immune", "necrosis",
                                               "other_tissue"}
    held_out = card.metrics["test"]  # a phantom the model never saw
    assert held_out["accuracy"] > 0.9 and held_out["balanced_accuracy"] > 0.7
    weights = Path(source) / "model.safetensors"
    assert weights.stat().st_size < 2_000_000
    loaded = load_model("phantom-demo")
    p = next(loaded.model.parameters())
    assert p.dtype.is_floating_point and p.dtype.itemsize == 4  # fp16 on disk, fp32 in memory


# --- the comparison rules ------------------------------------------------------------------

def test_tolerance_rules():
    rel = Tolerance("rel", rel=0.15, floor=15.0)
    assert rel.passes(114.0, 100.0) and not rel.passes(116.0, 100.0)
    assert rel.passes(24.0, 10.0) and not rel.passes(26.0, 10.0)  # the floor near zero
    assert rel.passes(math.inf, "inf") and not rel.passes(5.0, "inf")
    assert rel.passes(math.nan, "nan") and not rel.passes(0.0, "nan")
    ex = Tolerance("exact")
    assert ex.passes("excluded", "excluded") and not ex.passes("desert", "excluded")
    assert ex.passes(np.int64(2), 2.0) and not ex.passes(3, 2)
    assert Tolerance("abs", abs=0.05).passes(0.44, 0.4) and not Tolerance("abs", abs=0.05).passes(0.46, 0.4)


def test_compare_fails_a_missing_biomarker_and_skips_unknown_truth():
    truth = {"tls_count": 2, "tumor_area_mm2": 3.0, "tissue_area_mm2": 10.0, "other_tissue_area_mm2": 1.0}
    checks = {c.biomarker: c for c in compare(truth, {"tls_count": 2, "tissue_area_mm2": 8.5,
                                                     "other_tissue_area_mm2": 0.0})}
    assert checks["tls_count"].passed
    assert not checks["tumor_area_mm2"].passed  # missing from the measured row
    assert checks["tissue_area_excl_fat_mm2"].truth == 9.0
    assert checks["tissue_area_excl_fat_mm2"].passed  # 8.5 vs 9: within 10%
    assert "immune_phenotype" not in checks  # not in the truth: not compared
