"""Parameters of the biomarker aggregators (defaults of docs/biomarkers.md).

Every threshold is a field here; results carry all of them and their ``params_hash``, so
two results are comparable only when their hashes match.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


def _p(default: Any, lo: float | None = None, hi: float | None = None, doc: str = "") -> Any:
    """A dataclass field with an allowed closed range [lo, hi] kept in its metadata."""
    return field(default=default, metadata={"min": lo, "max": hi, "doc": doc})


@dataclass(frozen=True)
class BiomarkerParams:
    """Thresholds and sizes of docs/biomarkers.md; lengths in um, areas in um^2 / mm^2."""

    # compartments (TIGER: closing/opening disk 1,000 um for resections, 500 um for biopsies)
    bulk_close_um: float = _p(1000.0, 0, 1e5, "diameter of the disk closing then opening the tumour mask")
    bulk_min_area_mm2: float = _p(1.5, 0, 1e4, "tumour-bulk objects smaller than this are dropped")
    margin_um: float = _p(500.0, 0, 1e5, "half-width of the invasive-margin band around the bulk border")
    # TILs
    til_area_um2: float = _p(64.0, 1e-6, 1e4, "area counted per lymphocyte in the sTIL score (8 x 8 um)")
    til_positive_per_mm2: float = _p(800.0, 0, 1e7, "tile is TIL-positive at or above this density")
    # co-localisation
    mh_cell_um: float = _p(100.0, 1e-3, 1e5, "side of the Morisita-Horn squares")
    # immune phenotype
    phenotype_region_mm2: float = _p(1.0, 1e-6, 1e4, "area of one phenotype region")
    phenotype_min_tumor_fraction: float = _p(0.1, 0, 1, "regions with less tumour are not scored")
    inflamed_it_per_mm2: float = _p(130.0, 0, 1e7, "intratumoural TIL density of an inflamed region")
    excluded_st_per_mm2: float = _p(260.0, 0, 1e7, "stromal TIL density of an excluded region")
    phenotype_fraction: float = _p(1.0 / 3.0, 0, 1, "share of regions that labels the slide")
    # tertiary lymphoid structures
    tls_prob: float = _p(0.5, 0, 1, "immune-role probability of a TLS tile")
    tls_min_density_per_mm2: float = _p(3000.0, 0, 1e7, "lymphocyte density of a TLS tile")
    tls_min_area_um2: float = _p(6000.0, 0, 1e10, "smallest TLS")
    tls_max_distance_um: float = _p(1000.0, 0, 1e6, "largest gap between a TLS and the tumour bulk")
    # counts when there are neither cells nor a count head nor a nucleus counter
    area_estimate_per_mm2: float = _p(6000.0, 0, 1e7, "lymphocytes per mm^2 of immune-role tissue")
    # epithelium / stroma below tile resolution from a cell table's tumour cells (cellular.py).
    # 16 um ~ 1-2 nuclei; sigma 24 um ~ 2 nucleus spacings, so each pixel's share rests on ~10
    # nuclei yet stays below the width of thin nests and septa (~50-100 um); majority share;
    # the prior adds 10 non-tumour nuclei per mm^2 to the share's denominator: < 2% of the
    # non-lymphocyte nuclei of stroma (~640 per mm^2 on the histolytics HGSC slide) and < 1% of
    # nests (~1,400), so it only matters where there are almost no nuclei (the far tail of a
    # lone tumour cell in empty tissue). Larger priors shrink nests at their borders.
    cell_compartments: bool = _p(True, None, None, "refine epithelium/stroma with the cell table's tumour cells")
    cell_compartment_um: float = _p(16.0, 1, 1e4, "fine pixel of the cell-resolution compartments")
    cell_sigma_um: float = _p(24.0, 0, 1e4, "Gaussian sigma smoothing the nucleus counts")
    cell_tumor_share: float = _p(0.5, 0, 1, "epithelium: tumour share of non-lymphocyte nuclei at least")
    cell_share_prior_per_mm2: float = _p(10.0, 0, 1e7, "non-tumour nuclei per mm^2 added to the share's denominator")

    def __post_init__(self) -> None:
        for name, value in self.as_dict().items():
            check_range(type(self), name, value)

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def check_range(cls: type, name: str, value: Any) -> None:
    """Raise ValueError naming ``name`` when ``value`` is outside the field's [min, max]."""
    meta: Mapping[str, Any] = {f.name: f.metadata for f in fields(cls)}.get(name, {})
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if lo is not None or hi is not None:
            raise ValueError(f"{name} = {value!r}: expected a number")
        return
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: must be finite")
    if lo is not None and value < lo:
        raise ValueError(f"{name} = {value!r}: must be >= {lo}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} = {value!r}: must be <= {hi}")
