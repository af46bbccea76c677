"""Everything a batch writes about its cohort, in one call.

``write_cohort_report(out_dir, outcomes, failures)`` writes::

    <out_dir>/cohort.csv, cohort.parquet     one row per finished slide (tables.py)
    <out_dir>/tls.csv, tls.parquet           one row per TLS of every slide
    <out_dir>/figures/<slide_id>/*.png       the four pictures of each slide
    <out_dir>/report.html                    the self-contained report
    <out_dir>/slides/<slide_id>.html         one self-contained page per slide, only for
                                             cohorts larger than ``inline_max_slides``

The density pictures of a cohort share one colour scale, so slides can be compared by eye.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant._faults import checkpoint
from tmequant.atomic import atomic_write_bytes, atomic_write_text
from tmequant.report.html import write_html_report
from tmequant.report.slide import slide_figures, slide_section
from tmequant.report.tables import CSV_FLOAT_FORMAT, parquet_bytes, write_cohort_table

log = logging.getLogger("tmequant")

INLINE_MAX_SLIDES = 40  # beyond this a single page with every picture gets too heavy to open
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


@dataclass
class SlideOutcome:
    """One finished slide: its store (SlideStore), the model the pictures show, its result.

    notes: lines shown on the slide's section (e.g. "MPP overridden to 0.25").
    """

    store: Any
    model_name: str
    result: Any
    notes: tuple[str, ...] = ()


@dataclass
class CohortOutputs:
    cohort_csv: Path
    cohort_parquet: Path
    tls_csv: Path
    tls_parquet: Path
    report_html: Path
    figures: dict[str, dict[str, Path]] = field(default_factory=dict)
    slide_pages: dict[str, Path] = field(default_factory=dict)


def safe_name(slide_id: str) -> str:
    """The slide id when it is a safe file name (tmequant.inputs enforces that), else a hash."""
    if _SAFE.match(slide_id) and ".." not in slide_id:
        return slide_id
    import hashlib

    return "slide-" + hashlib.sha256(slide_id.encode()).hexdigest()[:16]


def cohort_density_vmax(densities: Iterable[np.ndarray], percentile: float = 99.0) -> float:
    """Top of a shared lymphocyte-density colour scale: the cohort's 99th percentile (>= 100)."""
    finite = [d[np.isfinite(d)] for d in (np.asarray(x, dtype=np.float64).ravel() for x in densities)]
    allv = np.concatenate(finite) if finite else np.zeros(0)
    return max(float(np.percentile(allv, percentile)) if allv.size else 0.0, 100.0)


