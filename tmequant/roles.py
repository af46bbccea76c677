"""The role vocabulary of docs/biomarkers.md.

Model cards map their own class names to these roles; every aggregator speaks only of
roles, so any model (or a caller's own predictions) drives the same biomarkers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

TISSUE_ROLES: tuple[str, ...] = (
    "tumor",
    "stroma",
    "immune",  # lymphocyte-dense tissue / lymphoid aggregate
    "necrosis",
    "other_tissue",
    "background",
)

# Lymphocytes and plasma cells together count as `lymphocyte` (as TIGER does).
CELL_ROLES: tuple[str, ...] = ("lymphocyte", "tumor_cell", "other")

# Where per-tile lymphocyte counts came from, in order of precedence.
# ``model_cells``: the cells a detector model wrote into the store (tmequant.inference.cell_store).
COUNT_SOURCES: tuple[str, ...] = ("cell_table", "model_cells", "model", "nucleus_counter",
                                  "area_estimate")

# Exact names first (lower case), then word rules. TIGER counts lymphocytes and plasma
# cells together; HoVer-Net/CellViT/PanNuke "inflammatory" is mostly lymphocytes. PanNuke
# "epithelial" is non-neoplastic epithelium and macrophages are not TILs: both are "other".
DEFAULT_CELL_ROLE_MAP: dict[str, str] = {
    "lymphocyte": "lymphocyte", "lymphocytes": "lymphocyte", "plasma cell": "lymphocyte",
    "plasma": "lymphocyte", "plasma_cell": "lymphocyte", "inflammatory": "lymphocyte",
    "til": "lymphocyte", "immune cells": "lymphocyte", "lymphoplasmacytic": "lymphocyte",
    "tumor": "tumor_cell", "tumour": "tumor_cell", "neoplastic": "tumor_cell",
    "tumor_cell": "tumor_cell", "tumor cell": "tumor_cell", "tumour cell": "tumor_cell",
    "invasive tumor": "tumor_cell", "carcinoma": "tumor_cell",
    "epithelial": "other", "macrophage": "other", "macrophage_cell": "other",
    "macrophage_nucleus": "other", "connective": "other", "dead": "other", "necrosis": "other",
}
_LYMPH_RE = re.compile(r"lymph|plasma|inflamm")
_TUMOR_RE = re.compile(r"tumou?r|neoplas|carcinom|malignan|cancer")
_NEG_RE = re.compile(r"\bnon[-_ ]?|\bnot\b|\bnormal\b|\bbenign\b")


def cell_role(name: object, mapping: Mapping[str, str] | None = None) -> str:
    """Role (``lymphocyte``, ``tumor_cell`` or ``other``) of one class name.

    ``mapping`` (lower-case name -> role) is consulted before the defaults. Unknown or
    missing names are ``other``; ``non-tumor`` and the like are never tumour.
    """
    if name is None or (isinstance(name, float) and math.isnan(name)):
        return "other"
    key = str(name).strip().lower()
    if mapping:
        low = {str(k).strip().lower(): v for k, v in mapping.items()}
        if key in low:
            return low[key]
    if key in DEFAULT_CELL_ROLE_MAP:
        return DEFAULT_CELL_ROLE_MAP[key]
    if _NEG_RE.search(key):
        return "other"
    if _LYMPH_RE.search(key):
        return "lymphocyte"
    if _TUMOR_RE.search(key):
        return "tumor_cell"
    return "other"
