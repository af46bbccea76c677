"""Slides with non-square pixels (issue 16, item 8): x and y pixel sizes carried separately.

A slide of 0.25 x 0.5 um pixels was measured with their mean, 0.375 um (every area and
density ~12% off), and then refused. Now tiles still cover ``tile_um`` x ``tile_um`` (their
level-0 footprint is ``tile_um / mpp_x`` by ``tile_um / mpp_y`` px), stored coordinates stay
level-0 pixels of the file, and every conversion goes through ``tmequant.pixelsize.PixelSize``.

The end-to-end tests render one phantom at 0.25 um/px (the *square* slide) and make its
*twin* by averaging pairs of rows (0.25 x 0.5 um/px, resolution tags saying so): the same
tissue, half the rows. The same job (tile, the ``phantom-demo`` model, the nucleus counter,
biomarkers, with and without a cell table) runs on both. Measured on this phantom (166 tiles):
tissue and tumour area agree to 0.03%, nucleus-counter lymphocytes exactly, TIL densities to
1.1%, the twin's tiles differ from the square slide's by 0.08 grey levels on average; the
old mean (the twin read as square 0.375 um pixels, ``--mpp-override 0.375``) put the tissue
area 13% high.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tmequant as tq
from tmequant.inputs import SlideSpec
from tmequant.pixelsize import PixelSize
from tmequant.store import SlideStore

MODEL = "phantom-demo"
TILING = tq.TilingParams(target_mpp_um=1.0, tile_px=112)  # the demo model's tiles
# A bulk small enough for a 1.6 x 1.4 mm phantom (the defaults want 1.5 mm^2 of tumour).
PARAMS = tq.BiomarkerParams(bulk_close_um=200.0, bulk_min_area_mm2=0.1, margin_um=112.0,
                            phenotype_region_mm2=0.1)
# Tolerances of the twin against the square slide (measured: <= 1.1%, see the docstring).
REL_AREA = 0.01
REL_DENSITY = 0.03
OLD_MEAN_OFF = 0.08  # the averaged 0.375 um pixel is at least this far off (measured 13%)


def _write_tiff(path: Path, rgb: np.ndarray, mpp_x: float, mpp_y: float) -> Path:
    import tifffile

    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb",
                     resolution=(1e4 / mpp_x, 1e4 / mpp_y), resolutionunit="CENTIMETER")
    return path


def _twin(rgb: np.ndarray) -> np.ndarray:
    """Rows averaged in pairs (round half to even: no bias): 0.25 -> 0.5 um along y."""
    return np.rint((rgb[0::2].astype(np.float32) + rgb[1::2]) / 2).astype(np.uint8)


def _rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# --- units ---------------------------------------------------------------------------------------

def test_pixel_size_converts_per_axis():
    px = PixelSize(0.25, 0.5)
    assert not px.is_square and px.area_um2 == 0.125
    assert px.mean_um == pytest.approx(math.sqrt(0.125))
    assert px.to_um(400, 200) == (100.0, 100.0)
    assert px.to_px(100.0, 100.0) == (400.0, 200.0)
    assert px.px(112.0) == (448.0, 224.0) and px.coarsest_um == 0.5
    assert px.describe() == "0.25 x 0.5 um/px"
    sq = PixelSize.square(0.2527)
    assert sq.is_square and sq.mean_um == 0.2527 and sq.px(112.0) == (112.0 / 0.2527,) * 2
    with pytest.raises(ValueError):
        PixelSize(0.0, 0.5)


def test_resolve_mpp_keeps_both_sizes_and_snaps_near_square_ones():
    from tmequant.wsi import resolve_mpp

    mpp, mx, my, src = resolve_mpp("s.tif", (None, None), (0.25, 0.5), None, None)
    assert (mx, my, src) == (0.25, 0.5, "tiff-resolution")
    assert mpp == pytest.approx(math.sqrt(0.125))
    # within 1%: one size, their mean, exactly as before
    near = resolve_mpp("s.svs", (0.2527, 0.2529), None, None, None)
    assert near == (0.2528, 0.2528, 0.2528, "vendor")
    assert resolve_mpp("s.svs", (0.25, 0.25), None, None, None) == (0.25, 0.25, 0.25, "vendor")
    # only implausible values are refused, naming both
    with pytest.raises(tq.SlideError, match=r"pixel size 0.25 x 500 um/px \(ome\) is outside"):
        resolve_mpp("s.ome.tif", (None, None), None, (0.25, 500.0), None)


def test_grid_pitch_is_per_axis():
    """A 100 x 100 um slide of 0.25 x 0.5 um pixels (400 x 200 px), 25 um tiles: a 4 x 4 grid
    whose tiles are 100 x 50 level-0 px, exactly the grid of the square 400 x 400 px slide
    with y halved."""
    from tmequant.tiling import plan_grid

    mask = np.zeros((20, 20), bool)  # 5 um/px mask: 20 x 20 px either way
    mask[4:16, 2:10] = True
    twin = plan_grid((400, 200), (100.0, 50.0), mask, (20.0, 10.0), 0.25)
    square = plan_grid((400, 400), 100.0, mask, 20.0, 0.25)
    assert twin.pitch_xy == (100.0, 50.0) and square.pitch_xy == (100.0, 100.0)
    assert (twin.n_rows, twin.n_cols) == (square.n_rows, square.n_cols) == (4, 4)
    assert np.array_equal(twin.grid, square.grid)
    assert np.array_equal(twin.tissue_fraction, square.tissue_fraction)
    assert np.array_equal(twin.coords[:, 0], square.coords[:, 0])
    assert np.array_equal(2 * twin.coords[:, 1], square.coords[:, 1])
    # partial edge tiles: per axis too (a 390 x 195 px slide: the last row/column is cut)
    edge = plan_grid((390, 195), (100.0, 50.0), np.ones((20, 20), bool), (20.0, 10.0), 0.0,
                     edge_tiles=True)
    assert (edge.n_rows, edge.n_cols) == (4, 4)
    last = edge.tissue_fraction[(edge.grid[:, 0] == 3) & (edge.grid[:, 1] == 3)]
    assert last == pytest.approx([(90 / 100) * (45 / 50)])


def test_tile_grid_from_table_and_cells_per_axis():
    from tmequant.biomarkers import counts_from_cells

    px = PixelSize(0.25, 0.5)
    df = pd.DataFrame({"x": [0, 448, 0], "y": [0, 0, 224], "tumor": [1.0, 1.0, 1.0]})
    g = tq.TileGrid.from_table(df, tile_um=112.0, slide_mpp_um=px.mean_um, pixel_size=px)
    assert g.pitch_xy == (448.0, 224.0)
    assert list(zip(g.rows, g.cols)) == [(0, 0), (0, 1), (1, 0)]
    cells = pd.DataFrame({"x": [10.0, 460.0, 10.0, 10.0], "y": [10.0, 10.0, 230.0, 460.0],
                          "class": ["lymphocyte"] * 4})
    lym, _, outside = counts_from_cells(g, cells)
    assert list(lym) == [1, 1, 1] and outside == 1
    assert g.level0_to_um(448.0, 224.0) == (112.0, 112.0)
    with pytest.raises(tq.InputError, match="not the geometric mean"):
        tq.TileGrid.from_table(df, tile_um=112.0, slide_mpp_um=0.375, pixel_size=px)


def test_cell_table_in_micrometres_is_read_per_axis():
    """The micrometre check divides x and y by their own sizes and says so."""
    from tmequant.biomarkers.cells import check_cell_units

    px = PixelSize(0.25, 0.5)
    rows, cols = np.divmod(np.arange(100), 10)  # tiles of 448 x 224 px; tissue in one corner
    g = tq.TileGrid(rows=rows, cols=cols, tile_um=112.0, slide_mpp_um=px.mean_um,
                    role_probs={"tumor": np.ones(100)}, tissue_fraction=(rows >= 5) & (cols >= 5),
                    pixel_size=px, metadata={"slide_id": "rect"})
    rng = np.random.default_rng(0)
    x, y = rng.uniform(5 * 448, 10 * 448, 500), rng.uniform(5 * 224, 10 * 224, 500)  # on tissue
    check_cell_units(g, pd.DataFrame({"x": x, "y": y}))  # pixels: fine
    with pytest.raises(tq.CellTableError, match=r"divide x by the slide's 0.25 um/px and y by "
                                                r"its 0.5 um/px to convert"):
        check_cell_units(g, pd.DataFrame({"x": x * 0.25, "y": y * 0.5}))


def test_best_level_and_thumbnail_use_both_axes(tmp_path):
    """A level is fine enough only when both axes are; the thumbnail has square pixels."""
    from tmequant.wsi import open_slide, write_pyramid_tiff

    rng = np.random.default_rng(1)
    img = rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)
    sq = write_pyramid_tiff(tmp_path / "sq.tif", img, 0.25, flavor="tiff", compression="zlib",
                            n_levels=1)
    tw = _write_tiff(tmp_path / "tw.tif", _twin(img), 0.25, 0.5)
    with open_slide(sq) as a, open_slide(tw) as b:
        assert b.info.pixel_size == PixelSize(0.25, 0.5)
        assert b.info.mpp_um == pytest.approx(math.sqrt(0.125))
        ta, tb = a.read_thumbnail(8.0), b.read_thumbnail(8.0)
        assert ta.shape == tb.shape == (32, 32, 3)
        assert np.abs(ta.astype(int) - tb.astype(int)).mean() < 0.5
    from tmequant.wsi.slide import Slide, SlideInfo

    info = SlideInfo(path="x", reader="tifffile", vendor="t",
                     level_dimensions=((800, 400), (200, 100)), level_downsamples=(1.0, 4.0),
                     associated_images=(), mpp_um=math.sqrt(0.125), mpp_source="tiff-resolution",
                     mpp_x_um=0.25, mpp_y_um=0.5)
    s = Slide(info, backend=None)
    assert s.best_level_for_mpp(2.0) == 1  # level 1: 1.0 x 2.0 um
    assert s.best_level_for_mpp(1.5) == 0  # the mean (1.41 um) would have taken level 1


def test_qupath_polygons_and_figure_positions_per_axis():
    from tmequant.qupath import grid_mask_to_polygons
    from tmequant.report.figures import SlideGeometry

    polys = grid_mask_to_polygons(np.ones((2, 3), bool), (1, 0), (448.0, 224.0))
    assert len(polys) == 1 and polys[0].bounds == (0.0, 224.0, 3 * 448.0, 3 * 224.0)
    px = PixelSize(0.25, 0.5)
    # as a store keeps them: per pixel of the geometric-mean size
    geom = SlideGeometry(8.0 / px.mean_um, px.mean_um, 112.0 / px.mean_um, px)
    assert geom.thumb_um_per_px == pytest.approx(8.0)
    assert geom.tile_thumb_px == pytest.approx(14.0)
    assert geom.level0_to_thumb(np.array([[448.0, 224.0]])) == pytest.approx(np.array([[14.0, 14]]))


# --- end to end: a phantom and its twin -------------------------------------------------------

@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The same job on the square phantom, its twin, and the twin read the old way (0.375)."""
    from tmequant.demo import DEMO_COUNTER
    from tmequant.inference.nuclei import NucleusCounterParams
    from tmequant.phantom import PhantomRenderer, PhantomSpec, make_layout

    tmp = tmp_path_factory.mktemp("nonsquare")
    spec = PhantomSpec(name="sq", width_px=6400, height_px=5600, mpp_um=0.25, seed=2,
                       tumor_radii_um=(500.0, 430.0), n_tls=1, tls_distance_um=(90.0, 160.0),
                       tls_radius_um=80.0, fat_area_mm2=0.05, background_margin_um=60.0)
    layout = make_layout(spec)
    rgb = PhantomRenderer(layout).render()
    paths = {"square": _write_tiff(tmp / "square.tif", rgb, 0.25, 0.25),
             "twin": _write_tiff(tmp / "twin.tif", _twin(rgb), 0.25, 0.5)}
    del rgb
    cells = layout.cells()
    cells = cells.assign(**{"class": cells["class"].astype(str)})[["x", "y", "class"]]
    model = tq.load_model(MODEL)
    counter = NucleusCounterParams(**DEMO_COUNTER)
    out = {}
    for sid, name, override in (("square", "square", None), ("twin", "twin", None),
                                ("old", "twin", 0.375)):
        r = tq.tile_slide(SlideSpec(sid, paths[name], override), tmp / "stores", TILING,
                          progress=False)
        sp = r.store_path
        tq.predict_store(sp, model, device="cpu", num_workers=0, progress=False)
        tq.count_nuclei(sp, counter, progress=False, cells_out=tmp / f"{sid}.cells.parquet")
        # the cell table in level-0 px of each file: y halved on the twin
        table = cells if name == "square" else cells.assign(y=cells["y"] / 2)
        out[sid] = {
            "store": SlideStore(sp),
            "row": tq.biomarkers_for_store(sp, MODEL, params=PARAMS).row,
            "cells_row": tq.biomarkers_for_store(sp, MODEL, cells=table, params=PARAMS).row,
            "nuclei": pd.read_parquet(tmp / f"{sid}.cells.parquet"),
        }
    return out


