"""The per-slide zarr v3 store: the one module that knows its keys (layout: docs/store-layout.md).

The store is the interface between steps. :class:`SlideStore` reads a finished store
(``SlideStore(path)`` or ``SlideStore.open(path)``) and writes one for every writer
(``SlideStore.open(path, "w")`` for tiling, ``"r+"`` for predictions and nucleus counts).
A writer holds the store's lock (``<out>/.<slide_id>.zarr.lock``, :mod:`tmequant.locks`) until
it closes the store, so two commands never write one store at once. Every group a step
writes carries ``complete``, written last, so a half-written group is never read.

Integrity: every array this module writes carries a crc32c checksum per stored chunk (the
zarr ``crc32c`` codec, after compression) and stores every chunk, even all-zero ones, so
:meth:`SlideStore.verify` can name a corrupted or missing chunk, and every read checks the
checksums of what it decodes. Reads that fail raise StoreError naming the store.

Paths may be local or any fsspec URL zarr supports (``memory://``, ``s3://``...); stores at
URLs are not locked (no OS file lock there).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ShardingCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync as zsync

from tmequant import shards
from tmequant.codecs import ImageCodec, parse_image_codec
from tmequant.errors import StoreError
from tmequant.locks import HeldLock, acquire_lock
from tmequant.pixelsize import PixelSize

if TYPE_CHECKING:
    import pandas as pd

STORE_SCHEMA_VERSION = 1
COMPLETE = "complete"
PARAMS_HASH = "params_hash"

# --- every key of the layout -----------------------------------------------------------------
TILES = "tiles"
IMAGES = "tiles/images"
COORDS = "tiles/coords"
GRID = "tiles/grid"
TISSUE_FRACTION = "tiles/tissue_fraction"
TISSUE_MASK = "tissue_mask"
THUMBNAIL = "thumbnail"
PREDICTIONS = "predictions"
TISSUE_PROBS = "tissue_probs"
CELL_COUNTS = "cell_counts"
CHUNK_DONE = "chunk_done"
CELLS = "cells"
NUCLEI = "nuclei"
NUCLEI_COUNTS = "counts"
CELL_FIELDS = {"x": "float64", "y": "float64", "cls": "uint8", "score": "float32", "tile": "int32"}
CELL_COLUMNS = ("x", "y", "class", "score", "tile")

# Root attributes a tiler writes (schema_version and complete are the store's own).
ROOT_ATTRS = (
    "slide_id", "source_path", "source_size_bytes", "source_fingerprint", "reader", "vendor",
    "level0_width_px", "level0_height_px", "slide_mpp_um", "mpp_source", "target_mpp_um",
    "tile_px", "tile_um", "tile_level0_px", "read_level", "tissue", "min_tissue_fraction",
    "tiling_params", PARAMS_HASH, "package_version",
)
# Per-axis pixel size and grid pitch (tmequant.pixelsize), written by the tiler since
# non-square pixels are supported: all four or none. A store without them (an older one, or
# a header written by hand) has square pixels of slide_mpp_um.
AXIS_ATTRS = ("slide_mpp_x_um", "slide_mpp_y_um", "tile_level0_x_px", "tile_level0_y_px")

COMPRESSIONS = ("zstd", "zstd-1", "zstd-9", "blosc-lz4", "none")  # lossless
NO_PIXELS = "omit"  # tiling_params.compression of a store without tiles/images (--pixels none)
# Every chunk is stored (all-zero ones too): a missing chunk is then damage, never "empty".
_WRITE_CONFIG: Any = {"write_empty_chunks": True}  # zarr's ArrayConfigParams

AccessMode = Literal["r", "r+", "a", "w", "w-"]


def compressors(name: str) -> list[Any]:
    """Lossless codec chain ``name`` (one of COMPRESSIONS) followed by the crc32c checksum."""
    if name == "none":
        chain: list[Any] = []
    elif name == "blosc-lz4":
        chain = [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")]
    else:
        chain = [ZstdCodec(level={"zstd": 3, "zstd-1": 1, "zstd-9": 9}[name])]
    return [*chain, Crc32cCodec()]


# zarr's default for numbers (zstd level 0), plus the checksum
_DEFAULT_COMPRESSORS = [ZstdCodec(level=0), Crc32cCodec()]


def store_path(out_dir: str | os.PathLike[str], slide_id: str) -> str:
    """``<out_dir>/<slide_id>.zarr`` (out_dir may be an fsspec URL)."""
    return f"{str(out_dir).rstrip('/')}/{slide_id}.zarr"


def _is_url(path: str) -> bool:
    return "://" in path


def lock_path(path: str | os.PathLike[str]) -> Path | None:
    """``<parent>/.<name>.lock`` of a local store (None for a URL: not lockable)."""
    p = str(path).rstrip("/")
    if _is_url(p):
        return None
    q = Path(p)
    return q.with_name(f".{q.name}.lock")


class StoreLockedError(StoreError):
    """Another process is writing this slide store."""


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


StoreState = Literal["missing", "foreign", "unreadable", "unfinished", "complete"]


def store_state(path: str | os.PathLike[str]) -> StoreState:
    """What is at ``path``: nothing, something that is not a zarr store, an unreadable store,
    an unfinished one or a finished one."""
    p = str(path)
    if not _is_url(p):
        if not Path(p).exists():
            return "missing"
        if not (Path(p) / "zarr.json").exists():
            return "foreign"
    try:
        root = zarr.open_group(p, mode="r", zarr_format=3)
    except Exception:
        return "missing" if _is_url(p) else "unreadable"
    return "complete" if is_complete(root) else "unfinished"


class StoreArray:
    """A zarr array of a store whose reads raise StoreError naming the store and the array.

    Slicing, ``get_orthogonal_selection`` and ``np.asarray`` read; other attributes (shape,
    dtype, chunks, attrs...) are the zarr array's.
    """

    def __init__(self, array: zarr.Array, store_path: str, key: str):
        self._array, self._path, self._key = array, store_path, key

    def _fail(self, e: Exception) -> StoreError:
        return StoreError(f"cannot read {self._key}: {_reason(e)} "
                          "(damaged store? check it with `tmequant verify`)", self._path)

    def __getitem__(self, sel: Any) -> Any:
        try:
            return self._array[sel]
        except (IndexError, TypeError):  # the caller's selection, not the store
            raise
        except Exception as e:
            raise self._fail(e) from None

    def get_orthogonal_selection(self, sel: Any) -> Any:
        try:
            return self._array.get_orthogonal_selection(sel)
        except (IndexError, TypeError):
            raise
        except Exception as e:
            raise self._fail(e) from None

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        a = np.asarray(self[...])
        return a if dtype is None else a.astype(dtype)

    def __len__(self) -> int:
        return int(self._array.shape[0])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._array, name)

    def __repr__(self) -> str:
        return f"<StoreArray {self._key} {self._array.shape} {self._array.dtype} of {self._path}>"


@dataclass
class PredictionState:
    """What a ``predictions/<model_name>`` group holds (see :meth:`SlideStore.prediction_state`)."""

    params_hash: str | None
    chunk_rows: int | None
    done: np.ndarray  # (n_chunks,) bool: chunk finished
    complete: bool

    @property
    def n_chunks(self) -> int:
        return int(self.done.shape[0])


def _chunk_key(chunk: int) -> str:
    return f"c{chunk:06d}"


class SlideStore:
    """A slide store: a finished one read-only, or one being written under its lock.

    >>> s = SlideStore("out/slide.zarr")          # doctest: +SKIP
    >>> s.n_tiles, s.tile_um, s.coords.shape      # doctest: +SKIP
    (812, 112.0, (812, 2))
    >>> with SlideStore.open("out/slide.zarr", "r+") as st:   # doctest: +SKIP
    ...     st.write_nuclei_counts(counts)
    """

    def __init__(self, path: str | os.PathLike[str], require_complete: bool = True):
        self.path = str(path)
        self.mode = "r"
        self._lock: HeldLock | None = None
        self._arrays: dict[str, zarr.Array] = {}
        self.root = open_group(self.path, "r")
        if require_complete:
            self._check_finished()

    @classmethod
    def open(cls, path: str | os.PathLike[str], mode: Literal["r", "r+", "w"] = "r", *,
             wait: bool | float = False) -> SlideStore:
        """Open a store: ``r`` a finished one, read-only; ``r+`` a finished one to add groups
        (predictions, nuclei); ``w`` a new one (what was at ``path`` is deleted).

        Writers take the store's lock first; when another process holds it, StoreLockedError
        (``wait``: False at once, True wait as long as it takes, a number: seconds). Close the
        store (or use it as a context manager) to release the lock.
        """
        if mode == "r":
            return cls(path)
        if mode not in ("r+", "w"):
            raise ValueError(f"mode must be 'r', 'r+' or 'w', not {mode!r}")
        self = cls.__new__(cls)
        self.path, self.mode, self._arrays = str(path), mode, {}
        self._lock = None
        lp = lock_path(self.path)
        if lp is not None:
            if mode == "w":
                lp.parent.mkdir(parents=True, exist_ok=True)
            elif not Path(self.path).exists():
                raise StoreError("no such slide store (run `tmequant tile` first)", self.path)
            self._lock = acquire_lock(lp, lambda holder: StoreLockedError(
                f"slide store is being written by another tmequant process ({holder}); "
                "rerun when it has finished", self.path), wait=wait,
                waiting=f"{self.path}: waiting for the process writing it ({{holder}})")
        try:
            if mode == "w":
                try:
                    self.root = zarr.open_group(self.path, mode="w", zarr_format=3)
                except Exception as e:
                    raise StoreError(f"cannot create slide store: {type(e).__name__}: {e}",
                                     self.path) from None
            else:
                self.root = open_group(self.path, "r+")
                self._check_finished()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Release the writer's lock (no-op for readers and when already closed)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> SlideStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_finished(self) -> None:
        if not is_complete(self.root):
            raise StoreError(
                "slide store is unfinished (interrupted?); rerun `tmequant tile` to complete it",
                self.path,
            )
        version = self.root.attrs.get("schema_version")
        if version != STORE_SCHEMA_VERSION:
            raise StoreError(
                f"store schema version {version!r}, this tmequant reads {STORE_SCHEMA_VERSION}",
                self.path,
            )

    def _writable(self) -> None:
        if self.mode == "r":
            raise StoreError("slide store is open read-only (use SlideStore.open(path, 'r+'))",
                             self.path)

    # --- attributes -------------------------------------------------------------------
    def _attr(self, key: str) -> Any:
        """A root attribute as read from JSON (typed Any: the schema fixes its type)."""
        try:
            return self.root.attrs[key]
        except KeyError:
            raise StoreError(f"store has no attribute {key!r}", self.path) from None

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self.root.attrs)

    @property
    def complete(self) -> bool:
        return is_complete(self.root)

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
        """Grid pitch in level-0 px for square pixels (``tile_um / slide_mpp_um``); use
        :attr:`tile_level0_xy_px` for positions, which also holds for non-square pixels."""
        return float(self._attr("tile_level0_px"))

    @property
    def pixel_size(self) -> PixelSize:
        """Level-0 pixel size along x and y (``slide_mpp_um`` is their geometric mean)."""
        mx, my = self.root.attrs.get("slide_mpp_x_um"), self.root.attrs.get("slide_mpp_y_um")
        if mx is None or my is None:
            return PixelSize.square(self.slide_mpp_um)
        return PixelSize(float(mx), float(my))  # type: ignore[arg-type]

    @property
    def tile_level0_xy_px(self) -> tuple[float, float]:
        """Grid pitch (= tile footprint) in level-0 px along x and y."""
        tx, ty = self.root.attrs.get("tile_level0_x_px"), self.root.attrs.get("tile_level0_y_px")
        if tx is None or ty is None:
            t = self.tile_level0_px
            return t, t
        return float(tx), float(ty)  # type: ignore[arg-type]

    @property
    def params_hash(self) -> str | None:
        """Hash of the tiling parameters (None if absent)."""
        v = self.root.attrs.get(PARAMS_HASH)
        return None if v is None else str(v)

    @property
    def source_fingerprint(self) -> str | None:
        v = self.root.attrs.get("source_fingerprint")
        return None if v is None else str(v)

    # --- reading arrays ---------------------------------------------------------------
    def _zarray(self, key: str) -> zarr.Array:
        arr = self._arrays.get(key)
        if arr is not None:
            return arr
        try:
            node = self.root[key]
        except KeyError:
            raise StoreError(f"store has no array {key!r}", self.path) from None
        except Exception as e:
            raise StoreError(f"cannot open {key}: {type(e).__name__}: {e}", self.path) from None
        if not isinstance(node, zarr.Array):
            raise StoreError(f"{key} is not an array", self.path)
        if self.mode != "r":
            node = node.with_config(_WRITE_CONFIG)
        self._arrays[key] = node
        return node

    def _array(self, key: str) -> StoreArray:
        return StoreArray(self._zarray(key), self.path, key)

    def _read(self, key: str, dtype: Any) -> np.ndarray:
        return np.asarray(self._array(key)[...], dtype=dtype)

    def _group(self, key: str) -> zarr.Group | None:
        try:
            node = self.root.get(key)
        except Exception as e:
            raise StoreError(f"cannot open {key}: {type(e).__name__}: {e}", self.path) from None
        return node if isinstance(node, zarr.Group) else None

    @property
    def coords(self) -> np.ndarray:
        """(N, 2) int64 level-0 x, y of tile top-left corners."""
        return self._read(COORDS, np.int64).reshape(-1, 2)

    @property
    def grid(self) -> np.ndarray:
        """(N, 2) int32 row, col on the tile grid."""
        return self._read(GRID, np.int32).reshape(-1, 2)

    @property
    def tissue_fraction(self) -> np.ndarray:
        """(N,) float32 tissue fraction per tile, 0-1."""
        return self._read(TISSUE_FRACTION, np.float32)

    @property
    def images(self) -> StoreArray:
        """(N, tile_px, tile_px, 3) uint8 array, read lazily (slice to load). A store made
        without pixels (``--pixels none``) has none: :func:`tmequant.tiling.open_tiles` gives
        a store's tiles either way (from the slide for such a store)."""
        if not self.stores_pixels:
            raise StoreError("store holds no pixels (tiled with --pixels none): read its tiles "
                             "with tmequant.tiling.open_tiles(store)", self.path)
        return self._array(IMAGES)

    @property
    def stores_pixels(self) -> bool:
        """False for a store tiled with ``--pixels none`` (no ``tiles/images``)."""
        tp = self.attrs.get("tiling_params") or {}
        return not (isinstance(tp, dict) and tp.get("compression") == NO_PIXELS)

    @property
    def tissue_mask(self) -> np.ndarray:
        """(h, w) bool low-resolution tissue mask."""
        return self._read(TISSUE_MASK, bool)

    @property
    def mask_downsample(self) -> float:
        """Level-0 pixels per tissue-mask pixel (with non-square pixels: per pixel of their
        geometric-mean size; :attr:`mask_downsample_xy` gives x and y)."""
        downsample: Any = self._zarray(TISSUE_MASK).attrs["downsample"]
        return float(downsample)

    @property
    def mask_downsample_xy(self) -> tuple[float, float]:
        """Level-0 pixels per tissue-mask pixel along x and y (mask pixels are square)."""
        px = self.pixel_size
        if px.is_square:
            d = self.mask_downsample
            return d, d
        mask_mpp: Any = self._zarray(TISSUE_MASK).attrs["mpp_um"]
        return px.px(float(mask_mpp))

    @property
    def thumbnail(self) -> np.ndarray:
        """(h, w, 3) uint8 RGB thumbnail at the mask's resolution."""
        return self._read(THUMBNAIL, np.uint8)

    # --- predictions (read) -------------------------------------------------------------
    @staticmethod
    def _pkey(model_name: str, *parts: str) -> str:
        return "/".join((PREDICTIONS, model_name, *parts))

    def prediction_names(self) -> list[str]:
        """Names of models with finished predictions in this store."""
        grp = self._group(PREDICTIONS)
        if grp is None:
            return []
        return sorted(k for k, g in grp.groups() if is_complete(g))

    def predictions(self, model_name: str) -> zarr.Group:
        """The finished ``predictions/<model_name>`` group (StoreError if absent/unfinished)."""
        grp = self._group(self._pkey(model_name))
        if grp is None:
            raise StoreError(
                f"no predictions for model {model_name!r} (run `tmequant predict`)", self.path
            )
        if not is_complete(grp):
            raise StoreError(
                f"predictions for {model_name!r} are unfinished; rerun `tmequant predict`",
                self.path,
            )
        return grp

    def prediction_attrs(self, model_name: str) -> dict[str, Any]:
        """Attributes of the finished predictions of ``model_name``."""
        return dict(self.predictions(model_name).attrs)

    def prediction_params_hash(self, model_name: str) -> str | None:
        v = self.predictions(model_name).attrs.get(PARAMS_HASH)
        return None if v is None else str(v)

    def prediction_card(self, model_name: str) -> dict[str, Any]:
        """The model card stored with the predictions, as a dict ({} when none was stored)."""
        import json

        card: Any = self.predictions(model_name).attrs.get("card") or {}
        if isinstance(card, str):
            try:
                card = json.loads(card)
            except ValueError:
                raise StoreError(f"predictions of {model_name!r}: attribute 'card' is not JSON",
                                 self.path) from None
        return dict(card) if isinstance(card, dict) else {}

    def has_tissue_probs(self, model_name: str) -> bool:
        return TISSUE_PROBS in self.predictions(model_name)

    def tissue_probs(self, model_name: str) -> np.ndarray:
        """(N, K) float32 tissue-class probabilities of the finished predictions."""
        self.predictions(model_name)
        return self._read(self._pkey(model_name, TISSUE_PROBS), np.float32)

    def has_cell_counts(self, model_name: str) -> bool:
        """True when the finished predictions hold a count head's ``cell_counts``."""
        return CELL_COUNTS in self.predictions(model_name)

    def cell_counts(self, model_name: str) -> np.ndarray | None:
        """(N, C) float32 count-head output, or None when the model has no count head."""
        if CELL_COUNTS not in self.predictions(model_name):
            return None
        return self._read(self._pkey(model_name, CELL_COUNTS), np.float32)

    def prediction_state(self, model_name: str) -> PredictionState | None:
        """State of ``predictions/<model_name>`` whatever its completeness (None when absent
        or without its chunk flags)."""
        grp = self._group(self._pkey(model_name))
        if grp is None or CHUNK_DONE not in grp:
            return None
        done = self._read(self._pkey(model_name, CHUNK_DONE), np.uint8).astype(bool)
        ph, rows = grp.attrs.get(PARAMS_HASH), grp.attrs.get("chunk_rows")
        return PredictionState(None if ph is None else str(ph),
                               int(rows) if isinstance(rows, (int, float)) else None,
                               done, is_complete(grp))

    # --- cells (read) -------------------------------------------------------------------
    def has_cells(self, model_name: str) -> bool:
        """True when finished predictions of ``model_name`` hold cell detections."""
        grp = self._group(self._pkey(model_name))
        return grp is not None and is_complete(grp) and CELLS in grp

    def read_cells(self, model_name: str) -> pd.DataFrame:
        """Cell detections of ``model_name``: one row per cell, chunk by chunk.

        Columns ``x``, ``y`` (float64, level-0 px), ``class`` (str, from the ``cell_classes``
        attribute), ``score`` (float32, 0-1), ``tile`` (int32 tile index); an empty frame
        with these columns when there are none. StoreError when the predictions are absent,
        unfinished or hold no cells.
        """
        import pandas as pd  # only cell readers pay for pandas

        self.predictions(model_name)
        cg = self._group(self._pkey(model_name, CELLS))
        if cg is None:
            raise StoreError(f"predictions of {model_name!r} hold no cells", self.path)
        listed: Any = cg.attrs.get("cell_classes") or []
        classes = [str(c) for c in listed]
        n_chunks = int(cg.attrs.get("n_chunks", 0))  # type: ignore[arg-type]
        parts: dict[str, list[np.ndarray]] = {k: [] for k in CELL_FIELDS}
        for c in range(n_chunks):
            base = self._pkey(model_name, CELLS, _chunk_key(c))
            if self._group(base) is None:
                raise StoreError(f"cells of {model_name!r}: chunk {c} is missing", self.path)
            for k, dt in CELL_FIELDS.items():
                parts[k].append(self._read(f"{base}/{k}", dt))
        cat = {k: (np.concatenate(v) if v else np.zeros(0, CELL_FIELDS[k])) for k, v in parts.items()}
        cls = cat["cls"].astype(np.int64)
        if cls.size and (cls.max() >= len(classes)):
            raise StoreError(f"cells of {model_name!r}: class index {int(cls.max())} but only "
                             f"{len(classes)} cell_classes", self.path)
        names = np.asarray(classes, dtype=object)[cls] if cls.size else np.zeros(0, dtype=object)
        return pd.DataFrame({
            "x": cat["x"].astype(np.float64), "y": cat["y"].astype(np.float64),
            "class": pd.Series(names, dtype=object),
            "score": cat["score"].astype(np.float32), "tile": cat["tile"].astype(np.int32),
        }, columns=list(CELL_COLUMNS))

    # --- nuclei (read) ------------------------------------------------------------------
    def nuclei_counts(self) -> np.ndarray | None:
        """(N, 2) float32 nucleus-counter counts (lymphocyte, other), or None if absent."""
        grp = self._group(NUCLEI)
        if grp is None or not is_complete(grp):
            return None
        return self._read(f"{NUCLEI}/{NUCLEI_COUNTS}", np.float32)

    def nuclei_params_hash(self) -> str | None:
        """params_hash of finished nucleus counts, None when there are none."""
        grp = self._group(NUCLEI)
        if grp is None or not is_complete(grp):
            return None
        v = grp.attrs.get(PARAMS_HASH)
        return None if v is None else str(v)

    # --- writing: the tiles -----------------------------------------------------------
    def write_header(self, **attrs: Any) -> None:
        """Root attributes of a new store: exactly ROOT_ATTRS, and AXIS_ATTRS all or none
        (schema_version is added)."""
        self._writable()
        known = set(ROOT_ATTRS) | set(AXIS_ATTRS)
        missing, unknown = set(ROOT_ATTRS) - set(attrs), set(attrs) - known
        axes = [k for k in AXIS_ATTRS if k in attrs]
        if axes and len(axes) != len(AXIS_ATTRS):
            missing |= set(AXIS_ATTRS) - set(axes)
        if missing or unknown:
            raise ValueError(f"store header: missing {sorted(missing)}, unknown {sorted(unknown)}")
        self.root.attrs.update({"schema_version": STORE_SCHEMA_VERSION,
                                **{k: attrs[k] for k in ROOT_ATTRS}, **{k: attrs[k] for k in axes}})

    def _write_small(self, key: str, data: np.ndarray, attrs: dict[str, Any]) -> None:
        data = np.ascontiguousarray(data)
        if data.ndim == 3 and data.shape[2] == 3:
            chunks: tuple[int, ...] = (min(max(data.shape[0], 1), 1024),
                                       min(max(data.shape[1], 1), 1024), 3)
        else:
            chunks = tuple(max(1, min(s, 1 << 20)) for s in data.shape)
        arr = self.root.create_array(key, shape=data.shape, dtype=data.dtype, chunks=chunks,
                                     compressors=compressors("zstd"), fill_value=0,
                                     config=_WRITE_CONFIG)
        if data.size:
            arr[...] = data
        if attrs:
            arr.attrs.update(attrs)

    def write_tissue(self, mask: np.ndarray, thumbnail: np.ndarray, *, downsample: float,
                     mask_mpp_um: float) -> None:
        """(h, w) bool tissue mask and (h, w, 3) uint8 thumbnail at ``mask_mpp_um``;
        ``downsample``: level-0 px per mask px."""
        self._writable()
        self._write_small(TISSUE_MASK, mask, {"downsample": float(downsample),
                                              "mpp_um": float(mask_mpp_um)})
        self._write_small(THUMBNAIL, thumbnail, {"mpp_um": float(mask_mpp_um)})

    def write_tile_grid(self, coords: np.ndarray, grid: np.ndarray,
                        tissue_fraction: np.ndarray) -> None:
        """(N, 2) int64 level-0 x, y; (N, 2) int32 row, col; (N,) float32 tissue fraction."""
        self._writable()
        self.root.require_group(TILES)
        self._write_small(COORDS, coords, {"unit": "level-0 px", "columns": ["x", "y"]})
        self._write_small(GRID, grid, {"columns": ["row", "col"]})
        self._write_small(TISSUE_FRACTION, tissue_fraction, {})

    def create_images(self, n_tiles: int, tile_px: int, *, tiles_per_chunk: int,
                      tiles_per_shard: int, compression: str, mpp_um: float) -> None:
        """Create ``tiles/images`` (n_tiles, tile_px, tile_px, 3) uint8, sharded. ``compression``:
        a lossless chain (COMPRESSIONS) or a lossy image codec (``jpeg-95``...,
        :mod:`tmequant.codecs`), stored one image per tile."""
        self._writable()
        tp = tile_px
        kw: dict[str, Any]
        if compression in COMPRESSIONS:
            kw = {"chunks": (tiles_per_chunk, tp, tp, 3), "compressors": compressors(compression)}
        else:  # a lossy image codec: one image per tile, checksummed like every chunk
            codec, level = parse_image_codec(compression)
            kw = {"chunks": (1, tp, tp, 3), "serializer": ImageCodec(codec=codec, level=level),
                  "compressors": [Crc32cCodec()]}
        arr = self.root.create_array(
            IMAGES, shape=(n_tiles, tp, tp, 3), dtype=np.uint8,
            shards=(tiles_per_shard, tp, tp, 3), fill_value=0,
            dimension_names=["tile", "y", "x", "channel"], config=_WRITE_CONFIG, **kw,
        )
        arr.attrs.update({"mpp_um": float(mpp_um), "color": "RGB"})
        self._arrays[IMAGES] = arr

    def write_tiles(self, start: int, tiles: np.ndarray) -> None:
        """Write (n, tile_px, tile_px, 3) uint8 tiles at ``start``. Whole shards (the last may
        end with the array) are encoded in one call each (:mod:`tmequant.shards`: the bytes
        zarr would write, at a fraction of its CPU); anything else goes through zarr."""
        self._writable()
        arr = self._zarray(IMAGES)
        shard, chunk, n_all = arr.shards[0], arr.chunks[0], arr.shape[0]  # type: ignore[index]
        codec = arr.metadata.codecs[0]  # type: ignore[union-attr]
        enc = (shards.chunk_encoder(codec) if isinstance(codec, ShardingCodec)
               and shards.index_supported(codec) else None)
        if enc is None or start % shard or (len(tiles) % shard and start + len(tiles) != n_all):
            arr[start:start + len(tiles)] = tiles
            return
        store, base = arr.store_path.store, arr.store_path.path
        for k in range(0, len(tiles), shard):
            data = shards.encode_shard(tiles[k:k + shard], chunk, shard, enc)
            key = f"{base}/{arr.metadata.encode_chunk_key(((start + k) // shard, 0, 0, 0))}"
            zsync(store.set(key, default_buffer_prototype().buffer.from_bytes(data)))

    def mark_complete(self, **attrs: Any) -> None:
        """Root attributes (``n_tiles``) and then the store's completion marker."""
        self._writable()
        mark_complete(self.root, **attrs)

    # --- writing: predictions -----------------------------------------------------------
    def create_predictions(
        self, model_name: str, n_tiles: int, *, chunk_rows: int, params_hash: str,
        attrs: dict[str, Any], n_tissue: int | None = None, n_cell: int = 0,
        cell_classes: Sequence[str] | None = None, cells_attrs: dict[str, Any] | None = None,
    ) -> None:
        """(Re)create ``predictions/<model_name>``: ``tissue_probs`` (N, n_tissue) float16 when
        n_tissue, ``cell_counts`` (N, n_cell) float32 when n_cell, one ``chunk_done`` flag per
        output chunk of ``chunk_rows`` tiles, and a ``cells`` group when ``cell_classes``.
        A group already there (another model version, or --overwrite) is deleted first."""
        self._writable()
        preds = self.root.require_group(PREDICTIONS)
        if model_name in preds:
            old = preds[model_name]
            if isinstance(old, zarr.Group):
                clear_complete(old)
            del preds[model_name]
        self._forget(self._pkey(model_name))
        g = preds.create_group(model_name)
        n_chunks = max(1, math.ceil(n_tiles / chunk_rows))
        rows = min(chunk_rows, max(1, n_tiles))
        if n_tissue:
            g.create_array(TISSUE_PROBS, shape=(n_tiles, n_tissue), dtype="float16",
                           chunks=(rows, n_tissue), fill_value=0,
                           compressors=_DEFAULT_COMPRESSORS, config=_WRITE_CONFIG)
        if n_cell:
            g.create_array(CELL_COUNTS, shape=(n_tiles, n_cell), dtype="float32",
                           chunks=(rows, n_cell), fill_value=0,
                           compressors=_DEFAULT_COMPRESSORS, config=_WRITE_CONFIG)
        # One flag per output chunk, each its own object: a kill mid-write loses at most one.
        g.create_array(CHUNK_DONE, shape=(n_chunks,), dtype="uint8", chunks=(1,), fill_value=0,
                       compressors=_DEFAULT_COMPRESSORS)
        g.attrs.update({**attrs, PARAMS_HASH: params_hash, "chunk_rows": chunk_rows})
        if cell_classes is not None:
            self.create_cells(model_name, cell_classes, n_chunks, cells_attrs or {})

    def _forget(self, prefix: str) -> None:
        for k in [k for k in self._arrays if k == prefix or k.startswith(prefix + "/")]:
            del self._arrays[k]

    def write_prediction_chunk(
        self, model_name: str, chunk: int, *, tissue_probs: np.ndarray | None = None,
        cell_counts: np.ndarray | None = None, cells: dict[str, np.ndarray] | None = None,
    ) -> None:
        """Rows of output chunk ``chunk`` (at ``chunk * chunk_rows``), its cells (``cells``:
        the arguments of :meth:`write_cells`), then its ``chunk_done`` flag, in that order:
        a chunk is done only once all of it is on disk."""
        self._writable()
        grp = self._group(self._pkey(model_name))
        if grp is None:
            raise StoreError(f"no predictions group for {model_name!r}", self.path)
        if tissue_probs is not None or cell_counts is not None:
            rows = grp.attrs.get("chunk_rows")
            if not isinstance(rows, int):
                raise StoreError(f"predictions of {model_name!r} have no chunk_rows", self.path)
            a = chunk * rows
        if tissue_probs is not None:
            self._zarray(self._pkey(model_name, TISSUE_PROBS))[a:a + len(tissue_probs)] = \
                np.asarray(tissue_probs).astype(np.float16)
        if cell_counts is not None:
            self._zarray(self._pkey(model_name, CELL_COUNTS))[a:a + len(cell_counts)] = \
                np.asarray(cell_counts, dtype=np.float32)
        if cells is not None:
            self.write_cells(model_name, chunk, **cells)
        self.mark_chunk_done(model_name, chunk)

    def mark_chunk_done(self, model_name: str, chunk: int) -> None:
        """Set the ``chunk_done`` flag of ``chunk`` (after everything of it is written)."""
        self._writable()
        self._zarray(self._pkey(model_name, CHUNK_DONE))[chunk] = 1

    def mark_predictions_complete(self, model_name: str, **attrs: Any) -> None:
        """``attrs`` and then the completion marker of ``predictions/<model_name>``."""
        self._writable()
        grp = self._group(self._pkey(model_name))
        if grp is None:
            raise StoreError(f"no predictions group for {model_name!r}", self.path)
        mark_complete(grp, **attrs)

    # --- writing: cells -----------------------------------------------------------------
    def create_cells(self, model_name: str, cell_classes: Sequence[str], n_chunks: int,
                     attrs: dict[str, Any] | None = None) -> None:
        """(Re)create ``predictions/<model_name>/cells`` for ``n_chunks`` output chunks.

        The predictions group is created (with its ``chunk_done`` flags) when absent; when
        present its flags must number ``n_chunks``. ``cell_classes``: at most 256 names, the
        values of ``cls``."""
        self._writable()
        classes = [str(c) for c in cell_classes]
        if not 0 < len(classes) <= 256 or len(set(classes)) != len(classes):
            raise ValueError("cell_classes: 1-256 distinct names")
        if n_chunks < 1:
            raise ValueError("n_chunks must be >= 1")
        g = self.root.require_group(self._pkey(model_name))
        flags = g.get(CHUNK_DONE)
        if flags is None:
            g.create_array(CHUNK_DONE, shape=(n_chunks,), dtype="uint8", chunks=(1,),
                           fill_value=0, compressors=_DEFAULT_COMPRESSORS)
        elif not isinstance(flags, zarr.Array) or flags.shape != (n_chunks,):
            raise StoreError(f"predictions of {model_name!r} do not have {n_chunks} chunk flags",
                             self.path)
        if CELLS in g:
            del g[CELLS]
        self._forget(self._pkey(model_name, CELLS))
        cg = g.create_group(CELLS)
        cg.attrs.update({**(attrs or {}), "cell_classes": classes, "n_chunks": int(n_chunks)})

    def write_cells(self, model_name: str, chunk: int, x: np.ndarray, y: np.ndarray,
                    cls: np.ndarray, score: np.ndarray, tile: np.ndarray) -> None:
        """Cells of output chunk ``chunk``: (M,) level-0 px ``x``, ``y``; ``cls`` index into
        ``cell_classes``; ``score`` 0-1; ``tile`` index. A rewrite replaces the chunk's cells
        (a resumed chunk never doubles them). Set the chunk's flag after this."""
        self._writable()
        cg = self._group(self._pkey(model_name, CELLS))
        if cg is None:
            raise StoreError(f"no cells group for {model_name!r} (create_cells first)", self.path)
        n_chunks = int(cg.attrs["n_chunks"])  # type: ignore[arg-type]
        if not 0 <= chunk < n_chunks:
            raise ValueError(f"chunk {chunk} outside 0-{n_chunks - 1}")
        cols = {"x": x, "y": y, "cls": cls, "score": score, "tile": tile}
        m = {len(np.asarray(v).reshape(-1)) for v in cols.values()}
        if len(m) != 1:
            raise ValueError(f"cells of chunk {chunk}: x, y, cls, score, tile differ in length")
        n_cls = len(cg.attrs.get("cell_classes") or [])  # type: ignore[arg-type]
        c = np.asarray(cls).reshape(-1)
        if c.size and (c.min() < 0 or c.max() >= n_cls):
            raise ValueError(f"cells of chunk {chunk}: cls outside 0-{n_cls - 1}")
        key = _chunk_key(chunk)
        sub = cg.create_group(key, overwrite=True)
        self._forget(f"{self._pkey(model_name, CELLS)}/{key}")
        for name, dt in CELL_FIELDS.items():
            v = np.ascontiguousarray(np.asarray(cols[name]).reshape(-1).astype(dt))
            arr = sub.create_array(name, shape=v.shape, dtype=dt, chunks=(max(1, len(v)),),
                                   fill_value=0, compressors=_DEFAULT_COMPRESSORS,
                                   config=_WRITE_CONFIG)
            if v.size:
                arr[...] = v

    # --- writing: nuclei ----------------------------------------------------------------
    def write_nuclei_counts(self, counts: np.ndarray) -> None:
        """(N, 2) float32 nucleus counts into a fresh ``nuclei`` group (marker cleared first);
        call :meth:`mark_nuclei_complete` after."""
        self._writable()
        old = self._group(NUCLEI)
        if old is not None:
            clear_complete(old)
        self._forget(NUCLEI)
        counts = np.asarray(counts, dtype=np.float32)
        n = counts.shape[0]
        grp = self.root.create_group(NUCLEI, overwrite=True)
        arr = grp.create_array(NUCLEI_COUNTS, shape=(n, 2), dtype="float32",
                               chunks=(max(1, min(n, 65536)), 2),
                               compressors=_DEFAULT_COMPRESSORS, config=_WRITE_CONFIG)
        if n:
            arr[...] = counts

    def mark_nuclei_complete(self, **attrs: Any) -> None:
        """``attrs`` and then the completion marker of ``nuclei``."""
        self._writable()
        grp = self._group(NUCLEI)
        if grp is None:
            raise StoreError("no nuclei group (write_nuclei_counts first)", self.path)
        mark_complete(grp, **attrs)

    # --- verification -------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Problems found, one line each (empty: the store is sound); see :func:`verify_store`."""
        return verify_store(self.path)


