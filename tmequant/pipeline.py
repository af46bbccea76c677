"""The batch pipeline behind ``tmequant run``: tile -> predict -> count -> biomarkers -> report.

Every slide goes through the same stages; each stage is skipped when its completion marker
and parameter hash say it is done, so a rerun after a kill (or with more slides) redoes only
unfinished work, slide by slide and stage by stage. One failing slide never stops the
others; its stage and one-line reason go to ``failures.csv``. The cohort outputs are
assembled at the end from every finished slide. With a Dask ``distributed`` client the
per-slide stages run on the cluster's workers (the predict stage on workers that declare a
``GPU`` resource, when there are any) and the cohort outputs are written by the client; the
cohort table is byte-identical to a serial run.

Output folder layout (``--out DIR``)::

    DIR/
      cohort.csv, cohort.parquet    one row per finished slide: biomarkers, provenance, parameters
                                    (rows sorted by slide id; store_path relative to DIR)
      tls.csv, tls.parquet          one row per tertiary lymphoid structure of every slide
      report.html                   self-contained HTML report (tables, pictures, failures)
      failures.csv                  slide_id, stage, reason of every failed slide (header only
                                    when none failed); rewritten by every run
      figures/<slide_id>/*.png      thumbnail, tissue classes, lymphocyte density, compartments
      figures/<slide_id>/figures.json   what the pictures show (slide result + cohort colour
                                    scale): unchanged pictures are not redrawn by a rerun
      slides/<slide_id>.html        per-slide pages (only for cohorts over 40 slides)
      stores/<slide_id>.zarr        the slide store: tiles, predictions/<model>, nuclei
                                    (docs/store-layout.md)
      stores/<slide_id>.qc.png      tiling QC: thumbnail, tissue outline, kept tiles
      results/<slide_id>/
        biomarkers.json             the slide's biomarker row (units in key names)
        tls.csv, tls.parquet        the slide's TLS table
        arrays.npz                  per-tile densities and compartment maps (for the report)
        <slide_id>.geojson.zip      QuPath objects (one <slide_id>.geojson inside; QuPath's
                                    File > Import objects reads .zip directly, not .gz): tiles
                                    (class probabilities and counts as measurements), tumour
                                    bulk, invasive margin and TLS annotations
        done.json                   completion marker of the biomarker stage (its inputs hash)
      run.json                      the last run's settings and provenance
      .tmequant.lock(.json)         the output-folder lock and who holds it

Every file is written under a temporary name and renamed into place, so a kill never leaves
a half file that looks finished; zarr groups carry their own completion markers.
"""

from __future__ import annotations

import csv
import filecmp
import io
import json
import logging
import math
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant._faults import checkpoint
from tmequant.batch import Failure, one_line_reason
from tmequant.biomarkers import BiomarkerParams
from tmequant.domain import DEFAULT_MODEL, is_phantom_slide
from tmequant.errors import InputError, TmequantError
from tmequant.inputs import SlideSpec, expand_slides
from tmequant.provenance import file_fingerprint, package_version, params_hash, to_jsonable
from tmequant.tiling.tile import TilingParams

log = logging.getLogger("tmequant")

STAGES = ("cells", "tile", "predict", "count", "biomarkers")
CELL_TABLE_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".csv", ".parquet", ".geoparquet")
LOCK_NAME = ".tmequant.lock"
SMALL_STORE_TILES = 512  # below this, inference reads tiles in the main process
RESULT_FILES = ("biomarkers.json", "tls.csv", "tls.parquet", "arrays.npz", "done.json")
# Deterministic feature ids: the same slide gives the same GeoJSON in every run.
_UUID_NS = uuid.UUID("6f1c1d2e-6c1b-4b8e-9a57-2f0a4a3c7e11")


class OutputLockedError(TmequantError):
    """Another tmequant run holds the output folder."""


# --- configuration and results ----------------------------------------------------------

@dataclass(frozen=True)
class RunConfig:
    """Everything a worker needs to process one slide (picklable, no open handles).

    model: a model name or folder path (loaded once per process). counter: nucleus-counter
    parameters or None when the counter is off. cells_dir: folder of ``<slide_id>.<ext>``
    cell tables or None. workers: reader threads per slide (tiling and counting).
    """

    out_dir: str
    model: str
    tiling: TilingParams = field(default_factory=TilingParams)
    params: BiomarkerParams = field(default_factory=BiomarkerParams)
    counter: Any = None  # tmequant.inference.nuclei.NucleusCounterParams | None
    cells_dir: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    overwrite: bool = False
    geojson_suffix: str = ".geojson.zip"  # ".geojson.zip", ".geojson" or ".geojson.gz"

    @property
    def stores_dir(self) -> Path:
        return Path(self.out_dir) / "stores"

    def result_dir(self, slide_id: str) -> Path:
        return Path(self.out_dir) / "results" / slide_id


@dataclass
class SlideRun:
    """One slide's way through the stages; passed from stage to stage (and worker to client).

    stages: stage -> "done" (computed now) or "skipped" (finished earlier, reused).
    seconds: stage -> wall time; tiles_per_s: stage -> rate of the work done now.
    failure: the first failure, after which the remaining stages are not run.
    result: the slide's BiomarkerResult once the biomarkers stage finished.
    """

    spec: SlideSpec
    store_path: str | None = None
    model_name: str | None = None
    n_tiles: int | None = None
    stages: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    tiles_per_s: dict[str, float] = field(default_factory=dict)
    failure: Failure | None = None
    result: Any = None
    cell_table: str | None = None
    notes: tuple[str, ...] = ()
    workers: dict[str, str] = field(default_factory=dict)  # Dask: stage -> worker address
    why: dict[str, str] = field(default_factory=dict)  # stage -> why it was skipped (shown)
    result_hash: str | None = None  # inputs hash of the biomarker stage (names its outputs)

    @property
    def slide_id(self) -> str:
        return self.spec.slide_id

    @property
    def ok(self) -> bool:
        return self.failure is None and self.result is not None


@dataclass
class RunResult:
    """What :func:`run_batch` wrote: cohort tables, report, per-slide runs and failures."""

    out_dir: Path
    slides: dict[str, SlideRun]
    failures: list[Failure]
    cohort_csv: Path | None = None
    cohort_parquet: Path | None = None
    tls_csv: Path | None = None
    report_html: Path | None = None
    failures_csv: Path | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def outcomes(self) -> list[SlideRun]:
        return [r for r in self.slides.values() if r.ok]


