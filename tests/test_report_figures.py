"""Pictures: geometry (tiles where they belong, true aspect ratio, scale bar length), colours."""

from __future__ import annotations

import io
import math
import types

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from PIL import Image
from scipy import ndimage as ndi

from tmequant.report.figures import (
    ROLE_COLORS,
    TLS_COLOR,
    SlideGeometry,
    class_colors,
    grid_raster,
    nice_scale_bar_mm,
    plot_compartments,
    plot_lymphocyte_density,
    plot_thumbnail,
    plot_tissue_classes,
)

GREEN = (0, 200, 0)


def _rgb(png: bytes) -> np.ndarray:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _near(img: np.ndarray, color, tol: int = 6) -> np.ndarray:
    c = np.array([round(255 * v) for v in to_rgb(color)] if isinstance(color, str) else color)
    return (np.abs(img - c) <= tol).all(axis=2)


def _largest(mask: np.ndarray) -> tuple[int, tuple[float, float], tuple[int, int]]:
    """Area, centroid (y, x) and bbox size (h, w) of the largest 4-connected component."""
    lab, n = ndi.label(mask)
    assert n > 0, "colour not found in the picture"
    sizes = np.bincount(lab.ravel())[1:]
    k = int(np.argmax(sizes)) + 1
    ys, xs = np.nonzero(lab == k)
    return int(sizes[k - 1]), (ys.mean(), xs.mean()), (int(np.ptp(ys)) + 1, int(np.ptp(xs)) + 1)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


def test_grid_raster_places_values_and_shifts_origin():
    rc = np.array([[0, 0], [2, 1], [1, 3]])
    r = grid_raster(rc, np.array([1.0, 2.0, 3.0]))
    assert r.shape == (3, 4)
    assert r[0, 0] == 1 and r[2, 1] == 2 and r[1, 3] == 3
    assert np.isnan(r).sum() == 12 - 3
    shifted = grid_raster(rc, np.array([1, 2, 3]), shape=(3, 3), fill=0, origin_rc=(1, 1))
    assert shifted[1, 0] == 2 and shifted[0, 2] == 3 and shifted.sum() == 5  # (0, 0) dropped
    with pytest.raises(ValueError):
        grid_raster(rc, np.zeros(2))


@pytest.mark.parametrize("width_px,um_per_px", [(300, 5.0), (2000, 16.0), (500, 0.5), (800, 250.0)])
def test_scale_bar_length_is_nice_and_fits(width_px, um_per_px):
    mm = nice_scale_bar_mm(width_px, um_per_px)
    width_mm = width_px * um_per_px / 1000
    assert mm <= 0.25 * width_mm + 1e-12
    assert mm >= 0.25 * width_mm / 2.5 - 1e-12  # the next nice step would not fit
    mantissa = mm / 10 ** math.floor(math.log10(mm))
    assert any(math.isclose(mantissa, m) for m in (1, 2, 2.5, 5))


@pytest.mark.parametrize("h,w", [(120, 300), (300, 120), (1700, 3401)])  # the last is block-reduced
def test_thumbnail_keeps_aspect_and_scale_bar_matches_mm(h, w):
    geom = SlideGeometry(thumb_downsample=10.0, slide_mpp_um=0.5, tile_level0_px=224.0)  # 5 um/px
    thumb = np.zeros((h, w, 3), np.uint8)
    thumb[:] = GREEN
    png = plot_thumbnail(thumb, None, geom, title="t")
    img = _rgb(png)
    y0, y1, x0, x1 = _bbox(_near(img, GREEN))
    shown_h, shown_w = y1 - y0, x1 - x0
    assert shown_h / shown_w == pytest.approx(h / w, rel=0.02)
    # the bar: the longest run of black pixels in any row inside the image area
    black = (img[y0:y1, x0:x1] < 40).all(axis=2)
    runs = [max((len(s) for s in "".join("1" if b else "0" for b in row).split("0")), default=0)
            for row in black]
    bar_px = max(runs)
    expected_mm = nice_scale_bar_mm(w, geom.thumb_um_per_px)
    assert bar_px / shown_w == pytest.approx(expected_mm * 1000 / geom.thumb_um_per_px / w, rel=0.04)


