"""Cell tables: one row per detected cell, ``x, y`` in level-0 px and ``class``.

Read from QuPath GeoJSON (detections, cells or annotations; points or polygon centroids),
CSV, or (Geo)Parquet (WKB geometry -> centroid, or x/y columns), so detections from QuPath,
HoVer-Net, CellViT or histolytics drive the same biomarkers. Class names are mapped to the
cell roles of :mod:`tmequant.roles` by :func:`cell_roles`.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from array import array
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant.errors import CellTableError

# Class-name -> cell-role rules live in tmequant.roles, shared with the training labels.
from tmequant.roles import DEFAULT_CELL_ROLE_MAP, cell_role

__all__ = ["DEFAULT_CELL_ROLE_MAP", "DEFAULT_MAX_BYTES", "cell_role", "cell_roles", "check_cell_units",
           "read_cell_table"]

DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB
# Cells admitted in one table. compute_biomarkers peaks at ~205 bytes per cell over a
# ~160 MB base (x, y, class, role, tile and pixel indices; measured: 1M cells 362 MB, 4M
# 976 MB, docs/reliability.md), so 8 million cells stay under ~1.8 GB; a whole-slide export
# rarely has more than 3 million. A 2 GiB file can hold 25 million point features, so the
# size limit alone does not bound memory.
MAX_CELLS = 8_000_000

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


_UNITS_SAMPLE = 100_000  # cells looked at to tell micrometres from pixels


def check_cell_units(grid: Any, cells: pd.DataFrame) -> None:
    """Refuse a cell table whose x/y are micrometres rather than level-0 pixels.

    Read as micrometres, every coordinate is ``mpp`` times the pixel one: at 0.25 um/px the
    cells crowd into the slide's top-left sixteenth, at 2 um/px they run off it. The test
    compares evidence instead of guessing from ranges: the share of cells on tissue tiles
    read as pixels (as given) and read as micrometres (divided by the MPP). A table whose
    cells fit the tissue at least 80% as micrometres and at most half as well as pixels is
    refused with a message saying how to convert it. Near 1 um/px the two readings agree
    and nothing is checked. Non-square pixels are read per axis. grid: a TileGrid (rows,
    cols, pitch_xy, level0, tissue_fraction); cells: x, y.
    """
    px = grid.level0
    if grid.n_tiles == 0 or len(cells) == 0 or all(0.8 <= m <= 1.25 for m in (px.x_um, px.y_um)):
        return
    tissue = np.asarray(grid.tissue_fraction) > 0
    if not tissue.any():
        return
    rows, cols = grid.rows[tissue], grid.cols[tissue]
    r0, c0 = int(rows.min()), int(cols.min())
    on = np.zeros((int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1), dtype=bool)
    on[rows - r0, cols - c0] = True
    step = max(1, len(cells) // _UNITS_SAMPLE)  # every k-th cell: deterministic, order-free enough
    x = cells["x"].to_numpy(dtype=np.float64)[::step]
    y = cells["y"].to_numpy(dtype=np.float64)[::step]
    sx, sy = grid.pitch_xy

    def share_on_tissue(xx: np.ndarray, yy: np.ndarray) -> float:
        r = np.floor(yy / sy).astype(np.int64) - r0
        c = np.floor(xx / sx).astype(np.int64) - c0
        ok = (r >= 0) & (c >= 0) & (r < on.shape[0]) & (c < on.shape[1])
        hit = np.zeros(len(xx), dtype=bool)
        hit[ok] = on[r[ok], c[ok]]
        return float(hit.mean())

    as_px = share_on_tissue(x, y)
    as_um = share_on_tissue(*px.to_px(x, y))
    if as_um >= 0.8 and as_px <= 0.5 * as_um:
        src = cells.attrs.get("source_path") or grid.metadata.get("slide_id") or "cell table"
        how = (f"x and y by the slide's {px.x_um:.4g} um/px" if px.is_square else
               f"x by the slide's {px.x_um:.4g} um/px and y by its {px.y_um:.4g} um/px")
        raise CellTableError(
            f"x/y look like micrometres, not level-0 pixels: {100 * as_um:.0f}% of the cells lie "
            f"on tissue read as micrometres, {100 * as_px:.0f}% read as pixels; divide {how} "
            "to convert", src)


def _check_size(p: Path, max_bytes: int) -> None:
    if not p.is_file():
        from tmequant.inputs import missing_reason

        reason = missing_reason(p) if not p.exists() else "not a file"
        raise CellTableError("no such cell table" if reason == "no such file or folder" else
                             f"cell table: {reason}", p)
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


_FEATURES_START = re.compile(r'"features"\s*:\s*\[')
_GEO_BATCH = 20_000  # features turned into shapely geometries at a time
_MAX_FEATURE_CHARS = 16 << 20  # one cell's feature (a detailed polygon is a few kB)
_MAX_HEAD_CHARS = 64 << 20  # where a FeatureCollection's "features" list must begin
_SEPARATORS = re.compile(r"[\s,]*")


_END = object()  # what _FeatureStream.next_feature returns after the last feature


class _FeatureStream:
    """The features of a GeoJSON text read chunk by chunk and decoded one at a time;
    ``buf[pos:]`` is what was read and not decoded yet."""

    def __init__(self, chunks: Iterator[str]) -> None:
        self.dec = json.JSONDecoder()
        self.chunks = chunks
        self.buf = ""
        self.pos = 0

    def more(self) -> bool:
        """Append the next chunk to what is left; False at the end of the text."""
        nxt = next(self.chunks, None)
        if nxt is None:
            return False
        self.buf = self.buf[self.pos:] + nxt
        self.pos = 0
        return True

    def find_features(self, p: Path) -> bool:
        """Move to the first feature: of a FeatureCollection's "features" list, a bare list, or
        one Feature. False: a small file without a features list (one Feature, or an error)."""
        while True:
            self.buf = self.buf.lstrip()  # leading whitespace is dropped as it comes: a file of spaces stays small
            if self.buf or not self.more():
                break
        if not self.buf:
            raise CellTableError("not valid JSON (only whitespace)", p)
        if self.buf[0] == "[":
            self.pos = 1
        elif self.buf[0] == "{":
            while (m := _FEATURES_START.search(self.buf)) is None:
                if len(self.buf) > _MAX_HEAD_CHARS:
                    raise CellTableError(f"no \"features\" list in the first {_MAX_HEAD_CHARS >> 20} MiB: "
                                         "not a QuPath cell export", p)
                if not self.more():  # a small file without a features list (one Feature, or an error)
                    return False
            self.pos = m.end()
        else:
            raise CellTableError("not valid JSON (line 1: Expecting value)", p)
        return True

    def next_feature(self, n: int, p: Path) -> Any:
        """The next feature decoded (``n``: its index, for messages), or :data:`_END` after the
        list's closing bracket."""
        # skip whitespace and commas between features
        while True:
            self.pos = _SEPARATORS.match(self.buf, self.pos).end()  # type: ignore[union-attr]
            if self.pos < len(self.buf) or not self.more():
                break
        if self.pos >= len(self.buf):
            raise CellTableError("not valid JSON (the features list is cut short)", p)
        if self.buf[self.pos] == "]":
            return _END
        while True:
            try:
                f, end = self.dec.raw_decode(self.buf, self.pos)
                break
            except json.JSONDecodeError as e:
                # a feature cut by the chunk's end reads as an error too: read on, but a
                # feature over _MAX_FEATURE_CHARS is a broken file, not a cell
                if len(self.buf) - self.pos > _MAX_FEATURE_CHARS or not self.more():
                    raise CellTableError(f"not valid JSON (feature {n}: {e.msg})", p) from None
            except RecursionError:
                raise CellTableError("GeoJSON geometry is nested too deeply", p) from None
        self.pos = end
        return f


