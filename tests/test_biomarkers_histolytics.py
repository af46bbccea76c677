"""Real geometry: histolytics HGSC whole slide (592,349 nuclei, 3,712 tissue polygons).

Two paths over the same slide:
- reference ("cell-table path" at polygon resolution): tissue polygons painted on an 8 um
  (16 px) raster; each nucleus centroid takes the class of its raster pixel; densities are
  lymphocytes in a tissue class inside the tumour bulk / that class's area inside the bulk.
  The reference never looks at the tumour cells: it is the annotators' polygons.
- tile path: the same polygons rasterised onto a 112 um grid (224 px at 0.5 um/px), each
  tile labelled with its majority class (one-hot, as a tile classifier would), tissue
  fraction = covered share; counts from the cell table binned on the tiles;
  compute_biomarkers with default parameters. Because the cell table has tumour cells, the
  default splits epithelium / stroma inside the bulk by the cells (``compartment_resolution``
  ``cell``, tmequant/biomarkers/cellular.py: 16 um pixels, tumour-cell share of the
  non-lymphocyte nuclei smoothed with sigma 24 um); ``cell_compartments=False`` gives the
  plain tile resolution.
The pixel size of this data is not published: 0.5 um/px is assumed (README of testdata).

Where the tolerances come from: a 112 um tile that straddles a tumour/stroma border is all
one class, so each path's compartment differs by the border tiles' minority share. On this
slide that is ~1 pp of area, hence composition within 2 pp. Stromal TIL density is ~12x the
intratumoural one, so at tile resolution the few % of stroma inside tumour-majority border
tiles barely move the stromal density (-1.5%) but inflate the intratumoural one (+27%).
Splitting the tiles by the cells removes that bias: intratumoural -1.1%, stromal -5.3%
against the polygons (the cells' nests are tighter than hand-drawn polygons, so some lymphocyte-
poor polygon tumour lands in stroma). Both are inside the issue's 10%; sensitivity on this
slide: sigma 16 / 32 um gives intratumoural -3.6% / +3.5%, stromal -10.7% / -2.0%. The tile
path keeps its own checks: exact agreement (1%) with an independent count over the very same
tiles, and the known direction and a 35% bound of its border bias.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from conftest import shared_path

from tmequant.biomarkers import (
    BiomarkerParams,
    TileGrid,
    cell_roles,
    compute_biomarkers,
    read_cell_table,
)

MPP = 0.5
TILE_UM = 112.0
FINE_PX = 16  # reference raster pixel: 16 level-0 px = 8 um
ROLE = {"tumor": "tumor", "stroma": "stroma", "necrosis": "necrosis", "omental_fat": "other_tissue",
        "hemorragia": "other_tissue", "serum": "other_tissue"}
ROLES = ["tumor", "stroma", "necrosis", "other_tissue"]


@pytest.fixture(scope="module")
def slide():
    from PIL import Image, ImageDraw

    nuclei = shared_path("histolytics", "hgsc_nuclei_wsi.parquet")
    tissue = shared_path("histolytics", "hgsc_tissue_wsi.parquet")
    cells = read_cell_table(nuclei)
    t = pq.read_table(tissue)
    polys = shapely.from_wkb(t.column("geometry").to_numpy(zero_copy_only=False))
    cls = np.array(t.column("class_name").to_pylist())
    s = int(TILE_UM / MPP)
    k = s // FINE_PX
    xmax, ymax = shapely.total_bounds(polys)[2:]
    R, C = int(np.ceil(ymax / s)), int(np.ceil(xmax / s))
    img = Image.new("L", (C * k, R * k), 0)
    draw = ImageDraw.Draw(img)
    for j in np.argsort(-shapely.area(polys)):  # large first: nested small polygons stay on top
        v = ROLES.index(ROLE[cls[j]]) + 1
        for p in getattr(polys[j], "geoms", [polys[j]]):
            draw.polygon([tuple(q) for q in np.asarray(p.exterior.coords) / FINE_PX], fill=v)
            for h in p.interiors:
                draw.polygon([tuple(q) for q in np.asarray(h.coords) / FINE_PX], fill=0)
    fine = np.asarray(img).astype(np.int8)
    cov = np.stack([(fine == i + 1).reshape(R, k, C, k).mean((1, 3)) for i in range(len(ROLES))])
    tot = cov.sum(0)
    rr, cc = np.nonzero(tot > 0)
    hard = cov.argmax(0)[rr, cc]
    grid = TileGrid(rows=rr, cols=cc, tile_um=TILE_UM, slide_mpp_um=MPP,
                    role_probs={r: (hard == i).astype(float) for i, r in enumerate(ROLES)},
                    tissue_fraction=tot[rr, cc])
    res = compute_biomarkers(grid, cells=cells)
    res_tile = compute_biomarkers(grid, cells=cells, params=BiomarkerParams(cell_compartments=False))
    return {"cells": cells, "fine": fine, "k": k, "res": res, "res_tile": res_tile, "grid": grid}


def test_composition_within_2pp(slide):
    fine, r = slide["fine"], slide["res"].row
    areas = np.array([(fine == i + 1).sum() for i in range(len(ROLES))], float)
    for i, role in enumerate(ROLES):
        assert abs(r[f"{role}_fraction"] - areas[i] / areas.sum()) < 0.02, role
    assert r["tissue_area_mm2"] == pytest.approx(areas.sum() * (FINE_PX * MPP) ** 2 / 1e6, rel=0.01)


def _reference_density(slide, cls_index: int) -> float:
    fine, k, res, cells = slide["fine"], slide["k"], slide["res"], slide["cells"]
    comp = res.compartments
    # the bulk on the slide's own tile grid, upsampled to the fine raster
    bulk = np.zeros((fine.shape[0] // k, fine.shape[1] // k), bool)
    r, c = np.nonzero(comp.bulk)
    r, c = r + comp.origin[0], c + comp.origin[1]
    ok = (r >= 0) & (c >= 0) & (r < bulk.shape[0]) & (c < bulk.shape[1])
    bulk[r[ok], c[ok]] = True
    bulk_fine = np.kron(bulk, np.ones((k, k), bool))
    region = (fine == cls_index + 1) & bulk_fine
    py = np.clip((cells["y"].to_numpy() / FINE_PX).astype(int), 0, fine.shape[0] - 1)
    px = np.clip((cells["x"].to_numpy() / FINE_PX).astype(int), 0, fine.shape[1] - 1)
    lymph = cell_roles(cells["class"]) == "lymphocyte"
    n = (lymph & region[py, px]).sum()
    return n / (region.sum() * (FINE_PX * MPP) ** 2 / 1e6)


def test_stromal_til_density_within_10pct(slide):
    ref = _reference_density(slide, ROLES.index("stroma"))
    for key, resolution in (("res", "cell"), ("res_tile", "tile")):
        r = slide[key].row
        assert r["count_source"] == "cell_table" and r["bulk_area_mm2"] > 10
        assert r["compartment_resolution"] == resolution
        assert r["til_density_stromal_per_mm2"] == pytest.approx(ref, rel=0.10), resolution


def test_intratumoral_til_density_within_10pct(slide):
    r = slide["res"].row
    assert r["compartment_resolution"] == "cell"
    ref = _reference_density(slide, ROLES.index("tumor"))
    assert r["til_density_intratumoral_per_mm2"] == pytest.approx(ref, rel=0.10)
    # the split only moves tissue and lymphocytes between the two compartments
    t = slide["res_tile"].row
    for k in ("epithelium_area_mm2", "lymphocytes_intratumoral"):
        other = k.replace("epithelium", "tumor_stroma").replace("intratumoral", "stromal")
        assert r[k] + r[other] == pytest.approx(t[k] + t[other], rel=1e-9)


def test_tile_resolution_intratumoral_border_bias(slide):
    res, grid, cells = slide["res_tile"], slide["grid"], slide["cells"]
    tile_path = res.row["til_density_intratumoral_per_mm2"]
    # (a) independent count over the same epithelium tiles: exact up to float noise
    epi = res.compartments.tiles("epithelium")
    s = grid.tile_level0_px
    key = set(zip(grid.rows[epi].tolist(), grid.cols[epi].tolist()))
    lymph = cell_roles(cells["class"]) == "lymphocyte"
    cr = np.floor(cells["y"].to_numpy()[lymph] / s).astype(int)
    ccol = np.floor(cells["x"].to_numpy()[lymph] / s).astype(int)
    n = sum((a, b) in key for a, b in zip(cr.tolist(), ccol.tolist()))
    area_mm2 = grid.tissue_area_um2[epi].sum() / 1e6
    assert tile_path == pytest.approx(n / area_mm2, rel=0.01)
    # (b) against the polygons: border tiles add stromal lymphocytes (see module docstring)
    ref = _reference_density(slide, ROLES.index("tumor"))
    assert tile_path >= ref
    assert tile_path == pytest.approx(ref, rel=0.35)
