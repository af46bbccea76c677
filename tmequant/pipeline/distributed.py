"""A run on a Dask ``distributed`` cluster: each slide's stages as three chained tasks.

The cells check and tiling, inference (on workers that declare a ``GPU`` resource, when there
are any) and counting + biomarkers run on the workers; the client collects the SlideRuns and
writes the cohort outputs, byte-identical to a serial run's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tmequant.batch import Failure, one_line_reason
from tmequant.errors import InputError
from tmequant.inputs import SlideSpec
from tmequant.pipeline.config import RunConfig, SlideRun
from tmequant.pipeline.stages import finish_slide, predict_slide, start_slide
from tmequant.progress import BatchProgress

log = logging.getLogger("tmequant")


def _here(run: SlideRun, *stages: str) -> SlideRun:
    """Record which Dask worker ran ``stages`` (provenance, and to check GPU routing)."""
    try:
        from distributed import get_worker  # dask is optional and heavy: only on a worker

        addr = get_worker().address
    except (ImportError, ValueError):  # not on a worker
        return run
    for s in stages:
        run.workers[s] = addr
    return run


def _task_head(spec: SlideSpec, cfg: RunConfig) -> SlideRun:
    """Worker task: cells check and tiling."""
    return _here(start_slide(spec, cfg, None), "cells", "tile")


def _task_predict(run: SlideRun, cfg: RunConfig) -> SlideRun:
    """Worker task: inference (on a GPU worker when the cluster has any)."""
    return _here(predict_slide(run, cfg, None, None), "predict")


def _task_tail(run: SlideRun, cfg: RunConfig) -> SlideRun:
    """Worker task: nucleus counting and biomarkers (per-slide outputs)."""
    return _here(finish_slide(run, cfg, None, None), "count", "biomarkers")


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
    try:  # dask is optional and heavy: loaded only for a distributed run
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
        import dask  # optional and heavy, like distributed above

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


def run_distributed(specs: Sequence[SlideSpec], cfg: RunConfig, client: Any,
                     bar: BatchProgress) -> dict[str, SlideRun]:
    """Per-slide stages as three chained tasks per slide on a Dask cluster."""
    from distributed import as_completed  # dask is optional and heavy: only for a distributed run

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


__all__ = ["dask_client", "run_distributed"]
