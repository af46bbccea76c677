"""A :class:`BiomarkerResult` to and from files: its row, TLS table and per-tile arrays.

``write_result_files`` writes ``biomarkers.json`` (the row, units in key names),
``tls.parquet`` and ``tls.csv`` (the TLS table) and ``arrays.npz`` (per-tile densities and
counts, compartment maps); ``read_result_files`` gives the same result back. ``tmequant run``
keeps them in ``results/<slide_id>/`` (with its completion marker, :mod:`tmequant.pipeline`)
and reuses them when the slide's inputs are unchanged.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant.atomic import atomic_write_bytes, atomic_write_text, dump_json
from tmequant.biomarkers.aggregate import (
    COMPARTMENT_NAMES,
    BiomarkerResult,
    Compartments,
    DenseGrid,
)

#: The files of one result, in the order they are written.
RESULT_FILES = ("biomarkers.json", "tls.parquet", "tls.csv", "arrays.npz")


def write_result_files(rdir: Path, res: Any) -> None:
    """Write ``res`` (a BiomarkerResult) as :data:`RESULT_FILES` in ``rdir``, each atomically."""
    atomic_write_text(rdir / "biomarkers.json", dump_json(to_plain(res.row)))
    buf = io.BytesIO()
    res.tls.to_parquet(buf, index=False)
    atomic_write_bytes(rdir / "tls.parquet", buf.getvalue())
    atomic_write_text(rdir / "tls.csv", res.tls.to_csv(index=False, float_format="%.10g",
                                                      lineterminator="\n"))
    atomic_write_bytes(rdir / "arrays.npz", _result_arrays(res))


def to_plain(row: dict[str, Any]) -> dict[str, Any]:
    """numpy scalars -> Python scalars (NaN/inf kept as floats)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, np.generic):
            v = v.item()
        elif isinstance(v, np.ndarray):
            v = v.tolist()
        out[k] = v
    return out


def _result_arrays(res: Any) -> bytes:
    comp = res.compartments
    arrays = {
        "lymphocyte_density_per_mm2": np.asarray(res.lymphocyte_density_per_mm2),
        "tls_labels": np.asarray(res.tls_labels),
        "lymphocyte_counts": np.asarray(res.lymphocyte_counts),
        "origin": np.asarray(comp.origin, dtype=np.int64),
        "dist_to_bulk_um": np.asarray(comp.dist_to_bulk_um),
        "dense_origin": np.asarray(comp.dense.origin, dtype=np.int64),
        "dense_shape": np.asarray(comp.dense.shape, dtype=np.int64),
        "dense_r": np.asarray(comp.dense.r), "dense_c": np.asarray(comp.dense.c),
        "dense_has_tile": np.asarray(comp.dense.has_tile),
    }
    for k in COMPARTMENT_NAMES:
        arrays[f"comp_{k}"] = np.asarray(getattr(comp, k))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def read_result_files(rdir: Path) -> BiomarkerResult:
    """The BiomarkerResult :func:`write_result_files` wrote in ``rdir``.

    Raises OSError, ValueError or KeyError for missing, unreadable or incomplete files.
    """
    row = json.loads((rdir / "biomarkers.json").read_text())
    tls = pd.read_parquet(rdir / "tls.parquet")
    with np.load(rdir / "arrays.npz", allow_pickle=False) as z:
        a = {k: z[k] for k in z.files}
    dense = DenseGrid(tuple(int(v) for v in a["dense_origin"]),  # type: ignore[arg-type]
                      tuple(int(v) for v in a["dense_shape"]),  # type: ignore[arg-type]
                      a["dense_r"], a["dense_c"], a["dense_has_tile"])
    comp = Compartments(origin=tuple(int(v) for v in a["origin"]),  # type: ignore[arg-type]
                        dense=dense, dist_to_bulk_um=a["dist_to_bulk_um"],
                        **{k: a[f"comp_{k}"] for k in COMPARTMENT_NAMES})
    return BiomarkerResult(row=row, tls=tls, compartments=comp,
                           lymphocyte_density_per_mm2=a["lymphocyte_density_per_mm2"],
                           tls_labels=a["tls_labels"], lymphocyte_counts=a["lymphocyte_counts"])


__all__ = ["RESULT_FILES", "read_result_files", "to_plain", "write_result_files"]
