"""A cell detector over a slide store: every tile with the borders of its neighbours.

Each tile is run as a canvas of ``tile_px + 2 * context_px`` pixels: the tile in the centre,
the facing strips of its (up to 8) stored neighbours around it, glass where there is no
neighbour (slide edge, background). A cell is kept only by the tile that holds its centre,
so cells on tile borders are neither lost (the network sees them whole) nor counted twice.

Per output chunk the store gets the chunk's cells (level-0 x, y, class, score, tile), the
per-tile counts per cell class (``cell_counts``) and tissue probabilities derived from the
cells (``tissue_probs``, :func:`tmequant.models.detector.tissue_from_cells`), then the chunk's
flag: a killed run resumes at the first unfinished chunk and never doubles cells.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmequant._faults import checkpoint
from tmequant.inference.cells import ALIGN_PX, PAD_VALUE, HeatmapRunner
from tmequant.memory import release_memory
from tmequant.models.detector import peaks_table, tissue_from_cells
from tmequant.progress import ProgressBar
from tmequant.store import SlideStore
from tmequant.tiling.source import open_tiles

log = logging.getLogger("tmequant")

# Largest run of consecutive tiles read at once to find a block's neighbours; beyond it
# (a store whose tiles are not in row-major order) neighbours are read one by one.
MAX_WINDOW_TILES = 4096
WINDOW_BLOCK_TILES = 128  # tiles read and dropped together by the window (a default shard)
_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]


class _Neighbours:
    """Grid lookup: tile index of (row, col), -1 where no tile is stored."""

    def __init__(self, grid_rc: np.ndarray):
        lo = (grid_rc.min(axis=0) - 1) if len(grid_rc) else np.zeros(2, np.int64)
        self.r0, self.c0 = int(lo[0]), int(lo[1])
        shape = (grid_rc.max(axis=0) - (self.r0, self.c0) + 2) if len(grid_rc) else (1, 1)
        self.map = np.full(tuple(int(s) for s in shape), -1, dtype=np.int64)
        self.map[grid_rc[:, 0] - self.r0, grid_rc[:, 1] - self.c0] = np.arange(len(grid_rc))
        self.grid = grid_rc

    def of(self, idx: np.ndarray, dr: int, dc: int) -> np.ndarray:
        """(n,) index of the neighbour at (dr, dc) of each tile in ``idx`` (-1: none)."""
        rc = self.grid[idx]
        return self.map[rc[:, 0] - self.r0 + dr, rc[:, 1] - self.c0 + dc]


class _TileWindow:
    """Decoded tiles of a sliding index range, so each tile is decoded once per pass.

    Held as blocks of WINDOW_BLOCK_TILES consecutive tiles (a shard of the default store),
    each read once and dropped once the pass is past it: no window is ever concatenated or
    copied as it slides, and every block is one size, so the heap reuses their memory
    instead of fragmenting (a concatenated window of varying size grew the process by
    ~3 MB per output chunk)."""

    def __init__(self, images: Any):
        self.images = images
        self.n = int(images.shape[0])
        self.tile_shape = tuple(images.shape[1:])
        self.blocks: dict[int, np.ndarray] = {}

    def get(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx), T, T, 3) uint8 tiles ``idx`` (all >= 0)."""
        lo, hi = int(idx.min()), int(idx.max()) + 1
        out = np.empty((len(idx),) + self.tile_shape, dtype=np.uint8)
        if hi - lo > MAX_WINDOW_TILES:
            order = np.argsort(idx)
            out[order] = np.asarray(self.images.get_orthogonal_selection((idx[order],)))
            return out
        bs = WINDOW_BLOCK_TILES
        first, last = lo // bs, (hi - 1) // bs
        for b in [b for b in self.blocks if b < first or b > last + 1]:
            del self.blocks[b]  # behind the pass (or ahead of a resumed one): not needed again
        which = idx // bs
        for b in range(first, last + 1):
            if b not in self.blocks:
                self.blocks[b] = np.asarray(self.images[b * bs:min((b + 1) * bs, self.n)])
            sel = which == b
            if sel.any():
                out[sel] = self.blocks[b][idx[sel] - b * bs]
        return out


def tile_canvases(tiles: _TileWindow, nb: _Neighbours, idx: np.ndarray, tile_px: int,
                  margin: int) -> np.ndarray:
    """(n, T + 2m, T + 2m, 3) uint8: each tile of ``idx`` with ``margin`` px of its neighbours."""
    t, m = tile_px, margin
    side = t + 2 * m
    out = np.full((len(idx), side, side, 3), PAD_VALUE, dtype=np.uint8)
    src = {-1: slice(t - m, t), 0: slice(0, t), 1: slice(0, m)}
    dst = {-1: slice(0, m), 0: slice(m, m + t), 1: slice(m + t, side)}
    for dr, dc in _OFFSETS:
        if m == 0 and (dr or dc):
            continue
        j = idx if (dr, dc) == (0, 0) else nb.of(idx, dr, dc)
        have = j >= 0
        if not have.any():
            continue
        px = tiles.get(j[have])
        out[np.flatnonzero(have), dst[dr], dst[dc]] = px[:, src[dr], src[dc]]
    return out


