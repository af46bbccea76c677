"""Cell tables: one row per detected cell, ``x, y`` in level-0 px and ``class``.

Read from QuPath GeoJSON (detections, cells or annotations; points or polygon centroids),
CSV, or (Geo)Parquet (WKB geometry -> centroid, or x/y columns), so detections from QuPath,
HoVer-Net, CellViT or histolytics drive the same biomarkers. Class names are mapped to the
cell roles of :mod:`tmequant.roles` by :func:`cell_roles`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from tmequant.errors import CellTableError

# Class-name -> cell-role rules live in tmequant.roles, shared with the training labels.
from tmequant.roles import DEFAULT_CELL_ROLE_MAP, cell_role

__all__ = ["DEFAULT_CELL_ROLE_MAP", "DEFAULT_MAX_BYTES", "cell_role", "cell_roles", "read_cell_table"]

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB

_X_NAMES = ("x", "x_px", "centroid_x", "centroid x px", "centroid_x_px", "cx", "xc")
_Y_NAMES = ("y", "y_px", "centroid_y", "centroid y px", "centroid_y_px", "cy", "yc")
_CLASS_NAMES = ("class", "class_name", "classification", "cell_type", "type", "label", "name")
_UM_NAMES = ("centroid x µm", "centroid x um", "x_um")

def cell_roles(classes: pd.Series | np.ndarray, mapping: Mapping[str, str] | None = None) -> np.ndarray:
    """(M,) object array of roles for (M,) class names (each distinct name mapped once)."""
    from tmequant.roles import CELL_ROLES

    if mapping:
        bad = {k: v for k, v in mapping.items() if v not in CELL_ROLES}
        if bad:
            raise CellTableError(f"cell role map has unknown roles {bad}; valid: {list(CELL_ROLES)}")
    cat = pd.Categorical(pd.Series(classes, dtype="object").fillna("").astype(str))
    lut = np.array([cell_role(c, mapping) for c in cat.categories] + ["other"], dtype=object)
    codes = np.asarray(cat.codes)
    return lut[np.where(codes < 0, len(lut) - 1, codes)]


def _check_size(p: Path, max_bytes: int) -> None:
    if not p.is_file():
        raise CellTableError("no such cell table", p)
    size = p.stat().st_size
    if size == 0:
        raise CellTableError("cell table is empty (0 bytes)", p)
    if size > max_bytes:
        raise CellTableError(
            f"cell table is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit", p)


def _pick(cols: list[str], names: tuple[str, ...]) -> str | None:
    low = {c.strip().lower(): c for c in cols}
    for n in names:
        if n in low:
            return low[n]
    return None


def _finish(x: np.ndarray, y: np.ndarray, cls: np.ndarray, p: Path) -> pd.DataFrame:
    df = pd.DataFrame({"x": np.asarray(x, dtype=np.float64), "y": np.asarray(y, dtype=np.float64),
                       "class": pd.Series(cls, dtype="object").fillna("").astype(str).to_numpy()})
    if len(df) == 0:
        raise CellTableError("cell table has no cells", p)
    bad = ~(np.isfinite(df["x"].to_numpy()) & np.isfinite(df["y"].to_numpy()))
    if bad.any():
        raise CellTableError(f"{int(bad.sum())} cells have missing or non-finite x/y", p)
    if (df["x"] < 0).any() or (df["y"] < 0).any():
        raise CellTableError("negative x/y: coordinates must be level-0 pixels of the slide", p)
    df.attrs["source_path"] = str(p)  # later checks (cells off the slide) name the file
    return df


def _from_columns(df: pd.DataFrame, p: Path) -> pd.DataFrame:
    cols = [str(c) for c in df.columns]
    xc, yc, cc = _pick(cols, _X_NAMES), _pick(cols, _Y_NAMES), _pick(cols, _CLASS_NAMES)
    if xc is None or yc is None:
        hint = (" (found micron centroids: convert to level-0 pixels by dividing by the slide MPP)"
                if _pick(cols, _UM_NAMES) else "")
        raise CellTableError(f"cell table needs x and y columns in level-0 px, has {cols[:12]}{hint}", p)
    if cc is None:
        raise CellTableError(f"cell table needs a class column (one of {list(_CLASS_NAMES)}), has {cols[:12]}", p)
    try:
        x = pd.to_numeric(df[xc]).to_numpy()
        y = pd.to_numeric(df[yc]).to_numpy()
    except (ValueError, TypeError):
        raise CellTableError(f"columns {xc!r}/{yc!r} are not numeric", p) from None
    return _finish(x, y, df[cc].to_numpy(), p)


def _read_geojson(p: Path, max_bytes: int) -> pd.DataFrame:
    import shapely

    from tmequant.qupath import read_features

    feats = read_features(p, max_bytes=max_bytes)
    if not feats:
        raise CellTableError("GeoJSON has no features", p)
    geoms = np.array([f.geometry for f in feats], dtype=object)
    empty = shapely.is_empty(geoms)
    if empty.any():  # e.g. "coordinates": [] : no position to count the cell at
        raise CellTableError(f"{int(empty.sum())} features have an empty geometry "
                             f"(first: feature {int(np.flatnonzero(empty)[0])})", p)
    pts = shapely.centroid(geoms)
    return _finish(shapely.get_x(pts), shapely.get_y(pts),
                   np.array([f.classification for f in feats], dtype=object), p)


def _read_parquet(p: Path) -> pd.DataFrame:
    import json

    import pyarrow.parquet as pq
    import shapely

    try:
        table = pq.read_table(p)
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError on garbage
        raise CellTableError(f"not a readable Parquet file ({type(e).__name__}: {e})", p) from None
    meta = table.schema.metadata or {}
    geo_col = None
    if b"geo" in meta:
        try:
            geo_col = json.loads(meta[b"geo"]).get("primary_column", "geometry")
        except ValueError:
            geo_col = "geometry"
    elif "geometry" in table.column_names:
        geo_col = "geometry"
    cols = [c for c in table.column_names if c != geo_col]
    df = table.select(cols).to_pandas(ignore_metadata=True)
    if geo_col and geo_col in table.column_names and _pick(cols, _X_NAMES) is None:
        wkb = table.column(geo_col).to_numpy(zero_copy_only=False)
        try:
            geoms = shapely.from_wkb(wkb)
        except Exception as e:  # noqa: BLE001 - shapely GEOSException and friends
            raise CellTableError(f"geometry column {geo_col!r} is not WKB ({e})", p) from None
        empty = shapely.is_empty(geoms)
        if empty.any():
            raise CellTableError(f"{int(empty.sum())} rows have an empty geometry", p)
        pts = shapely.centroid(geoms)
        cc = _pick(cols, _CLASS_NAMES)
        if cc is None:
            raise CellTableError(f"cell table needs a class column (one of {list(_CLASS_NAMES)}), has {cols[:12]}", p)
        return _finish(shapely.get_x(pts), shapely.get_y(pts), df[cc].to_numpy(), p)
    return _from_columns(df, p)


def read_cell_table(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> pd.DataFrame:
    """Read a cell table -> DataFrame with ``x, y`` (float64, level-0 px) and ``class`` (str).

    Formats by suffix: ``.geojson``/``.json`` (+ ``.gz``) QuPath GeoJSON, ``.csv``/``.tsv``,
    ``.parquet``/``.geoparquet``. Raises CellTableError (one line, naming the file) when the
    file is missing, empty, larger than ``max_bytes``, malformed, or lacks x/y/class.
    """
    p = Path(path)
    _check_size(p, max_bytes)
    name = p.name.lower().removesuffix(".gz")
    if name.endswith((".geojson", ".json")):
        return _read_geojson(p, max_bytes)
    if name.endswith((".parquet", ".geoparquet", ".pq")):
        return _read_parquet(p)
    if name.endswith((".csv", ".tsv", ".txt")):
        try:
            df = pd.read_csv(p, sep=None if not name.endswith(".csv") else ",", engine="python"
                             if not name.endswith(".csv") else "c")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise CellTableError(f"cannot parse as CSV: {' '.join(str(e).split())[:200]}", p) from None
        return _from_columns(df, p)
    raise CellTableError("unknown cell-table format: use .geojson, .csv or .parquet", p)