def _read_geojson(p: Path, max_bytes: int) -> pd.DataFrame:
    """Stream a QuPath GeoJSON cell export: features are decoded one at a time and only each
    one's centroid and class are kept, so memory grows with the number of cells (~40 bytes
    each) instead of ~11x the file (the whole JSON tree plus a shapely object per cell)."""
    import shapely
    from shapely.geometry import shape

    from tmequant.qupath import _classification_name, feature_parts, iter_text

    text = _FeatureStream(iter_text(p, max_bytes))
    xs, ys = array("d"), array("d")  # 8 bytes per cell
    classes: list[str] = []
    intern: dict[str, str] = {}
    geoms: list[Any] = []  # shapes the fast path leaves to shapely, and their cell index
    geom_idx: list[int] = []
    n = 0

    def flush() -> None:
        if not geoms:
            return
        arr = np.array(geoms, dtype=object)
        empty = shapely.is_empty(arr)
        if empty.any():  # e.g. "coordinates": [] : no position to count the cell at
            raise CellTableError(f"features have an empty geometry (first: feature "
                                 f"{geom_idx[int(np.flatnonzero(empty)[0])]})", p)
        pts = shapely.centroid(arr)
        for i, x, y in zip(geom_idx, shapely.get_x(pts), shapely.get_y(pts)):
            xs[i], ys[i] = x, y
        geoms.clear()
        geom_idx.clear()

    if not text.find_features(p):
        return _read_geojson_whole(p, max_bytes)
    while (f := text.next_feature(n, p)) is not _END:
        gj, props = feature_parts(f, n, p)
        xy = _fast_centroid(gj)
        if xy is not None:
            xs.append(xy[0])
            ys.append(xy[1])
        else:
            xs.append(math.nan)
            ys.append(math.nan)
            geom_idx.append(n)
        try:
            if xy is None:
                geoms.append(shape(gj))
        except RecursionError:
            raise CellTableError("GeoJSON geometry is nested too deeply", p) from None
        except Exception as e:  # noqa: BLE001 - shapely raises several types for bad coordinates
            raise CellTableError(f"feature {n}: invalid geometry ({type(e).__name__}: {e})", p) from None
        c = _classification_name(props) or ""
        classes.append(intern.setdefault(c, c))
        n += 1
        if n > MAX_CELLS:
            raise CellTableError(_too_many(), p)
        if len(geoms) >= _GEO_BATCH:
            flush()
    flush()
    if n == 0:
        raise CellTableError("GeoJSON has no features", p)
    return _finish(np.frombuffer(xs, dtype=np.float64), np.frombuffer(ys, dtype=np.float64),
                   np.array(classes, dtype=object), p)


