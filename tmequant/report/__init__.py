"""Reports: pictures (PNG), the cohort table (CSV + Parquet) and the self-contained HTML report.

>>> from tmequant.report import write_cohort_table, write_html_report, slide_figures  # doctest: +SKIP
"""

from tmequant.report.figures import (
    ROLE_COLORS,
    SlideGeometry,
    class_colors,
    grid_raster,
    nice_scale_bar_mm,
    plot_compartments,
    plot_lymphocyte_density,
    plot_thumbnail,
    plot_tissue_classes,
)
from tmequant.report.html import SlideSection, format_value, render_html_report, write_html_report
from tmequant.report.slide import FIGURES, slide_figures, slide_section
from tmequant.report.tables import (
    PROVENANCE_COLUMNS,
    cohort_frame,
    column_kind,
    flatten_row,
    read_cohort_table,
    write_cohort_table,
)

__all__ = [
    "FIGURES", "PROVENANCE_COLUMNS", "ROLE_COLORS", "SlideGeometry", "SlideSection", "class_colors",
    "cohort_frame", "column_kind", "flatten_row", "format_value", "grid_raster", "nice_scale_bar_mm",
    "plot_compartments", "plot_lymphocyte_density", "plot_thumbnail", "plot_tissue_classes",
    "read_cohort_table", "render_html_report", "slide_figures", "slide_section", "write_cohort_table",
    "write_html_report",
]
