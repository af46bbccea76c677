"""Property tests (hypothesis) of compute_biomarkers: invariances and ranges."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tmequant.biomarkers import BiomarkerParams, TileGrid, compute_biomarkers

ROLES = ["tumor", "stroma", "immune", "necrosis", "other_tissue", "background"]
# small disks and areas so that random 14x14 grids have a bulk, a margin and TLS candidates
PARAMS = BiomarkerParams(bulk_close_um=300.0, bulk_min_area_mm2=0.05, margin_um=150.0,
                         phenotype_region_mm2=0.16, mh_cell_um=100.0, tls_min_density_per_mm2=2000.0)


@st.composite
def grids(draw):
    n = draw(st.integers(6, 14))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # blocky tumour so that a bulk survives the morphology
    coarse = rng.random((n // 2 + 1, n // 2 + 1)) < 0.5
    tumour = np.kron(coarse, np.ones((2, 2), bool))[:n, :n]
    logits = rng.normal(size=(6, n, n))
    logits[0] += 4 * tumour
    p = np.exp(logits) / np.exp(logits).sum(0)
    keep = rng.random((n, n)) < 0.9
    rr, cc = np.nonzero(keep)
    return TileGrid(
        rows=rr, cols=cc, tile_um=100.0, slide_mpp_um=0.5,
        role_probs={r: p[i][rr, cc] for i, r in enumerate(ROLES)},
        tissue_fraction=rng.uniform(0.2, 1.0, len(rr)),
        lymphocyte_counts=rng.poisson(rng.choice([1.0, 30.0]), len(rr)).astype(float),
        tumor_cell_counts=rng.poisson(10.0, len(rr)).astype(float), count_source="model")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


COMPOSITION = {f"{r}_fraction" for r in ROLES}
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(grids(), st.integers(0, 2**31 - 1))
def test_permuting_tiles_changes_nothing(g, seed):
    perm = np.random.default_rng(seed).permutation(g.n_tiles)
    h = TileGrid(rows=g.rows[perm], cols=g.cols[perm], tile_um=g.tile_um, slide_mpp_um=g.slide_mpp_um,
                 role_probs={k: v[perm] for k, v in g.role_probs.items()},
                 tissue_fraction=g.tissue_fraction[perm], lymphocyte_counts=g.lymphocyte_counts[perm],
                 tumor_cell_counts=g.tumor_cell_counts[perm], count_source="model")
    a, b = compute_biomarkers(g, params=PARAMS), compute_biomarkers(h, params=PARAMS)
    for k in a.row:
        assert _same(a.row[k], b.row[k]), k
    np.testing.assert_array_equal(a.lymphocyte_density_per_mm2[perm], b.lymphocyte_density_per_mm2)
    assert len(a.tls) == len(b.tls)
    assert np.allclose(np.sort(a.tls["area_um2"].to_numpy()), np.sort(b.tls["area_um2"].to_numpy()))


@SETTINGS
@given(grids())
def test_doubling_mpp_quadruples_areas_and_quarters_densities(g):
    """Same pixels at twice the MPP: every length doubles. Length parameters scale with it
    (else the morphology sees a different tumour); areas x4, densities /4, counts equal."""
    p2 = BiomarkerParams(**{**PARAMS.as_dict(), "bulk_close_um": 2 * PARAMS.bulk_close_um,
                            "bulk_min_area_mm2": 4 * PARAMS.bulk_min_area_mm2, "margin_um": 2 * PARAMS.margin_um,
                            "phenotype_region_mm2": 4 * PARAMS.phenotype_region_mm2,
                            "mh_cell_um": 2 * PARAMS.mh_cell_um})
    h = TileGrid(rows=g.rows, cols=g.cols, tile_um=2 * g.tile_um, slide_mpp_um=2 * g.slide_mpp_um,
                 role_probs=g.role_probs, tissue_fraction=g.tissue_fraction,
                 lymphocyte_counts=g.lymphocyte_counts, tumor_cell_counts=g.tumor_cell_counts,
                 count_source="model")
    a, b = compute_biomarkers(g, params=PARAMS).row, compute_biomarkers(h, params=p2).row
    for k in a:
        if k.endswith("_area_mm2") and not k.startswith("tls_"):  # TLS: absolute density threshold
            assert _same(4 * a[k], b[k]), k
        elif k.startswith("til_density_"):
            assert _same(a[k] / 4, b[k]), k
        elif k.startswith("lymphocytes_") or k in COMPOSITION or k in ("morisita_horn", "tumor_stroma_ratio"):
            # density thresholds (phenotype, TIL-positive) are absolute, so those may change
            assert _same(a[k], b[k]), k
    assert b["tile_level0_px"] == a["tile_level0_px"]


@SETTINGS
@given(grids())
def test_ranges(g):
    res = compute_biomarkers(g, params=PARAMS)
    r = res.row
    for k, v in r.items():
        if k.startswith(("lymphocytes_", "tls_")) and isinstance(v, (int, float)) and not math.isnan(v):
            assert v >= 0, k
        if k.endswith("_fraction") and not k.startswith("param_") and not math.isnan(v):
            assert 0.0 <= v <= 1.0, k
    for k in ("morisita_horn", "tumor_stroma_ratio", "stil_score_pct"):
        v = r[k]
        assert math.isnan(v) or 0.0 <= v <= (100.0 if k == "stil_score_pct" else 1.0), k
    assert (np.nan_to_num(res.lymphocyte_density_per_mm2) >= 0).all()
    assert r["tls_count"] == r["tls_intratumoral_count"] + r["tls_peritumoral_count"]
    fr = [r[f"phenotype_{x}_fraction"] for x in ("inflamed", "excluded", "desert")]
    assert all(math.isnan(f) for f in fr) or math.isclose(sum(fr), 1.0)
    comp = res.compartments
    assert not (comp.core & comp.margin).any() and not (comp.core & ~comp.bulk).any()