def _fast_centroid(g: Any) -> tuple[float, float] | None:
    """Centroid of a GeoJSON Point or hole-free Polygon without building a shapely object
    (15x faster; a cell export is millions of them). None: leave it to shapely (other types,
    holes, zero area, anything malformed, which shapely then names)."""
    try:
        t, c = g.get("type"), g.get("coordinates")
        if t == "Point" and isinstance(c, list) and len(c) in (2, 3):
            px, py = float(c[0]), float(c[1])
            return (px, py) if math.isfinite(px) and math.isfinite(py) else None
        if t != "Polygon" or not isinstance(c, list) or len(c) != 1 or len(c[0]) < 4:
            return None
        a = np.asarray(c[0], dtype=np.float64)
        if a.ndim != 2 or a.shape[1] < 2 or not np.isfinite(a[:, :2]).all():
            return None
        x0, y0 = float(a[0, 0]), float(a[0, 1])
        x: np.ndarray = a[:, 0] - x0  # relative to a vertex: less round-off (as GEOS)
        y: np.ndarray = a[:, 1] - y0
        if x[-1] != 0 or y[-1] != 0:  # an open ring: shapely closes it
            x, y = np.append(x, 0.0), np.append(y, 0.0)
        cross = x[:-1] * y[1:] - x[1:] * y[:-1]
        area2 = float(cross.sum())
        if area2 == 0:
            return None
        return (x0 + float(((x[:-1] + x[1:]) * cross).sum()) / (3 * area2),
                y0 + float(((y[:-1] + y[1:]) * cross).sum()) / (3 * area2))
    except (TypeError, ValueError, AttributeError):
        return None


