"""TME biomarkers: TIL density, immune exclusion and phenotype, TLS, composition.

Pure functions of a :class:`TileGrid` (and an optional cell table); definitions, units and
defaults in docs/biomarkers.md.

>>> from tmequant.biomarkers import TileGrid, compute_biomarkers    # doctest: +SKIP
>>> res = compute_biomarkers(TileGrid.from_store("out/s1.zarr", "tmequant-tissue"))  # doctest: +SKIP
>>> res.row["til_density_stromal_per_mm2"]                          # doctest: +SKIP
"""

from tmequant.biomarkers.aggregate import (
    COMPARTMENT_NAMES,
    TLS_COLUMNS,
    BiomarkerResult,
    Compartments,
    block_sums,
    compartments,
    composition,
    compute_biomarkers,
    exclusion_ratio,
    find_tls,
    immune_phenotype,
    lymphocyte_counts,
    morisita_horn,
    square_counts,
    til_density,
    til_positive_fraction,
    tile_density_per_mm2,
    tumor_bulk,
)
from tmequant.biomarkers.cells import DEFAULT_CELL_ROLE_MAP, cell_role, cell_roles, read_cell_table
from tmequant.biomarkers.cellular import CellCompartments, cell_compartments, stil_score_pct
from tmequant.biomarkers.grid import DenseGrid, TileGrid, counts_from_cells
from tmequant.biomarkers.params import BiomarkerParams
from tmequant.biomarkers.store import biomarkers_for_store

__all__ = [
    "COMPARTMENT_NAMES",
    "DEFAULT_CELL_ROLE_MAP",
    "TLS_COLUMNS",
    "BiomarkerParams",
    "BiomarkerResult",
    "CellCompartments",
    "Compartments",
    "DenseGrid",
    "TileGrid",
    "biomarkers_for_store",
    "block_sums",
    "cell_compartments",
    "cell_role",
    "cell_roles",
    "compartments",
    "composition",
    "compute_biomarkers",
    "counts_from_cells",
    "exclusion_ratio",
    "find_tls",
    "immune_phenotype",
    "lymphocyte_counts",
    "morisita_horn",
    "read_cell_table",
    "square_counts",
    "stil_score_pct",
    "til_density",
    "til_positive_fraction",
    "tile_density_per_mm2",
    "tumor_bulk",
]
