"""Reports: pictures (PNG), the cohort table (CSV + Parquet) and the self-contained HTML report.

>>> from tmequant.report import SlideOutcome, write_cohort_report  # doctest: +SKIP
"""

from tmequant.report.cohort import (
    CohortOutputs,
    SlideOutcome,
    cohort_density_vmax,
    write_cohort_report,
    write_tls_table,
)
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
    "FIGURES",
    "PROVENANCE_COLUMNS",
    "ROLE_COLORS",
    "CohortOutputs",
    "SlideGeometry",
    "SlideOutcome",
    "SlideSection",
    "class_colors",
    "cohort_density_vmax",
    "cohort_frame",
    "column_kind",
    "flatten_row",
    "format_value",
    "grid_raster",
    "nice_scale_bar_mm",
    "plot_compartments",
    "plot_lymphocyte_density",
    "plot_thumbnail",
    "plot_tissue_classes",
    "read_cohort_table",
    "render_html_report",
    "slide_figures",
    "slide_section",
    "write_cohort_report",
    "write_cohort_table",
    "write_html_report",
    "write_tls_table",
]
