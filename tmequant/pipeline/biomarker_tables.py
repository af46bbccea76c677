"""``write_biomarker_tables``: the biomarkers of finished slide stores as tables, the library
side of ``tmequant biomarkers``."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from tmequant.atomic import atomic_write_bytes, atomic_write_text
from tmequant.batch import BatchResult, run_per_slide, write_failures_csv
from tmequant.biomarkers import TLS_COLUMNS, BiomarkerParams, biomarkers_for_store
from tmequant.errors import InputError
from tmequant.inputs import expand_stores, store_id, validate_slide_id
from tmequant.pipeline.stages import find_cell_table
from tmequant.provenance import params_hash, to_jsonable
from tmequant.qupath.export import write_slide_geojson
from tmequant.tiling.store import SlideStore

log = logging.getLogger("tmequant")


def _cells_for_slide(cells: Path | None, slide_id: str, n_stores: int) -> Path | None:
    """The cell table of one slide: ``cells`` itself (one store) or ``<cells>/<slide_id>.<ext>``."""
    if cells is None:
        return None
    if cells.is_dir():
        return find_cell_table(cells, slide_id)
    if n_stores > 1:
        raise InputError("--cells names one file but several stores were given; pass a folder of "
                         "<slide_id>.geojson/.csv/.parquet files", cells)
    return cells


def write_biomarker_tables(
    stores: Iterable[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    model: str,
    *,
    cells: str | os.PathLike[str] | None = None,
    params: BiomarkerParams | None = None,
    geojson: bool = True,
) -> BatchResult[Any]:
    """Compute the biomarkers of each finished store and write them as tables into ``out_dir``.

    stores: slide stores (``*.zarr``), folders of stores or globs (:func:`tmequant.expand_stores`).
    model: the name of the predictions to use (``predictions/<model>`` in each store).
    cells: a cell table for one store, or a folder of ``<slide_id>.<ext>`` tables.
    Writes ``biomarkers.csv`` and ``biomarkers.parquet`` (one row per slide, units in column
    names, parameters and ``params_hash``), ``tls.csv``, ``biomarker_params.json`` (when any
    slide finished), ``<slide_id>.geojson.zip`` per slide for QuPath (``geojson``) and
    ``failures.csv`` (when any failed): the files of ``tmequant biomarkers``. One failing store
    never stops the others; returns the BatchResult (store key -> BiomarkerResult, failures).
    """
    bp = params if params is not None else BiomarkerParams()
    paths = expand_stores(stores)
    if not paths:
        raise InputError("no slide stores given")
    cells_p = None if cells is None else Path(cells)
    if cells_p is not None and not cells_p.exists():
        raise InputError("no such cell table or folder", cells_p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claimed: dict[str, str] = {}  # slide id (lower case) -> the store that has it

    def one(path: str) -> Any:
        store = SlideStore(path)
        # The id names output files: a store from elsewhere must not write outside --out.
        sid = validate_slide_id(store.slide_id, store.path)
        # ... and one row and one GeoJSON per id: a second store with the same id would
        # overwrite the first's GeoJSON and drop a row (ids differing only in case collide
        # on case-insensitive disks)
        other = claimed.setdefault(sid.lower(), store.path)
        if other != store.path:
            raise InputError(f"slide id {sid!r} is also the id of {other}; outputs are named by "
                             "slide id, so run the two stores into different --out folders", store.path)
        cpath = _cells_for_slide(cells_p, sid, len(paths))
        res = biomarkers_for_store(store, model, cells=cpath, params=bp)
        if geojson:
            write_slide_geojson(out / f"{sid}.geojson.zip", store, model, res)
        log.info("%s: %s, sTIL %.1f%%, %d TLS (counts: %s)", sid, res.row["immune_phenotype"],
                 res.row["stil_score_pct"], res.row["tls_count"], res.row["count_source"])
        return res

    # batch keys: the store's name, or its whole path where two names are the same
    names = [store_id(q) for q in paths]
    key = {q: (n if names.count(n) == 1 else q) for q, n in zip(paths, names)}
    batch = run_per_slide(paths, one, key.__getitem__, "biomarkers")
    results = [batch.results[k] for k in batch.results]
    if results:
        _write_tables(out, results, bp)
    if batch.failures:
        write_failures_csv(out, batch.failures)
    return batch


def _write_tables(out: Path, results: list[Any], bp: BiomarkerParams) -> None:
    """biomarkers.csv/.parquet, tls.csv and biomarker_params.json of the finished slides."""
    rows = pd.DataFrame([r.row for r in results])
    atomic_write_text(out / "biomarkers.csv", rows.to_csv(index=False))
    buf = io.BytesIO()
    rows.to_parquet(buf, index=False)
    atomic_write_bytes(out / "biomarkers.parquet", buf.getvalue())
    tls = [r.tls for r in results if len(r.tls)]
    tls_df = pd.concat(tls, ignore_index=True) if tls else pd.DataFrame(columns=["slide_id", *TLS_COLUMNS])
    atomic_write_text(out / "tls.csv", tls_df.to_csv(index=False))
    atomic_write_text(out / "biomarker_params.json", json.dumps(
        {"params": to_jsonable(bp), "params_hash": params_hash(bp)}, indent=2))


__all__ = ["write_biomarker_tables"]
