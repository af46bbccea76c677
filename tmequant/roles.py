"""The role vocabulary of docs/biomarkers.md.

Model cards map their own class names to these roles; every aggregator speaks only of
roles, so any model (or a caller's own predictions) drives the same biomarkers.
"""

from __future__ import annotations

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
COUNT_SOURCES: tuple[str, ...] = ("cell_table", "model", "nucleus_counter", "area_estimate")
