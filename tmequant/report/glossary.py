"""Human labels, units, number formats and one-line definitions of the cohort-table columns.

The report shows these instead of the raw column names (the raw name stays in the cell's
hover title); the definitions are short forms of docs/biomarkers.md, which
``tests/test_docs_links.py`` checks names every column listed here. One number format per
unit, so the same measure always looks the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Term:
    """label: what a pathologist reads; unit: shown after the label; fmt: Python format of a
    finite number; definition: one line (hover title and footnote)."""

    label: str
    unit: str
    fmt: str
    definition: str


# One format per unit: densities to 0.1 cell/mm^2, areas to 0.01 mm^2, shares to 0.01...
_DENS, _AREA, _FRAC, _RATIO, _PCT, _INT, _UM = ",.1f", ",.2f", ".2f", ".2f", ".1f", ",.0f", ",.0f"

TERMS: dict[str, Term] = {
    # QC and provenance read first
    "qc_flags": Term("QC flags", "", "", "reasons not to trust the row without a look (see the QC section)"),
    "model_domain": Term("Model trained on", "", "", "what the model's training slides were: synthetic, untrained, or tissues"),
    "count_source": Term("Lymphocyte counts from", "", "", "cell_table, model (count head), nucleus_counter or area_estimate"),
    # phenotype
    "immune_phenotype": Term("Immune phenotype", "", "", "inflamed, excluded or desert by the share of 1 mm² bulk regions of each kind; not_evaluable without scored regions"),
    "phenotype_region_um": Term("Phenotype region side", "µm", _UM, "side of one phenotype region"),
    "phenotype_regions_n": Term("Phenotype regions scored", "", _INT, "bulk regions with enough tumour epithelium to be scored"),
    "phenotype_inflamed_fraction": Term("Inflamed regions", "0-1", _FRAC, "share of scored regions with intratumoural TILs at or above the inflamed threshold"),
    "phenotype_excluded_fraction": Term("Excluded regions", "0-1", _FRAC, "share of scored regions, not inflamed, with stromal TILs at or above the excluded threshold"),
    "phenotype_desert_fraction": Term("Desert regions", "0-1", _FRAC, "share of scored regions that are neither"),
    # TILs
    "til_density_intratumoral_per_mm2": Term("Intratumoural TILs", "cells/mm²", _DENS, "lymphocytes in the tumour epithelium per mm² of it"),
    "til_density_stromal_per_mm2": Term("Stromal TILs", "cells/mm²", _DENS, "lymphocytes in the tumour-associated stroma per mm² of it"),
    "til_density_core_per_mm2": Term("TILs in the tumour core", "cells/mm²", _DENS, "lymphocytes per mm² of the bulk minus the margin"),
    "til_density_margin_per_mm2": Term("TILs in the invasive margin", "cells/mm²", _DENS, "lymphocytes per mm² of the band either side of the bulk border"),
    "stil_score_pct": Term("Stromal TIL score", "%", _PCT, "TIGER: 100 × lymphocytes × 64 µm² / tumour-associated stroma area, clipped to 0-100"),
    "til_positive_tile_fraction": Term("TIL-positive bulk tiles", "0-1", _FRAC, "share of bulk tiles with at least the TIL-positive density (800 cells/mm²)"),
    "exclusion_ratio_stroma_to_tumor": Term("Exclusion ratio stroma : tumour", "ratio", _RATIO, "stromal / intratumoural TIL density; ∞ when only the stroma has TILs"),
    "exclusion_ratio_margin_to_core": Term("Exclusion ratio margin : core", "ratio", _RATIO, "margin / core TIL density"),
    "morisita_horn": Term("Morisita-Horn index", "0-1", _FRAC, "co-localisation of tumour cells and lymphocytes (1 same distribution, 0 disjoint)"),
    "morisita_horn_square_um": Term("Morisita-Horn square side", "µm", _UM, "side of the squares the index is computed on"),
    "morisita_horn_tumor_source": Term("Morisita-Horn tumour source", "", "", "where the tumour-cell distribution came from"),
    "lymphocytes_total": Term("Lymphocytes, all tissue", "cells", _INT, "lymphocytes counted on every tile"),
    "lymphocytes_intratumoral": Term("Lymphocytes in the epithelium", "cells", _INT, "lymphocytes in the tumour epithelium"),
    "lymphocytes_stromal": Term("Lymphocytes in the tumour stroma", "cells", _INT, "lymphocytes in the tumour-associated stroma"),
    # TLS
    "tls_count": Term("TLS", "count", _INT, "tertiary lymphoid structures within 1 mm of the tumour bulk"),
    "tls_per_mm2": Term("TLS density", "per mm²", ".2f", "TLS per mm² of bulk + margin"),
    "tls_intratumoral_count": Term("TLS inside the bulk", "count", _INT, "TLS at least half inside the tumour bulk"),
    "tls_peritumoral_count": Term("TLS around the bulk", "count", _INT, "the other TLS"),
    "tls_total_area_mm2": Term("TLS area", "mm²", ".3f", "summed TLS area"),
    # composition
    "tissue_area_mm2": Term("Tissue area", "mm²", _AREA, "non-background tissue (tile area × tissue fraction)"),
    "tumor_area_mm2": Term("Tumour area", "mm²", _AREA, "expected tumour-role tissue (probability × tissue area)"),
    "stroma_area_mm2": Term("Stroma area", "mm²", _AREA, "stroma-role tissue"),
    "immune_area_mm2": Term("Immune-rich area", "mm²", _AREA, "immune-role (lymphocyte-dense) tissue"),
    "necrosis_area_mm2": Term("Necrosis area", "mm²", _AREA, "necrosis-role tissue"),
    "other_tissue_area_mm2": Term("Other tissue area", "mm²", _AREA, "fat, mucosa and other tissue"),
    "tumor_fraction": Term("Tumour share", "0-1", _FRAC, "tumour area / tissue area"),
    "stroma_fraction": Term("Stroma share", "0-1", _FRAC, "stroma area / tissue area"),
    "immune_fraction": Term("Immune-rich share", "0-1", _FRAC, "immune area / tissue area"),
    "necrosis_fraction": Term("Necrosis share", "0-1", _FRAC, "necrosis area / tissue area"),
    "other_tissue_fraction": Term("Other tissue share", "0-1", _FRAC, "other tissue area / tissue area"),
    "tumor_stroma_ratio": Term("Tumour-stroma ratio", "0-1", _FRAC, "stroma / (stroma + tumour) inside the bulk"),
    "stroma_high": Term("Stroma-high", "", "", "tumour-stroma ratio above 0.5"),
    # compartments
    "bulk_area_mm2": Term("Tumour bulk area", "mm²", _AREA, "tumour region after closing/opening with a 1 mm disk, small objects dropped"),
    "epithelium_area_mm2": Term("Tumour epithelium area", "mm²", _AREA, "tumour-role tissue inside the bulk (intratumoural compartment)"),
    "tumor_stroma_area_mm2": Term("Tumour stroma area", "mm²", _AREA, "stroma- and immune-role tissue inside the bulk"),
    "margin_area_mm2": Term("Invasive margin area", "mm²", _AREA, "band of 500 µm either side of the bulk border"),
    "core_area_mm2": Term("Tumour core area", "mm²", _AREA, "bulk minus the margin"),
    "n_tiles_without_role": Term("Tissue tiles without a role", "tiles", _INT, "tiles whose role probabilities are NaN, all zero or tied: in no compartment"),
    "compartment_resolution": Term("Compartment resolution", "", "", "cell: split by a cell table's tumour cells; tile: by tile classes"),
}

# The cohort summary's columns, in reading order (the rest is on each slide's section, where
# the model, what it was trained on and the count source are stated too).
SUMMARY_COLUMNS: tuple[str, ...] = (
    "immune_phenotype",
    "til_density_intratumoral_per_mm2",
    "til_density_stromal_per_mm2",
    "stil_score_pct",
    "exclusion_ratio_stroma_to_tumor",
    "tls_count",
    "tumor_stroma_ratio",
    "tumor_area_mm2",
    "bulk_area_mm2",
    "tissue_area_mm2",
)


def term(column: str) -> Term:
    """The column's Term; unknown columns get their name with underscores as spaces."""
    if column in TERMS:
        return TERMS[column]
    unit = ""
    for suffix, u in (("_per_mm2", "per mm²"), ("_mm2", "mm²"), ("_um2", "µm²"), ("_um", "µm"),
                      ("_pct", "%"), ("_px", "px")):
        if column.endswith(suffix):
            unit = u
            break
    return Term(column.replace("_", " ").capitalize(), unit, "", "")


