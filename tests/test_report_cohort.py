"""The cohort writer: tables, TLS table, pictures and report from real BiomarkerResults."""

from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest

biomarkers = pytest.importorskip("tmequant.biomarkers")

from tmequant.batch import Failure
from tmequant.report.cohort import (
    SlideOutcome,
    cohort_density_vmax,
    safe_name,
    write_cohort_report,
)
from tmequant.report.html import IMAGE_MIME
from tmequant.report.slide import FIGURES

NAMES = ["TUM", "STR", "LYM"]
ROLES = {"TUM": "tumor", "STR": "stroma", "LYM": "immune"}


class _Group(dict):
    def __init__(self, attrs, **arrays):
        super().__init__(arrays)
        self.attrs = attrs


def _outcome(slide_id: str, n_tls: int, seed: int) -> SlideOutcome:
    """A fake store (the attributes SlideStore has) and a real BiomarkerResult for it:
    an elliptic tumour in stroma, with ``n_tls`` dense lymphoid blobs next to it."""
    rng = np.random.default_rng(seed)
    R, C = 36, 48
    rc = np.argwhere(np.ones((R, C), bool))
    r, c = rc[:, 0], rc[:, 1]
    tum = ((r - 18) / 8) ** 2 + ((c - 24) / 10) ** 2 < 1
    probs = np.where(tum[:, None], [0.9, 0.07, 0.03], [0.05, 0.9, 0.05]).astype(np.float32)
    counts = rng.poisson(4, len(rc)).astype(float)
    for k in range(n_tls):  # 2x2-tile blobs just outside the tumour
        blob = (r // 2 == 3 + 2 * k) & (c // 2 == 4)
        probs[blob] = [0.02, 0.03, 0.95]
        counts[blob] = 80.0
    tile_um, mpp = 112.0, 0.5
    grid = biomarkers.TileGrid(
        rows=r, cols=c, tile_um=tile_um, slide_mpp_um=mpp,
        role_probs={ROLES[n]: probs[:, i] for i, n in enumerate(NAMES)},
        tissue_fraction=np.ones(len(rc)), lymphocyte_counts=counts, count_source="model",
        metadata={"slide_id": slide_id, "model_name": "m"},
    )
    result = biomarkers.compute_biomarkers(grid)
    l0 = tile_um / mpp
    ds = 64.0
    h, w = int(R * l0 / ds), int(C * l0 / ds)
    attrs = {"card": {"name": "m", "tissue_classes": NAMES, "tissue_roles": ROLES}}
    store = types.SimpleNamespace(
        slide_id=slide_id, thumbnail=np.full((h, w, 3), 225, np.uint8),
        tissue_mask=np.ones((h, w), bool), grid=rc.astype(np.int32), mask_downsample=ds,
        slide_mpp_um=mpp, tile_level0_px=l0,
        predictions=lambda name: _Group(attrs, tissue_probs=probs),
        tissue_probs=lambda name: probs,  # SlideStore.tissue_probs
        prediction_card=lambda name: attrs["card"],  # SlideStore.prediction_card
    )
    return SlideOutcome(store=store, model_name="m", result=result)


@pytest.fixture(scope="module")
def outcomes():
    return [_outcome("b-slide", 2, 0), _outcome("a-slide", 1, 1)]


def test_writes_tables_pictures_and_report(outcomes, tmp_path):
    fails = [Failure("c-slide", "predict", "ModelError: bad card")]
    out = write_cohort_report(tmp_path, outcomes, fails)
    cohort = pd.read_parquet(out.cohort_parquet)
    assert list(cohort["slide_id"]) == ["a-slide", "b-slide"]
    assert cohort.columns[0] == "slide_id" and "til_density_stromal_per_mm2" in cohort
    tls = pd.read_csv(out.tls_csv)
    expected = {o.store.slide_id: int(o.result.row["tls_count"]) for o in outcomes}
    assert sum(expected.values()) > 0
    assert tls.groupby("slide_id").size().to_dict() == {k: v for k, v in expected.items() if v}
    for sid in expected:
        assert sorted(p.stem for p in out.figures[sid].values()) == sorted(FIGURES)
        assert all(p.is_file() for p in out.figures[sid].values())
    html = out.report_html.read_text()
    assert html.count(f"data:{IMAGE_MIME};base64,") == 2 * len(FIGURES)
    assert "ModelError: bad card" in html and not out.slide_pages


def test_large_cohort_gets_one_page_per_slide(outcomes, tmp_path):
    out = write_cohort_report(tmp_path, outcomes, [], inline_max_slides=1)
    html = out.report_html.read_text()
    assert f"data:{IMAGE_MIME}" not in html  # the cohort page stays light
    for page in out.slide_pages.values():
        assert f'href="slides/{page.name}"' in html
        text = page.read_text()
        assert text.count(f"data:{IMAGE_MIME};base64,") == len(FIGURES)
        assert 'href="../report.html"' in text and "Failures" not in text


def test_a_picture_failure_does_not_fail_the_cohort(outcomes, tmp_path):
    bad = _outcome("z-slide", 0, 2)
    bad.store.prediction_card = lambda name: (_ for _ in ()).throw(KeyError("no predictions"))
    out = write_cohort_report(tmp_path, [*outcomes, bad], [])
    assert out.figures["z-slide"] == {}
    assert "pictures not drawn: KeyError" in out.report_html.read_text()
    assert len(pd.read_csv(out.cohort_csv)) == 3


def test_shared_density_scale_and_safe_names():
    assert cohort_density_vmax([np.array([0.0, 50.0])]) == 100.0
    assert cohort_density_vmax([np.arange(1000.0), np.array([np.nan, np.inf])]) == pytest.approx(
        np.percentile(np.arange(1000.0), 99))
    assert safe_name("TCGA-01.svs_1") == "TCGA-01.svs_1"
    assert safe_name("../etc") != "../etc" and "/" not in safe_name("a/b")
