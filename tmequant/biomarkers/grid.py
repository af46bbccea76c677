"""The tile grid the aggregators work on: geometry, role probabilities, optional counts.

A :class:`TileGrid` is in memory and model-agnostic: probabilities are already summed per
role (docs/biomarkers.md "Roles"), so every aggregator speaks only of roles. Build one from a
slide store (:meth:`TileGrid.from_store`) or from a caller's own table (:meth:`TileGrid.from_table`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from tmequant.biomarkers.cells import cell_roles
from tmequant.errors import CellTableError, InputError, StoreError
from tmequant.pixelsize import PixelSize
from tmequant.roles import COUNT_SOURCES, TISSUE_ROLES

if TYPE_CHECKING:
    from tmequant.store import SlideStore

log = logging.getLogger("tmequant")


@dataclass
class TileGrid:
    """N tiles on a regular grid of pitch ``tile_um`` anchored at level-0 (0, 0).

    rows, cols: (N,) int grid indices; tile ``i`` covers level-0 x in
    ``[cols[i] * tile_level0_px, (cols[i] + 1) * tile_level0_px)`` and y likewise.
    pixel_size: the slide's level-0 pixel size along x and y (:class:`PixelSize`); None for
    square pixels of ``slide_mpp_um``. With non-square pixels ``slide_mpp_um`` is their
    geometric mean, the pitch differs per axis and ``tile_level0_px`` (``tile_um /
    slide_mpp_um``) is no position: :attr:`pitch_xy` and :meth:`level0_to_um` are.
    role_probs: role -> (N,) float, the summed class probabilities of each tissue role.
    tissue_fraction: (N,) share of the tile covered by tissue, 0-1.
    lymphocyte_counts / tumor_cell_counts: (N,) cells per tile, or None.
    count_source: where lymphocyte_counts came from (tmequant.roles.COUNT_SOURCES), or None.
    """

    rows: np.ndarray
    cols: np.ndarray
    tile_um: float
    slide_mpp_um: float
    role_probs: dict[str, np.ndarray]
    tissue_fraction: np.ndarray
    tile_level0_px: float | None = None
    lymphocyte_counts: np.ndarray | None = None
    tumor_cell_counts: np.ndarray | None = None
    count_source: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    pixel_size: PixelSize | None = None

    def __post_init__(self) -> None:
        self.rows = np.asarray(self.rows, dtype=np.int64).ravel()
        self.cols = np.asarray(self.cols, dtype=np.int64).ravel()
        n = self.rows.shape[0]
        if self.cols.shape[0] != n:
            raise InputError(f"rows ({n}) and cols ({self.cols.shape[0]}) differ in length")
        if not (np.isfinite(self.tile_um) and self.tile_um > 0):
            raise InputError(f"tile_um must be > 0, got {self.tile_um!r}")
        if not (np.isfinite(self.slide_mpp_um) and self.slide_mpp_um > 0):
            raise InputError(f"slide_mpp_um must be > 0, got {self.slide_mpp_um!r}")
        if self.tile_level0_px is None:
            self.tile_level0_px = self.tile_um / self.slide_mpp_um
        self.tile_level0_px = float(self.tile_level0_px)
        if self.pixel_size is not None and not self.pixel_size.is_square:
            mean = self.pixel_size.mean_um
            if abs(self.slide_mpp_um - mean) > 1e-6 * mean:
                raise InputError(f"slide_mpp_um {self.slide_mpp_um!r} is not the geometric mean "
                                 f"{mean:.6g} of the pixel size {self.pixel_size.describe()}")
        unknown = set(self.role_probs) - set(TISSUE_ROLES)
        if unknown:
            raise InputError(f"unknown tissue roles {sorted(unknown)}; valid: {list(TISSUE_ROLES)}")
        probs = {}
        for r, v in self.role_probs.items():
            a = np.asarray(v, dtype=np.float64).ravel()
            if a.shape[0] != n:
                raise InputError(f"role_probs[{r!r}] has {a.shape[0]} values for {n} tiles")
            probs[r] = np.nan_to_num(np.clip(a, 0.0, 1.0))
        self.role_probs = probs
        tf = np.asarray(self.tissue_fraction, dtype=np.float64).ravel()
        if tf.shape[0] != n:
            raise InputError(f"tissue_fraction has {tf.shape[0]} values for {n} tiles")
        self.tissue_fraction = np.clip(np.nan_to_num(tf), 0.0, 1.0)
        for name in ("lymphocyte_counts", "tumor_cell_counts"):
            v = getattr(self, name)
            if v is not None:
                a = np.asarray(v, dtype=np.float64).ravel()
                if a.shape[0] != n:
                    raise InputError(f"{name} has {a.shape[0]} values for {n} tiles")
                if (a < 0).any() or not np.isfinite(a).all():
                    raise InputError(f"{name} must be finite and >= 0")
                setattr(self, name, a)
        if self.count_source is not None and self.count_source not in COUNT_SOURCES:
            raise InputError(f"count_source {self.count_source!r} not in {list(COUNT_SOURCES)}")
        if n and len(np.unique(np.stack([self.rows, self.cols], axis=1), axis=0)) != n:
            raise InputError("tile grid has duplicate (row, col) positions")

    # --- derived -----------------------------------------------------------------------
    @property
    def n_tiles(self) -> int:
        return int(self.rows.shape[0])

    @property
    def level0(self) -> PixelSize:
        """Level-0 pixel size along x and y."""
        if self.pixel_size is None or self.pixel_size.is_square:
            return PixelSize.square(self.slide_mpp_um)
        return self.pixel_size

    @property
    def pitch_xy(self) -> tuple[float, float]:
        """Grid pitch (= tile side) in level-0 px along x and y; ``tile_level0_px`` both ways
        for square pixels."""
        if self.pixel_size is None or self.pixel_size.is_square:
            t = float(self.tile_level0_px)  # type: ignore[arg-type]
            return t, t
        return self.pixel_size.px(self.tile_um)

    def level0_to_um(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Level-0 px (numbers or arrays) -> micrometres, per axis."""
        return self.level0.to_um(x, y)

    @property
    def tile_area_um2(self) -> float:
        return float(self.tile_um) ** 2

    @property
    def tissue_area_um2(self) -> np.ndarray:
        """(N,) tissue area per tile in um^2 = tile area x tissue fraction."""
        return self.tile_area_um2 * self.tissue_fraction

    def prob(self, role: str) -> np.ndarray:
        """(N,) probability of ``role`` (zeros when the model has no class with that role)."""
        return self.role_probs.get(role, np.zeros(self.n_tiles))

    def hard_roles(self) -> np.ndarray:
        """(N,) int index into TISSUE_ROLES of each tile's most probable role; -1 (no role)
        where there is none: all probabilities 0 (NaN from a broken model reads as 0) or a
        tie for the top (a flat output). Such tiles are in no compartment; a tie never goes
        to the first role (which made NaN tiles tumour)."""
        stack = np.stack([self.prob(r) for r in TISSUE_ROLES], axis=0)
        top = stack.max(axis=0)
        unique_top = (stack == top).sum(axis=0) == 1
        return np.where((top > 0) & unique_top, np.argmax(stack, axis=0), -1)

    # --- constructors ------------------------------------------------------------------
    @classmethod
    def from_store(cls, store_or_path: SlideStore | str | os.PathLike[str], model_name: str,
                   cells: pd.DataFrame | None = None,
                   cell_role_map: Mapping[str, str] | None = None,
                   nucleus_counts: bool = True) -> TileGrid:
        """Grid of a finished slide store and its ``predictions/<model_name>`` group.

        Counts, by precedence: ``cells`` (a cell table, see read_cell_table) > the model's
        count head > the nucleus counter (``nuclei/counts``, column 0 = lymphocyte) > none
        (compute_biomarkers then estimates them from immune-role area: ``area_estimate``).
        ``nucleus_counts=False`` ignores nucleus-counter counts already in the store (the
        counter switched off for this run).
        """
        from tmequant.store import SlideStore

        store = store_or_path if isinstance(store_or_path, SlideStore) else SlideStore(store_or_path)
        card = store.prediction_card(model_name)
        if "tissue_classes" not in card:
            raise StoreError(f"predictions of {model_name!r} have no valid model card "
                             "(attribute 'card')", store.path)
        tissue_classes = list(card.get("tissue_classes") or [])
        tissue_roles = dict(card.get("tissue_roles") or {})
        if not store.has_tissue_probs(model_name):
            raise StoreError(f"predictions of {model_name!r} have no tissue probabilities",
                             store.path)
        probs = store.tissue_probs(model_name)
        n = store.n_tiles
        if probs.ndim != 2 or probs.shape[0] != n or probs.shape[1] != len(tissue_classes):
            raise StoreError(
                f"tissue probabilities of {model_name!r} have shape {probs.shape}, expected "
                f"({n}, {len(tissue_classes)}) from the card's tissue_classes", store.path)
        role_probs = _sum_by_role(probs, tissue_classes, tissue_roles, store.path)
        grid_rc = store.grid
        attrs = store.attrs
        meta = {
            "slide_id": attrs.get("slide_id"), "source_path": attrs.get("source_path"),
            "source_fingerprint": attrs.get("source_fingerprint"),
            "slide_mpp_um": attrs.get("slide_mpp_um"), "mpp_source": attrs.get("mpp_source"),
            "target_mpp_um": attrs.get("target_mpp_um"), "tile_px": attrs.get("tile_px"),
            "store_path": store.path, "store_params_hash": store.params_hash,
            "model_name": card.get("name", model_name), "model_version": card.get("version"),
            "predictions_params_hash": store.prediction_params_hash(model_name),
            "level0_width_px": attrs.get("level0_width_px"),
            "level0_height_px": attrs.get("level0_height_px"),
        }
        lymph = tumor = None
        source = None
        cell_classes = list(card.get("cell_classes") or [])
        cell_roles_map = dict(card.get("cell_roles") or {})
        from tmequant.domain import count_head_trusted

        # An untrained model's (random) count head never replaces a count source.
        model_counts = store.cell_counts(model_name) \
            if cell_classes and count_head_trusted(card) else None
        if model_counts is not None:
            counts = model_counts.astype(np.float64)
            if counts.shape == (n, len(cell_classes)):
                by_role = _sum_by_role(counts, cell_classes, cell_roles_map, store.path)
                if "lymphocyte" in by_role:
                    lymph, source = np.clip(by_role["lymphocyte"], 0, None), "model"
                if "tumor_cell" in by_role:
                    tumor = np.clip(by_role["tumor_cell"], 0, None)
        if lymph is None and nucleus_counts:
            nuc = store.nuclei_counts()
            if nuc is not None and nuc.shape[0] == n:
                lymph, source = np.clip(nuc[:, 0].astype(np.float64), 0, None), "nucleus_counter"
        grid = cls(rows=grid_rc[:, 0], cols=grid_rc[:, 1], tile_um=store.tile_um,
                   slide_mpp_um=store.slide_mpp_um, tile_level0_px=store.tile_level0_px,
                   role_probs=role_probs, tissue_fraction=store.tissue_fraction,
                   lymphocyte_counts=lymph, tumor_cell_counts=tumor, count_source=source,
                   metadata=meta, pixel_size=store.pixel_size)
        if cells is not None:
            grid = grid.with_cells(cells, cell_role_map)
        return grid

    @classmethod
    def from_table(cls, df: pd.DataFrame, tile_um: float, slide_mpp_um: float,
                   class_roles: Mapping[str, str] | None = None,
                   tile_level0_px: float | None = None,
                   metadata: Mapping[str, Any] | None = None,
                   pixel_size: PixelSize | None = None) -> TileGrid:
        """Grid from a caller's per-tile table (one row per tile).

        Position: ``row, col`` columns, or ``x, y`` (level-0 px of the top-left corner).
        ``pixel_size``: x and y sizes of a slide with non-square pixels (``slide_mpp_um``
        then their geometric mean, ``pixel_size.mean_um``).
        Probabilities: with ``class_roles`` (class column -> role) the class columns are
        summed per role; otherwise columns named ``<role>`` or ``prob_<role>``.
        Optional: ``tissue_fraction`` (default 1), ``lymphocyte_count``, ``tumor_cell_count``
        (counts per tile; count_source ``model``).
        """
        cols = set(map(str, df.columns))
        l0 = tile_level0_px or tile_um / slide_mpp_um
        lx, ly = (l0, l0) if pixel_size is None or pixel_size.is_square else pixel_size.px(tile_um)
        if {"row", "col"} <= cols:
            rows, cs = df["row"].to_numpy(), df["col"].to_numpy()
        elif {"x", "y"} <= cols:
            rows = np.floor(df["y"].to_numpy(dtype=float) / ly + 1e-6).astype(np.int64)
            cs = np.floor(df["x"].to_numpy(dtype=float) / lx + 1e-6).astype(np.int64)
        else:
            raise InputError("tile table needs row/col or x/y columns")
        role_probs: dict[str, np.ndarray] = {}
        if class_roles:
            missing = [c for c in class_roles if c not in cols]
            if missing:
                raise InputError(f"tile table lacks class columns {missing}")
            for c, r in class_roles.items():
                role_probs[r] = role_probs.get(r, 0) + df[c].to_numpy(dtype=float)
        else:
            for r in TISSUE_ROLES:
                for name in (r, f"prob_{r}"):
                    if name in cols:
                        role_probs[r] = df[name].to_numpy(dtype=float)
            if not role_probs:
                raise InputError(f"tile table has no role columns (any of {list(TISSUE_ROLES)})")
        tf = df["tissue_fraction"].to_numpy(dtype=float) if "tissue_fraction" in cols else np.ones(len(df))
        lymph = df["lymphocyte_count"].to_numpy(dtype=float) if "lymphocyte_count" in cols else None
        tumor = df["tumor_cell_count"].to_numpy(dtype=float) if "tumor_cell_count" in cols else None
        return cls(rows=rows, cols=cs, tile_um=tile_um, slide_mpp_um=slide_mpp_um,
                   tile_level0_px=l0, role_probs=role_probs, tissue_fraction=tf,
                   lymphocyte_counts=lymph, tumor_cell_counts=tumor,
                   count_source="model" if lymph is not None else None,
                   metadata=dict(metadata or {}), pixel_size=pixel_size)

    def with_cells(self, cells: pd.DataFrame, cell_role_map: Mapping[str, str] | None = None,
                   source: str = "cell_table") -> TileGrid:
        """A copy whose counts come from a cell table (count_source ``source``: ``cell_table``
        for a user's table, ``model_cells`` for a detector's cells)."""
        from dataclasses import replace

        _check_cells_on_slide(cells, self.metadata)
        lymph, tumor, outside = counts_from_cells(self, cells, cell_role_map)
        meta = dict(self.metadata, n_cells=len(cells), n_cells_outside_tiles=int(outside))
        return replace(self, lymphocyte_counts=lymph, tumor_cell_counts=tumor,
                       count_source=source, metadata=meta)