def test_thumbnail_outlines_the_mask_and_writes_identical_file(tmp_path):
    geom = SlideGeometry(16.0, 0.5, 224.0)
    thumb = np.full((100, 150, 3), 240, np.uint8)
    mask = np.zeros((50, 75), bool)  # half resolution: stretched onto the thumbnail
    mask[10:40, 20:60] = True
    png = plot_thumbnail(thumb, mask, geom, title="s1")
    outline = _near(_rgb(png), "#00a651", tol=30)
    assert outline.sum() > 200
    path = plot_thumbnail(thumb, mask, geom, title="s1", path=tmp_path / "a" / "thumb.png")
    assert path.read_bytes() == png  # deterministic: same inputs, same bytes


def test_class_colors_follow_roles_and_stay_distinct():
    names = ["tum", "str", "mus", "lym", "weird"]
    roles = {"tum": "tumor", "str": "stroma", "mus": "stroma", "lym": "immune", "weird": "unknown"}
    cols = class_colors(names, roles)
    assert cols[0] == ROLE_COLORS["tumor"] and cols[1] == ROLE_COLORS["stroma"]
    assert cols[3] == ROLE_COLORS["immune"]
    assert len(set(cols)) == len(cols)


def test_tissue_class_map_puts_each_class_on_its_tile():
    # 1 x 3 grid of 60-px tiles on a 60 x 180 thumbnail: lym | tum | str
    geom = SlideGeometry(thumb_downsample=1.0, slide_mpp_um=1.0, tile_level0_px=60.0)
    thumb = np.full((60, 180, 3), 255, np.uint8)
    names = ["tum", "str", "lym"]
    roles = {"tum": "tumor", "str": "stroma", "lym": "immune"}
    rc = np.array([[0, 0], [0, 1], [0, 2]])
    probs = np.array([[0.1, 0.1, 0.8], [0.7, 0.2, 0.1], [0.2, 0.6, 0.2]])
    img = _rgb(plot_tissue_classes(thumb, rc, probs, names, roles, geom, alpha=1.0))
    cols = class_colors(names, roles)
    found = {n: _largest(_near(img, c, tol=4)) for n, c in zip(names, cols)}
    xs = {n: f[1][1] for n, f in found.items()}
    assert xs["lym"] < xs["tum"] < xs["str"]
    widths = [f[2][1] for f in found.values()]  # bbox: the scale bar box may cover a corner
    assert max(widths) / min(widths) < 1.03  # equal tiles
    for _, _, (bh, bw) in found.values():
        assert bh / bw == pytest.approx(1.0, rel=0.03)  # square tiles
    with pytest.raises(ValueError):
        plot_tissue_classes(thumb, rc, probs[:, :2], names, roles, geom)


def test_density_heatmap_is_darker_where_denser_and_nan_is_transparent():
    geom = SlideGeometry(1.0, 1.0, 60.0)
    thumb = np.full((60, 240, 3), 255, np.uint8)
    rc = np.array([[0, 0], [0, 1], [0, 3]])
    img = _rgb(plot_lymphocyte_density(thumb, rc, np.array([0.0, np.nan, 1000.0]), geom,
                                       vmax_per_mm2=1000.0, count_source="model"))
    lum = img.sum(axis=2)
    dark = _largest(lum < 150)
    pale = _largest((img[..., 0] > 230) & (img[..., 1] > 230) & (img[..., 2] < 200))
    assert dark[1][1] > pale[1][1]  # the 1000/mm² tile is right of the 0/mm² tile
    assert dark[0] == pytest.approx(pale[0], rel=0.15)