def _read_geojson_whole(p: Path, max_bytes: int) -> pd.DataFrame:
    """A single Feature or a FeatureCollection without a features list near its top: parse
    whole (such files are small)."""
    import shapely

    from tmequant.qupath import read_features

    feats = read_features(p, max_bytes=max_bytes)
    if not feats:
        raise CellTableError("GeoJSON has no features", p)
    geoms = np.array([f.geometry for f in feats], dtype=object)
    empty = shapely.is_empty(geoms)
    if empty.any():
        raise CellTableError(f"{int(empty.sum())} features have an empty geometry "
                             f"(first: feature {int(np.flatnonzero(empty)[0])})", p)
    pts = shapely.centroid(geoms)
    return _finish(shapely.get_x(pts), shapely.get_y(pts),
                   np.array([f.classification or "" for f in feats], dtype=object), p)


def _too_many() -> str:
    return (f"cell table has more than {MAX_CELLS:,} cells, the limit that keeps memory under "
            "2 GB; split it or raise tmequant.biomarkers.cells.MAX_CELLS")


def _read_parquet(p: Path) -> pd.DataFrame:
    import json

    import pyarrow.parquet as pq
    import shapely

    try:
        n_rows = pq.ParquetFile(p).metadata.num_rows
        if n_rows > MAX_CELLS:
            raise CellTableError(_too_many(), p)
        table = pq.read_table(p)
    except CellTableError:
        raise
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


class _Bounded(io.RawIOBase):
    """A binary stream that raises CellTableError after ``limit`` bytes (bounds what a gzip
    file decompresses to) and turns a truncated gzip stream into CellTableError."""

    def __init__(self, raw: Any, limit: int, p: Path):
        self._raw, self._left, self._p, self._limit = raw, limit, p, limit

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        try:
            data = self._raw.read(len(b))
        except EOFError:
            raise CellTableError("gzip file is truncated (an incomplete copy or download?)",
                                 self._p) from None
        except OSError as e:  # gzip.BadGzipFile and friends
            raise CellTableError(f"cannot read as gzip: {e}", self._p) from None
        self._left -= len(data)
        if self._left < 0:
            raise CellTableError(f"gzip file holds more than {self._limit / 2**20:.0f} MiB of text, "
                                 "over the limit (raise max_bytes or split the table)", self._p)
        b[: len(data)] = data
        return len(data)


def _read_csv(p: Path, name: str, max_bytes: int) -> pd.DataFrame:
    """CSV/TSV -> cell table, keeping only the x, y and class columns in memory (a wide
    export otherwise costs all its columns); gzip bounded by ``max_bytes`` decompressed."""
    import gzip

    csv = name.endswith(".csv")
    kw: dict[str, Any] = {"sep": "," if csv else None, "engine": "c" if csv else "python"}

    def stream() -> Any:
        if p.name.lower().endswith(".gz"):
            return io.BufferedReader(_Bounded(gzip.open(p, "rb"), max_bytes, p), 1 << 20)
        return open(p, "rb")

    try:
        with stream() as fh:
            cols = [str(c) for c in pd.read_csv(fh, nrows=0, **kw).columns]
        keep = [c for c in (_pick(cols, _X_NAMES), _pick(cols, _Y_NAMES), _pick(cols, _CLASS_NAMES)) if c]
        if len(keep) < 3:  # _from_columns names what is missing
            with stream() as fh:
                return _from_columns(pd.read_csv(fh, nrows=1, **kw), p)
        parts, n = [], 0
        with stream() as fh:
            for chunk in pd.read_csv(fh, usecols=keep, chunksize=1 << 20, **kw):
                n += len(chunk)
                if n > MAX_CELLS:
                    raise CellTableError(_too_many(), p)
                # classes as a categorical: a few distinct names instead of a string per row
                parts.append(chunk.assign(**{keep[2]: chunk[keep[2]].astype("category")}))
        if not parts:
            raise CellTableError("cell table has no cells", p)
        df = pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]
        if not isinstance(df[keep[2]].dtype, pd.CategoricalDtype):  # chunks' categories differed
            df[keep[2]] = df[keep[2]].astype("category")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as e:
        raise CellTableError(f"cannot parse as CSV: {' '.join(str(e).split())[:200]}", p) from None
    except EOFError:
        raise CellTableError("gzip file is truncated (an incomplete copy or download?)", p) from None
    except OSError as e:
        raise CellTableError(f"cannot read: {' '.join(str(e).split())[:200]}", p) from None
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
        return _read_csv(p, name, max_bytes)
    raise CellTableError("unknown cell-table format: use .geojson, .csv or .parquet", p)