# --- atomic files -----------------------------------------------------------------------

def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync, then rename over it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(p)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: give the partial copy's space back
        raise
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_dumps(obj: Any) -> str:
    """JSON that keeps NaN/inf (Python's json reads them back), for our own files only."""
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True, default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# --- the output-folder lock -------------------------------------------------------------

def _remove_stale_temp_files(out: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files a killed run left behind (never read, only clutter).

    Called with the output lock held, before this run writes anything: no other writer can
    own them. Slide stores are left alone (zarr keeps no such files).
    """
    for sub in ("", "results", "figures", "slides"):
        base = out / sub
        if not base.is_dir():
            continue
        for p in base.rglob(".*.tmp-*"):
            if p.is_file() and ".zarr" not in p.parts[-2:]:
                try:
                    p.unlink()
                    log.debug("removed stale temporary file %s", p)
                except OSError:
                    pass


@contextmanager
def output_lock(out_dir: str | os.PathLike[str], wait: bool = False,
                poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``<out_dir>/.tmequant.lock`` for the duration; one run per output folder.

    Without ``wait`` a held lock raises OutputLockedError naming the folder and the holder
    (pid, host, start time from ``.tmequant.lock.json``); with ``wait`` it blocks until free.
    The lock is an OS file lock (``filelock``): a killed run releases it automatically.
    """
    from tmequant.locks import file_lock

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> OutputLockedError:
        return OutputLockedError(
            f"output folder is in use by another tmequant run ({holder}); wait for it to "
            "finish, pass --wait to queue behind it, or choose another --out", out)

    with file_lock(out / LOCK_NAME, busy, wait=wait, poll_s=poll_s,
                   waiting=f"{out}: waiting for the run holding the folder ({{holder}})"):
        _remove_stale_temp_files(out)
        yield


# --- progress ---------------------------------------------------------------------------

class BatchProgress:
    """One display for the batch: slides done, current slide and stage, last tiles/s.

    On a terminal: one rich progress bar. Otherwise: one log line per finished stage and
    per finished slide (no carriage-return noise in CI logs or files).
    """

    def __init__(self, n_slides: int, enabled: bool | None = None):
        from tmequant.progress import _enabled_default  # the CLI's --quiet switch

        self.n = n_slides
        self.done = 0
        self.enabled = _enabled_default if enabled is None else enabled
        self._rich: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> BatchProgress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._rich = Progress(TextColumn("slides"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeElapsedColumn())
            self._rich.start()
            self._task = self._rich.add_task("", total=self.n)
            # Log lines go through rich's stderr proxy, so they print above the bar.
            self._swapped = []
            for h in log.handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__:
                    self._swapped.append((h, h.setStream(sys.stderr)))
        return self

    def _show(self, msg: str, advance: int = 0) -> None:
        from rich.markup import escape

        self._rich.update(self._task, advance=advance, description=escape(msg))

    def stage(self, slide_id: str, stage: str) -> None:
        """A stage starts."""
        if self._rich is not None:
            self._show(f"{slide_id}: {stage}...")

    def stage_done(self, run: SlideRun, stage: str) -> None:
        what = run.stages.get(stage, "?")
        rate = run.tiles_per_s.get(stage)
        rate_s = f", {rate:.1f} tiles/s" if rate and what == "done" else ""
        tiles = f", {run.n_tiles} tiles" if run.n_tiles is not None else ""
        if what == "skipped" and run.why.get(stage):  # say why, not just "skipped"
            msg = f"{run.slide_id}: {stage}: {run.why[stage]}{tiles} ({run.seconds.get(stage, 0.0):.1f} s)"
        else:
            msg = f"{run.slide_id}: {stage} {what}{tiles}{rate_s} ({run.seconds.get(stage, 0.0):.1f} s)"
        if self._rich is not None:
            self._show(msg)
        elif self.enabled:
            log.info("[%d/%d] %s", self.done, self.n, msg)

    def slide_done(self, run: SlideRun) -> None:
        self.done += 1
        if run.failure is not None:
            msg = f"{run.slide_id}: FAILED [{run.failure.stage}] {run.failure.reason}"
        else:
            msg = f"{run.slide_id}: finished ({sum(run.seconds.values()):.1f} s)"
        if self._rich is not None:
            self._show(msg, advance=1)
        elif self.enabled:
            log.info("[%d/%d] %s", self.done, self.n, msg)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
            for h, old in self._swapped:
                h.setStream(old)


# --- the model, once per process --------------------------------------------------------

_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def _model_key(model: str) -> str:
    """The model string plus the weights file's size and mtime, when it is a folder/file."""
    p = Path(model).expanduser()
    if p.exists():
        w = p / "model.safetensors" if p.is_dir() else p
        try:
            st = w.stat()
            return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            return str(p.resolve())
    return model


def get_model(model: str) -> Any:
    """The LoadedModel for ``model`` (on the CPU; the engine moves it), cached per process."""
    from tmequant.models import load_model

    key = (_model_key(model), "cpu")
    if key not in _MODEL_CACHE:
        _MODEL_CACHE.clear()  # one model at a time: workers are long-lived
        _MODEL_CACHE[key] = load_model(model, device="cpu")
    return _MODEL_CACHE[key]


# --- the stages -------------------------------------------------------------------------

def find_cell_table(cells_dir: str | os.PathLike[str], slide_id: str) -> Path:
    """``<cells_dir>/<slide_id>.<ext>`` (geojson, geojson.gz, json, csv, parquet, geoparquet)."""
    d = Path(cells_dir)
    for suf in CELL_TABLE_SUFFIXES:
        p = d / f"{slide_id}{suf}"
        if p.is_file():
            return p
    raise InputError(f"no cell table for slide {slide_id!r} (expected {slide_id}.geojson, "
                     ".geojson.gz, .csv or .parquet)", d)


def _stage(run: SlideRun, name: str, fn: Any, progress: BatchProgress | None) -> SlideRun:
    """Run one stage unless an earlier one failed; a failure is recorded, never raised."""
    if run.failure is not None:
        return run
    if progress is not None:
        progress.stage(run.slide_id, name)
    t0 = time.perf_counter()
    try:
        fn(run)
    except Exception as exc:  # noqa: BLE001 - per-slide isolation
        reason = one_line_reason(exc)
        log.error("%s failed (%s): %s", run.slide_id, name, reason)
        log.debug("traceback for %s", run.slide_id, exc_info=True)
        run.failure = Failure(run.slide_id, name, reason)
    run.seconds[name] = run.seconds.get(name, 0.0) + time.perf_counter() - t0
    if progress is not None and run.failure is None:
        progress.stage_done(run, name)
    return run


def _do_cells(run: SlideRun, cfg: RunConfig) -> None:
    if cfg.cells_dir is None:
        run.stages["cells"] = "skipped"
        run.why["cells"] = "no cell table given (--cells-dir)"
        return
    run.cell_table = str(find_cell_table(cfg.cells_dir, run.slide_id))
    run.stages["cells"] = "done"


def _do_tile(run: SlideRun, cfg: RunConfig) -> None:
    from tmequant.tiling.tile import tile_slide

    res = tile_slide(run.spec, cfg.stores_dir, cfg.tiling, overwrite=cfg.overwrite,
                     workers=cfg.workers, progress=False)
    run.store_path, run.n_tiles = res.store_path, res.n_tiles
    run.stages["tile"] = "skipped" if res.reused else "done"
    run.why["tile"] = "store already made with these parameters, reused"
    if not res.reused:
        run.tiles_per_s["tile"] = res.tiles_per_s
    if run.spec.mpp_override_um is not None:
        run.notes += (f"slide MPP overridden to {run.spec.mpp_override_um:g} um/px",)


def _do_predict(run: SlideRun, cfg: RunConfig, model: Any = None) -> None:
    from tmequant.inference import predict_store

    loaded = model if model is not None else get_model(cfg.model)
    assert run.store_path is not None
    readers = _reader_processes(run.n_tiles or 0)
    res = predict_store(run.store_path, loaded, device=cfg.device, batch_size=cfg.batch_size,
                        num_workers=readers, overwrite=cfg.overwrite, progress=False)
    run.model_name = res.model_name
    run.stages["predict"] = "skipped" if res.skipped else "done"
    run.why["predict"] = f"predictions of {res.model_name} already complete, reused"
    if res.n_computed:
        run.tiles_per_s["predict"] = res.tiles_per_s


def _reader_processes(n_tiles: int) -> int | None:
    """DataLoader reader processes for inference: None (the engine's default) or 0 (read in
    this process): a reader pays for its start-up only on larger stores, and a daemonic
    process (a Dask worker started with ``distributed.worker.daemon: True``, the default)
    may not have children at all."""
    import multiprocessing

    if n_tiles < SMALL_STORE_TILES:
        return 0
    if multiprocessing.current_process().daemon:
        log.debug("daemonic worker process: tiles are read in the worker itself "
                  "(start workers with DASK_DISTRIBUTED__WORKER__DAEMON=False for reader processes)")
        return 0
    return None


_COUNTER_WARNED: set[str] = set()


def _counter_needed(run: SlideRun, cfg: RunConfig, has_count_head: bool) -> bool:
    """The counter runs only where its counts are used: no cell table and no count head."""
    return (cfg.counter is not None and getattr(cfg.counter, "enabled", True)
            and run.cell_table is None and not has_count_head)


def _do_count(run: SlideRun, cfg: RunConfig, has_count_head: bool) -> None:
    if not _counter_needed(run, cfg, has_count_head):
        run.stages["count"] = "skipped"
        run.why["count"] = ("nucleus counter not needed: counts come from the cell table"
                            if run.cell_table is not None else
                            "nucleus counter not needed: counts come from the model's count head"
                            if has_count_head else "nucleus counter off (--counter off)")
        return
    from tmequant.inference.nuclei import count_store

    assert run.store_path is not None
    # once per output folder and process; phantoms (the demo) are what its settings are for
    if cfg.out_dir not in _COUNTER_WARNED and not is_phantom_slide(run.spec.path):
        _COUNTER_WARNED.add(cfg.out_dir)
        log.warning("lymphocyte counts come from the weight-free nucleus counter, which finds "
                    "about 1 in 6 human-labelled lymphocytes on real H&E (BRCA-M2C: F1 0.26); "
                    "for counts to trust use a cell detector (the default model, %s) or a cell "
                    "table (--cells-dir)", DEFAULT_MODEL)
    res = count_store(run.store_path, cfg.counter, workers=cfg.workers, overwrite=cfg.overwrite,
                      progress=False)
    run.stages["count"] = "done" if res.computed else "skipped"
    run.why["count"] = "nucleus counts already complete, reused"
    if res.computed:
        run.tiles_per_s["count"] = res.tiles_per_s


def _biomarker_inputs(run: SlideRun, cfg: RunConfig, store: Any) -> dict[str, Any]:
    """Everything the biomarker stage's outputs depend on (hashed into its marker)."""
    # counter off: its counts are unused
    nuclei = store.nuclei_params_hash() if cfg.counter is not None else None
    return {
        "store_params_hash": store.params_hash,
        "source_fingerprint": store.attrs.get("source_fingerprint"),
        "predictions": run.model_name,
        "predictions_params_hash": store.prediction_params_hash(run.model_name),
        "nuclei_params_hash": nuclei,
        "cell_table": None if run.cell_table is None else file_fingerprint(run.cell_table),
        "biomarker_params_hash": params_hash(cfg.params),
        "geojson_suffix": cfg.geojson_suffix,
        "package_version": package_version(),
    }


def _do_biomarkers(run: SlideRun, cfg: RunConfig) -> None:
    from tmequant.biomarkers import biomarkers_for_store
    from tmequant.tiling.store import SlideStore

    assert run.store_path is not None and run.model_name is not None
    store = SlideStore(run.store_path)
    rdir = cfg.result_dir(run.slide_id)
    inputs = _biomarker_inputs(run, cfg, store)
    ihash = params_hash(inputs)
    run.result_hash = ihash
    # Anything recomputed upstream in this run (even with the same hashes) is recomputed here.
    upstream_new = any(run.stages.get(k) == "done" for k in ("tile", "predict", "count"))
    if not cfg.overwrite and not upstream_new:
        cached = load_slide_result(rdir, ihash)
        if cached is not None:
            run.result = cached
            run.stages["biomarkers"] = "skipped"
            run.why["biomarkers"] = "inputs unchanged since the last run, results reused"
            return
    res = biomarkers_for_store(store, run.model_name, cells=run.cell_table, params=cfg.params,
                               nucleus_counts=cfg.counter is not None)
    # Paths inside the output folder are relative to it: the folder can move, and a serial
    # and a distributed run into different folders give identical cohort tables.
    res.row["store_path"] = _relative(run.store_path, cfg.out_dir)
    res.row["cell_table_path"] = run.cell_table
    write_slide_result(rdir, run.slide_id, store, run.model_name, res, ihash, inputs,
                       geojson_suffix=cfg.geojson_suffix)
    run.result = res
    run.stages["biomarkers"] = "done"


def _relative(path: str, root: str) -> str:
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(root).resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def run_slide(spec: SlideSpec, cfg: RunConfig, *, model: Any = None,
              progress: BatchProgress | None = None) -> SlideRun:
    """All stages of one slide (cells -> tile -> predict -> count -> biomarkers).

    Never raises for a slide problem: the returned SlideRun carries the failure (stage and
    one-line reason). ``model``: an already loaded model (else loaded and cached by name).
    """
    run = SlideRun(spec)
    for name in ("cells", "tile"):
        run = _stage(run, name, lambda r, n=name: _STAGE_FNS[n](r, cfg), progress)
    return _finish_slide(_stage_predict(run, cfg, model, progress), cfg, model, progress)


def _stage_predict(run: SlideRun, cfg: RunConfig, model: Any = None,
                   progress: BatchProgress | None = None) -> SlideRun:
    return _stage(run, "predict", lambda r: _do_predict(r, cfg, model), progress)


def _finish_slide(run: SlideRun, cfg: RunConfig, model: Any = None,
                  progress: BatchProgress | None = None) -> SlideRun:
    def count(r: SlideRun) -> None:
        head = _has_count_head(r, model, cfg)
        _do_count(r, cfg, head)

    run = _stage(run, "count", count, progress)
    return _stage(run, "biomarkers", lambda r: _do_biomarkers(r, cfg), progress)


def _has_count_head(run: SlideRun, model: Any, cfg: RunConfig) -> bool:
    """Whether the predictions hold cell counts (read from the store: no model needed).
    An untrained model's count head never counts: its random counts would replace the counter."""
    from tmequant.domain import count_head_trusted
    from tmequant.tiling.store import SlideStore

    assert run.store_path is not None and run.model_name is not None
    store = SlideStore(run.store_path)
    card = store.prediction_card(run.model_name)
    return bool(card.get("cell_classes")) and store.has_cell_counts(run.model_name) \
        and count_head_trusted(card)


_STAGE_FNS = {"cells": _do_cells, "tile": _do_tile}


# --- per-slide result files -------------------------------------------------------------

def write_slide_result(rdir: Path, slide_id: str, store: Any, model_name: str, res: Any,
                       inputs_hash: str, inputs: dict[str, Any],
                       geojson_suffix: str = ".geojson.zip") -> None:
    """Write the slide's row, TLS table, arrays and QuPath GeoJSON, then ``done.json`` last."""
    rdir.mkdir(parents=True, exist_ok=True)
    marker = rdir / "done.json"
    if marker.exists():  # about to rewrite: the old marker must not vouch for new files
        marker.unlink()
    atomic_write_text(rdir / "biomarkers.json", _json_dumps(to_plain(res.row)))
    buf = io.BytesIO()
    res.tls.to_parquet(buf, index=False)
    atomic_write_bytes(rdir / "tls.parquet", buf.getvalue())
    atomic_write_text(rdir / "tls.csv", res.tls.to_csv(index=False, float_format="%.10g",
                                                      lineterminator="\n"))
    atomic_write_bytes(rdir / "arrays.npz", _result_arrays(res))
    write_slide_geojson(rdir / f"{slide_id}{geojson_suffix}", store, model_name, res)
    if store.has_cells(model_name):  # a detector's cells: one row per cell (output-schema.md)
        buf = io.BytesIO()
        store.read_cells(model_name).to_parquet(buf, index=False)
        atomic_write_bytes(rdir / "cells.parquet", buf.getvalue())
    checkpoint("slide_result")  # tests: a kill with every file written but the marker
    atomic_write_text(marker, _json_dumps({"slide_id": slide_id, "inputs_hash": inputs_hash,
                                           "inputs": inputs, "complete": True}))


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
    from tmequant.biomarkers import COMPARTMENT_NAMES

    for k in COMPARTMENT_NAMES:
        arrays[f"comp_{k}"] = np.asarray(getattr(comp, k))
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def load_slide_result(rdir: Path, inputs_hash: str) -> Any | None:
    """The BiomarkerResult saved in ``rdir`` when its marker matches ``inputs_hash``, else None."""
    from tmequant.biomarkers import COMPARTMENT_NAMES, BiomarkerResult, Compartments, DenseGrid

    marker = rdir / "done.json"
    if not marker.is_file():
        return None
    try:
        done = json.loads(marker.read_text())
        if done.get("inputs_hash") != inputs_hash or not done.get("complete"):
            return None
        row = json.loads((rdir / "biomarkers.json").read_text())
        tls = pd.read_parquet(rdir / "tls.parquet")
        with np.load(rdir / "arrays.npz", allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        log.info("%s: saved biomarkers unreadable (%s); recomputing", rdir, type(e).__name__)
        return None
    dense = DenseGrid(tuple(int(v) for v in a["dense_origin"]),  # type: ignore[arg-type]
                      tuple(int(v) for v in a["dense_shape"]),  # type: ignore[arg-type]
                      a["dense_r"], a["dense_c"], a["dense_has_tile"])
    comp = Compartments(origin=tuple(int(v) for v in a["origin"]),  # type: ignore[arg-type]
                        dense=dense, dist_to_bulk_um=a["dist_to_bulk_um"],
                        **{k: a[f"comp_{k}"] for k in COMPARTMENT_NAMES})
    return BiomarkerResult(row=row, tls=tls, compartments=comp,
                           lymphocyte_density_per_mm2=a["lymphocyte_density_per_mm2"],
                           tls_labels=a["tls_labels"], lymphocyte_counts=a["lymphocyte_counts"])


# --- QuPath GeoJSON ---------------------------------------------------------------------

def _hex_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def slide_features(store: Any, model_name: str, res: Any, slide_id: str | None = None) -> list[dict[str, Any]]:
    """QuPath features of one slide: a ``tile`` per tile and the compartment/TLS annotations.

    Tiles: classified by their most probable tissue class (colour of the class's role, as
    in the report), measurements ``P(<class>)`` for every class, ``Lymphocyte count`` and
    ``Lymphocyte density per mm^2`` (the counts the biomarkers used), the model's cell
    counts (``<class> count``) and the nucleus counter's (``Nuclei <column> count``) when
    present, and ``Tissue fraction``. Annotations: ``Tumor bulk``, ``Invasive margin``,
    ``Tumor core``, ``Tumor epithelium``, ``Tumor stroma`` (one per connected part, area in
    um^2) and each TLS. Coordinates: level-0 px, origin top-left.
    Measurements that are not finite are left out (QuPath reads every value as a number).
    """
    from shapely import union_all

    from tmequant.qupath import annotation_feature, grid_mask_to_polygons
    from tmequant.report.figures import COMPARTMENT_STYLES, TLS_COLOR, class_colors

    sid = slide_id or store.slide_id
    card = store.prediction_card(model_name)
    classes = list(card.get("tissue_classes") or [])
    roles = dict(card.get("tissue_roles") or {})
    probs = store.tissue_probs(model_name)
    colors = [list(_hex_rgb(c)) for c in class_colors(classes, roles)]
    # measurement name -> (N,) values, in the order QuPath lists them
    meas: dict[str, np.ndarray] = {f"P({c})": probs[:, k] for k, c in enumerate(classes)}
    meas["Lymphocyte count"] = np.asarray(res.lymphocyte_counts, float)
    meas["Lymphocyte density per mm^2"] = np.asarray(res.lymphocyte_density_per_mm2, float)
    cc = store.cell_counts(model_name) if card.get("cell_classes") else None
    if cc is not None:
        for k, name in enumerate(card["cell_classes"]):
            meas[f"Model {name} count"] = cc[:, k]
    nuc = store.nuclei_counts()
    if nuc is not None:
        for k, name in enumerate(("lymphocyte", "other")[: nuc.shape[1]]):
            meas[f"Nuclei {name} count"] = nuc[:, k]
    meas["Tissue fraction"] = store.tissue_fraction
    coords = store.coords
    size = float(store.tile_level0_px)
    feats = _tile_features(sid, coords, size, classes, colors, probs, meas)

    comp = res.compartments
    mpp = float(store.slide_mpp_um)
    um2 = mpp * mpp
    ann: list[dict[str, Any]] = []
    for key, label in QUPATH_COMPARTMENTS:
        color = _hex_rgb(COMPARTMENT_STYLES[key][0]) if key in COMPARTMENT_STYLES else _EXTRA_RGB[key]
        for j, g in enumerate(grid_mask_to_polygons(getattr(comp, key), comp.origin, size)):
            f = annotation_feature(g, label, color, {"Area um^2": g.area * um2})
            f["id"] = str(uuid.uuid5(_UUID_NS, f"{sid}/{key}/{j}"))
            ann.append(f)
    labels_r = comp.dense.paint(np.asarray(res.tls_labels), 0)
    for rec in res.tls.to_dict("records"):
        polys = grid_mask_to_polygons(labels_r == rec["tls_id"], comp.origin, size)
        if not polys:
            continue
        m = {"Area um^2": rec.get("area_um2"), "Lymphocytes": rec.get("n_lymphocytes"),
             "Mean lymphocyte density per mm^2": rec.get("mean_density_per_mm2"),
             "Distance to tumor bulk um": rec.get("distance_to_bulk_um"),
             "Intratumoral": float(rec.get("location") == "intratumoral")}
        m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
        f = annotation_feature(union_all(polys), f"TLS {rec['tls_id']}", _hex_rgb(TLS_COLOR), m,
                               classification="TLS")
        f["id"] = str(uuid.uuid5(_UUID_NS, f"{sid}/tls/{rec['tls_id']}"))
        ann.append(f)
    return ann + feats


# Annotation name per compartment, as a QuPath user reads them (outer regions first).
QUPATH_COMPARTMENTS = (("bulk", "Tumor bulk"), ("margin", "Invasive margin"), ("core", "Tumor core"),
                       ("epithelium", "Tumor epithelium"), ("tumor_stroma", "Tumor stroma"))
_EXTRA_RGB = {"epithelium": (150, 0, 100), "tumor_stroma": (60, 160, 60)}


def _tile_features(sid: str, coords: np.ndarray, size: float, classes: list[str],
                   colors: list[list[int]], probs: np.ndarray,
                   meas: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """QuPath ``tile`` features, built from arrays directly (a 70,000-tile slide in about a
    second; one shapely polygon per tile takes several). The square's ring runs like
    ``shapely.box``'s: (x1, y0), (x1, y1), (x0, y1), (x0, y0), (x1, y0)."""
    n = len(coords)
    if n == 0:
        return []
    x0 = coords[:, 0].astype(float).tolist()
    y0 = coords[:, 1].astype(float).tolist()
    x1 = (coords[:, 0] + size).astype(float).tolist()
    y1 = (coords[:, 1] + size).astype(float).tolist()
    top: list[Any] = probs.argmax(axis=1).tolist() if classes and probs.size else [None] * n
    cols = [(k, np.asarray(v, dtype=np.float64).tolist()) for k, v in meas.items()]
    isfinite = math.isfinite
    out = []
    for i in range(n):
        props: dict[str, Any] = {"objectType": "tile"}
        if top[i] is not None:
            props["classification"] = {"name": classes[top[i]], "color": colors[top[i]]}
        props["measurements"] = {k: v[i] for k, v in cols if isfinite(v[i])}
        ring = [[x1[i], y0[i]], [x1[i], y1[i]], [x0[i], y1[i]], [x0[i], y0[i]], [x1[i], y0[i]]]
        out.append({"type": "Feature", "id": str(uuid.uuid5(_UUID_NS, f"{sid}/tile/{i}")),
                    "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props})
    return out


def write_slide_geojson(path: str | os.PathLike[str], store: Any, model_name: str, res: Any) -> Path:
    """Write :func:`slide_features` as a QuPath GeoJSON FeatureCollection (atomically).

    The name's ending picks the container: ``.zip`` holds one ``<stem>.geojson`` entry (what
    QuPath's own compressed export writes and its importer reads), ``.gz`` is gzip (smaller
    to move around, but QuPath does not read it: gunzip first), anything else plain JSON.
    Compressed output is deterministic (fixed time stamps), so reruns give identical bytes.
    """
    import gzip as _gz
    import zipfile

    p = Path(path)
    feats = slide_features(store, model_name, res)
    data = json.dumps({"type": "FeatureCollection", "features": feats}, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
    name = p.name.lower()
    if name.endswith(".zip"):
        inner = p.name[: -len(".zip")]
        inner = inner if inner.lower().endswith((".geojson", ".json")) else inner + ".geojson"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            info = zipfile.ZipInfo(inner, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
        data = buf.getvalue()
    elif name.endswith(".gz"):
        data = _gz.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(p, data)


# --- the batch --------------------------------------------------------------------------

def _counter_params(counter: Any) -> Any:
    """True -> default NucleusCounterParams; False/None/"off" -> None; params pass through."""
    if counter is None or counter is False or counter == "off":
        return None
    from tmequant.inference.nuclei import NucleusCounterParams

    if counter is True or counter == "on":
        return NucleusCounterParams()
    if isinstance(counter, NucleusCounterParams):
        return counter.validate() if counter.enabled else None
    raise InputError(f"counter must be on/off or NucleusCounterParams, got {counter!r}")


def _failures_csv(out: Path, failures: Sequence[Failure]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "stage", "reason"])
    for f in sorted(failures, key=lambda f: f.item_id):
        w.writerow([f.item_id, f.stage, f.reason])
    try:
        return atomic_write_text(out / "failures.csv", buf.getvalue())
    except OSError:
        # A full disk: the atomic write needs room for a second copy. Rewriting the existing
        # file in place reuses its blocks, so the failure is still recorded.
        path = out / "failures.csv"
        if not path.is_file():
            raise
        with open(path, "r+", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.truncate()
        return path


def run_batch(
    slides: Iterable[SlideSpec | str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    tiling: TilingParams | None = None,
    params: BiomarkerParams | None = None,
    counter: Any = True,
    cells_dir: str | os.PathLike[str] | None = None,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    scheduler: Any = None,
    local_workers: int | None = None,
    overwrite: bool = False,
    wait: bool = False,
    progress: bool | None = True,
    title: str | None = None,
    qc: Any = None,
) -> RunResult:
    """Run the whole pipeline on a batch of slides into ``out_dir`` (layout: module docstring).

    slides: SlideSpecs, or paths/folders/globs/manifests for :func:`tmequant.inputs.expand_slides`.
    model: a model name or folder. tiling: None -> the model card's MPP and tile size.
    counter: True/"on" (default parameters), False/"off", or NucleusCounterParams; the counter
    runs only for slides without a cell table whose model has no count head.
    scheduler: a dask.distributed Client or a scheduler address; local_workers: start a
    LocalCluster of that many worker processes. Neither: everything runs in this process.
    Holds the output-folder lock for the duration (``wait``: queue behind another run).
    qc: :class:`tmequant.report.qc.QCParams` of the cohort table's ``qc_flags`` (None: defaults).
    Never raises for a slide problem; see ``RunResult.failures``.
    """
    t0 = time.perf_counter()
    items = list(slides)
    specs = [s for s in items if isinstance(s, SlideSpec)]
    others = [s for s in items if not isinstance(s, SlideSpec)]
    if others:
        specs += expand_slides(others)
    if len({s.slide_id.lower() for s in specs}) != len(specs):
        raise InputError("duplicate slide ids in the batch; give unique ids in a CSV manifest")
    if not specs:
        raise InputError("no slides given")
    # Absolute paths: workers on other machines (or other working folders) find the same files.
    specs = [replace(s, path=Path(s.path).absolute()) if "://" not in str(s.path) else s for s in specs]
    if Path(str(model)).expanduser().exists():
        model = str(Path(str(model)).expanduser().absolute())
    out = Path(out_dir)
    loaded = get_model(str(model))
    card = loaded.card
    if card.domain_warning and not all(is_phantom_slide(s.path) for s in specs):
        log.warning("WARNING: %s", card.domain_warning)  # one line; the report gets a banner
    if tiling is None:
        tiling = TilingParams(target_mpp_um=card.mpp_um, tile_px=card.tile_px)
    _check_model_tiling(card, tiling, str(model))
    if cells_dir is not None and not Path(cells_dir).is_dir():
        raise InputError("--cells-dir is not a folder", cells_dir)
    cfg = RunConfig(out_dir=str(out.resolve()), model=str(model), tiling=tiling,
                    params=params or BiomarkerParams(), counter=_counter_params(counter),
                    cells_dir=None if cells_dir is None else str(Path(cells_dir).resolve()),
                    device=device, batch_size=batch_size, workers=workers, overwrite=overwrite)

    with output_lock(out, wait=wait):
        _check_output_folder(out, specs, cfg)
        atomic_write_text(out / "run.json", _json_dumps({
            "package_version": package_version(), "model": cfg.model, "model_name": card.name,
            "model_version": card.version, "tiling": to_jsonable(tiling),
            "tiling_params_hash": params_hash(tiling), "biomarkers": to_jsonable(cfg.params),
            "biomarker_params_hash": params_hash(cfg.params),
            "nucleus_counter": None if cfg.counter is None else cfg.counter.to_dict(),
            "cells_dir": cfg.cells_dir, "device": device,
            "scheduler": None if scheduler is None else str(getattr(scheduler, "scheduler", scheduler)),
            "local_workers": local_workers, "slides": [s.slide_id for s in specs],
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))
        with BatchProgress(len(specs), enabled=progress) as bar:
            if scheduler is not None or local_workers:
                with dask_client(scheduler, local_workers) as client:
                    runs = _run_distributed(specs, cfg, client, bar)
                    figures = _prepare_figures(out, runs, card.name, client)
            else:
                runs = {}
                for spec in specs:
                    runs[spec.slide_id] = run = run_slide(spec, cfg, model=loaded, progress=bar)
                    bar.slide_done(run)
                figures = _prepare_figures(out, runs, card.name, None)
        result = _write_cohort(out, specs, runs, card.name, title, figures, qc)
    result.seconds = time.perf_counter() - t0
    return result


def _check_output_folder(out: Path, specs: Sequence[SlideSpec], cfg: RunConfig) -> None:
    """Refuse, before any work, a run that would silently lose or mix slides of ``out``.

    1. Slides with results in ``out`` that this run does not name: the cohort tables and
       report are rewritten from this run's slides, so they would drop them.
    2. A slide id whose store in ``out`` was made from another slide file (another path and
       other contents): its results would be replaced by a different slide's.
    """
    ids = {s.slide_id.lower() for s in specs}
    rdir = out / "results"
    earlier = sorted(d.name for d in rdir.iterdir()
                     if (d / "done.json").is_file() and d.name.lower() not in ids) if rdir.is_dir() else []
    if earlier:
        shown = ", ".join(earlier[:5]) + (f" and {len(earlier) - 5} more" if len(earlier) > 5 else "")
        raise InputError(
            f"the folder holds results of {len(earlier)} slide(s) this run does not name ({shown}); "
            "the cohort tables and report would leave them out: name them too (finished results "
            "are reused), delete their results/<slide_id> folders, or choose another --out", out)
    for s in specs:
        meta = cfg.stores_dir / f"{s.slide_id}.zarr" / "zarr.json"
        try:
            src = json.loads(meta.read_text()).get("attributes", {}).get("source_path")
        except (OSError, ValueError, AttributeError):
            continue  # no store yet (or unreadable: the tile stage says so)
        if not src or "://" in str(s.path) or os.path.realpath(src) == os.path.realpath(s.path):
            continue
        if not Path(src).is_file() or not Path(s.path).is_file():
            continue  # moved: the tile stage compares the file with the store's fingerprint
        try:  # a copy is the same slide; only a rare same-size pair is read through
            same = os.path.samefile(src, s.path) or (
                os.path.getsize(src) == os.path.getsize(s.path)
                and filecmp.cmp(src, s.path, shallow=False))
        except OSError:
            continue
        if not same:
            raise InputError(
                f"slide id {s.slide_id!r} in this folder belongs to {src}, not to {s.path}; "
                "give the slides unique ids (a CSV manifest slide_id,path) or choose another --out",
                out)


def _check_model_tiling(card: Any, tiling: TilingParams, model: str) -> None:
    """Refuse tiles the model was not made for, before any slide is tiled."""
    problems = []
    if card.tile_px != tiling.tile_px:
        problems.append(f"tile_px {tiling.tile_px} (model wants {card.tile_px})")
    if abs(card.mpp_um - tiling.target_mpp_um) > 0.01 * card.mpp_um:
        problems.append(f"{tiling.target_mpp_um:g} um/px (model wants {card.mpp_um:g})")
    if problems:
        raise InputError(f"model {model!r} does not fit {' and '.join(problems)}; leave --mpp "
                         f"and --tile-px out to use the model's (--mpp {card.mpp_um:g} "
                         f"--tile-px {card.tile_px})")


def _write_cohort(out: Path, specs: Sequence[SlideSpec], runs: dict[str, SlideRun],
                  model_name: str, title: str | None, figures: FigurePlan | None = None,
                  qc: Any = None) -> RunResult:
    from tmequant.report import SlideOutcome, write_cohort_report
    from tmequant.tiling.store import SlideStore

    failures = [r.failure for r in (runs[s.slide_id] for s in specs) if r.failure is not None]
    outcomes = []
    for s in specs:
        r = runs[s.slide_id]
        if r.ok and r.store_path is not None:
            outcomes.append(SlideOutcome(SlideStore(r.store_path), r.model_name or model_name,
                                         r.result, r.notes))
    failures_csv = _failures_csv(out, failures)
    res = RunResult(out, runs, failures, failures_csv=failures_csv)
    try:
        co = write_cohort_report(out, outcomes, failures,
                                 title=title or f"tmequant cohort report ({model_name})",
                                 figures=None if figures is None else figures.ready, qc=qc)
    except Exception as exc:  # noqa: BLE001 - per-slide outputs are written; say what failed
        reason = one_line_reason(exc)
        log.error("cohort report failed: %s", reason)
        log.debug("traceback", exc_info=True)
        res.failures.append(Failure("(cohort)", "report", reason))
        _failures_csv(out, res.failures)
        return res
    res.cohort_csv, res.cohort_parquet = co.cohort_csv, co.cohort_parquet
    res.tls_csv, res.report_html = co.tls_csv, co.report_html
    if figures is not None:  # pictures drawn just now: remember what they show
        for sid, key in figures.stale.items():
            figs = co.figures.get(sid, {})
            if set(figs) == set(_figure_stems()):
                _write_figure_marker(figs, key)
    return res


# --- pictures: drawn once per result and colour scale -----------------------------------

@dataclass
class FigurePlan:
    """ready: slide id -> {stem: PNG path} to reuse; stale: slide id -> key of pictures to draw."""

    ready: dict[str, dict[str, Path]] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)


def _figure_stems() -> list[str]:
    from tmequant.report.slide import FIGURES

    return list(FIGURES)


def _figure_dir(out: Path, slide_id: str) -> Path:
    from tmequant.report.cohort import safe_name

    return out / "figures" / safe_name(slide_id)


def _write_figure_marker(figs: dict[str, Any], key: str) -> None:
    d = Path(next(iter(figs.values()))).parent
    atomic_write_text(d / "figures.json", json.dumps({"key": key, "figures": sorted(figs)}))


def _prepare_figures(out: Path, runs: dict[str, SlideRun], model_name: str,
                     client: Any = None) -> FigurePlan:
    """Reuse pictures whose slide result and cohort colour scale are unchanged; with a Dask
    client, draw the others on the workers. A picture depends on the slide's biomarker inputs
    (``result_hash``) and on the cohort's density scale (:func:`cohort_density_vmax`)."""
    from tmequant.report.cohort import cohort_density_vmax

    ok = sorted((r for r in runs.values() if r.ok), key=lambda r: r.slide_id)
    vmax = cohort_density_vmax(r.result.lymphocyte_density_per_mm2 for r in ok)
    plan = FigurePlan()
    stems = _figure_stems()
    for r in ok:
        key = params_hash({"result": r.result_hash, "vmax_per_mm2": vmax, "stems": stems,
                           "model_name": r.model_name or model_name, "version": package_version()})
        d = _figure_dir(out, r.slide_id)
        paths = {k: d / f"{k}.png" for k in stems}
        try:
            same = json.loads((d / "figures.json").read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if r.result_hash is not None and same and all(p.is_file() for p in paths.values()):
            plan.ready[r.slide_id] = paths
        else:
            plan.stale[r.slide_id] = key
    if client is not None and plan.stale:
        futures = {client.submit(_task_figures, runs[sid].store_path, runs[sid].model_name or model_name,
                                 runs[sid].result, str(_figure_dir(out, sid)), vmax, key, pure=False): sid
                   for sid, key in plan.stale.items()}
        for fut, sid in futures.items():
            try:
                plan.ready[sid] = {k: Path(v) for k, v in fut.result().items()}
            except Exception as exc:  # noqa: BLE001 - drawn again on the client, or left out
                log.warning("%s: pictures not drawn on the worker (%s); drawing them here",
                            sid, one_line_reason(exc))
        plan.stale = {sid: k for sid, k in plan.stale.items() if sid not in plan.ready}
    return plan


def _task_figures(store_path: str, model_name: str, result: Any, fig_dir: str, vmax: float,
                  key: str) -> dict[str, str]:
    """Worker task: one slide's pictures on the cohort's colour scale, then their marker."""
    from tmequant.report.slide import slide_figures
    from tmequant.tiling.store import SlideStore

    figs = slide_figures(SlideStore(store_path), model_name, result, fig_dir, vmax_per_mm2=vmax)
    _write_figure_marker(figs, key)
    return {k: str(v) for k, v in figs.items()}


# --- Dask ---------------------------------------------------------------------------------

def _here(run: SlideRun, *stages: str) -> SlideRun:
    """Record which Dask worker ran ``stages`` (provenance, and to check GPU routing)."""
    try:
        from distributed import get_worker

        addr = get_worker().address
    except (ImportError, ValueError):  # not on a worker
        return run
    for s in stages:
        run.workers[s] = addr
    return run


def _task_head(spec: SlideSpec, cfg: RunConfig) -> SlideRun:
    """Worker task: cells check and tiling."""
    run = SlideRun(spec)
    for name in ("cells", "tile"):
        run = _stage(run, name, lambda r, n=name: _STAGE_FNS[n](r, cfg), None)
    return _here(run, "cells", "tile")


def _task_predict(run: SlideRun, cfg: RunConfig) -> SlideRun:
    """Worker task: inference (on a GPU worker when the cluster has any)."""
    return _here(_stage_predict(run, cfg, None, None), "predict")


def _task_tail(run: SlideRun, cfg: RunConfig) -> SlideRun:
    """Worker task: nucleus counting and biomarkers (per-slide outputs)."""
    return _here(_finish_slide(run, cfg, None, None), "count", "biomarkers")


def _cluster_has_gpu(client: Any) -> bool:
    try:
        info = client.scheduler_info(n_workers=-1)  # every worker, not the first few
    except TypeError:  # older distributed
        info = client.scheduler_info()
    workers = info.get("workers", {})
    return any(float((w.get("resources") or {}).get("GPU", 0)) > 0 for w in workers.values())


@contextmanager
def dask_client(scheduler: Any = None, local_workers: int | None = None) -> Iterator[Any]:
    """A ``distributed.Client``: the one given, one connected to a scheduler address, or one
    on a new LocalCluster of ``local_workers`` processes (closed on exit, unlike a given one)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # pragma: no cover
        raise InputError("--scheduler/--local-workers need dask[distributed]: "
                         "pip install 'dask[distributed]'") from None

    cluster = None
    own_client = not isinstance(scheduler, Client)
    if isinstance(scheduler, Client):
        client = scheduler
    elif scheduler is not None:
        try:
            client = Client(str(scheduler), timeout="30s")
        except (OSError, TimeoutError) as e:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {e}") from None
    else:
        import dask

        # Non-daemonic workers may start DataLoader reader processes for inference.
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(n_workers=int(local_workers or 1), threads_per_worker=1,
                                   processes=True, dashboard_address=None)
        client = Client(cluster)
    try:
        yield client
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            # Workers that take a moment to exit (torch) are killed; that is expected here.
            nanny_log = logging.getLogger("distributed.nanny")
            level = nanny_log.level
            nanny_log.setLevel(logging.ERROR)
            try:
                cluster.close()
            finally:
                nanny_log.setLevel(level)


def _run_distributed(specs: Sequence[SlideSpec], cfg: RunConfig, client: Any,
                     bar: BatchProgress) -> dict[str, SlideRun]:
    """Per-slide stages as three chained tasks per slide on a Dask cluster."""
    from distributed import as_completed

    gpu = _cluster_has_gpu(client)
    if gpu:
        log.info("Dask: predict tasks go to workers with a GPU resource")
    futures = {}
    for spec in specs:
        head = client.submit(_task_head, spec, cfg, pure=False)
        pred = client.submit(_task_predict, head, cfg, pure=False,
                             resources={"GPU": 1} if gpu else None)
        tail = client.submit(_task_tail, pred, cfg, pure=False)
        futures[tail] = spec
    runs: dict[str, SlideRun] = {}
    for fut in as_completed(list(futures)):
        spec = futures[fut]
        try:
            run = fut.result()
        except Exception as exc:  # noqa: BLE001 - a lost worker fails its slide only
            run = SlideRun(spec, failure=Failure(spec.slide_id, "worker", one_line_reason(exc)))
        for stage in ("tile", "predict", "count", "biomarkers"):
            if stage in run.stages:
                bar.stage_done(run, stage)
        bar.slide_done(run)
        runs[spec.slide_id] = run
    return runs


__all__ = [
    "BatchProgress",
    "FigurePlan",
    "OutputLockedError",
    "RunConfig",
    "RunResult",
    "SlideRun",
    "atomic_write_bytes",
    "atomic_write_text",
    "dask_client",
    "find_cell_table",
    "load_slide_result",
    "output_lock",
    "run_batch",
    "run_slide",
    "slide_features",
    "write_slide_geojson",
    "write_slide_result",
]
