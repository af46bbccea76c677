"""Per-slide quality-control flags: results a pathologist should not trust without a look.

Each flag is ``code: reason``; a slide's flags are joined with ``"; "`` into the cohort
table's ``qc_flags`` column (empty when none) and shown on the report. The thresholds are
:class:`QCParams` fields, set in the ``[qc]`` section of a parameters file (``--params``);
docs/biomarkers.md lists them with their reasons.

Codes:
  ``model_domain``       the model was trained on synthetic phantoms or is untrained
  ``nuclei_density``     nuclei per mm^2 of tissue outside [min, max] (nucleus counter, or a
                         detector's cells)
  ``lymphocyte_density`` lymphocytes per mm^2 of tissue outside [min, max]
  ``no_tumour``          tumour area below ``min_tumor_area_mm2`` or no tumour bulk: the model
                         calls the slide carcinoma-free, so every tumour-compartment biomarker
                         is undefined
  ``mpp_override``       the pixel size came from an override (and what the file says)
  ``few_tiles``          fewer than ``min_tiles`` tissue tiles
  ``stain``              the slide's H or E stain vector is more than ``max_stain_angle_deg``
                         from the model's training stain (only for cards with stain info)
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from tmequant.pixelsize import PixelSize

log = logging.getLogger("tmequant")

QC_SECTION = "qc"


def _p(default: float, lo: float, hi: float, doc: str) -> Any:
    return field(default=default, metadata={"min": lo, "max": hi, "doc": doc})


@dataclass(frozen=True)
class QCParams:
    """Thresholds of the QC flags; densities per mm^2 of tissue, areas in mm^2, angles in degrees."""

    # Nucleated cells of H&E tissue lie between a few hundred (fat, loose stroma) and ~15,000
    # (lymphoid tissue, solid tumour) per mm^2; outside that the counter saw something else.
    min_nuclei_per_mm2: float = _p(300.0, 0, 1e7, "fewer nuclei per mm^2 of tissue is implausible")
    max_nuclei_per_mm2: float = _p(20000.0, 0, 1e7, "more nuclei per mm^2 of tissue is implausible")
    # Any carcinoma has some lymphocytes: under ~5 per mm^2 the counts are missing, not low.
    # A lymph node reaches ~10,000 per mm^2.
    min_lymphocytes_per_mm2: float = _p(5.0, 0, 1e7, "fewer lymphocytes per mm^2 of tissue is implausible")
    max_lymphocytes_per_mm2: float = _p(15000.0, 0, 1e7, "more lymphocytes per mm^2 of tissue is implausible")
    min_tumor_area_mm2: float = _p(0.01, 0, 1e4, "less tumour-role tissue flags a tumour-free call")
    min_tiles: int = _p(50, 0, 1e9, "fewer tissue tiles flag a slide too small to measure")
    min_tissue_mm2_for_density: float = _p(0.5, 0, 1e4, "density checks need this much tissue")
    max_stain_angle_deg: float = _p(15.0, 0, 90, "largest angle of the H or E vector to the training stain")
    mpp_differs_fraction: float = _p(0.05, 0, 10, "an override differing by more than this share from the file's MPP is named")

    def __post_init__(self) -> None:
        from tmequant.biomarkers.params import check_range

        for f in fields(self):
            check_range(type(self), f.name, getattr(self, f.name))
        if self.min_nuclei_per_mm2 > self.max_nuclei_per_mm2:
            raise ValueError("min_nuclei_per_mm2 is above max_nuclei_per_mm2")
        if self.min_lymphocytes_per_mm2 > self.max_lymphocytes_per_mm2:
            raise ValueError("min_lymphocytes_per_mm2 is above max_lymphocytes_per_mm2")


def qc_params_from_file(path: str | os.PathLike[str] | None) -> QCParams:
    """QCParams from the ``[qc]`` section of a parameters file (defaults without one)."""
    from tmequant.params import dataclass_from_mapping, load_params_file

    sections = load_params_file(path) if path is not None else {}
    return dataclass_from_mapping(QCParams, sections.get(QC_SECTION, {}), path or "<params>", QC_SECTION)


def join_flags(flags: list[tuple[str, str]]) -> str:
    """``code: reason; code: reason`` (empty string when there is none)."""
    # "; " separates flags: a reason never holds one
    return "; ".join(f"{c}: {r.replace('; ', ', ')}" for c, r in flags)


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def slide_qc_flags(row: dict[str, Any], store: Any = None, card: dict[str, Any] | None = None,
                   params: QCParams | None = None) -> list[tuple[str, str]]:
    """The (code, reason) QC flags of one slide.

    row: the slide's biomarker row (``tissue_area_mm2``, ``tumor_area_mm2``,
    ``lymphocytes_total``, ``n_tiles``, ``mpp_source``, ``slide_mpp_um``, ``count_source``);
    store: its SlideStore (nucleus counts, thumbnail for the stain check) or None;
    card: the model card as a dict (``domain``, ``stain_normalization``) or None.
    """
    from tmequant.domain import card_domain, domain_warning

    p = params or QCParams()
    flags: list[tuple[str, str]] = []

    def add(code: str, reason: str) -> None:
        flags.append((code, reason))

    if card is not None:
        domain = card_domain(card)
        if domain_warning(str(card.get("name", "?")), domain):
            add("model_domain", (f"{domain} model {card.get('name', '?')!r}: its numbers on real "
                                 "tissue mean nothing"))
    tissue = _num(row.get("tissue_area_mm2"))
    if tissue is not None and tissue >= p.min_tissue_mm2_for_density:
        nuc = _safe(lambda: store.nuclei_counts()) if store is not None else None
        n_nuclei: float | None = None
        if nuc is not None and len(nuc):
            n_nuclei = float(np.nansum(np.asarray(nuc, dtype=np.float64)))
        elif row.get("count_source") == "model_cells" and _num(row.get("n_cells")) is not None:
            n_nuclei = _num(row.get("n_cells"))  # a detector's cells are its nuclei
        if n_nuclei is not None:
            n = n_nuclei
            d = n / tissue
            if not p.min_nuclei_per_mm2 <= d <= p.max_nuclei_per_mm2:
                add("nuclei_density", (
                    f"{d:,.0f} nuclei/mm² of tissue ({n:,.0f} in {tissue:.2f} mm²) is outside the "
                    f"plausible {p.min_nuclei_per_mm2:,.0f}-{p.max_nuclei_per_mm2:,.0f}"))
        lym = _num(row.get("lymphocytes_total"))
        if lym is not None:
            d = lym / tissue
            if not p.min_lymphocytes_per_mm2 <= d <= p.max_lymphocytes_per_mm2:
                add("lymphocyte_density", (
                    f"{d:,.1f} lymphocytes/mm² of tissue ({lym:,.0f} in {tissue:.2f} mm², counts: "
                    f"{row.get('count_source', '?')}) is outside the plausible "
                    f"{p.min_lymphocytes_per_mm2:,.0f}-{p.max_lymphocytes_per_mm2:,.0f}"))
    tumour = _num(row.get("tumor_area_mm2"))
    bulk = _num(row.get("bulk_area_mm2"))
    if (tumour is not None and tumour < p.min_tumor_area_mm2) or bulk == 0:
        what = (f"{tumour:.2f} mm² of tumour" if tumour is not None else "no tumour") + (
            " and no tumour bulk" if bulk == 0 else "")
        add("no_tumour", (f"the model found {what}: it calls the slide carcinoma-free, so TIL "
                          "densities, exclusion and phenotype are undefined (check the model fits "
                          "this tissue)"))
    if row.get("mpp_source") == "override":
        mpp = _num(row.get("slide_mpp_um"))
        given = f"pixel size {mpp:g} um/px given by the user" if mpp else "pixel size given by the user"
        file_px = file_pixel_size(row.get("source_path"))
        if file_px is None:
            add("mpp_override", f"{given} (no pixel size read from the file)")
        else:
            file_mpp = file_px.mean_um
            shown = (f"{file_mpp:.4g}" if file_px.is_square
                     else f"{file_px.x_um:.4g} x {file_px.y_um:.4g}")
            if mpp is not None and abs(file_mpp - mpp) > p.mpp_differs_fraction * file_mpp:
                add("mpp_override", f"{given} differs from the file's {shown} um/px")
            else:
                add("mpp_override", f"{given} (the file says {shown})")
    n_tiles = _num(row.get("n_tiles"))
    if n_tiles is not None and n_tiles < p.min_tiles:
        add("few_tiles", (f"{n_tiles:.0f} tissue tiles (< {p.min_tiles}): too little tissue for "
                          "stable densities and compartments"))
    stain = (card or {}).get("stain_normalization")
    if stain and store is not None:
        angle = _safe(lambda: stain_angle_deg(store, stain))
        if angle is not None and angle > p.max_stain_angle_deg:
            add("stain", (f"the slide's stain is {angle:.0f}° from the model's training stain "
                          f"(> {p.max_stain_angle_deg:g}°): colours unlike its training slides"))
    return flags


def _safe(fn: Any) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a QC check never fails a finished slide
        log.debug("QC check skipped: %s", exc)
        return None


def file_pixel_size(path: Any) -> PixelSize | None:
    """The level-0 pixel size (x, y) a slide file itself records; None as for file_mpp_um."""
    if not path:
        return None

    def read() -> PixelSize | None:
        from tmequant.wsi import open_slide

        with open_slide(str(path), require_mpp=False) as s:
            return None if s.info.mpp_um is None else s.info.pixel_size

    return _safe(read)


def file_mpp_um(path: Any) -> float | None:
    """The pixel size a slide file itself records, um/px; None when it has none, an
    implausible one, or cannot be opened (metadata only: no pixels are read)."""
    if not path:
        return None

    def read() -> float | None:
        from tmequant.wsi import open_slide

        with open_slide(str(path), require_mpp=False) as s:
            return s.info.mpp_um

    return _safe(read)


def stain_angle_deg(store: Any, stain: dict[str, Any]) -> float:
    """Largest angle (degrees) between the slide's Macenko H and E vectors (from the store's
    thumbnail, tissue pixels only) and the card's ``stain_normalization.stain_matrix``."""
    from tmequant.models.stain import macenko_stains

    thumb = np.asarray(store.thumbnail)
    mask = np.asarray(store.tissue_mask, dtype=bool)
    if mask.shape == thumb.shape[:2]:
        px = thumb[mask]
    else:
        px = thumb.reshape(-1, 3)
    he, _ = macenko_stains(px.reshape(-1, 1, 3))
    target = np.asarray(stain["stain_matrix"], dtype=np.float64)
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    cos = np.clip(np.sum(he * target, axis=1), -1.0, 1.0)
    return float(np.degrees(np.arccos(cos)).max())


__all__ = [
    "QC_SECTION",
    "QCParams",
    "file_mpp_um",
    "file_pixel_size",
    "join_flags",
    "qc_params_from_file",
    "slide_qc_flags",
    "stain_angle_deg",
]