@pytest.mark.slow
def test_twin_store_records_both_sizes_and_the_same_grid(pair):
    sq, tw = pair["square"]["store"], pair["twin"]["store"]
    assert tw.pixel_size == PixelSize(0.25, 0.5) and sq.pixel_size == PixelSize(0.25, 0.25)
    assert tw.slide_mpp_um == pytest.approx(math.sqrt(0.125))
    assert tw.tile_level0_xy_px == (448.0, 224.0) and sq.tile_level0_xy_px == (448.0, 448.0)
    assert tw.tile_um == sq.tile_um == 112.0
    assert tw.mask_downsample_xy == (32.0, 16.0) and sq.mask_downsample_xy == (32.0, 32.0)
    assert tw.tissue_mask.shape == sq.tissue_mask.shape  # square mask pixels, 8 um
    # the same tiles at the same places: x equal, y halved (level-0 px of each file)
    assert np.array_equal(tw.grid, sq.grid)
    assert np.array_equal(tw.coords[:, 0], sq.coords[:, 0])
    assert np.array_equal(2 * tw.coords[:, 1], sq.coords[:, 1])
    assert np.abs(tw.tissue_fraction - sq.tissue_fraction).max() < 0.05


@pytest.mark.slow
def test_twin_tiles_match_the_square_slides_tiles(pair):
    """Square images at 1 um/px from both: mean absolute difference < 0.5 grey levels
    (measured 0.08; the twin's rows were rounded once), never more than 2."""
    a = np.asarray(pair["square"]["store"].images[:]).astype(np.int16)
    b = np.asarray(pair["twin"]["store"].images[:]).astype(np.int16)
    assert a.shape == b.shape and a.shape[1:] == (112, 112, 3)
    d = np.abs(a - b)
    assert d.mean() < 0.5 and d.max() <= 2, (d.mean(), d.max())


