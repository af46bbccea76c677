"""Known-truth phantom slides: synthetic H&E whose tissue, cells and biomarkers are known.

>>> from tmequant.phantom import scenario_spec, generate_phantom       # doctest: +SKIP
>>> truth = generate_phantom(scenario_spec("excluded", seed=0), "phantoms/")  # doctest: +SKIP
>>> truth.immune_phenotype, truth.tls_count                            # doctest: +SKIP
('excluded', 2)

A spec (``PhantomSpec``: size, um/px, seed, tissue layout in um, lymphocyte densities in
cells/mm^2, TLS number/size/distance) draws a tissue label map and a cell table
(``make_layout``), which are rendered as H&E-like pixels (``PhantomRenderer``) into a
pyramidal SVS. The expected biomarkers come from the construction itself
(``construction_truth``: cells drawn per compartment, areas of the layout, the TLS placed),
never from ``tmequant.biomarkers``, which they check; ``expected_biomarkers`` runs that
module on the truth (a perfect classifier and counter) for its own tests.
"""

from tmequant.phantom.generate import (
    PhantomTruth,
    generate_phantom,
    generator_key,
    load_truth,
    truth_dir_for,
)
from tmequant.phantom.layout import PhantomLayout, make_layout
from tmequant.phantom.render import PhantomRenderer
from tmequant.phantom.spec import (
    CELL_CLASSES,
    CLASS_NAMES,
    CLASS_ROLES,
    SCENARIOS,
    TISSUE_CLASSES,
    PhantomSpec,
    scenario_spec,
)
from tmequant.phantom.tiles import PhantomTile, phantom_tiles, training_specs, write_phantom_tiles
from tmequant.phantom.truth import (
    ConstructionTruth,
    class_fractions,
    construction_truth,
    expected_biomarkers,
    realised_densities,
    truth_grid,
)

__all__ = [
    "CELL_CLASSES",
    "CLASS_NAMES",
    "CLASS_ROLES",
    "SCENARIOS",
    "TISSUE_CLASSES",
    "ConstructionTruth",
    "PhantomLayout",
    "PhantomRenderer",
    "PhantomSpec",
    "PhantomTile",
    "PhantomTruth",
    "class_fractions",
    "construction_truth",
    "expected_biomarkers",
    "generate_phantom",
    "generator_key",
    "load_truth",
    "make_layout",
    "phantom_tiles",
    "realised_densities",
    "scenario_spec",
    "training_specs",
    "truth_dir_for",
    "truth_grid",
    "write_phantom_tiles",
]
