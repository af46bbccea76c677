"""Whole-slide images: open (OpenSlide, tifffile), resolve pixel size, detect tissue, write.

>>> from tmequant.wsi import open_slide                       # doctest: +SKIP
>>> with open_slide("slide.svs", mpp_override_um=None) as s:  # doctest: +SKIP
...     s.info.mpp_um, s.info.mpp_source, s.read_thumbnail(8.0).shape
"""

from tmequant.wsi.resample import read_resampled
from tmequant.wsi.slide import (
    MPP_MAX_UM,
    MPP_MIN_UM,
    MPP_SOURCES,
    Slide,
    SlideInfo,
    open_slide,
    resolve_mpp,
)
from tmequant.wsi.tissue import TissueParams, detect_tissue, tissue_fraction_of_boxes
from tmequant.wsi.write import write_pyramid_tiff

__all__ = [
    "MPP_MAX_UM", "MPP_MIN_UM", "MPP_SOURCES", "Slide", "SlideInfo", "TissueParams",
    "detect_tissue", "open_slide", "read_resampled", "resolve_mpp", "tissue_fraction_of_boxes",
    "write_pyramid_tiff",
]
