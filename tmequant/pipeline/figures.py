"""The pictures of a run, drawn once per slide result and cohort colour scale.

A slide's pictures depend on its biomarker inputs (``SlideRun.result_hash``) and on the
cohort's lymphocyte-density scale; ``figures/<slide_id>/figures.json`` records both, and
``prepare_figures`` reuses the pictures it vouches for. With a Dask client the others are
drawn on the workers; what is left is drawn by the cohort report.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmequant.atomic import atomic_write_text
from tmequant.batch import one_line_reason
from tmequant.pipeline.config import SlideRun
from tmequant.provenance import package_version, params_hash
from tmequant.report.cohort import cohort_density_vmax, safe_name
from tmequant.report.slide import FIGURES, slide_figures
from tmequant.tiling.store import SlideStore

log = logging.getLogger("tmequant")


@dataclass
class FigurePlan:
    """ready: slide id -> {stem: PNG path} to reuse; stale: slide id -> key of pictures to draw."""

    ready: dict[str, dict[str, Path]] = field(default_factory=dict)
    stale: dict[str, str] = field(default_factory=dict)


def figure_stems() -> list[str]:
    """The pictures every slide gets (``tmequant.report.slide.FIGURES``)."""
    return list(FIGURES)


def _figure_dir(out: Path, slide_id: str) -> Path:
    return out / "figures" / safe_name(slide_id)


def write_figure_marker(figs: dict[str, Any], key: str) -> None:
    """Record in ``figures.json`` beside the pictures ``figs`` what they show (``key``)."""
    d = Path(next(iter(figs.values()))).parent
    atomic_write_text(d / "figures.json", json.dumps({"key": key, "figures": sorted(figs)}))


def prepare_figures(out: Path, runs: dict[str, SlideRun], model_name: str,
                    client: Any = None) -> FigurePlan:
    """Reuse pictures whose slide result and cohort colour scale are unchanged; with a Dask
    client, draw the others on the workers. A picture depends on the slide's biomarker inputs
    (``result_hash``) and on the cohort's density scale (:func:`cohort_density_vmax`)."""
    ok = sorted((r for r in runs.values() if r.ok), key=lambda r: r.slide_id)
    vmax = cohort_density_vmax(r.result.lymphocyte_density_per_mm2 for r in ok)
    plan = FigurePlan()
    stems = figure_stems()
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
    figs = slide_figures(SlideStore(store_path), model_name, result, fig_dir, vmax_per_mm2=vmax)
    write_figure_marker(figs, key)
    return {k: str(v) for k, v in figs.items()}


__all__ = ["FigurePlan", "figure_stems", "prepare_figures", "write_figure_marker"]
