"""tmequant: H&E whole-slide images to tumour-microenvironment biomarkers.

Per-MPP tiling into a zarr store per slide, a timm tissue/cell model, and
compartment-aware TIL density, immune exclusion, immune phenotype and TLS readouts.
"""

from tmequant._version import __version__

__all__ = ["__version__"]