# --- verification ------------------------------------------------------------------------------

def _walk(group: zarr.Group, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for name, child in group.members():
        key = f"{prefix}{name}"
        yield key, child
        if isinstance(child, zarr.Group):
            yield from _walk(child, key + "/")


def _has_checksums(arr: zarr.Array) -> bool:
    def names(codecs: Any) -> Iterator[str]:
        for c in codecs:
            yield type(c).__name__
            yield from names(getattr(c, "codecs", ()) or ())
    return "Crc32cCodec" in set(names(getattr(arr.metadata, "codecs", ())))


def _reason(e: Exception) -> str:
    """A decoding failure in a few words (zarr's checksum message prints raw bytes)."""
    text = str(e)
    return "checksum mismatch" if "checksum" in text.lower() else f"{type(e).__name__}: {text}"


def _verify_array(arr: zarr.Array, key: str, require_all: bool) -> list[str]:
    """Decode every stored chunk (checksums checked); with ``require_all``, a chunk that
    is not stored is a problem too. Returns problem lines (without the store path)."""
    from zarr.core.sync import sync

    problems: list[str] = []
    store, base = arr.store_path.store, arr.path
    sharded = getattr(arr, "shards", None) is not None
    for region, skey in zip(arr._iter_shard_regions(), arr._iter_shard_keys()):
        if require_all and not sync(store.exists(f"{base}/{skey}")):
            problems.append(f"{key}: chunk {skey} is missing")
            continue
        try:
            arr[region]
            continue
        except Exception as e:
            reason = _reason(e)
        if not sharded:
            problems.append(f"{key}: chunk {skey} is corrupt ({reason})")
            continue
        # name the damaged inner chunks of the shard
        bad = []
        inner = arr.chunks
        starts = [range(r.start, r.stop, c) for r, c in zip(region, inner)]
        for origin in np.array(np.meshgrid(*starts, indexing="ij")).reshape(len(inner), -1).T:
            sel = tuple(slice(int(o), min(int(o) + c, r.stop)) for o, c, r in zip(origin, inner, region))
            try:
                arr[sel]
            except Exception:
                bad.append(f"tiles {sel[0].start}-{sel[0].stop - 1}" if len(sel) else "?")
        where = ", ".join(bad) if bad else "its index"
        problems.append(f"{key}: shard {skey} is corrupt ({where}: {reason})")
    return problems


def verify_store(path: str | os.PathLike[str]) -> list[str]:
    """Check a slide store: finished, every expected array present with the right number of
    rows, every stored chunk decodable with a matching checksum, no chunk of a finished group
    missing. Returns one line per problem, each starting with the store path (empty: sound).

    Unfinished predictions and nuclei groups are resumable work, not damage: not checked.
    Stores written before checksums existed are checked by decoding only.
    """
    p = str(path)
    try:
        root = open_group(p, "r")
    except StoreError as e:
        return [str(e)]
    problems: list[str] = []
    if not is_complete(root):
        return [f"{p}: slide store is unfinished (interrupted?); rerun `tmequant tile`"]
    n = root.attrs.get("n_tiles")
    try:
        members = list(_walk(root))
    except Exception as e:
        return [f"{p}: cannot list the store: {type(e).__name__}: {e}"]
    found = dict(members)
    tp = root.attrs.get("tiling_params") or {}
    no_pixels = isinstance(tp, dict) and tp.get("compression") == NO_PIXELS
    for key in (TISSUE_MASK, THUMBNAIL, COORDS, GRID, TISSUE_FRACTION) + (() if no_pixels else (IMAGES,)):
        arr = found.get(key)
        if not isinstance(arr, zarr.Array):
            problems.append(f"{p}: {key} is missing")
        elif key.startswith(TILES + "/") and arr.shape[:1] != (n,):
            problems.append(f"{p}: {key} has {arr.shape[0]} rows, n_tiles is {n}")
    groups = {k: g for k, g in members if isinstance(g, zarr.Group)}

    def finished(key: str) -> bool | None:
        """Completeness of the step group holding ``key`` (None: part of the tiles)."""
        parts = key.split("/")
        if parts[0] == PREDICTIONS and len(parts) > 2:
            g = groups.get("/".join(parts[:2]))
        elif parts[0] == NUCLEI and len(parts) > 1:
            g = groups.get(NUCLEI)
        else:
            return None
        return None if g is None else is_complete(g)

    for key, node in members:
        if not isinstance(node, zarr.Array):
            continue
        fin = finished(key)
        if fin is False:
            continue  # unfinished step: resumable, not checked
        # flags are written one by one when set: an unset (0) flag is legitimately not stored
        require_all = _has_checksums(node) and not key.endswith("/" + CHUNK_DONE)
        problems += [f"{p}: {line}" for line in _verify_array(node, key, require_all)]
    for name, g in groups.items():  # finished predictions: every chunk done, cells complete
        parts = name.split("/")
        if len(parts) != 2 or parts[0] != PREDICTIONS or not is_complete(g):
            continue
        flags = found.get(f"{name}/{CHUNK_DONE}")
        if isinstance(flags, zarr.Array) and n:  # an empty store has nothing to do
            try:
                if not np.asarray(flags[...]).all():
                    problems.append(f"{p}: {name} is marked complete but not every chunk is done")
            except Exception:
                pass  # reported by the chunk check above
        cg = groups.get(f"{name}/{CELLS}")
        if cg is not None:
            for c in range(int(cg.attrs.get("n_chunks", 0))):  # type: ignore[arg-type]
                sub = f"{name}/{CELLS}/{_chunk_key(c)}"
                for field in CELL_FIELDS:
                    if not isinstance(found.get(f"{sub}/{field}"), zarr.Array):
                        problems.append(f"{p}: {sub}/{field} is missing")
    return problems


__all__ = [
    "CELL_COLUMNS",
    "COMPLETE",
    "COMPRESSIONS",
    "STORE_SCHEMA_VERSION",
    "PredictionState",
    "SlideStore",
    "StoreArray",
    "StoreLockedError",
    "clear_complete",
    "compressors",
    "is_complete",
    "lock_path",
    "mark_complete",
    "open_group",
    "store_is_complete",
    "store_path",
    "store_state",
    "verify_store",
]
