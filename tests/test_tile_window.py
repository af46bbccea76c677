"""The detector's sliding window of decoded tiles: right tiles, each block read once, bounded."""

from __future__ import annotations

import numpy as np

from tmequant.inference import cell_store
from tmequant.inference.cell_store import WINDOW_BLOCK_TILES, _TileWindow


class _Counting:
    """An array of tiles that counts the tiles read through slices."""

    def __init__(self, a: np.ndarray):
        self.a, self.shape, self.read = a, a.shape, 0

    def __getitem__(self, key):
        out = self.a[key]
        self.read += len(out)
        return out

    def get_orthogonal_selection(self, sel):
        return self.a[sel[0]]


def _tiles(n: int) -> np.ndarray:
    t = np.zeros((n, 4, 4, 3), np.uint8)
    t[:, 0, 0, 0], t[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256  # the index, in pixels
    return t


def test_a_forward_pass_reads_each_tile_once_and_stays_bounded():
    n, row = 1000, 60
    src = _Counting(_tiles(n))
    w = _TileWindow(src)
    for s in range(0, n, 9):  # batches of 9 with their neighbours a row above and below
        idx = np.arange(s, min(s + 9, n))
        near = np.clip(np.concatenate([idx - row - 1, idx, idx + row + 1]), 0, n - 1)
        assert np.array_equal(w.get(near), src.a[near])
        span = near.max() - near.min() + 1
        assert len(w.blocks) <= span // WINDOW_BLOCK_TILES + 2  # never the whole slide
    assert src.read == n  # every tile decoded once in the pass


def test_a_resumed_pass_going_back_and_a_scattered_batch():
    src = _Counting(_tiles(700))
    w = _TileWindow(src)
    first = w.get(np.arange(500, 520))
    back = w.get(np.arange(10, 30))  # a resumed run's earlier chunk
    assert np.array_equal(first, src.a[500:520]) and np.array_equal(back, src.a[10:30])
    assert all(b <= 1 for b in w.blocks)  # blocks ahead of the pass were dropped


def test_indices_further_apart_than_the_window_are_read_directly(monkeypatch):
    monkeypatch.setattr(cell_store, "MAX_WINDOW_TILES", 100)
    src = _Counting(_tiles(600))
    w = _TileWindow(src)
    idx = np.array([550, 3, 300, 3])
    assert np.array_equal(w.get(idx), src.a[idx]) and not w.blocks