@pytest.mark.slow
@pytest.mark.parametrize("which", ["row", "cells_row"])
def test_twin_biomarkers_agree_and_the_old_mean_did_not(pair, which):
    """Areas within 1%, lymphocyte counts and TIL densities within 3% (measured: 0.03%, equal,
    1.1%); the twin read with the mean 0.375 um is >= 8% off in tissue area (measured 13%)."""
    sq, tw, old = (pair[k][which] for k in ("square", "twin", "old"))
    for k in ("tissue_area_mm2", "tumor_area_mm2", "stroma_area_mm2", "bulk_area_mm2",
              "epithelium_area_mm2", "margin_area_mm2"):
        assert sq[k] > 0 and _rel(tw[k], sq[k]) <= REL_AREA, (k, tw[k], sq[k])
    for k in ("lymphocytes_total", "til_density_intratumoral_per_mm2", "til_density_core_per_mm2",
              "til_density_margin_per_mm2"):
        assert sq[k] > 0 and _rel(tw[k], sq[k]) <= REL_DENSITY, (k, tw[k], sq[k])
    assert tw["immune_phenotype"] == sq["immune_phenotype"]
    assert tw["tls_count"] == sq["tls_count"]
    assert tw["slide_mpp_um"] == pytest.approx(math.sqrt(0.125))
    assert _rel(old["tissue_area_mm2"], sq["tissue_area_mm2"]) >= OLD_MEAN_OFF
    if which == "cells_row":  # a cell table: binned per axis, every cell in the same tile
        assert tw["n_cells"] == sq["n_cells"]
        assert tw["n_cells_outside_tiles"] == sq["n_cells_outside_tiles"]
        assert tw["lymphocytes_total"] == sq["lymphocytes_total"]
        assert tw["morisita_horn"] == pytest.approx(sq["morisita_horn"], rel=1e-9)
        assert tw["compartment_resolution"] == sq["compartment_resolution"] == "cell"


