"""Thin adapters: one slide's store + BiomarkerResult -> its pictures and its report section.

The picture functions in :mod:`tmequant.report.figures` take plain arrays; this is the only
place that knows where those arrays live (the slide store and
:class:`tmequant.biomarkers.BiomarkerResult`), read by attribute so the biomarkers module is
not imported here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tmequant.report.figures import (
    SlideGeometry,
    grid_raster,
    plot_compartments,
    plot_lymphocyte_density,
    plot_thumbnail,
    plot_tissue_classes,
)
from tmequant.report.html import SlideSection

# File stem -> caption, in the order the report shows them.
FIGURES: dict[str, str] = {
    "thumbnail": "Thumbnail and tissue mask",
    "tissue_classes": "Tissue class per tile",
    "lymphocyte_density": "Lymphocyte density per tile",
    "compartments": "Tumour bulk, invasive margin and TLS",
}


def slide_figures(
    store: Any,
    model_name: str,
    result: Any,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    vmax_per_mm2: float | None = None,
) -> dict[str, bytes | Path]:
    """The four pictures of one slide.

    store: a :class:`tmequant.store.SlideStore` (thumbnail, tissue mask, grid,
    ``tissue_probs(model_name)`` and ``prediction_card(model_name)``); result: the slide's BiomarkerResult
    (``lymphocyte_density_per_mm2`` (N,), ``tls_labels`` (N,), ``compartments`` with
    ``origin``, ``bulk``, ``margin``; ``row['count_source']``).
    out_dir: when given, PNGs are written as ``<out_dir>/<stem>.png`` and paths returned
    (stems: the keys of :data:`FIGURES`); otherwise PNG bytes.
    vmax_per_mm2: common top of the density colour scale for a cohort (see plot_lymphocyte_density).
    Returns stem -> PNG bytes or path.
    """
    geom = SlideGeometry.from_store(store)
    thumb = store.thumbnail
    grid_rc = store.grid
    sid = store.slide_id
    card = store.prediction_card(model_name)
    classes = list(card.get("tissue_classes") or [])
    roles = dict(card.get("tissue_roles") or {})
    probs = store.tissue_probs(model_name)
    comp = result.compartments
    origin = (int(comp.origin[0]), int(comp.origin[1]))
    row = getattr(result, "row", {}) or {}

    def dest(stem: str) -> Path | None:
        return None if out_dir is None else Path(out_dir) / f"{stem}.png"

    figs: dict[str, bytes | Path] = {}
    figs["thumbnail"] = plot_thumbnail(thumb, store.tissue_mask, geom, title=f"{sid}: thumbnail",
                                       path=dest("thumbnail"))
    figs["tissue_classes"] = plot_tissue_classes(
        thumb, grid_rc, probs, classes, roles, geom,
        title=f"{sid}: tissue classes ({card.get('name', model_name)})", path=dest("tissue_classes"))
    figs["lymphocyte_density"] = plot_lymphocyte_density(
        thumb, grid_rc, result.lymphocyte_density_per_mm2, geom, vmax_per_mm2=vmax_per_mm2,
        title=f"{sid}: lymphocyte density", count_source=row.get("count_source"),
        bulk_mask=comp.bulk, origin_rc=origin, path=dest("lymphocyte_density"))
    # TLS labels on the compartments' raster, so one origin places both
    tls = grid_raster(grid_rc, np.asarray(result.tls_labels, dtype=np.int64),
                      shape=tuple(np.shape(comp.bulk)), fill=0, origin_rc=origin)
    figs["compartments"] = plot_compartments(
        thumb, geom, masks={"bulk": comp.bulk, "margin": comp.margin}, origin_rc=origin,
        tls_labels=tls, title=f"{sid}: compartments", path=dest("compartments"),
        areas_mm2={k: float(row[f"{k}_area_mm2"]) for k in ("bulk", "margin")
                   if row.get(f"{k}_area_mm2") is not None})
    return figs


def slide_section(
    slide_id: str,
    row: Mapping[str, Any],
    figures: Mapping[str, bytes | str | os.PathLike[str]],
    notes: tuple[str, ...] = (),
) -> SlideSection:
    """A report section from a slide's cohort row and its :func:`slide_figures` (captions added)."""
    captioned = {FIGURES.get(k, k): v for k, v in figures.items()}
    return SlideSection(slide_id=slide_id, row=row, figures=captioned, notes=notes)
