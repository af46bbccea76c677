"""Tile pixels read from the slide itself, for stores made without pixels (``--pixels none``).

Such a store holds everything a tiler writes (grid, coordinates, tissue, thumbnail) except
``tiles/images``. :func:`open_tiles` is how every reader of tiles gets them: the stored array,
or for such a store a :class:`SlideTiles`, which reads the same tiles from the source slide
on demand with the tiler's own reader
(:func:`tmequant.tiling.tile.read_tiles`). So a prediction from a store without pixels is the
prediction from a lossless store, number for number (tests/test_pixels_none.py), at no
storage cost: the way LazySlide and TRIDENT work.

The slide must be where the store says, unchanged (its content fingerprint is checked when
the slide is opened), with the same pixel-size override as at tiling.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from tmequant.errors import StoreError
from tmequant.provenance import file_fingerprint
from tmequant.store import SlideStore
from tmequant.tiling.grid import TilePlan
from tmequant.tiling.tile import read_tiles
from tmequant.wsi import Slide, open_slide


class SlideTiles:
    """``(n_tiles, tile_px, tile_px, 3)`` uint8, array-like (``shape``, ``[a:b]``,
    ``get_orthogonal_selection``), read from the slide of a store without pixels.

    Picklable for reader processes: the slide is opened lazily in each process.
    """

    def __init__(self, store: Any, check: bool = True):
        a = store.attrs
        self.store_path = store.path
        self.source_path = str(a.get("source_path") or "")
        self.fingerprint = store.source_fingerprint
        tp = dict(a.get("tiling_params") or {})
        self.mpp_override_um = tp.get("mpp_override_um")
        self.dct_scaled = bool(tp.get("jpeg_dct_scaling", False))
        self.level = int(a.get("read_level", 0))
        tx, ty = store.tile_level0_xy_px
        self.plan = TilePlan(store.coords, store.grid, store.tissue_fraction, 0, 0, float(tx), float(ty))
        self.tile_px = int(store.tile_px)
        self.shape = (int(store.n_tiles), self.tile_px, self.tile_px, 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 4
        self._slide: Slide | None = None
        self._lock = threading.Lock()
        if check:  # here, in the caller's process: a clear error before any reader starts
            self._check_source()

    def __len__(self) -> int:
        return self.shape[0]

    def _check_source(self) -> None:
        """StoreError unless the slide is where the store says and has not changed."""
        if not self.source_path:
            raise StoreError("store holds no pixels and names no source slide", self.store_path)
        try:
            fp = file_fingerprint(self.source_path)
        except OSError as e:
            raise StoreError(f"store holds no pixels (--pixels none) and its slide "
                             f"{self.source_path} cannot be read: {e.strerror or e}; "
                             "tile again with stored pixels, or put the slide back",
                             self.store_path) from None
        if fp["sha256_head_tail"] != self.fingerprint:
            raise StoreError(f"store holds no pixels (--pixels none) and its slide "
                             f"{self.source_path} changed since tiling; tile it again",
                             self.store_path)

    def _open(self) -> Slide:
        with self._lock:
            if self._slide is None:
                self._slide = open_slide(self.source_path, mpp_override_um=self.mpp_override_um)
            return self._slide

    def read(self, idx: np.ndarray) -> np.ndarray:
        """Tiles ``idx`` (any order, each < n_tiles): (len(idx), T, T, 3) uint8."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.shape[0]):
            raise IndexError(f"tile index out of range 0-{self.shape[0] - 1}")
        return read_tiles(self._open(), self.level, self.plan, idx, self.tile_px, self.dct_scaled)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, tuple):
            key = key[0] if len(key) == 1 else key
        if isinstance(key, slice):
            return self.read(np.arange(self.shape[0])[key])
        if isinstance(key, (int, np.integer)):
            return self.read(np.array([int(key)]))[0]
        raise TypeError(f"SlideTiles takes a slice or an index, not {type(key).__name__}")

    def get_orthogonal_selection(self, selection: tuple[Any, ...]) -> np.ndarray:
        return self.read(np.asarray(selection[0]))

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    def __getstate__(self) -> dict[str, Any]:  # never ship an open slide to a worker
        return {**self.__dict__, "_slide": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self._slide is not None:
            self._slide.close()
            self._slide = None


def open_tiles(store: Any, check: bool = True) -> Any:
    """A store's tiles, ``(N, T, T, 3)`` uint8 and array-like: ``store.images``, or the
    slide's tiles (:class:`SlideTiles`) for a store made with ``--pixels none``. ``store``:
    a :class:`tmequant.store.SlideStore` or its path. ``check``: verify the slide's content
    fingerprint (False only where the caller's process already did, e.g. reader processes)."""
    st = store if isinstance(store, SlideStore) else SlideStore(str(store))
    return st.images if st.stores_pixels else SlideTiles(st, check=check)