@pytest.mark.slow
def test_twin_cells_map_to_the_same_places(pair):
    """Nuclei found on the twin lie where the square slide's are: (x, 2 y) within 2 level-0 px
    of the square slide's for >= 95% of them (measured 98%; the others sit on a threshold)."""
    from scipy.spatial import cKDTree

    a, b = pair["square"]["nuclei"], pair["twin"]["nuclei"]
    assert _rel(len(b), len(a)) <= 0.01
    d, _ = cKDTree(a[["x", "y"]].to_numpy()).query(np.c_[b["x"], 2 * b["y"]])
    assert (d <= 2.0).mean() >= 0.95
    # every nucleus lies in its tile's footprint, 448 x 224 level-0 px on the twin
    st = pair["twin"]["store"]
    x0, y0 = st.coords[b["tile_index"].to_numpy()].T
    assert ((b["x"] >= x0) & (b["x"] < x0 + 448) & (b["y"] >= y0) & (b["y"] < y0 + 224)).all()


def test_detector_cells_on_non_square_pixels(tmp_path):
    """A cell detector's cells (inference.cell_store) in level-0 px of the twin: (x, 2 y) of
    the square slide's, each inside its tile's 224 x 112 px footprint."""
    from test_cell_detector import _draw, _oracle

    from tmequant.training.metrics import match_points

    rng = np.random.default_rng(3)
    img = np.full((1792, 1792, 3), (225, 170, 200), np.uint8)
    pts: list[np.ndarray] = []
    while len(pts) < 60:  # discs of 1.5 um radius, at least 8 um apart
        p = rng.uniform(20, 1772, 2)
        if all(np.linalg.norm(p - q) > 32 for q in pts):
            pts.append(p)
    xy = np.array(pts)
    _draw(img, xy, radius=6.0)
    spec = tq.TilingParams(target_mpp_um=0.5, tile_px=224, min_tissue_fraction=0.0)
    found = {}
    for name, rgb, my in (("square", img, 0.25), ("twin", _twin(img), 0.5)):
        path = _write_tiff(tmp_path / f"{name}.tif", rgb, 0.25, my)
        sp = tq.tile_slide(path, tmp_path / "stores", spec, progress=False).store_path
        tq.predict_store(sp, _oracle(32), progress=False)
        st = SlideStore(sp)
        cells = st.read_cells("oracle")
        tx, ty = st.tile_level0_xy_px
        x0, y0 = st.coords[cells["tile"].to_numpy()].T
        assert ((cells["x"] >= x0) & (cells["x"] < x0 + tx) & (cells["y"] >= y0)
                & (cells["y"] < y0 + ty)).all()
        found[name] = cells[["x", "y"]].to_numpy()
    sq, tw = found["square"], found["twin"] * np.array([1.0, 2.0])
    a, _ = match_points(sq, xy, 4.0)
    assert len(a) == len(xy)  # the detector finds every disc on the square slide
    a, _ = match_points(tw, sq, 4.0)  # 1 um
    assert len(a) == len(sq) == len(tw)
