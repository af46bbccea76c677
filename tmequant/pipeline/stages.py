"""The stages of one slide: cells -> tile -> predict -> count -> biomarkers (``run_slide``).

Each stage is skipped when its completion marker and parameter hash say it is done, so a
rerun redoes only unfinished work; a failing stage is recorded in the SlideRun (stage and
one-line reason), never raised, and the slide's later stages are not run. The model is
loaded once per process (``get_model``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any

from tmequant.batch import Failure, one_line_reason
from tmequant.biomarkers import biomarkers_for_store
from tmequant.domain import DEFAULT_MODEL, count_head_trusted, is_phantom_slide
from tmequant.errors import InputError
from tmequant.inputs import SlideSpec
from tmequant.memory import release_memory
from tmequant.pipeline.config import RunConfig, SlideRun
from tmequant.pipeline.results import load_slide_result, write_slide_result
from tmequant.progress import BatchProgress
from tmequant.provenance import file_fingerprint, package_version, params_hash
from tmequant.tiling.store import SlideStore
from tmequant.tiling.tile import tile_slide

log = logging.getLogger("tmequant")

CELL_TABLE_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".csv", ".parquet", ".geoparquet")
SMALL_STORE_TILES = 512  # below this, inference reads tiles in the main process


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
    # torch comes with the models: loaded only when a model is
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


def run_stage(run: SlideRun, name: str, fn: Any, progress: BatchProgress | None) -> SlideRun:
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
    release_memory()  # one stage's peak is not carried into the next
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
    # torch comes with inference: loaded only when a slide is predicted
    from tmequant.inference import predict_store

    loaded = model if model is not None else get_model(cfg.model)
    assert run.store_path is not None
    readers = _reader_processes(run.n_tiles or 0)
    res = predict_store(run.store_path, loaded, device=cfg.device, batch_size=cfg.batch_size,
                        num_workers=readers, overwrite=cfg.overwrite, progress=False,
                        runtime=cfg.runtime)
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
    # skimage comes with the counter: loaded only when a slide is counted
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
    run = start_slide(spec, cfg, progress)
    return finish_slide(predict_slide(run, cfg, model, progress), cfg, model, progress)


def start_slide(spec: SlideSpec, cfg: RunConfig,
                progress: BatchProgress | None = None) -> SlideRun:
    """A slide's first stages: its cell table (if any) and tiling."""
    run = SlideRun(spec)
    run = run_stage(run, "cells", lambda r: _do_cells(r, cfg), progress)
    return run_stage(run, "tile", lambda r: _do_tile(r, cfg), progress)


def predict_slide(run: SlideRun, cfg: RunConfig, model: Any = None,
                  progress: BatchProgress | None = None) -> SlideRun:
    """The predict stage (``model``: a loaded model, else loaded by name)."""
    return run_stage(run, "predict", lambda r: _do_predict(r, cfg, model), progress)


def finish_slide(run: SlideRun, cfg: RunConfig, model: Any = None,
                 progress: BatchProgress | None = None) -> SlideRun:
    """A slide's last stages: nucleus counting (where its counts are used) and biomarkers."""
    def count(r: SlideRun) -> None:
        head = _has_count_head(r, model, cfg)
        _do_count(r, cfg, head)

    run = run_stage(run, "count", count, progress)
    return run_stage(run, "biomarkers", lambda r: _do_biomarkers(r, cfg), progress)


def _has_count_head(run: SlideRun, model: Any, cfg: RunConfig) -> bool:
    """Whether the predictions hold cell counts (read from the store: no model needed).
    An untrained model's count head never counts: its random counts would replace the counter."""
    assert run.store_path is not None and run.model_name is not None
    store = SlideStore(run.store_path)
    card = store.prediction_card(run.model_name)
    return bool(card.get("cell_classes")) and store.has_cell_counts(run.model_name) \
        and count_head_trusted(card)


__all__ = [
    "CELL_TABLE_SUFFIXES",
    "find_cell_table",
    "finish_slide",
    "get_model",
    "predict_slide",
    "run_slide",
    "run_stage",
    "start_slide",
]