def header(column: str) -> str:
    """``Label (unit)`` as plain text."""
    t = term(column)
    return f"{t.label} ({t.unit})" if t.unit else t.label


def format_value(v: Any) -> str:
    """Human-readable cell text: 3 significant digits for small numbers, thousands separators."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "−∞"
        a = abs(v)
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_cell(column: str, v: Any) -> str:
    """The column's number format (one per unit); text, None, NaN and inf as format_value does."""
    fmt = term(column).fmt
    if fmt and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return format(v, fmt)
    return format_value(v)


def _param(row: dict[str, Any], name: str, default: float) -> float:
    for key in (f"param_{name}", name):
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    params = row.get("params")
    if isinstance(params, dict) and isinstance(params.get(name), (int, float)):
        return float(params[name])
    return default


def _f(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def phenotype_reason(row: dict[str, Any]) -> str:
    """One sentence: why the slide got its ``immune_phenotype`` (thresholds from the row's
    ``param_*`` values, defaults of docs/biomarkers.md where a row lacks them)."""
    label = row.get("immune_phenotype")
    n = _f(row, "phenotype_regions_n") or 0
    thr = _param(row, "phenotype_fraction", 1 / 3)
    it = _param(row, "inflamed_it_per_mm2", 130.0)
    st = _param(row, "excluded_st_per_mm2", 260.0)
    fi = _f(row, "phenotype_inflamed_fraction")
    fe = _f(row, "phenotype_excluded_fraction")
    fd = _f(row, "phenotype_desert_fraction")
    regions = f"{n:.0f} tumour region{'s' if n != 1 else ''}"
    if label == "not_evaluable":
        bulk = _f(row, "bulk_area_mm2")
        tumour = _f(row, "tumor_area_mm2")
        min_bulk = _param(row, "bulk_min_area_mm2", 1.5)
        if not bulk:
            t = "" if tumour is None else f" (tumour area {tumour:.2f} mm²)"
            return (f"not evaluable: no tumour bulk, i.e. no tumour region of at least "
                    f"{min_bulk:g} mm² after closing{t}")
        frac = _param(row, "phenotype_min_tumor_fraction", 0.1)
        area = _param(row, "phenotype_region_mm2", 1.0)
        return (f"not evaluable: no {area:g} mm² region of the {bulk:.2f} mm² bulk has at least "
                f"{frac:.0%} tumour epithelium")
    # The fractions weight each scored region by its tumour epithelium (aggregate.py).
    if label == "inflamed" and fi is not None:
        return (f"inflamed: regions with ≥ {it:g} intratumoural TILs/mm² hold {fi:.0%} of the "
                f"scored tumour ({regions}; ≥ {thr:.0%} needed)")
    if label == "excluded" and fe is not None:
        return (f"excluded: regions with few TILs in the epithelium but ≥ {st:g} stromal TILs/mm² "
                f"hold {fe:.0%} of the scored tumour ({regions}; ≥ {thr:.0%} needed; inflamed "
                f"{fi or 0:.0%})")
    if label == "desert" and fd is not None:
        return (f"desert: neither inflamed ({fi or 0:.0%}) nor excluded ({fe or 0:.0%}) regions "
                f"reach {thr:.0%} of the scored tumour ({regions})")
    return str(label or "")


__all__ = ["SUMMARY_COLUMNS", "TERMS", "Term", "format_cell", "header", "phenotype_reason", "term"]
