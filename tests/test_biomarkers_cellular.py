"""Cell-resolution epithelium / stroma split (tmequant/biomarkers/cellular.py) on hand-built
cell tables whose answers are hand counts over hand areas.

Geometry: 100 um tiles at 1 um/px (level-0 px = um), a 6 x 6 grid of tumour-role tiles (so the
tile path calls all 0.36 mm^2 epithelium), 10 um fine pixels. Every fine pixel holds one
non-lymphocyte nucleus at its centre: a tumour cell inside the nest rectangle, a fibroblast
outside. The nest edges lie on fine-pixel edges, so with a narrow smoothing (sigma 5 um) the
epithelium is exactly the nest and the expected densities are exact.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tmequant.biomarkers import BiomarkerParams, TileGrid, compute_biomarkers

TILE_UM = 100.0
SIDE = 6  # tiles per side
BULK = {"bulk_close_um": 100.0, "bulk_min_area_mm2": 0.0, "margin_um": 100.0}  # bulk = tumour tiles
DEFAULT = BiomarkerParams(**BULK)  # default cell-compartment parameters
FINE = BiomarkerParams(**BULK, cell_compartment_um=10.0, cell_sigma_um=5.0, cell_share_prior_per_mm2=0.0)


def tumour_grid(tissue_fraction: float = 1.0) -> TileGrid:
    rr, cc = np.mgrid[0:SIDE, 0:SIDE].reshape(2, -1)
    return TileGrid(rows=rr, cols=cc, tile_um=TILE_UM, slide_mpp_um=1.0,
                    role_probs={"tumor": np.ones(rr.size)},
                    tissue_fraction=np.full(rr.size, tissue_fraction))


def nest_cells(x0: float, x1: float, y0: float, y1: float, n_in: int, n_out: int,
               seed: int = 0, out_box: tuple[float, float, float, float] | None = None) -> pd.DataFrame:
    """One nucleus per 10 um pixel (tumour in [x0, x1) x [y0, y1), fibroblast elsewhere), plus
    ``n_in`` lymphocytes in the nest and ``n_out`` outside it (inside ``out_box`` if given)."""
    rng = np.random.default_rng(seed)
    c = np.arange(5.0, SIDE * TILE_UM, 10.0)
    xx, yy = [a.ravel() for a in np.meshgrid(c, c)]
    in_nest = (xx >= x0) & (xx < x1) & (yy >= y0) & (yy < y1)
    lx = rng.uniform(x0 + 0.5, x1 - 0.5, n_in)
    ly = rng.uniform(y0 + 0.5, y1 - 0.5, n_in)
    bx0, bx1, by0, by1 = out_box or (0.0, SIDE * TILE_UM, 0.0, SIDE * TILE_UM)
    ox, oy = [], []
    while len(ox) < n_out:  # rejection sampling outside the nest
        x, y = rng.uniform(bx0 + 0.5, bx1 - 0.5), rng.uniform(by0 + 0.5, by1 - 0.5)
        if not (x0 - 1 <= x < x1 + 1 and y0 - 1 <= y < y1 + 1):
            ox.append(x)
            oy.append(y)
    return pd.DataFrame({
        "x": np.concatenate([xx, lx, ox]), "y": np.concatenate([yy, ly, oy]),
        "class": np.concatenate([np.where(in_nest, "Tumor", "Fibroblast"),
                                 ["Lymphocyte"] * (n_in + n_out)]),
    })


def test_nest_across_tiles_exact_densities():
    # nest 200 x 140 um straddling four tiles; 7 lymphocytes inside, 11 in the stroma
    cells = nest_cells(150, 350, 120, 260, n_in=7, n_out=11)
    res = compute_biomarkers(tumour_grid(), cells=cells, params=FINE)
    r = res.row
    nest_mm2, bulk_mm2 = 200 * 140 / 1e6, 0.36
    assert r["compartment_resolution"] == "cell"
    assert r["epithelium_area_mm2"] == pytest.approx(nest_mm2)
    assert r["tumor_stroma_area_mm2"] == pytest.approx(bulk_mm2 - nest_mm2)
    assert (r["lymphocytes_intratumoral"], r["lymphocytes_stromal"]) == (7, 11)
    assert r["til_density_intratumoral_per_mm2"] == pytest.approx(7 / nest_mm2)
    assert r["til_density_stromal_per_mm2"] == pytest.approx(11 / (bulk_mm2 - nest_mm2))
    assert r["stil_score_pct"] == pytest.approx(100 * 11 * 64 / ((bulk_mm2 - nest_mm2) * 1e6))
    assert r["exclusion_ratio_stroma_to_tumor"] == pytest.approx((11 / 0.332) / (7 / 0.028))
    # the tile path sees one epithelium of 0.36 mm^2 holding all 18 lymphocytes
    t = compute_biomarkers(tumour_grid(), cells=cells,
                           params=BiomarkerParams(**{**FINE.as_dict(), "cell_compartments": False})).row
    assert t["compartment_resolution"] == "tile"
    assert t["til_density_intratumoral_per_mm2"] == pytest.approx(18 / bulk_mm2)
    assert math.isnan(t["til_density_stromal_per_mm2"])
    # the fine raster marks exactly the nest's 20 x 14 pixels
    split = res.cell_compartments
    assert split is not None and split.pixel_um == 10.0 and int(split.epithelium.sum()) == 20 * 14


def test_nest_inside_one_tile_with_dense_infiltrate():
    # a 60 x 80 um nest inside tile (row 2, col 2); more lymphocytes (60) than tumour cells (48)
    # inside it, 9 in the same tile's stroma: lymphocytes do not vote on the compartment
    cells = nest_cells(220, 280, 210, 290, n_in=60, n_out=9, out_box=(200, 300, 200, 300))
    grid = tumour_grid(tissue_fraction=0.5)  # half of each tile is tissue: areas halve
    res = compute_biomarkers(grid, cells=cells, params=FINE)
    split = res.cell_compartments
    assert split is not None
    i = int(np.flatnonzero((grid.rows == 2) & (grid.cols == 2))[0])
    assert split.epithelium_area_um2[i] == pytest.approx(60 * 80 * 0.5)
    assert split.stroma_area_um2[i] == pytest.approx((100 * 100 - 60 * 80) * 0.5)
    assert (split.epithelium_lymphocytes[i], split.stroma_lymphocytes[i]) == (60, 9)
    others = np.arange(grid.n_tiles) != i
    assert split.epithelium_area_um2[others].sum() == 0 and split.epithelium_lymphocytes.sum() == 60
    r = res.row
    assert r["til_density_intratumoral_per_mm2"] == pytest.approx(60 / (60 * 80 * 0.5 / 1e6))
    assert r["til_density_stromal_per_mm2"] == pytest.approx(9 / ((0.36e6 - 60 * 80) * 0.5 / 1e6))


def test_default_smoothing_recovers_a_nest_within_discretisation():
    # default 16 um pixels / sigma 24 um / prior: a 300 x 300 um nest (tile-aligned at 100 um
    # tiles, not at 16.7 um pixels) is found within one fine pixel along its border
    cells = nest_cells(150, 450, 150, 450, n_in=30, n_out=40)
    p = DEFAULT
    r = compute_biomarkers(tumour_grid(), cells=cells, params=p).row
    pix = TILE_UM / round(TILE_UM / p.cell_compartment_um)
    nest_um2, ring_um2 = 300.0 ** 2, 4 * 300.0 * pix
    assert abs(r["epithelium_area_mm2"] * 1e6 - nest_um2) <= ring_um2
    assert r["lymphocytes_intratumoral"] == pytest.approx(30, abs=3)  # only those at the border
    assert r["lymphocytes_intratumoral"] + r["lymphocytes_stromal"] == 70


def test_permuting_cells_changes_nothing():
    cells = nest_cells(150, 350, 120, 260, n_in=7, n_out=11, seed=3)
    perm = cells.sample(frac=1.0, random_state=1).reset_index(drop=True)
    a = compute_biomarkers(tumour_grid(), cells=cells, params=DEFAULT)
    b = compute_biomarkers(tumour_grid(), cells=perm, params=DEFAULT)
    assert a.row["compartment_resolution"] == "cell"
    for k, v in a.row.items():
        if isinstance(v, float) and math.isnan(v):
            assert math.isnan(b.row[k]), k
        else:
            assert b.row[k] == v, k
    np.testing.assert_array_equal(a.cell_compartments.epithelium, b.cell_compartments.epithelium)


def test_tile_path_kept_without_tumour_cells_or_when_switched_off():
    grid = tumour_grid()
    cells = nest_cells(150, 350, 120, 260, n_in=7, n_out=11)
    no_tumour = cells.assign(**{"class": cells["class"].replace("Tumor", "Fibroblast")})
    off = BiomarkerParams(**BULK, cell_compartments=False)
    tile = compute_biomarkers(grid, cells=no_tumour, params=off).row
    auto = compute_biomarkers(grid, cells=no_tumour, params=DEFAULT).row
    assert auto["compartment_resolution"] == tile["compartment_resolution"] == "tile"
    assert tile["til_density_intratumoral_per_mm2"] == pytest.approx(18 / 0.36)
    for k in ("til_density_intratumoral_per_mm2", "epithelium_area_mm2", "lymphocytes_intratumoral"):
        assert auto[k] == tile[k]
    assert compute_biomarkers(grid, cells=cells, params=off).row["compartment_resolution"] == "tile"
    assert compute_biomarkers(grid, params=DEFAULT).row["compartment_resolution"] == "tile"
    # tumour cells only outside the bulk (a 2 x 2 tumour block with stroma around) stay tile-resolution
    rr, cc = np.mgrid[0:SIDE, 0:SIDE].reshape(2, -1)
    t = ((rr >= 2) & (rr < 4) & (cc >= 2) & (cc < 4)).astype(float)
    g2 = TileGrid(rows=rr, cols=cc, tile_um=TILE_UM, slide_mpp_um=1.0,
                  role_probs={"tumor": t, "stroma": 1 - t}, tissue_fraction=np.ones(rr.size))
    outside = nest_cells(10, 90, 10, 90, n_in=3, n_out=0)
    assert compute_biomarkers(g2, cells=outside, params=FINE).row["compartment_resolution"] == "tile"


def test_new_params_recorded_hashed_and_checked():
    a = compute_biomarkers(tumour_grid(), params=BiomarkerParams()).row
    b = compute_biomarkers(tumour_grid(), params=BiomarkerParams(cell_sigma_um=30.0)).row
    assert a["param_cell_sigma_um"] == 24.0 and b["param_cell_sigma_um"] == 30.0
    assert a["param_cell_compartments"] is True and a["params_hash"] != b["params_hash"]
    for bad in ({"cell_tumor_share": 1.5}, {"cell_compartment_um": 0.0}, {"cell_sigma_um": -1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            BiomarkerParams(**bad)
