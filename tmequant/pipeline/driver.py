"""``run_batch``: the batch driver behind ``tmequant run``.

It checks the inputs and the output folder before any work, holds the folder's lock, sends
every slide through its stages (here, or on a Dask cluster), reuses or draws the pictures,
and writes the cohort outputs (tables, report, ``failures.csv``) from every finished slide.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from tmequant.atomic import atomic_write_text, dump_json
from tmequant.batch import Failure, one_line_reason, write_failures_csv
from tmequant.biomarkers import BiomarkerParams
from tmequant.defaults import check_runtime
from tmequant.domain import is_phantom_slide
from tmequant.errors import InputError
from tmequant.inputs import SlideSpec, expand_slides
from tmequant.pipeline.config import (
    RunConfig,
    RunResult,
    SlideRun,
    check_model_tiling,
    counter_params,
)
from tmequant.pipeline.distributed import dask_client, run_distributed
from tmequant.pipeline.figures import FigurePlan, figure_stems, prepare_figures, write_figure_marker
from tmequant.pipeline.outdir import check_output_folder, output_lock
from tmequant.pipeline.stages import get_model, run_slide
from tmequant.progress import BatchProgress
from tmequant.provenance import package_version, params_hash, to_jsonable
from tmequant.report import SlideOutcome, write_cohort_report
from tmequant.tiling.store import SlideStore
from tmequant.tiling.tile import TilingParams, hashed_params

log = logging.getLogger("tmequant")


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
    runtime: str = "auto",
    workers: int | None = None,
    scheduler: Any = None,
    local_workers: int | None = None,
    overwrite: bool = False,
    wait: bool = False,
    progress: bool | None = True,
    title: str | None = None,
    qc: Any = None,
) -> RunResult:
    """Run the whole pipeline on a batch of slides into ``out_dir`` (layout: tmequant.pipeline).

    slides: SlideSpecs, or paths/folders/globs/manifests for :func:`tmequant.inputs.expand_slides`.
    model: a model name or folder. tiling: None -> the model card's MPP and tile size.
    counter: True/"on" (default parameters), False/"off", or NucleusCounterParams; the counter
    runs only for slides without a cell table whose model has no count head.
    scheduler: a dask.distributed Client or a scheduler address; local_workers: start a
    LocalCluster of that many worker processes. Neither: everything runs in this process.
    runtime: the inference runtime (``auto``: ONNX Runtime on the CPU, torch on GPUs).
    Holds the output-folder lock for the duration (``wait``: queue behind another run).
    qc: :class:`tmequant.report.qc.QCParams` of the cohort table's ``qc_flags`` (None: defaults).
    Never raises for a slide problem; see ``RunResult.failures``.
    """
    t0 = time.perf_counter()
    specs = _slide_specs(slides)
    if Path(str(model)).expanduser().exists():
        model = str(Path(str(model)).expanduser().absolute())
    out = Path(out_dir)
    loaded = get_model(str(model))
    card = loaded.card
    if card.domain_warning and not all(is_phantom_slide(s.path) for s in specs):
        log.warning("WARNING: %s", card.domain_warning)  # one line; the report gets a banner
    if tiling is None:
        tiling = TilingParams(target_mpp_um=card.mpp_um, tile_px=card.tile_px)
    check_model_tiling(card, tiling, str(model))
    if cells_dir is not None and not Path(cells_dir).is_dir():
        raise InputError("--cells-dir is not a folder", cells_dir)
    try:
        check_runtime(runtime)  # a usage error, not one per slide
    except ValueError as e:
        raise InputError(str(e)) from None
    cfg = RunConfig(out_dir=str(out.resolve()), model=str(model), tiling=tiling,
                    params=params or BiomarkerParams(), counter=counter_params(counter),
                    cells_dir=None if cells_dir is None else str(Path(cells_dir).resolve()),
                    device=device, batch_size=batch_size, runtime=runtime, workers=workers,
                    overwrite=overwrite)

    with output_lock(out, wait=wait):
        check_output_folder(out, specs, cfg)
        _write_run_json(out, cfg, card, specs, scheduler, local_workers)
        with BatchProgress(len(specs), enabled=progress) as bar:
            if scheduler is not None or local_workers:
                with dask_client(scheduler, local_workers) as client:
                    runs = run_distributed(specs, cfg, client, bar)
                    figures = prepare_figures(out, runs, card.name, client)
            else:
                runs = {}
                for spec in specs:
                    runs[spec.slide_id] = run = run_slide(spec, cfg, model=loaded, progress=bar)
                    bar.slide_done(run)
                figures = prepare_figures(out, runs, card.name, None)
        result = _write_cohort(out, specs, runs, card.name, title, figures, qc)
    result.seconds = time.perf_counter() - t0
    return result


def _slide_specs(slides: Iterable[SlideSpec | str | os.PathLike[str]]) -> list[SlideSpec]:
    """The batch's SlideSpecs (paths, folders, globs and manifests expanded): unique ids,
    absolute paths."""
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
    return specs


def _write_run_json(out: Path, cfg: RunConfig, card: Any, specs: Sequence[SlideSpec],
                    scheduler: Any, local_workers: int | None) -> None:
    """``run.json``: the run's settings and provenance (rewritten by every run)."""
    atomic_write_text(out / "run.json", dump_json({
        "package_version": package_version(), "model": cfg.model, "model_name": card.name,
        "model_version": card.version, "tiling": hashed_params(cfg.tiling),
        "tiling_params_hash": params_hash(hashed_params(cfg.tiling)), "biomarkers": to_jsonable(cfg.params),
        "biomarker_params_hash": params_hash(cfg.params),
        "nucleus_counter": None if cfg.counter is None else cfg.counter.to_dict(),
        "cells_dir": cfg.cells_dir, "device": cfg.device, "runtime": cfg.runtime,
        "scheduler": None if scheduler is None else str(getattr(scheduler, "scheduler", scheduler)),
        "local_workers": local_workers, "slides": [s.slide_id for s in specs],
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}))


def _write_cohort(out: Path, specs: Sequence[SlideSpec], runs: dict[str, SlideRun],
                  model_name: str, title: str | None, figures: FigurePlan | None = None,
                  qc: Any = None) -> RunResult:
    """failures.csv, then the cohort tables and report of every finished slide."""
    failures = [r.failure for r in (runs[s.slide_id] for s in specs) if r.failure is not None]
    outcomes = []
    for s in specs:
        r = runs[s.slide_id]
        if r.ok and r.store_path is not None:
            outcomes.append(SlideOutcome(SlideStore(r.store_path), r.model_name or model_name,
                                         r.result, r.notes))
    failures_csv = write_failures_csv(out, _by_slide(failures))
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
        write_failures_csv(out, _by_slide(res.failures))
        return res
    res.cohort_csv, res.cohort_parquet = co.cohort_csv, co.cohort_parquet
    res.tls_csv, res.report_html = co.tls_csv, co.report_html
    if figures is not None:  # pictures drawn just now: remember what they show
        for sid, key in figures.stale.items():
            figs = co.figures.get(sid, {})
            if set(figs) == set(figure_stems()):
                write_figure_marker(figs, key)
    return res


def _by_slide(failures: Sequence[Failure]) -> list[Failure]:
    """failures.csv lists a run's failures by slide id."""
    return sorted(failures, key=lambda f: f.item_id)


__all__ = ["run_batch"]
