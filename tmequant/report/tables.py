"""The cohort table: one row per slide, written as ``cohort.csv`` and ``cohort.parquet``.

Column order: the slide id first, then the biomarkers (in the order the rows, sorted by slide
id, first list them), then provenance (in :data:`PROVENANCE_COLUMNS` order), then parameters
(``param_<name>``, alphabetical). Rows are sorted by
slide id so a distributed run and a serial run write identical files. Floats in the CSV are
written with ``%.10g``: enough digits for any biomarker, no ``0.30000000000000004`` noise; NaN
is an empty cell and infinities are ``inf``/``-inf`` (what pandas and spreadsheets read back).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant.atomic import atomic_write_bytes, atomic_write_text
from tmequant.provenance import canonical_json

ID_COLUMN = "slide_id"
PARAM_PREFIX = "param_"
CSV_FLOAT_FORMAT = "%.10g"

# Provenance columns of docs/biomarkers.md (and the store's root attributes). Any column
# starting with "provenance_" counts too.
PROVENANCE_COLUMNS: tuple[str, ...] = (
    "source_path",
    "store_path",
    "store_params_hash",
    "predictions_params_hash",
    "source_size_bytes",
    "source_fingerprint",
    "reader",
    "vendor",
    "level0_width_px",
    "level0_height_px",
    "slide_mpp_um",
    "mpp_source",
    "target_mpp_um",
    "tile_px",
    "tile_um",
    "tile_level0_px",
    "n_tiles",
    "n_cells",
    "n_cells_outside_tiles",
    "tiling_params_hash",
    "model_name",
    "model_version",
    "model_domain",
    "model_params_hash",
    "count_source",
    "params_hash",
    "package_version",
)


def flatten_row(row: Mapping[str, Any], param_keys: Iterable[str] = ("params", "parameters")) -> dict[str, Any]:
    """One flat dict per slide: a nested ``params`` dict becomes ``param_<key>`` columns,
    other nested dicts ``<key>_<sub>``; lists/tuples become canonical JSON strings; numpy
    scalars become Python scalars."""
    out: dict[str, Any] = {}
    pk = set(param_keys)
    for key, value in row.items():
        if isinstance(value, Mapping):
            prefix = PARAM_PREFIX if key in pk else f"{key}_"
            for sub, v in flatten_row(value, ()).items():
                out[f"{prefix}{sub}"] = v
        else:
            out[key] = _scalar(value)
    return out


def _scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, (np.ndarray, list, tuple)):
        return canonical_json(v)
    if isinstance(v, Path):
        return str(v)
    return v


def column_kind(name: str, provenance_columns: Sequence[str] = PROVENANCE_COLUMNS) -> str:
    """``id``, ``biomarker``, ``provenance`` or ``parameter``."""
    if name == ID_COLUMN:
        return "id"
    if name.startswith(PARAM_PREFIX):
        return "parameter"
    if name in provenance_columns or name.startswith("provenance_"):
        return "provenance"
    return "biomarker"


def cohort_frame(
    rows: Iterable[Mapping[str, Any]],
    *,
    provenance_columns: Sequence[str] = PROVENANCE_COLUMNS,
) -> pd.DataFrame:
    """A DataFrame of the cohort: flattened rows, ordered columns, rows sorted by slide id.

    Every row must have ``slide_id``. Columns a row lacks are NaN/None there.
    """
    flat = [flatten_row(r) for r in rows]
    for i, r in enumerate(flat):
        if ID_COLUMN not in r:
            raise ValueError(f"cohort row {i} has no {ID_COLUMN!r}")
    # Sort first: the columns' order then depends on the set of rows, never on their arrival.
    flat.sort(key=lambda r: str(r[ID_COLUMN]))
    seen: dict[str, int] = {}
    for r in flat:
        for k in r:
            seen.setdefault(k, len(seen))
    order = {"id": 0, "biomarker": 1, "provenance": 2, "parameter": 3}
    prov_rank = {c: i for i, c in enumerate(provenance_columns)}

    def key(c: str) -> tuple[int, int, str, int]:
        kind = column_kind(c, provenance_columns)
        # biomarkers as the rows list them; provenance in the canonical order; parameters a-z
        return (order[kind], prov_rank.get(c, len(prov_rank)) if kind == "provenance" else 0,
                c if kind == "parameter" else "", seen[c])

    df = pd.DataFrame.from_records(flat, columns=sorted(seen, key=key))
    return df.reset_index(drop=True)


def _csv_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Object columns with floats inside (mixed types) get the same float format as float ones."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            out[c] = [(_fmt_float(v) if isinstance(v, float) else v) for v in out[c]]
    return out


def _parquet_frame(df: pd.DataFrame) -> pd.DataFrame:
    """Arrow needs one type per column: a column mixing types (say numbers and text) is text."""
    out = df.copy()
    for c in out.columns:
        if out[c].dtype == object:
            types = {type(v) for v in out[c] if v is not None and not (isinstance(v, float) and math.isnan(v))}
            if len(types) > 1 and not types <= {int, float}:
                out[c] = [None if v is None else str(v) for v in out[c]]
    return out


def _fmt_float(v: float) -> str:
    if math.isnan(v):
        return ""
    return CSV_FLOAT_FORMAT % v


def write_cohort_table(
    rows: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike[str],
    *,
    stem: str = "cohort",
    provenance_columns: Sequence[str] = PROVENANCE_COLUMNS,
) -> tuple[Path, Path]:
    """Write ``<out_dir>/<stem>.csv`` and ``<stem>.parquet``; returns both paths.

    Files are written to a temporary name and renamed (:mod:`tmequant.atomic`), so a reader
    never sees half a table.
    """
    df = cohort_frame(rows, provenance_columns=provenance_columns)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, pq_path = out / f"{stem}.csv", out / f"{stem}.parquet"
    atomic_write_text(csv_path, _csv_frame(df).to_csv(index=False, float_format=CSV_FLOAT_FORMAT,
                                                      na_rep="", lineterminator="\n"))
    atomic_write_bytes(pq_path, parquet_bytes(_parquet_frame(df)))
    return csv_path, pq_path


def parquet_bytes(df: pd.DataFrame) -> bytes:
    """``df`` as a Parquet file's bytes (no index), for :func:`tmequant.atomic.atomic_write_bytes`."""
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    return buf.getvalue()


def read_cohort_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a cohort table back (``.parquet`` keeps exact floats; ``.csv`` the formatted ones)."""
    p = Path(path)
    if p.suffix == ".parquet":
        return pd.read_parquet(p)
    return pd.read_csv(p)
