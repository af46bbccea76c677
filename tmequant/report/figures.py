"""Pictures a pathologist looks at: thumbnail, tissue classes, lymphocyte density, compartments.

Pure functions over plain arrays (no store or biomarker objects), drawn with matplotlib's
object API on an Agg canvas (no pyplot state, safe in worker processes). Every picture is
drawn in thumbnail pixel coordinates at the thumbnail's true aspect ratio, carries a legend
(or a colour bar with units) and a scale bar in mm computed from the thumbnail's um/px
(thumbnail downsample x slide MPP). The thumbnail has square pixels even when the slide's
are not: then the store's ``slide_mpp_um`` and downsample are per pixel of the geometric-mean
size, which gives the thumbnail's um/px and the tile side in thumbnail px all the same, and
level-0 positions go through ``SlideGeometry.level0_to_thumb`` (per axis).

Tile maps are rasters on the tile grid: cell ``[r, c]`` of a ``(R, C)`` raster is the tile
at grid row ``origin_rc[0] + r``, column ``origin_rc[1] + c``, which covers level-0 pixels
``x in [col * tile_level0_px, (col + 1) * tile_level0_px)`` (docs/store-layout.md).

Each ``plot_*`` returns PNG bytes, or writes the PNG and returns its path when ``path`` is given.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import patheffects
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from tmequant.atomic import atomic_write_bytes
from tmequant.pixelsize import PixelSize

# Colours per tissue role (docs/biomarkers.md), close to what H&E annotation tools use:
# tumour red, stroma pink, immune dark blue, necrosis ochre.
ROLE_COLORS: dict[str, str] = {
    "tumor": "#d62728",
    "stroma": "#f08cb4",
    "immune": "#1f3c9e",
    "necrosis": "#b8860b",
    "other_tissue": "#8fbc8f",
    "background": "#e6e6e6",
}
_FALLBACK_COLORS = ("#17becf", "#9467bd", "#8c564b", "#bcbd22", "#7f7f7f", "#ff7f0e")

# Styles of compartment outlines: name -> (colour, line style, fill alpha).
COMPARTMENT_STYLES: dict[str, tuple[str, str, float]] = {
    "tumor_bulk": ("#d62728", "-", 0.0),
    "bulk": ("#d62728", "-", 0.0),
    "invasive_margin": ("#ff8c00", "--", 0.25),
    "margin": ("#ff8c00", "--", 0.25),
    "core": ("#8b0000", ":", 0.0),
}
TLS_COLOR = "#0077cc"  # darker than sky blue: readable on pink tissue and on white
TLS_LABEL_PT = 12  # TLS numbers: legible at the report's 900 px width
# A white outline keeps labels readable on any tissue colour.
_HALO = [patheffects.withStroke(linewidth=3, foreground="white")]
TISSUE_OUTLINE_COLOR = "#00a651"

_FIG_MAX_IN = 7.5  # longest side of the image area, inches
_DPI = 120
_NICE_MM = (0.05, 0.1, 0.2, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 20.0, 25.0, 50.0)

@dataclass(frozen=True)
class SlideGeometry:
    """How the tile grid and the thumbnail relate to level 0.

    thumb_downsample: level-0 px per thumbnail px (the store's ``tissue_mask`` downsample).
    slide_mpp_um: level-0 microns per px.
    tile_level0_px: tile side (= grid pitch) in level-0 px.
    pixel_size: the slide's level-0 pixel size along x and y when it is not square (then the
    three numbers above are per pixel of the geometric-mean size, as the store keeps them);
    None for square pixels.
    """

    thumb_downsample: float
    slide_mpp_um: float
    tile_level0_px: float
    pixel_size: PixelSize | None = None

    @property
    def thumb_um_per_px(self) -> float:
        return self.thumb_downsample * self.slide_mpp_um

    @property
    def tile_thumb_px(self) -> float:
        """Tile side in thumbnail px."""
        return self.tile_level0_px / self.thumb_downsample

    def level0_to_thumb(self, xy: np.ndarray) -> np.ndarray:
        """(M, 2) level-0 x, y -> thumbnail x, y (per axis for non-square pixels)."""
        xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        px = self.pixel_size
        if px is None or px.is_square:
            return xy / self.thumb_downsample
        x_um, y_um = px.to_um(xy[:, 0], xy[:, 1])
        return np.stack([x_um, y_um], axis=1) / self.thumb_um_per_px

    @classmethod
    def from_store(cls, store: Any) -> SlideGeometry:
        """From a :class:`tmequant.tiling.store.SlideStore`."""
        return cls(
            thumb_downsample=store.mask_downsample,
            slide_mpp_um=store.slide_mpp_um,
            tile_level0_px=store.tile_level0_px,
            pixel_size=getattr(store, "pixel_size", None),  # None: square (stand-in stores)
        )


# --- rasters ---------------------------------------------------------------------------
def grid_raster(
    grid_rc: np.ndarray,
    values: np.ndarray,
    shape: tuple[int, int] | None = None,
    fill: float = np.nan,
    origin_rc: tuple[int, int] = (0, 0),
) -> np.ndarray:
    """Scatter per-tile ``values`` (N,) or (N, K) onto a (R, C[, K]) raster.

    Raster cell ``[i, j]`` is grid row ``origin_rc[0] + i``, column ``origin_rc[1] + j``.
    ``shape`` defaults to just cover every tile; cells without a tile get ``fill``; tiles
    outside the raster are dropped.
    """
    grid_rc = np.asarray(grid_rc, dtype=np.int64).reshape(-1, 2) - np.asarray(origin_rc, np.int64)
    values = np.asarray(values)
    if len(values) != len(grid_rc):
        raise ValueError(f"{len(values)} values for {len(grid_rc)} tiles")
    if shape is None:
        shape = (
            (int(grid_rc[:, 0].max()) + 1, int(grid_rc[:, 1].max()) + 1) if len(grid_rc) else (1, 1)
        )
    dtype = np.result_type(values.dtype, np.float32) if np.isnan(fill) else values.dtype
    out = np.full(shape + values.shape[1:], fill, dtype=dtype)
    inside = (grid_rc[:, 0] < shape[0]) & (grid_rc[:, 1] < shape[1]) & (grid_rc >= 0).all(axis=1)
    out[grid_rc[inside, 0], grid_rc[inside, 1]] = values[inside]
    return out


def class_colors(class_names: Sequence[str], class_roles: Mapping[str, str]) -> list[str]:
    """One hex colour per class: its role's colour, shaded apart when classes share a role."""
    by_role: dict[str, list[int]] = {}
    for i, name in enumerate(class_names):
        by_role.setdefault(class_roles.get(name, f"?{name}"), []).append(i)
    colors = [""] * len(class_names)
    n_unknown = 0
    for role, idx in by_role.items():
        if role in ROLE_COLORS:
            base = np.array(to_rgb(ROLE_COLORS[role]))
        else:
            base = np.array(to_rgb(_FALLBACK_COLORS[n_unknown % len(_FALLBACK_COLORS)]))
            n_unknown += 1
        for j, i in enumerate(idx):
            # Alternate darker/lighter shades of the role colour for the 2nd, 3rd... class.
            t = 0.0 if j == 0 else (0.35 * ((j + 1) // 2) / max(1, (len(idx) + 1) // 2))
            shade = base * (1 - t) if j % 2 else base + (1 - base) * t
            r, g, b = (round(255 * float(v)) for v in np.clip(shade, 0, 1))
            colors[i] = f"#{r:02x}{g:02x}{b:02x}"
    return colors


# --- drawing helpers -------------------------------------------------------------------
def _as_rgb_uint8(thumbnail: np.ndarray) -> np.ndarray:
    t = np.asarray(thumbnail)
    if t.ndim == 2:
        t = np.repeat(t[..., None], 3, axis=2)
    if t.ndim != 3 or t.shape[2] not in (3, 4):
        raise ValueError(f"thumbnail must be (h, w, 3) RGB, got shape {t.shape}")
    return np.ascontiguousarray(t[..., :3]).astype(np.uint8, copy=False)


MAX_DRAW_PX = 1600  # the picture is ~900 px wide: drawing more thumbnail pixels only costs time


def _reduce(thumbnail: np.ndarray, geom: SlideGeometry,
            max_px: int = MAX_DRAW_PX) -> tuple[np.ndarray, SlideGeometry, int]:
    """Block-average a large thumbnail to at most ``max_px`` on its long side.

    Returns the thumbnail, the geometry with the downsample scaled to match, and the factor.
    """
    k = math.ceil(max(thumbnail.shape[:2]) / max_px)
    if k <= 1:
        return thumbnail, geom, 1
    small = np.clip(_block_mean(thumbnail, k, 255.0) + 0.5, 0, 255).astype(np.uint8)
    g = SlideGeometry(geom.thumb_downsample * k, geom.slide_mpp_um, geom.tile_level0_px,
                      geom.pixel_size)
    return small, g, k


def _reduce_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A boolean mask brought to at most ``shape`` by block majority (never upsampled)."""
    k = math.ceil(max(mask.shape[0] / shape[0], mask.shape[1] / shape[1]))
    if k <= 1:
        return mask
    return _block_mean(mask, k, 0.0) >= 0.5


def _block_mean(a: np.ndarray, k: int, pad_value: float) -> np.ndarray:
    """Mean over k x k blocks of a (h, w[, c]) array, padding the edges with ``pad_value``."""
    h, w = a.shape[:2]
    H, W = -(-h // k) * k, -(-w // k) * k
    if (H, W) != (h, w):
        pad = [(0, H - h), (0, W - w)] + [(0, 0)] * (a.ndim - 2)
        a = np.pad(a, pad, constant_values=pad_value)
    b = a.reshape(H // k, k, W // k, k, *a.shape[2:])
    return b.mean(axis=(1, 3), dtype=np.float32)


def _faded_gray(thumbnail: np.ndarray, strength: float = 0.55) -> np.ndarray:
    """Light greyscale of the thumbnail: morphology stays visible under colour overlays."""
    g = thumbnail.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    g = 255 - (255 - g) * strength
    return np.repeat(g[..., None], 3, axis=2).astype(np.uint8)


def _new_figure(h_px: int, w_px: int, extra_w_in: float = 0.0) -> tuple[Figure, Any]:
    aspect = h_px / max(w_px, 1)
    if aspect <= 1:
        w_in, h_in = _FIG_MAX_IN, max(_FIG_MAX_IN * aspect, 1.5)
    else:
        w_in, h_in = max(_FIG_MAX_IN / aspect, 1.5), _FIG_MAX_IN
    fig = Figure(figsize=(w_in + extra_w_in, h_in + 0.6), dpi=_DPI)
    ax = fig.add_axes((0.02, 0.02, w_in / (w_in + extra_w_in) - 0.03, h_in / (h_in + 0.6) - 0.02))
    ax.set_xlim(0, w_px)
    ax.set_ylim(h_px, 0)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#888888")
        s.set_linewidth(0.6)
    return fig, ax


def _show_image(ax: Any, img: np.ndarray, **kw: Any) -> Any:
    h, w = img.shape[:2]
    return ax.imshow(img, extent=(0, w, h, 0), interpolation="nearest", **kw)


def _show_grid(ax: Any, raster: np.ndarray, geom: SlideGeometry, origin_rc=(0, 0), **kw: Any) -> Any:
    """Draw a grid raster where its tiles lie on the thumbnail."""
    t = geom.tile_thumb_px
    r0, c0 = origin_rc
    R, C = raster.shape[:2]
    extent = (c0 * t, (c0 + C) * t, (r0 + R) * t, r0 * t)
    return ax.imshow(raster, extent=extent, interpolation="nearest", **kw)


def nice_scale_bar_mm(width_px: float, um_per_px: float, max_fraction: float = 0.25) -> float:
    """The largest 'nice' length in mm (1, 2, 5 x 10^k) no longer than max_fraction of the width."""
    limit_mm = width_px * um_per_px * max_fraction / 1000.0
    best = _NICE_MM[0]
    for mm in _NICE_MM:
        if mm <= limit_mm:
            best = mm
    if limit_mm > _NICE_MM[-1]:
        k = 10 ** math.floor(math.log10(limit_mm))
        best = max(m * k for m in (1, 2, 5) if m * k <= limit_mm)
    return best


def _scale_bar(ax: Any, w_px: int, h_px: int, um_per_px: float) -> None:
    """A black bar of a nice length in mm, bottom right, on a translucent white box."""
    from matplotlib.font_manager import FontProperties
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar

    mm = nice_scale_bar_mm(w_px, um_per_px)
    label = f"{mm:g} mm" if mm >= 1 else f"{mm:g} mm ({mm * 1000:g} µm)"
    bar = AnchoredSizeBar(
        ax.transData, mm * 1000.0 / um_per_px, label, "lower right", pad=0.4, borderpad=0.6,
        sep=3, frameon=True, size_vertical=max(0.01 * h_px, 0.5), label_top=True,
        fontproperties=FontProperties(size=9),
    )
    bar.patch.set_facecolor("white")
    bar.patch.set_alpha(0.8)
    bar.patch.set_edgecolor("none")
    ax.add_artist(bar)


def _title(ax: Any, title: str | None) -> None:
    if title:
        # parse_math=False: slide ids may contain '$' or '_' that mathtext would mangle or reject.
        ax.set_title(title, fontsize=10, loc="left", parse_math=False)


def _legend(ax: Any, handles: list[Any], title: str | None = None) -> None:
    leg = ax.legend(
        handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
        fontsize=9, title=title, title_fontsize=9, frameon=False,
    )
    for t in leg.get_texts():
        t.set_parse_math(False)


def _outline_segments(mask: np.ndarray, upsample: int = 1) -> list[np.ndarray]:
    """Contours of a boolean mask as (M, 2) arrays of (x, y) in the mask's pixel units.

    Pixel (r, c) covers [c, c+1) x [r, r+1). ``upsample`` > 1 keeps tile-shaped outlines
    square (find_contours on a coarse mask would cut every corner diagonally).
    """
    from skimage.measure import find_contours

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return []
    if upsample > 1:
        m = np.kron(m, np.ones((upsample, upsample), dtype=bool))
    padded = np.pad(m, 1).astype(np.float32)
    out = []
    for cont in find_contours(padded, 0.5):
        # index i of the padded array is pixel i-1, whose centre lies at i-1+0.5
        yx = (cont - 1 + 0.5) / upsample
        out.append(yx[:, ::-1])
    return out


def _draw_outline(ax: Any, segments: list[np.ndarray], scale: float | tuple[float, float],
                  offset_xy: tuple[float, float] = (0.0, 0.0), **kw: Any) -> None:
    """Draw contours as one LineCollection (thousands of specks stay fast)."""
    from matplotlib.collections import LineCollection

    if not segments:
        return
    sx, sy = (scale, scale) if np.isscalar(scale) else scale  # type: ignore[misc]
    lines = [np.column_stack([seg[:, 0] * sx + offset_xy[0], seg[:, 1] * sy + offset_xy[1]])
             for seg in segments]
    ls = kw.pop("ls", kw.pop("linestyle", "-"))
    lw = kw.pop("lw", kw.pop("linewidth", 1.5))
    ax.add_collection(LineCollection(lines, colors=kw.pop("color", "black"), linestyles=ls,
                                     linewidths=lw, **kw))


def _grid_upsample(shape: tuple[int, ...]) -> int:
    return int(np.clip(2000 // max(max(shape[:2]), 1), 1, 6))


def _finish(fig: Figure, path: str | os.PathLike[str] | None) -> bytes | Path:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # A slide id in a script DejaVu lacks (CJK...) shows as boxes here; the HTML has the text.
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        # Fixed metadata: the same inputs give byte-identical PNGs (serial vs distributed runs).
        fig.savefig(buf, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08,
                    facecolor="white", metadata={"Software": None})
    data = buf.getvalue()
    if path is None:
        return data
    return atomic_write_bytes(path, data)  # a kill never leaves half a PNG


# --- the pictures ----------------------------------------------------------------------
def plot_thumbnail(
    thumbnail: np.ndarray,
    tissue_mask: np.ndarray | None,
    geom: SlideGeometry,
    *,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> bytes | Path:
    """The thumbnail (h, w, 3) uint8 with the tissue mask (h', w') bool outlined.

    The mask may have another resolution than the thumbnail; it is stretched onto it.
    """
    thumb, geom, _ = _reduce(_as_rgb_uint8(thumbnail), geom)
    h, w = thumb.shape[:2]
    fig, ax = _new_figure(h, w, extra_w_in=1.8)
    _show_image(ax, thumb)
    handles: list[Any] = []
    if tissue_mask is not None:
        m = np.asarray(tissue_mask, dtype=bool)
        area_px = float(m.sum()) * (h / m.shape[0]) * (w / m.shape[1])  # before any reduction
        m = _reduce_mask(m, (h, w))
        sy, sx = h / m.shape[0], w / m.shape[1]
        _draw_outline(ax, _outline_segments(m), (sx, sy), color=TISSUE_OUTLINE_COLOR, lw=1.2)
        area_mm2 = area_px * geom.thumb_um_per_px**2 / 1e6
        handles.append(Line2D([], [], color=TISSUE_OUTLINE_COLOR, lw=1.5,
                              label=f"tissue mask ({area_mm2:.1f} mm²)"))
    _scale_bar(ax, w, h, geom.thumb_um_per_px)
    _title(ax, title)
    if handles:
        _legend(ax, handles)
    return _finish(fig, path)


def plot_tissue_classes(
    thumbnail: np.ndarray,
    grid_rc: np.ndarray,
    tissue_probs: np.ndarray,
    class_names: Sequence[str],
    class_roles: Mapping[str, str],
    geom: SlideGeometry,
    *,
    title: str | None = None,
    alpha: float = 0.8,
    path: str | os.PathLike[str] | None = None,
) -> bytes | Path:
    """Most probable class per tile over a faded thumbnail; legend with class names, roles, shares.

    grid_rc: (N, 2) row, col; tissue_probs: (N, K) probabilities over ``class_names`` (K);
    class_roles: class name -> role (docs/biomarkers.md), which picks the colours.
    """
    thumb, geom, _ = _reduce(_as_rgb_uint8(thumbnail), geom)
    h, w = thumb.shape[:2]
    probs = np.asarray(tissue_probs, dtype=np.float32)
    probs = probs.reshape(len(grid_rc), probs.shape[-1] if probs.ndim == 2 else -1)
    if probs.shape[1] != len(class_names):
        raise ValueError(f"{probs.shape[1]} probability columns for {len(class_names)} classes")
    colors = class_colors(class_names, class_roles)
    label = np.argmax(probs, axis=1) if len(probs) else np.zeros(0, dtype=np.int64)
    rgba_lut = np.array([(*to_rgb(c), alpha) for c in colors] + [(0, 0, 0, 0)], np.float32)
    raster = grid_raster(grid_rc, label, shape=_grid_shape(h, w, geom, grid_rc), fill=-1)
    rgba = rgba_lut[np.where(raster < 0, len(colors), raster).astype(np.int64)]

    fig, ax = _new_figure(h, w, extra_w_in=2.2)
    _show_image(ax, _faded_gray(thumb))
    _show_grid(ax, rgba, geom)
    counts = np.bincount(label, minlength=len(class_names)) if len(label) else np.zeros(len(colors))
    total = max(int(counts.sum()), 1)
    handles = [
        Patch(facecolor=colors[i], edgecolor="#444444", lw=0.5,
              label=f"{name} ({class_roles.get(name, '?')}) {100 * counts[i] / total:.0f}%")
        for i, name in enumerate(class_names)
    ]
    _scale_bar(ax, w, h, geom.thumb_um_per_px)
    _title(ax, title)
    _legend(ax, handles, title="class (role), % tiles")
    return _finish(fig, path)


def _grid_shape(h: int, w: int, geom: SlideGeometry, grid_rc: np.ndarray) -> tuple[int, int]:
    """Grid raster shape covering the thumbnail and every tile."""
    t = geom.tile_thumb_px
    R, C = math.ceil(h / t), math.ceil(w / t)
    g = np.asarray(grid_rc).reshape(-1, 2)
    if len(g):
        R, C = max(R, int(g[:, 0].max()) + 1), max(C, int(g[:, 1].max()) + 1)
    return R, C


def plot_lymphocyte_density(
    thumbnail: np.ndarray,
    grid_rc: np.ndarray,
    density_per_mm2: np.ndarray,
    geom: SlideGeometry,
    *,
    vmax_per_mm2: float | None = None,
    title: str | None = None,
    count_source: str | None = None,
    bulk_mask: np.ndarray | None = None,
    origin_rc: tuple[int, int] = (0, 0),
    path: str | os.PathLike[str] | None = None,
) -> bytes | Path:
    """Heatmap of lymphocytes per mm^2 of tissue per tile, colour bar in cells/mm².

    density_per_mm2: (N,) per tile (NaN = not available, drawn transparent).
    vmax_per_mm2: top of the colour scale; pass the same value for every slide of a cohort to
    make the pictures comparable (default: the slide's 99th percentile, at least 100).
    bulk_mask: optional (R, C) bool tumour bulk on the grid at ``origin_rc``, outlined.
    """
    thumb, geom, _ = _reduce(_as_rgb_uint8(thumbnail), geom)
    h, w = thumb.shape[:2]
    dens = np.asarray(density_per_mm2, dtype=np.float64).reshape(-1)
    finite = dens[np.isfinite(dens)]
    if vmax_per_mm2 is None:
        vmax_per_mm2 = max(float(np.percentile(finite, 99)) if len(finite) else 0.0, 100.0)
    raster = grid_raster(grid_rc, dens, shape=_grid_shape(h, w, geom, grid_rc))
    raster = np.ma.masked_invalid(raster)

    fig, ax = _new_figure(h, w, extra_w_in=2.2)
    _show_image(ax, _faded_gray(thumb))
    im = _show_grid(ax, raster, geom, cmap="inferno_r", vmin=0.0, vmax=vmax_per_mm2, alpha=0.85)
    handles: list[Any] = []
    if bulk_mask is not None:
        _outline_grid_mask(ax, bulk_mask, geom, origin_rc, color=COMPARTMENT_STYLES["bulk"][0],
                           ls="-", lw=1.4)
        handles.append(Line2D([], [], color=COMPARTMENT_STYLES["bulk"][0], lw=1.5,
                              label="tumour bulk"))
    cax = ax.inset_axes((1.03, 0.0, 0.035, 0.6))
    cb = fig.colorbar(im, cax=cax, extend="max" if len(finite) and finite.max() > vmax_per_mm2
                      else "neither")
    cb.set_label(f"lymphocytes / mm² tissue (scale 0-{vmax_per_mm2:,.0f})", fontsize=9)
    cb.ax.tick_params(labelsize=8)
    if count_source:
        ax.text(1.03, 0.63, f"counts: {count_source}", transform=ax.transAxes, fontsize=9,
                va="bottom", parse_math=False)
    _scale_bar(ax, w, h, geom.thumb_um_per_px)
    _title(ax, title)
    if handles:
        _legend(ax, handles)
    return _finish(fig, path)


def _outline_grid_mask(ax: Any, mask: np.ndarray, geom: SlideGeometry, origin_rc, **kw: Any) -> None:
    m = np.asarray(mask, dtype=bool)
    t = geom.tile_thumb_px
    up = _grid_upsample(m.shape)
    _draw_outline(ax, _outline_segments(m, up), t, (origin_rc[1] * t, origin_rc[0] * t), **kw)


def plot_compartments(
    thumbnail: np.ndarray,
    geom: SlideGeometry,
    *,
    masks: Mapping[str, np.ndarray],
    origin_rc: tuple[int, int] = (0, 0),
    tls_labels: np.ndarray | None = None,
    tls_centroids_xy_level0: np.ndarray | None = None,
    tls_areas_um2: np.ndarray | None = None,
    areas_mm2: Mapping[str, float] | None = None,
    title: str | None = None,
    path: str | os.PathLike[str] | None = None,
) -> bytes | Path:
    """Tumour bulk, invasive margin (and core) and TLS outlined over the thumbnail.

    masks: name -> (R, C) bool on the grid at ``origin_rc`` (names such as ``bulk``/``tumor_bulk``,
    ``margin``/``invasive_margin``, ``core``; others get a fallback colour).
    tls_labels: optional (R, C) int on the same grid, 0 = none, k = TLS number k (outlined).
    tls_centroids_xy_level0: optional (M, 2) level-0 x, y; with ``tls_areas_um2`` (M,), each TLS
    is drawn as a circle of its area when no label map is given, and numbered in both cases.
    areas_mm2: optional name -> tissue area shown in the legend (pass the cohort row's
    ``<name>_area_mm2`` so the picture and the table agree).
    """
    thumb, geom, _ = _reduce(_as_rgb_uint8(thumbnail), geom)
    h, w = thumb.shape[:2]
    t = geom.tile_thumb_px
    off = (origin_rc[1] * t, origin_rc[0] * t)
    fig, ax = _new_figure(h, w, extra_w_in=2.0)
    _show_image(ax, thumb)
    handles: list[Any] = []
    n_fallback = 0
    for name, mask in masks.items():
        m = np.asarray(mask, dtype=bool)
        if name in COMPARTMENT_STYLES:
            color, ls, fill = COMPARTMENT_STYLES[name]
        else:
            color, ls, fill = _FALLBACK_COLORS[n_fallback % len(_FALLBACK_COLORS)], "-.", 0.0
            n_fallback += 1
        label = name.replace("_", " ")
        if areas_mm2 is not None and name in areas_mm2:
            label += f" ({areas_mm2[name]:.2f} mm² tissue)"
        if fill > 0 and m.any():
            rgba = np.zeros(m.shape + (4,), np.float32)
            rgba[m] = (*to_rgb(color), fill)
            _show_grid(ax, rgba, geom, origin_rc)
        _outline_grid_mask(ax, m, geom, origin_rc, color=color, ls=ls, lw=1.5)
        handles.append(Patch(facecolor=(*to_rgb(color), fill), edgecolor=color, ls=ls, lw=1.5,
                             label=label) if fill > 0 else
                       Line2D([], [], color=color, ls=ls, lw=1.5, label=label))
    n_tls = 0
    if tls_labels is not None:
        lab = np.asarray(tls_labels)
        from scipy import ndimage as ndi

        up = _grid_upsample(lab.shape)
        segs: list[np.ndarray] = []
        ids = []
        # contour each TLS inside its own bounding box: cheap however many there are
        for k, sl in enumerate(ndi.find_objects(np.clip(lab, 0, None).astype(np.int64)), start=1):
            if sl is None:
                continue
            ids.append(k)
            r0, c0 = sl[0].start, sl[1].start
            for seg in _outline_segments(lab[sl] == k, up):
                segs.append(seg + np.array([c0, r0], dtype=seg.dtype))
            ax.text(off[0] + (sl[1].stop + 0.2) * t, off[1] + r0 * t, str(k), color=TLS_COLOR,
                    fontsize=TLS_LABEL_PT, fontweight="bold", va="top", path_effects=_HALO)
        _draw_outline(ax, segs, t, off, color=TLS_COLOR, lw=1.6)
        n_tls = len(ids)
    elif tls_centroids_xy_level0 is not None and len(tls_centroids_xy_level0):
        from matplotlib.patches import Circle

        xy = geom.level0_to_thumb(tls_centroids_xy_level0)
        areas = (np.asarray(tls_areas_um2, dtype=np.float64).reshape(-1) if tls_areas_um2 is not None
                 else np.full(len(xy), (geom.tile_level0_px * geom.slide_mpp_um) ** 2))
        for k, ((x, y), a) in enumerate(zip(xy, areas), start=1):
            r_px = max(math.sqrt(a / math.pi) / geom.thumb_um_per_px, 2.0)
            ax.add_patch(Circle((x, y), r_px, fill=False, ec=TLS_COLOR, lw=1.6))
            ax.annotate(str(k), (x + r_px * 0.71, y - r_px * 0.71), xytext=(2, 2),
                        textcoords="offset points", color=TLS_COLOR, fontsize=TLS_LABEL_PT,
                        fontweight="bold", path_effects=_HALO)
        n_tls = len(xy)
    handles.append(Line2D([], [], color=TLS_COLOR, lw=1.6, label=f"TLS (n = {n_tls})"))
    _scale_bar(ax, w, h, geom.thumb_um_per_px)
    _title(ax, title)
    _legend(ax, handles)
    return _finish(fig, path)