def _check_cells_on_slide(cells: pd.DataFrame, meta: Mapping[str, Any]) -> None:
    """Refuse a cell table that lies wholly off the slide (wrong units or wrong slide); warn
    when some cells do. Needs the level-0 size in ``meta`` (grids from a store have it)."""
    w, h = meta.get("level0_width_px"), meta.get("level0_height_px")
    if not w or not h or len(cells) == 0:
        return
    x, y = cells["x"].to_numpy(dtype=np.float64), cells["y"].to_numpy(dtype=np.float64)
    off = ~((x >= 0) & (y >= 0) & (x < float(w)) & (y < float(h)))
    n_off = int(off.sum())
    if not n_off:
        return
    src = cells.attrs.get("source_path") or meta.get("slide_id") or "cell table"
    if n_off == len(cells):
        raise CellTableError(
            f"all {n_off} cells lie outside the slide ({w} x {h} level-0 px); coordinates must "
            "be level-0 pixels of this slide (not microns, not another slide's)", src)
    log.warning("%s: %d of %d cells lie outside the slide (%d x %d level-0 px) and are not "
                "counted", src, n_off, len(cells), w, h)


def _sum_by_role(values: np.ndarray, classes: list[str], roles: Mapping[str, str],
                 path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """(N, K) per-class values -> role -> (N,) sums over the classes with that role."""
    out: dict[str, np.ndarray] = {}
    for k, c in enumerate(classes):
        r = roles.get(c)
        if r is None:
            raise StoreError(f"model card maps no role to class {c!r}", str(path))
        out[r] = out.get(r, 0) + values[:, k].astype(np.float64)
    return out


# --- grid helpers ----------------------------------------------------------------------
@dataclass
class DenseGrid:
    """A (rows, cols) raster holding the tiles, padded by ``pad`` cells on each side.

    origin: (row, col) on the slide grid of raster cell (0, 0); r, c: (N,) raster index of
    each tile; has_tile: (R, C) bool.
    """

    origin: tuple[int, int]
    shape: tuple[int, int]
    r: np.ndarray
    c: np.ndarray
    has_tile: np.ndarray

    @classmethod
    def of(cls, rows: np.ndarray, cols: np.ndarray, pad: int) -> DenseGrid:
        if rows.size == 0:
            return cls((0, 0), (2 * pad + 1, 2 * pad + 1), rows.astype(np.int64),
                       cols.astype(np.int64), np.zeros((2 * pad + 1, 2 * pad + 1), bool))
        r0, c0 = int(rows.min()) - pad, int(cols.min()) - pad
        shape = (int(rows.max()) - r0 + pad + 1, int(cols.max()) - c0 + pad + 1)
        r, c = rows - r0, cols - c0
        has = np.zeros(shape, dtype=bool)
        has[r, c] = True
        return cls((r0, c0), shape, r, c, has)

    def paint(self, values: np.ndarray, fill: Any = 0) -> np.ndarray:
        """(N,) per-tile values -> (R, C) raster (``fill`` where there is no tile)."""
        values = np.asarray(values)
        out = np.full(self.shape, fill, dtype=values.dtype)
        out[self.r, self.c] = values
        return out

    def sample(self, raster: np.ndarray) -> np.ndarray:
        """(R, C) raster -> (N,) values at the tiles."""
        return raster[self.r, self.c]


def counts_from_cells(grid: TileGrid, cells: pd.DataFrame,
                      role_map: Mapping[str, str] | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Bin a cell table (x, y level-0 px; ``class`` or ``role``) onto the grid's tiles.

    Returns (lymphocytes (N,), tumour cells (N,), number of cells outside every tile).
    """
    role = cells["role"].to_numpy() if "role" in cells else cell_roles(cells["class"], role_map)
    sx, sy = grid.pitch_xy  # level-0 px per tile along x and y
    r = np.floor(cells["y"].to_numpy(dtype=np.float64) / sy).astype(np.int64)
    c = np.floor(cells["x"].to_numpy(dtype=np.float64) / sx).astype(np.int64)
    n = grid.n_tiles
    if n == 0:
        return np.zeros(0), np.zeros(0), len(cells)
    dense = DenseGrid.of(grid.rows, grid.cols, 0)
    idx = np.full(dense.shape, -1, dtype=np.int64)
    idx[dense.r, dense.c] = np.arange(n)
    rr, cc = r - dense.origin[0], c - dense.origin[1]
    inside = (rr >= 0) & (cc >= 0) & (rr < dense.shape[0]) & (cc < dense.shape[1])
    tile = np.full(r.shape, -1, dtype=np.int64)
    tile[inside] = idx[rr[inside], cc[inside]]
    ok = tile >= 0
    lymph = np.bincount(tile[ok & (role == "lymphocyte")], minlength=n).astype(np.float64)
    tumor = np.bincount(tile[ok & (role == "tumor_cell")], minlength=n).astype(np.float64)
    return lymph, tumor, int((~ok).sum())
