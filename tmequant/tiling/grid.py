"""The tile grid: pure geometry from a tissue mask to the kept tiles."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tmequant.pixelsize import pitch_xy
from tmequant.wsi.tissue import tissue_fraction_of_boxes


@dataclass(frozen=True)
class TilePlan:
    """Kept tiles in row-major order.

    ``coords`` (N, 2) int64 level-0 x, y of the top-left corners; ``grid`` (N, 2) int32
    row, col; ``tissue_fraction`` (N,) float32; ``n_rows, n_cols`` the full grid size;
    ``tile_level0_px`` the pitch in level-0 px (float) along x and ``tile_level0_y_px``
    along y (None: the same, square pixels). A tile covers ``tile_um`` in both directions,
    so on a slide with non-square pixels its footprint in level-0 px is not square.
    """

    coords: np.ndarray
    grid: np.ndarray
    tissue_fraction: np.ndarray
    n_rows: int
    n_cols: int
    tile_level0_px: float
    tile_level0_y_px: float | None = None

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])

    @property
    def pitch_xy(self) -> tuple[float, float]:
        """Grid pitch (= tile footprint) in level-0 px along x and y."""
        t = self.tile_level0_px
        return t, (t if self.tile_level0_y_px is None else self.tile_level0_y_px)


def plan_grid(
    level0_wh: tuple[int, int],
    tile_level0_px: float | tuple[float, float],
    mask: np.ndarray,
    mask_downsample: float | tuple[float, float],
    min_tissue_fraction: float,
    edge_tiles: bool = False,
) -> TilePlan:
    """Tiles of side ``tile_level0_px`` on a grid anchored at (0, 0) whose tissue fraction
    (from ``mask``, ``mask_downsample`` level-0 px per mask px) is >= ``min_tissue_fraction``.
    Tile corners are ``round(col * tile_level0_px)``. Both sizes are one number (square
    pixels) or (x, y) (non-square pixels: the pitch and the downsample differ per axis).

    Without ``edge_tiles`` only tiles fully inside level 0 are planned. With it, the partial
    tiles at the right and bottom edges are planned too (they are read padded with glass):
    their tissue fraction is of the whole tile (so tissue area = fraction x tile area stays
    true) and they are kept when the tissue covers ``min_tissue_fraction`` of the part of
    the tile that lies on the slide. Small images, TMA cores and biopsies are measured whole.
    """
    w0, h0 = level0_wh
    tx, ty = pitch_xy(tile_level0_px)
    mdx, mdy = pitch_xy(mask_downsample)
    eps = 1e-6
    rnd = math.ceil if edge_tiles else math.floor
    n_cols = max(0, rnd(w0 / tx - eps) if edge_tiles else rnd(w0 / tx + eps))
    n_rows = max(0, rnd(h0 / ty - eps) if edge_tiles else rnd(h0 / ty + eps))
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    rows, cols = rr.ravel(), cc.ravel()
    x = cols * tx
    y = rows * ty
    boxes = np.stack([x, y, x + tx, y + ty], axis=1) / np.array([mdx, mdy, mdx, mdy])
    frac = (tissue_fraction_of_boxes(mask, boxes) if rows.size else np.zeros(0, np.float32))
    # share of each tile on the slide (1 inside; less for partial edge tiles)
    on_slide = (np.clip(w0 - x, 0, tx) * np.clip(h0 - y, 0, ty)) / (tx * ty)
    frac = np.minimum(frac, on_slide).astype(np.float32)  # mask pixels reach past the edge
    keep = (frac >= min_tissue_fraction * on_slide - 1e-7) & (on_slide > 0)
    coords = np.stack([np.round(x[keep]), np.round(y[keep])], axis=1).astype(np.int64).reshape(-1, 2)
    grid = np.stack([rows[keep], cols[keep]], axis=1).astype(np.int32).reshape(-1, 2)
    return TilePlan(coords, grid, frac[keep].astype(np.float32), n_rows, n_cols, tx,
                    None if ty == tx else ty)


def blocks(plan: TilePlan, block_tiles: int) -> list[np.ndarray]:
    """Group kept tile indices into blocks of up to ``block_tiles`` x ``block_tiles`` grid cells,
    in row-major block order (so blocks of one block-row cover a contiguous index range)."""
    if plan.n_tiles == 0:
        return []
    br = plan.grid[:, 0] // block_tiles
    bc = plan.grid[:, 1] // block_tiles
    key = br.astype(np.int64) * (plan.n_cols // block_tiles + 2) + bc
    order = np.lexsort((np.arange(plan.n_tiles), key))
    k_sorted = key[order]
    cuts = np.flatnonzero(np.diff(k_sorted)) + 1
    return [np.sort(g) for g in np.split(order, cuts)]
