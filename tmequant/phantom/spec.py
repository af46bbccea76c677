"""Phantom slide specification: the knobs of a known-truth synthetic H&E slide.

All lengths are in um, densities in cells/mm^2, so a spec means the same tissue at
0.25 and 0.5 um/px. ``scenario_spec`` gives presets whose truth lands clearly on one
immune phenotype under the default ``BiomarkerParams`` (docs/biomarkers.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: Tissue classes of the phantom label map: id -> (name, role). Names follow NCT-CRC-HE-100K.
TISSUE_CLASSES: tuple[tuple[str, str], ...] = (
    ("BACK", "background"),
    ("TUM", "tumor"),
    ("STR", "stroma"),
    ("LYM", "immune"),
    ("NEC", "necrosis"),
    ("ADI", "other_tissue"),
)
CLASS_NAMES: tuple[str, ...] = tuple(n for n, _ in TISSUE_CLASSES)
CLASS_ROLES: dict[str, str] = dict(TISSUE_CLASSES)
BACK, TUM, STR, LYM, NEC, ADI = range(len(TISSUE_CLASSES))
#: Cell classes of the truth cell table (the biomarkers module's cell roles).
CELL_CLASSES: tuple[str, ...] = ("lymphocyte", "tumor_cell", "other")

SCENARIOS: tuple[str, ...] = ("inflamed", "excluded", "desert", "custom")
MPPS_UM: tuple[float, ...] = (0.25, 0.5)


@dataclass(frozen=True)
class PhantomSpec:
    """A phantom slide: size, pixel size, seed, and the tissue layout in um.

    The tumour region is a lobulated ellipse (semi-axes ``tumor_radii_um``, centred at
    ``tumor_center_frac`` of the slide) whose inside is split into tumour nests (share
    ``nest_fraction``, blob scale ``nest_scale_um``) and intratumoural stroma; the rest of
    the tissue is stroma, with a fat lobule, a necrotic focus inside the tumour, and
    ``n_tls`` round lymphoid aggregates (TLS) of radius ``tls_radius_um`` whose centres lie
    ``tls_distance_um`` (min, max) outside the tumour border. Densities are Poisson
    intensities of the truth cell table, in cells/mm^2 of each compartment.
    """

    name: str = "phantom"
    width_px: int = 12000
    height_px: int = 10000
    mpp_um: float = 0.5
    seed: int = 0
    scenario: str = "custom"
    # tumour region and nests
    tumor_center_frac: tuple[float, float] = (0.47, 0.5)  # (x, y) fraction of the slide
    tumor_radii_um: tuple[float, float] = (1700.0, 1400.0)  # (x, y) semi-axes
    tumor_lobulation: float = 0.10  # relative amplitude of the border's lobes
    nest_fraction: float = 0.6  # share of the tumour region that is tumour epithelium
    nest_scale_um: float = 90.0  # smoothing scale of the nest pattern (nests ~3-5x wider)
    tumor_cell_spacing_um: float = 15.0  # mean distance between tumour-cell centres
    # lymphocytes (cells/mm^2)
    lymph_nest_per_mm2: float = 400.0  # intra-epithelial, inside nests
    lymph_stroma_per_mm2: float = 600.0  # stroma inside the tumour region
    lymph_outer_stroma_per_mm2: float = 150.0  # stroma outside the tumour region
    lymph_necrosis_per_mm2: float = 50.0
    lymph_fat_per_mm2: float = 10.0
    fibroblast_per_mm2: float = 1500.0  # spindle cells in all stroma ("other")
    # tertiary lymphoid structures
    n_tls: int = 3
    tls_radius_um: float = 140.0
    tls_lymph_per_mm2: float = 16000.0
    tls_distance_um: tuple[float, float] = (250.0, 600.0)  # centre to tumour border, outside
    # other tissue
    necrosis_fraction: float = 0.04  # share of the tumour region that is necrotic
    fat_area_mm2: float = 1.2
    background_margin_um: float = 250.0  # glass between the slide edge and the tissue
    label_um: float = 4.0  # resolution of the truth label map (divides the 112 um grid)

    def __post_init__(self) -> None:
        if self.mpp_um not in MPPS_UM:
            raise ValueError(f"mpp_um must be one of {MPPS_UM}, got {self.mpp_um!r}")
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        if self.width_px < 256 or self.height_px < 256:
            raise ValueError("width_px and height_px must be >= 256")
        if not 0 < self.nest_fraction < 1:
            raise ValueError("nest_fraction must be in (0, 1)")
        if self.n_tls < 0:
            raise ValueError("n_tls must be >= 0")
        ratio = self.label_um / self.mpp_um
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError("label_um must be a whole number of pixels")

    @property
    def width_um(self) -> float:
        return self.width_px * self.mpp_um

    @property
    def height_um(self) -> float:
        return self.height_px * self.mpp_um

    @property
    def label_downsample(self) -> int:
        """Level-0 pixels per label-map pixel."""
        return round(self.label_um / self.mpp_um)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **kw: Any) -> PhantomSpec:
        return dataclasses.replace(self, **kw)


#: Scenario presets (densities in cells/mm^2). Chosen with wide margins around the default
#: thresholds (inflamed: intratumoural >= 130; excluded: stromal >= 260), because tiles that
#: straddle a nest border mix the two compartments' densities.
_SCENARIOS: dict[str, dict[str, Any]] = {
    "inflamed": {"lymph_nest_per_mm2": 450.0, "lymph_stroma_per_mm2": 700.0,
                     "lymph_outer_stroma_per_mm2": 250.0, "n_tls": 3},
    "excluded": {"lymph_nest_per_mm2": 15.0, "lymph_stroma_per_mm2": 600.0,
                     "lymph_outer_stroma_per_mm2": 300.0, "n_tls": 2},
    "desert": {"lymph_nest_per_mm2": 10.0, "lymph_stroma_per_mm2": 40.0,
                   "lymph_outer_stroma_per_mm2": 30.0, "n_tls": 0},
}


def scenario_spec(name: str, seed: int = 0, width_px: int | None = None,
                  height_px: int | None = None, mpp_um: float = 0.5, **overrides: Any) -> PhantomSpec:
    """Preset ``PhantomSpec`` for ``inflamed``, ``excluded`` or ``desert``.

    ``width_px``/``height_px`` default to 6 x 5 mm at ``mpp_um``; the tumour region scales
    with the slide (semi-axes 28% of each side) so any size keeps the same layout.
    ``overrides`` are any other ``PhantomSpec`` fields.
    """
    if name not in _SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {tuple(_SCENARIOS)}")
    w = int(width_px if width_px is not None else round(6000 / mpp_um))
    h = int(height_px if height_px is not None else round(5000 / mpp_um))
    kw: dict[str, Any] = {"name": f"phantom-{name}-s{seed}", "width_px": w, "height_px": h, "mpp_um": mpp_um,
                              "seed": seed, "scenario": name,
                              "tumor_radii_um": (0.283 * w * mpp_um, 0.28 * h * mpp_um)}
    kw.update(_SCENARIOS[name])
    kw.update(overrides)
    return PhantomSpec(**kw)


__all__ = [
    "ADI",
    "BACK",
    "CELL_CLASSES",
    "CLASS_NAMES",
    "CLASS_ROLES",
    "LYM",
    "NEC",
    "SCENARIOS",
    "STR",
    "TISSUE_CLASSES",
    "TUM",
    "PhantomSpec",
    "scenario_spec",
]