def write_tls_table(tables: Iterable[pd.DataFrame], out_dir: str | os.PathLike[str],
                    stem: str = "tls") -> tuple[Path, Path]:
    """Concatenate per-slide TLS tables (each with ``slide_id``) into ``tls.csv``/``tls.parquet``."""
    given = [t for t in tables if t is not None]
    frames = [t for t in given if len(t)]
    if frames:
        df = pd.concat(frames, ignore_index=True)
    elif given:  # no TLS anywhere: still the columns of docs/output-schema.md, no rows
        df = given[0].iloc[0:0].reset_index(drop=True)
    else:
        df = pd.DataFrame({"slide_id": pd.Series(dtype=str)})
    if len(df) and "slide_id" in df:
        sort = ["slide_id"] + (["tls_id"] if "tls_id" in df else [])
        df = df.sort_values(sort, kind="stable").reset_index(drop=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, pq_path = out / f"{stem}.csv", out / f"{stem}.parquet"
    atomic_write_text(csv_path, df.to_csv(index=False, float_format=CSV_FLOAT_FORMAT,
                                          lineterminator="\n"))
    atomic_write_bytes(pq_path, parquet_bytes(df))
    return csv_path, pq_path


def _stored_card(store: Any, model_name: str) -> dict[str, Any] | None:
    """The model card stored with the slide's predictions, as a dict (None when unreadable)."""
    try:
        return dict(store.prediction_card(model_name))
    except Exception:  # noqa: BLE001 - a caller's stand-in store: no card, no domain
        return None


def _cohort_row(o: SlideOutcome, qc: Any) -> tuple[dict[str, Any], str | None]:
    """The slide's cohort row (``qc_flags`` first, ``model_domain`` added) and its model's
    domain warning (None for a model trained on real tissue)."""
    from tmequant.domain import card_domain, domain_warning, is_phantom_slide
    from tmequant.report.qc import join_flags, slide_qc_flags

    row = dict(o.result.row)
    card = _stored_card(o.store, o.model_name)
    domain = card_domain(card) if card is not None else "unknown"
    phantom = is_phantom_slide(row.get("source_path"))
    flags = slide_qc_flags(row, o.store, None if phantom else card, qc)
    warn = None if phantom else domain_warning(str((card or {}).get("name", o.model_name)), domain)
    out = {"slide_id": o.store.slide_id, "qc_flags": join_flags(flags)}
    out.update(row)
    out["slide_id"] = o.store.slide_id
    out["model_domain"] = domain
    return out, warn


def write_cohort_report(
    out_dir: str | os.PathLike[str],
    outcomes: Sequence[SlideOutcome],
    failures: Iterable[Any] = (),
    *,
    title: str = "tmequant cohort report",
    inline_max_slides: int = INLINE_MAX_SLIDES,
    figures: Mapping[str, Mapping[str, Any]] | None = None,
    qc: Any = None,
) -> CohortOutputs:
    """Write the cohort table, TLS table, pictures and HTML report for finished slides.

    failures: tmequant.batch.Failure objects (or dicts slide_id/stage/reason) of the batch.
    figures: slide id -> {stem: PNG path} of pictures already drawn (by Dask workers, or
    unchanged since the last run, with the cohort's :func:`cohort_density_vmax`); the
    other slides' pictures are drawn here.
    qc: :class:`tmequant.report.qc.QCParams` of the ``qc_flags`` column (None: defaults).
    Each row gets ``model_domain`` (what the model was trained on) and ``qc_flags``; a
    synthetic or untrained model puts a warning banner on the report.
    Pictures of one slide that fail to draw are logged and left out; they never fail the batch.
    """
    out = Path(out_dir)
    outcomes = sorted(outcomes, key=lambda o: str(o.store.slide_id))
    rows, warnings = [], []
    for o in outcomes:
        row, warn = _cohort_row(o, qc)
        rows.append(row)
        if warn and warn not in warnings:
            warnings.append(warn)
    cohort_csv, cohort_pq = write_cohort_table(rows, out)
    tls_csv, tls_pq = write_tls_table((o.result.tls for o in outcomes), out)
    vmax = cohort_density_vmax(o.result.lymphocyte_density_per_mm2 for o in outcomes)

    drawn: dict[str, dict[str, Path]] = {}
    sections = []
    for o, row in zip(outcomes, rows):
        sid = str(o.store.slide_id)
        notes = tuple(o.notes)
        pre = (figures or {}).get(sid)
        if pre is not None:
            figs: dict[str, Any] = dict(pre)
        else:
            try:
                figs = slide_figures(o.store, o.model_name, o.result, out / "figures" / safe_name(sid),
                                     vmax_per_mm2=vmax)
            except Exception as exc:  # noqa: BLE001 - a picture never fails a finished slide
                log.warning("%s: pictures not drawn: %s: %s", sid, type(exc).__name__, exc)
                figs, notes = {}, notes + (f"pictures not drawn: {type(exc).__name__}: {exc}",)
        drawn[sid] = {k: Path(v) for k, v in figs.items()}
        sections.append(slide_section(sid, row, figs, notes))
        checkpoint("report")  # tests: a kill between pictures and the HTML report

    failures = list(failures)
    slide_pages: dict[str, Path] = {}
    links = None
    if len(sections) > inline_max_slides:
        links = {}
        for sec in sections:
            page = out / "slides" / f"{safe_name(sec.slide_id)}.html"
            write_html_report(page, [sec], None, title=f"{sec.slide_id} · {title}",
                              back_link="../report.html", banners=warnings,
                              density_vmax_per_mm2=vmax)
            slide_pages[sec.slide_id] = page
            links[sec.slide_id] = f"slides/{page.name}"
    report = write_html_report(out / "report.html", sections, failures, title=title, slide_links=links,
                               banners=warnings, density_vmax_per_mm2=vmax)
    return CohortOutputs(cohort_csv, cohort_pq, tls_csv, tls_pq, report, drawn, slide_pages)
