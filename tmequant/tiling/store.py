"""Read access to the per-slide zarr v3 store (layout: docs/store-layout.md).

The store is the interface between steps. ``SlideStore`` opens one read-only and checks
that it is finished; writers (tiling, prediction, nucleus counting) mark each group
``complete`` last with :func:`mark_complete`, so a half-written group is never read.
Paths may be local or any fsspec URL zarr supports (``memory://``, ``s3://``...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import zarr

from tmequant.errors import StoreError

STORE_SCHEMA_VERSION = 1
COMPLETE = "complete"


def store_path(out_dir: str | os.PathLike[str], slide_id: str) -> str:
    """``<out_dir>/<slide_id>.zarr`` (out_dir may be an fsspec URL)."""
    return f"{str(out_dir).rstrip('/')}/{slide_id}.zarr"


def _is_url(path: str) -> bool:
    return "://" in path


AccessMode = Literal["r", "r+", "a", "w", "w-"]


def open_group(path: str | os.PathLike[str], mode: AccessMode = "r") -> zarr.Group:
    """Open a zarr v3 group; a missing local store raises StoreError naming the path."""
    p = str(path)
    if mode == "r" and not _is_url(p) and not Path(p).exists():
        raise StoreError("no such slide store (run `tmequant tile` first)", p)
    try:
        return zarr.open_group(p, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):
        raise StoreError("no such slide store (run `tmequant tile` first)", p) from None
    except Exception as e:  # corrupt metadata and the like
        raise StoreError(f"cannot open slide store: {type(e).__name__}: {e}", p) from None


def is_complete(group: zarr.Group) -> bool:
    """True when the group's completion marker was written."""
    return bool(group.attrs.get(COMPLETE, False))


def mark_complete(group: zarr.Group, **attrs: Any) -> None:
    """Write ``attrs`` and then the completion marker, in that order (the marker is last)."""
    if attrs:
        group.attrs.update(attrs)
    group.attrs[COMPLETE] = True


def clear_complete(group: zarr.Group) -> None:
    """Remove the completion marker before a group is rewritten."""
    if COMPLETE in group.attrs:
        del group.attrs[COMPLETE]


def store_is_complete(path: str | os.PathLike[str]) -> bool:
    """True when a finished slide store exists at ``path`` (False if absent or unfinished)."""
    try:
        return is_complete(open_group(path, "r"))
    except StoreError:
        return False


class SlideStore:
    """A finished slide store, read-only.

    >>> s = SlideStore("out/slide.zarr")          # doctest: +SKIP
    >>> s.n_tiles, s.tile_um, s.coords.shape      # doctest: +SKIP
    (812, 112.0, (812, 2))
    """

    def __init__(self, path: str | os.PathLike[str], require_complete: bool = True):
        self.path = str(path)
        self.root = open_group(self.path, "r")
        if require_complete and not is_complete(self.root):
            raise StoreError(
                "slide store is unfinished (interrupted?); rerun `tmequant tile` to complete it",
                self.path,
            )
        version = self.root.attrs.get("schema_version")
        if require_complete and version != STORE_SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version!r}, this tmequant reads {STORE_SCHEMA_VERSION}",
                self.path,
            )

    # --- attributes -------------------------------------------------------------------
    def _attr(self, key: str) -> Any:
        """A root attribute as read from JSON (typed Any: the schema fixes its type)."""
        return self.root.attrs[key]

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def slide_id(self) -> str:
        return str(self._attr("slide_id"))

    @property
    def n_tiles(self) -> int:
        return int(self._attr("n_tiles"))

    @property
    def slide_mpp_um(self) -> float:
        return float(self._attr("slide_mpp_um"))

    @property
    def target_mpp_um(self) -> float:
        return float(self._attr("target_mpp_um"))

    @property
    def tile_px(self) -> int:
        return int(self._attr("tile_px"))

    @property
    def tile_um(self) -> float:
        return float(self._attr("tile_um"))

    @property
    def tile_level0_px(self) -> float:
        return float(self._attr("tile_level0_px"))

    # --- arrays -----------------------------------------------------------------------
    def _array(self, name: str) -> zarr.Array:
        try:
            arr = self.root[name]
        except KeyError:
            raise StoreError(f"store has no array {name!r}", self.path) from None
        assert isinstance(arr, zarr.Array)
        return arr

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 x, y of tile top-left corners."""
        return np.asarray(self._array("tiles/coords")[...], dtype=np.int64).reshape(-1, 2)

    @property
    def grid(self) -> np.ndarray:
        """(N, 2) int32 row, col on the tile grid."""
        return np.asarray(self._array("tiles/grid")[...], dtype=np.int32).reshape(-1, 2)

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction per tile, 0-1."""
        return np.asarray(self._array("tiles/tissue_fraction")[...], dtype=np.float32)

    @property
    def images(self) -> zarr.Array:
        """(N, tile_px, tile_px, 3) uint8 zarr array (read lazily, slice to load)."""
        return self._array("tiles/images")

    @property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool low-resolution tissue mask."""
        return np.asarray(self._array("tissue_mask")[...], dtype=bool)

    @property
    def mask_downsample(self) -> float:
        """Level-0 pixels per tissue-mask pixel."""
        downsample: Any = self._array("tissue_mask").attrs["downsample"]
        return float(downsample)

    @property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB thumbnail at the mask's resolution."""
        return np.asarray(self._array("thumbnail")[...], dtype=np.uint8)

    # --- groups written by later steps ------------------------------------------------
    def prediction_names(self) -> list[str]:
        """Names of models with finished predictions in this store."""
        if "predictions" not in self.root:
            return []
        grp = self.root["predictions"]
        assert isinstance(grp, zarr.Group)
        return sorted(k for k, g in grp.groups() if is_complete(g))

    def predictions(self, model_name: str) -> zarr.Group:
        """The finished ``predictions/<model_name>`` group (StoreError if absent/unfinished)."""
        key = f"predictions/{model_name}"
        if key not in self.root:
            raise StoreError(
                f"no predictions for model {model_name!r} (run `tmequant predict`)", self.path
            )
        grp = self.root[key]
        assert isinstance(grp, zarr.Group)
        if not is_complete(grp):
            raise StoreError(
                f"predictions for {model_name!r} are unfinished; rerun `tmequant predict`",
                self.path,
            )
        return grp

    def nuclei_counts(self) -> np.ndarray | None:
        """(N, 2) float32 nucleus-counter counts (lymphocyte, other), or None if absent."""
        if "nuclei" not in self.root:
            return None
        grp = self.root["nuclei"]
        assert isinstance(grp, zarr.Group)
        if not is_complete(grp):
            return None
        counts = grp["counts"]
        assert isinstance(counts, zarr.Array)
        return np.asarray(counts[...], dtype=np.float32)