def test_compartments_draw_tls_outlines_and_circles():
    geom = SlideGeometry(4.0, 0.5, 56.0)  # 14 thumbnail px per tile
    thumb = np.full((140, 210, 3), 235, np.uint8)
    bulk = np.zeros((10, 15), bool)
    bulk[3:7, 4:10] = True
    margin = np.zeros_like(bulk)
    margin[2:8, 3:11] = True
    margin[4:6, 5:9] = False
    no_tls = _near(_rgb(plot_compartments(thumb, geom, masks={"bulk": bulk, "margin": margin})),
                   TLS_COLOR).sum()
    labels = np.zeros_like(bulk, dtype=int)
    labels[0:2, 0:2] = 1
    labels[8:10, 12:14] = 2
    with_labels = _near(_rgb(plot_compartments(
        thumb, geom, masks={"bulk": bulk, "margin": margin}, tls_labels=labels,
        areas_mm2={"bulk": 0.1})), TLS_COLOR).sum()
    circles = _near(_rgb(plot_compartments(
        thumb, geom, masks={"bulk": bulk}, tls_centroids_xy_level0=np.array([[100.0, 100.0]]),
        tls_areas_um2=np.array([20000.0]))), TLS_COLOR).sum()
    assert with_labels > no_tls + 100
    assert circles > no_tls + 50


@pytest.mark.parametrize("title", ["$\\frac{", "<script>alert(1)</script>", "a_b$c$^", "späte Ü 日本"])
def test_titles_with_odd_characters_do_not_break(title):
    geom = SlideGeometry(8.0, 0.5, 224.0)
    png = plot_thumbnail(np.full((40, 60, 3), 200, np.uint8), np.ones((40, 60), bool), geom, title=title)
    assert png[:4] == b"\x89PNG"


def test_slide_figures_adapter_from_a_biomarker_result(tmp_path):
    biomarkers = pytest.importorskip("tmequant.biomarkers")
    from tmequant.report.slide import FIGURES, slide_figures

    R, C = 20, 30
    rr, cc = np.mgrid[0:R, 0:C]
    rc = np.argwhere(np.ones((R, C), bool))
    tum = (((rr - 10) / 6) ** 2 + ((cc - 15) / 8) ** 2 < 1)[rc[:, 0], rc[:, 1]]
    names, roles = ["T", "S", "L"], {"T": "tumor", "S": "stroma", "L": "immune"}
    probs = np.where(tum[:, None], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]).astype(np.float32)
    grid = biomarkers.TileGrid(
        rows=rc[:, 0], cols=rc[:, 1], tile_um=112.0, slide_mpp_um=0.5,
        role_probs={roles[n]: probs[:, i] for i, n in enumerate(names)},
        tissue_fraction=np.ones(len(rc)), lymphocyte_counts=np.full(len(rc), 3.0), count_source="model",
    )
    res = biomarkers.compute_biomarkers(grid)
    ds = 32.0
    h, w = int(R * 224 / ds), int(C * 224 / ds)
    attrs = {"card": {"name": "m", "tissue_classes": names, "tissue_roles": roles}}
    store = types.SimpleNamespace(
        thumbnail=np.full((h, w, 3), 220, np.uint8), tissue_mask=np.ones((h, w), bool),
        grid=rc.astype(np.int32), slide_id="s<1>", mask_downsample=ds, slide_mpp_um=0.5,
        tile_level0_px=224.0, predictions=lambda name: _Group(attrs, tissue_probs=probs),
        tissue_probs=lambda name: probs,  # SlideStore.tissue_probs
        prediction_card=lambda name: attrs["card"],  # SlideStore.prediction_card
    )
    figs = slide_figures(store, "m", res, tmp_path)
    assert list(figs) == list(FIGURES)
    for p in figs.values():
        assert p.read_bytes()[:4] == b"\x89PNG"


class _Group(dict):
    def __init__(self, attrs, **arrays):
        super().__init__(arrays)
        self.attrs = attrs


def test_a_slide_without_tiles_still_gets_pictures():
    geom = SlideGeometry(16.0, 0.5, 224.0)
    thumb = np.full((50, 80, 3), 240, np.uint8)
    rc = np.zeros((0, 2), int)
    empty = np.zeros((4, 6), bool)
    pngs = [
        plot_tissue_classes(thumb, rc, np.zeros((0, 2)), ["a", "b"], {"a": "tumor", "b": "stroma"}, geom),
        plot_lymphocyte_density(thumb, rc, np.zeros(0), geom),
        plot_compartments(thumb, geom, masks={"bulk": empty, "margin": empty}, tls_labels=empty.astype(int)),
        plot_thumbnail(thumb, np.zeros((50, 80), bool), geom),
    ]
    assert all(p[:4] == b"\x89PNG" for p in pngs)
