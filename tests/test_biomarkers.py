"""Hand-built grids with exact answers for tmequant.biomarkers (docs/biomarkers.md)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tmequant.biomarkers import (
    BiomarkerParams,
    TileGrid,
    compute_biomarkers,
    counts_from_cells,
    exclusion_ratio,
    morisita_horn,
    stil_score_pct,
    tumor_bulk,
)

# tile 100 um: one tile = 0.01 mm^2; a 100 um disk is a single cell, so morphology is the
# identity and the bulk is exactly the tumour tiles plus enclosed holes.
EXACT = BiomarkerParams(bulk_close_um=100.0, bulk_min_area_mm2=0.0, margin_um=100.0)


def make_grid(roles: np.ndarray, lymph: np.ndarray | None = None, tf: np.ndarray | None = None,
              tile_um: float = 100.0, mpp: float = 0.5, tumor_cells: np.ndarray | None = None) -> TileGrid:
    """Grid from a (R, C) array of role names ('' = no tile) and (R, C) lymphocyte counts."""
    rr, cc = np.nonzero(roles != "")
    names = ["tumor", "stroma", "immune", "necrosis", "other_tissue", "background"]
    probs = {n: (roles[rr, cc] == n).astype(float) for n in names}
    return TileGrid(
        rows=rr, cols=cc, tile_um=tile_um, slide_mpp_um=mpp, role_probs=probs,
        tissue_fraction=np.ones(len(rr)) if tf is None else tf[rr, cc],
        lymphocyte_counts=None if lymph is None else lymph[rr, cc],
        tumor_cell_counts=None if tumor_cells is None else tumor_cells[rr, cc],
        count_source=None if lymph is None else "model",
    )


def square_tumour():
    """30x30 stroma; tumour square rows/cols 10-19 (1 mm^2) with a 2x2 stroma hole at 14-15.

    Lymphocytes: 1 per epithelium tile, 5 per tile of the stroma hole, 2 per tile outside.
    """
    roles = np.full((30, 30), "stroma", dtype=object)
    roles[10:20, 10:20] = "tumor"
    roles[14:16, 14:16] = "stroma"
    lymph = np.full((30, 30), 2.0)
    lymph[10:20, 10:20] = 1.0
    lymph[14:16, 14:16] = 5.0
    return roles, lymph


def test_square_tumour_exact_densities():
    roles, lymph = square_tumour()
    r = compute_biomarkers(make_grid(roles, lymph), params=EXACT).row
    assert r["bulk_area_mm2"] == pytest.approx(1.0)
    assert r["epithelium_area_mm2"] == pytest.approx(0.96)
    assert r["tumor_stroma_area_mm2"] == pytest.approx(0.04)
    assert r["lymphocytes_intratumoral"] == 96 and r["lymphocytes_stromal"] == 20
    assert r["til_density_intratumoral_per_mm2"] == pytest.approx(100.0)
    assert r["til_density_stromal_per_mm2"] == pytest.approx(500.0)
    assert r["exclusion_ratio_stroma_to_tumor"] == pytest.approx(5.0)
    # TIGER: 100 * 20 TILs * 64 um^2 / 40,000 um^2 of stroma
    assert r["stil_score_pct"] == pytest.approx(3.2)
    # margin (100 um either side of the border): the bulk's outer ring (36 tiles, 1 TIL each)
    # and the ring of 44 tiles outside it (2 each); core = the 64 inner tiles.
    assert r["margin_area_mm2"] == pytest.approx(0.80)
    assert r["core_area_mm2"] == pytest.approx(0.64)
    assert r["til_density_margin_per_mm2"] == pytest.approx((36 + 88) / 0.80)
    assert r["til_density_core_per_mm2"] == pytest.approx((60 + 20) / 0.64)
    assert r["exclusion_ratio_margin_to_core"] == pytest.approx(155.0 / 125.0)
    # composition and TSR (stroma / (stroma + tumour) inside the bulk)
    assert r["tissue_area_mm2"] == pytest.approx(9.0)
    assert r["tumor_area_mm2"] == pytest.approx(0.96)
    assert r["tumor_fraction"] == pytest.approx(0.96 / 9.0)
    assert r["tumor_stroma_ratio"] == pytest.approx(0.04)
    assert r["stroma_high"] is False
    assert r["count_source"] == "model"


def test_til_positive_fraction_threshold_inclusive():
    roles, lymph = square_tumour()
    g = make_grid(roles, lymph)
    at = compute_biomarkers(g, params=BiomarkerParams(**{**EXACT.as_dict(), "til_positive_per_mm2": 500.0})).row
    above = compute_biomarkers(g, params=BiomarkerParams(**{**EXACT.as_dict(), "til_positive_per_mm2": 500.01})).row
    assert at["til_positive_tile_fraction"] == pytest.approx(0.04)  # the 4 stroma-hole tiles
    assert above["til_positive_tile_fraction"] == 0.0


def test_cell_table_counts_match_tile_counts():
    roles, lymph = square_tumour()
    g = make_grid(roles, lymph)
    s = g.tile_level0_px
    rng = np.random.default_rng(0)
    rows = []
    for (i, j), n in np.ndenumerate(lymph):
        for _ in range(int(n)):
            rows.append(((j + rng.random()) * s, (i + rng.random()) * s, "Lymphocyte"))
    rows.append((5 * s + 1, 5 * s + 1, "Tumor"))
    rows.append((1e7, 1e7, "Lymphocyte"))  # off the grid
    cells = pd.DataFrame(rows, columns=["x", "y", "class"])
    ly, tu, outside = counts_from_cells(g, cells)
    np.testing.assert_array_equal(ly, g.lymphocyte_counts)
    assert tu.sum() == 1 and outside == 1
    a = compute_biomarkers(g, params=EXACT).row
    b = compute_biomarkers(g, cells=cells, params=EXACT).row
    assert b["count_source"] == "cell_table"
    for k in ("til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2", "stil_score_pct"):
        assert b[k] == pytest.approx(a[k])


def test_default_morphology_drops_small_tumour_and_closes_gaps():
    t = np.zeros((40, 40), bool)
    t[5:25, 5:12] = True
    t[5:25, 13:25] = True  # one-tile (100 um) gap: closed by the 1,000 um disk
    t[32:35, 32:35] = True  # 0.09 mm^2: dropped (< 1.5 mm^2)
    b = tumor_bulk(np.pad(t, 8), 100.0, 1000.0, 1.5)[8:-8, 8:-8]
    assert b[10:20, 12].all()  # gap closed
    assert not b[30:, 30:].any()  # speck removed
    assert not b[:3].any() and not b[:, :3].any()


def test_no_tumour_gives_nan_not_crash():
    roles = np.full((20, 20), "stroma", dtype=object)
    roles[5:8, 5:8] = "tumor"  # 0.09 mm^2: no bulk with the default minimum of 1.5 mm^2
    lymph = np.full((20, 20), 3.0)
    r = compute_biomarkers(make_grid(roles, lymph)).row
    assert r["bulk_area_mm2"] == 0
    for k in ("til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2", "stil_score_pct",
              "exclusion_ratio_stroma_to_tumor", "exclusion_ratio_margin_to_core",
              "til_positive_tile_fraction", "tumor_stroma_ratio", "tls_per_mm2"):
        assert math.isnan(r[k]), k
    assert r["immune_phenotype"] == "not_evaluable" and r["tls_count"] == 0


def test_exclusion_ratio_inf_when_tumour_has_no_tils():
    roles, lymph = square_tumour()
    lymph[10:20, 10:20] = 0.0
    lymph[14:16, 14:16] = 5.0
    r = compute_biomarkers(make_grid(roles, lymph), params=EXACT).row
    assert r["til_density_intratumoral_per_mm2"] == 0.0
    assert r["exclusion_ratio_stroma_to_tumor"] == math.inf
    lymph[14:16, 14:16] = 0.0
    r = compute_biomarkers(make_grid(roles, lymph), params=EXACT).row
    assert math.isnan(r["exclusion_ratio_stroma_to_tumor"])


@pytest.mark.parametrize("num,den,expect", [(5.0, 0.0, math.inf), (0.0, 0.0, math.nan), (0.0, 4.0, 0.0),
                                            (6.0, 3.0, 2.0), (math.nan, 1.0, math.nan), (1.0, math.nan, math.nan)])
def test_exclusion_ratio_rules(num, den, expect):
    got = exclusion_ratio(num, den)
    assert (math.isnan(got) and math.isnan(expect)) or got == expect


def test_stil_score_clipped_and_nan():
    assert stil_score_pct(10_000, 64_000.0) == 100.0
    assert stil_score_pct(10, 64_000.0) == pytest.approx(1.0)
    assert math.isnan(stil_score_pct(3, 0.0))


def test_morisita_horn_checkerboard_and_identical():
    board = (np.add.outer(np.arange(8), np.arange(8)) % 2).ravel().astype(float)
    assert morisita_horn(board, 1 - board) == 0.0
    assert morisita_horn(board * 3, board * 7) == pytest.approx(1.0)
    a = np.array([1.0, 2.0, 3.0])
    assert morisita_horn(a, a) == pytest.approx(1.0)
    # p = (1, 0), q = (.5, .5): 2 * .5 / (1 + .5) = 2/3
    assert morisita_horn(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2 / 3)
    assert math.isnan(morisita_horn(np.zeros(3), a))


def test_morisita_horn_on_grid_checkerboard():
    roles = np.full((10, 10), "stroma", dtype=object)
    board = np.add.outer(np.arange(10), np.arange(10)) % 2 == 0
    tumour_cells = np.where(board, 10.0, 0.0)
    lymph = np.where(board, 0.0, 4.0)
    r = compute_biomarkers(make_grid(roles, lymph, tumor_cells=tumour_cells), params=EXACT).row
    assert r["morisita_horn"] == 0.0 and r["morisita_horn_square_um"] == 100.0
    r = compute_biomarkers(make_grid(roles, tumour_cells / 5, tumor_cells=tumour_cells), params=EXACT).row
    assert r["morisita_horn"] == pytest.approx(1.0)


# --- TLS -------------------------------------------------------------------------------
def tls_slide():
    """40x40 stroma, tumour bulk rows/cols 15-24; immune blobs (40 lymphocytes per tile =
    4,000/mm^2) near the bulk (2 peritumoural), inside it (1 intratumoural), far away,
    too small (one half-covered tile: 5,000 um^2) and too sparse (2,000/mm^2)."""
    roles = np.full((40, 40), "stroma", dtype=object)
    lymph = np.zeros((40, 40))
    tf = np.ones((40, 40))
    roles[15:25, 15:25] = "tumor"
    blobs = {"near": (slice(10, 12), slice(10, 12)), "below": (slice(27, 29), slice(18, 20)),
             "inside": (slice(19, 21), slice(19, 21)), "far": (slice(0, 2), slice(38, 40)),
             "sparse": (slice(30, 32), slice(30, 32))}
    for name, sl in blobs.items():
        roles[sl] = "immune"
        lymph[sl] = 20.0 if name == "sparse" else 40.0
    roles[12, 30] = "immune"
    tf[12, 30] = 0.5
    lymph[12, 30] = 20.0  # 4,000/mm^2 but 5,000 um^2 < 6,000 um^2
    return roles, lymph, tf


def test_tls_count_location_and_table():
    roles, lymph, tf = tls_slide()
    res = compute_biomarkers(make_grid(roles, lymph, tf), params=EXACT)
    r, tls = res.row, res.tls
    assert r["tls_count"] == 3
    assert r["tls_intratumoral_count"] == 1 and r["tls_peritumoral_count"] == 2
    assert set(tls["area_um2"]) == {40_000.0}
    assert np.allclose(tls["mean_density_per_mm2"], 4000.0)
    near = tls[(tls["centroid_x_um"] - 1100.0).abs() < 1e-6]  # cols 10-11 -> centre at 11 tiles
    assert len(near) == 1 and near["centroid_y_px"].iloc[0] == pytest.approx(2200.0)  # 11 * 200 px
    assert set(np.unique(res.tls_labels)) == {0, 1, 2, 3}
    # bulk + margin: 10x10 bulk plus 44-tile ring at 100 um margin = 1.44 mm^2
    assert r["tls_per_mm2"] == pytest.approx(3 / 1.44)


def test_tls_distance_and_probability_thresholds():
    roles, lymph, tf = tls_slide()
    g = make_grid(roles, lymph, tf)
    close = compute_biomarkers(g, params=BiomarkerParams(**{**EXACT.as_dict(), "tls_max_distance_um": 300.0})).row
    assert close["tls_count"] == 2  # 'near' has a gap of ~466 um
    loose = compute_biomarkers(g, params=BiomarkerParams(**{**EXACT.as_dict(), "tls_min_density_per_mm2": 2000.0})).row
    assert loose["tls_count"] == 4  # the sparse blob joins
    nothing = compute_biomarkers(make_grid(np.where(roles == "tumor", "stroma", roles), lymph, tf), params=EXACT).row
    assert nothing["tls_count"] == 0  # no tumour: lymphoid aggregates are not TLS


# --- immune phenotype ------------------------------------------------------------------
def phenotype_slide(kinds: list[str], it_scale: float = 1.0):
    """3x3 regions of 10x10 tiles (1 mm^2 each): a tumour ring (36 tiles, 0.36 mm^2)
    around stroma (64 tiles, 0.64 mm^2). 'inflamed': intratumoural density exactly 130/mm^2;
    'excluded': 0 intratumoural, stromal exactly 260/mm^2; 'desert': neither."""
    roles = np.full((30, 30), "stroma", dtype=object)
    lymph = np.zeros((30, 30))
    for k, kind in enumerate(kinds):
        r0, c0 = 10 * (k // 3), 10 * (k % 3)
        roles[r0:r0 + 10, c0:c0 + 10] = "tumor"
        roles[r0 + 1:r0 + 9, c0 + 1:c0 + 9] = "stroma"
        if kind == "inflamed":
            lymph[r0, c0] = 130.0 * 0.36 * it_scale
        elif kind == "excluded":
            lymph[r0 + 4, c0 + 4] = 260.0 * 0.64 * it_scale
    return make_grid(roles, lymph)


@pytest.mark.parametrize("kinds,label", [
    (["inflamed"] * 3 + ["excluded"] * 3 + ["desert"] * 3, "inflamed"),
    (["inflamed"] * 2 + ["excluded"] * 4 + ["desert"] * 3, "excluded"),
    (["inflamed"] * 2 + ["excluded"] * 2 + ["desert"] * 5, "desert"),
    (["inflamed"] * 2 + ["excluded"] * 3 + ["desert"] * 4, "excluded"),
])
def test_phenotype_rules(kinds, label):
    r = compute_biomarkers(phenotype_slide(kinds), params=EXACT).row
    assert r["phenotype_regions_n"] == 9
    assert r["immune_phenotype"] == label
    assert r["phenotype_inflamed_fraction"] == pytest.approx(kinds.count("inflamed") / 9)
    assert r["phenotype_excluded_fraction"] == pytest.approx(kinds.count("excluded") / 9)
    assert r["phenotype_desert_fraction"] == pytest.approx(kinds.count("desert") / 9)


def test_phenotype_threshold_boundaries():
    kinds = ["inflamed"] * 3 + ["excluded"] * 3 + ["desert"] * 3
    just_below = compute_biomarkers(phenotype_slide(kinds, it_scale=0.999), params=EXACT).row
    assert just_below["phenotype_inflamed_fraction"] == 0.0
    assert just_below["phenotype_excluded_fraction"] == 0.0
    assert just_below["immune_phenotype"] == "desert"
    p = BiomarkerParams(**{**EXACT.as_dict(), "phenotype_min_tumor_fraction": 0.37})
    assert compute_biomarkers(phenotype_slide(kinds), params=p).row["immune_phenotype"] == "not_evaluable"


def test_area_estimate_when_no_counts():
    roles, _ = square_tumour()
    roles[14:16, 14:16] = "immune"
    r = compute_biomarkers(make_grid(roles), params=EXACT).row
    assert r["count_source"] == "area_estimate"
    assert r["lymphocytes_stromal"] == pytest.approx(0.04 * 6000)
    assert r["til_density_stromal_per_mm2"] == pytest.approx(6000.0)


def test_row_carries_params_and_hash():
    roles, lymph = square_tumour()
    a = compute_biomarkers(make_grid(roles, lymph), params=EXACT).row
    b = compute_biomarkers(make_grid(roles, lymph), params=BiomarkerParams()).row
    assert a["params_hash"] != b["params_hash"]
    assert a["param_margin_um"] == 100.0 and b["param_margin_um"] == 500.0
    assert b["param_area_estimate_per_mm2"] == 6000.0
    for k in ("slide_id", "slide_mpp_um", "mpp_source", "tile_um", "model_name", "model_version",
              "package_version", "count_source", "source_fingerprint"):
        assert k in a


def test_params_validation():
    with pytest.raises(ValueError, match="margin_um"):
        BiomarkerParams(margin_um=-1)
    with pytest.raises(ValueError, match="tls_prob"):
        BiomarkerParams(tls_prob=1.5)