def run_detector_chunks(
    st: SlideStore, model: Any, card: Any, dev: torch.device, todo: list[int], n: int,
    chunk_rows: int, batch_size: int, progress: bool | None, amp: torch.dtype | None = None,
    runtime: str = "torch",
) -> int:
    """Detect the cells of the output chunks ``todo`` and write them (see module doc).
    Returns the number of tiles processed."""
    spec = card.detector
    t = st.tile_px
    margin = int(spec.context_px)
    runner = HeatmapRunner(model, card, dev, amp, runtime=runtime)
    nb = _Neighbours(st.grid.astype(np.int64))
    tiles = _TileWindow(open_tiles(st, check=False))  # predict_store checked the slide
    coords = st.coords.astype(np.float64)
    frac = st.tissue_fraction.astype(np.float64)
    area_um2 = frac * st.tile_um ** 2
    # level-0 px per stored px, along x and y (they differ on non-square pixels)
    tx, ty = st.tile_level0_xy_px
    sx, sy = tx / t, ty / t
    roles = [card.cell_roles.get(c, "other") for c in card.cell_classes]
    n_cls = card.n_cell
    n_todo = sum(min((c + 1) * chunk_rows, n) - c * chunk_rows for c in todo)
    n_done = 0
    # Denser tiles than the densest training crop are extrapolation: say so (once per run).
    max_train = float(card.training.get("max_cells_per_mm2_in_training") or 0.0)
    n_denser = 0
    desc = f"detect cells {Path(st.path).name} [{card.name}]"
    with ProgressBar(n_todo, desc, unit="tiles", enabled=progress) as bar:
        for c in todo:
            a, b = c * chunk_rows, min((c + 1) * chunk_rows, n)
            cx, cy, ccls, csc, ctile = [], [], [], [], []
            counts = np.zeros((b - a, n_cls), dtype=np.float32)
            for s in range(a, b, batch_size):
                idx = np.arange(s, min(s + batch_size, b))
                canv = tile_canvases(tiles, nb, idx, t, margin)
                heat = runner(torch.from_numpy(_pad_batch(canv)))
                pk = peaks_table(heat, spec, card.cell_classes, card.mpp_um)
                lx, ly = pk["x"] - margin, pk["y"] - margin
                inside = (lx >= 0) & (lx < t) & (ly >= 0) & (ly < t)
                ti = idx[pk["b"][inside]]
                cx.append(coords[ti, 0] + lx[inside] * sx)
                cy.append(coords[ti, 1] + ly[inside] * sy)
                ccls.append(pk["cls"][inside])
                csc.append(pk["score"][inside])
                ctile.append(ti.astype(np.int32))
                np.add.at(counts, (ti - a, pk["cls"][inside].astype(np.int64)), 1.0)
                bar.update(len(idx))
            probs = tissue_from_cells(counts, roles, area_um2[a:b], spec)
            if max_train > 0:
                with np.errstate(divide="ignore", invalid="ignore"):
                    dens = counts.sum(axis=1) / (area_um2[a:b] * 1e-6)
                n_denser += int((dens > 1.2 * max_train).sum())
            cells = {k: np.concatenate(v) if v else np.zeros(0) for k, v in
                     (("x", cx), ("y", cy), ("cls", ccls), ("score", csc), ("tile", ctile))}
            cells["cls"] = cells["cls"].astype(np.uint8)
            cells["tile"] = cells["tile"].astype(np.int32)
            st.write_prediction_chunk(card.name, c, tissue_probs=probs, cell_counts=counts,
                                      cells=cells)
            checkpoint("predict_chunk")  # tests: a kill between chunks
            # the heap grows with every chunk's cell arrays and the runtime's threads' arenas
            # (1.72 -> 2.0 GB over 12 chunks of a 23,017-tile slide): hand it back
            release_memory()
            n_done += b - a
    if n_denser:
        log.warning("%s: %d tile(s) hold more cells than any training image of %s (> 1.2 x %.0f "
                    "cells/mm^2): counts there are extrapolated", st.path, n_denser, card.name,
                    max_train)
    return n_done


def _pad_batch(canv: np.ndarray) -> np.ndarray:
    """Pad a (n, S, S, 3) batch of canvases to a multiple of ALIGN_PX with glass."""
    s = canv.shape[1]
    side = -(-s // ALIGN_PX) * ALIGN_PX
    if side == s:
        return canv
    out = np.full((len(canv), side, side, 3), PAD_VALUE, dtype=np.uint8)
    out[:, :s, :s] = canv
    return out
