"""One slide's result folder, ``results/<slide_id>/`` of a run, and its completion marker.

``write_slide_result`` writes the BiomarkerResult's files
(:mod:`tmequant.biomarkers.result_files`), the QuPath GeoJSON and, with a cell detector, the
cell table, then ``done.json`` last: the inputs hash of the biomarker stage. A folder whose
marker is missing or names other inputs is never read back (``load_slide_result``).
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

from tmequant._faults import checkpoint
from tmequant.atomic import atomic_write_bytes, atomic_write_text, dump_json
from tmequant.biomarkers.result_files import read_result_files, write_result_files
from tmequant.qupath.export import write_slide_geojson

log = logging.getLogger("tmequant")


def write_slide_result(rdir: Path, slide_id: str, store: Any, model_name: str, res: Any,
                       inputs_hash: str, inputs: dict[str, Any],
                       geojson_suffix: str = ".geojson.zip") -> None:
    """Write the slide's row, TLS table, arrays and QuPath GeoJSON, then ``done.json`` last."""
    rdir.mkdir(parents=True, exist_ok=True)
    marker = rdir / "done.json"
    if marker.exists():  # about to rewrite: the old marker must not vouch for new files
        marker.unlink()
    write_result_files(rdir, res)  # biomarkers.json, tls.parquet, tls.csv, arrays.npz
    write_slide_geojson(rdir / f"{slide_id}{geojson_suffix}", store, model_name, res)
    if store.has_cells(model_name):  # a detector's cells: one row per cell (output-schema.md)
        buf = io.BytesIO()
        store.read_cells(model_name).to_parquet(buf, index=False)
        atomic_write_bytes(rdir / "cells.parquet", buf.getvalue())
    checkpoint("slide_result")  # tests: a kill with every file written but the marker
    atomic_write_text(marker, dump_json({"slide_id": slide_id, "inputs_hash": inputs_hash,
                                         "inputs": inputs, "complete": True}))


def load_slide_result(rdir: Path, inputs_hash: str) -> Any | None:
    """The BiomarkerResult saved in ``rdir`` when its marker matches ``inputs_hash``, else None."""
    marker = rdir / "done.json"
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        if done.get("inputs_hash") != inputs_hash or not done.get("complete"):
            return None
        return read_result_files(rdir)
    except (OSError, ValueError, KeyError) as e:
        log.info("%s: saved biomarkers unreadable (%s); recomputing", rdir, type(e).__name__)
        return None


__all__ = ["load_slide_result", "write_slide_result"]
