"""Tissue detection on a low-resolution RGB image (about 8-16 um/px).

A pixel is tissue when its colour saturation is above an Otsu threshold (floored, so a
blank slide yields no tissue rather than thresholded JPEG noise) and it is neither
near-white glass nor near-black (pen, dirt, scanner border). Then a closing, removal of
objects under ``min_object_area_mm2`` and filling of holes under ``max_hole_area_mm2``.
Every size is in um or mm^2, converted with the image's ``mpp_um`` (the image has square
pixels: ``Slide.read_thumbnail`` makes them so whatever the slide's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tmequant.pixelsize import PixelSize


@dataclass(frozen=True)
class TissueParams:
    """Tissue-detection parameters; units in the names."""

    mask_mpp_um: float = 8.0  # resolution the mask is computed (and stored) at
    method: str = "otsu"  # "otsu" or "fixed" (use min_saturation as the threshold)
    min_saturation: float = 0.07  # floor of the saturation threshold, 0-1
    max_brightness: float = 0.92  # mean RGB/255 above this is glass, whatever the saturation
    min_brightness: float = 0.08  # below this is pen/dirt/border
    closing_radius_um: float = 16.0
    min_object_area_mm2: float = 0.01
    max_hole_area_mm2: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in ("otsu", "fixed"):
            raise ValueError(f"tissue method must be 'otsu' or 'fixed', got {self.method!r}")
        if not 0.5 <= self.mask_mpp_um <= 64:
            raise ValueError("mask_mpp_um must be in 0.5-64 um/px")


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation (max - min) / max of an (h, w, 3) uint8 image, float32 in 0-1."""
    mx = rgb.max(axis=2).astype(np.float32)
    mn = rgb.min(axis=2).astype(np.float32)
    return np.where(mx > 0, (mx - mn) / np.maximum(mx, 1.0), 0.0).astype(np.float32)


def detect_tissue(rgb: np.ndarray, mpp_um: float, params: TissueParams = TissueParams()) -> np.ndarray:
    """(h, w) bool tissue mask of an (h, w, 3) uint8 RGB image at ``mpp_um`` um/px."""
    from scipy import ndimage as ndi
    from skimage import filters, morphology

    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError(f"rgb must be (h, w, 3), got {rgb.shape}")
    rgb = rgb[..., :3]
    if rgb.size == 0:
        return np.zeros(rgb.shape[:2], bool)
    sat = saturation(rgb)
    bright = rgb.mean(axis=2, dtype=np.float32) / 255.0
    valid = (bright <= params.max_brightness) & (bright >= params.min_brightness)
    thr = params.min_saturation
    if params.method == "otsu" and valid.any():
        # Otsu over every pixel, glass included: tissue vs background is the split we want
        # (over tissue pixels alone it would split two stains from each other).
        if sat.max() - sat.min() > 1e-3:
            thr = max(thr, float(filters.threshold_otsu(sat)))
    mask = valid & (sat > thr)
    px_area_mm2 = (mpp_um * 1e-3) ** 2
    r = int(round(params.closing_radius_um / mpp_um))
    if r >= 1 and mask.any():
        mask = morphology.closing(np.pad(mask, r), morphology.disk(r))[r:-r, r:-r]
    if params.max_hole_area_mm2 > 0 and mask.any():
        holes = ndi.binary_fill_holes(mask) & ~mask
        lab, n = ndi.label(holes)
        if n:
            sizes = np.bincount(lab.ravel())
            small = sizes * px_area_mm2 <= params.max_hole_area_mm2
            small[0] = False
            mask = mask | small[lab]
    if params.min_object_area_mm2 > 0 and mask.any():
        lab, n = ndi.label(mask)
        if n:
            sizes = np.bincount(lab.ravel())
            keep = sizes * px_area_mm2 >= params.min_object_area_mm2
            keep[0] = False
            mask = keep[lab]
    return mask


def tissue_fraction_of_boxes(mask: np.ndarray, boxes_mask_px: np.ndarray) -> np.ndarray:
    """Share of each box covered by ``mask``, (N,) float32 in 0-1.

    ``boxes_mask_px``: (N, 4) float x0, y0, x1, y1 in mask pixels. Box edges are rounded to
    mask pixels; the part of a box outside the mask counts as background.
    """
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int64)
    ii[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    b = np.asarray(boxes_mask_px, dtype=np.float64).reshape(-1, 4)
    x0 = np.floor(b[:, 0] + 0.5).astype(np.int64)
    y0 = np.floor(b[:, 1] + 0.5).astype(np.int64)
    x1 = np.maximum(np.floor(b[:, 2] + 0.5).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.floor(b[:, 3] + 0.5).astype(np.int64), y0 + 1)
    area = (x1 - x0) * (y1 - y0)
    cx0, cy0 = np.clip(x0, 0, w), np.clip(y0, 0, h)
    cx1, cy1 = np.clip(x1, 0, w), np.clip(y1, 0, h)
    s = ii[cy1, cx1] - ii[cy0, cx1] - ii[cy1, cx0] + ii[cy0, cx0]
    return (s / area).astype(np.float32)


def mask_shape(level0_wh: tuple[int, int], slide_mpp_um: float | PixelSize,
               mask_mpp_um: float) -> tuple[int, int]:
    """(h, w) of a mask at ``mask_mpp_um`` (square mask pixels) covering the whole level 0;
    ``slide_mpp_um``: the level-0 pixel size, one number or a PixelSize (x, y)."""
    px = slide_mpp_um if isinstance(slide_mpp_um, PixelSize) else PixelSize.square(slide_mpp_um)
    dsx, dsy = px.px(mask_mpp_um)
    return max(1, math.ceil(level0_wh[1] / dsy)), max(1, math.ceil(level0_wh[0] / dsx))
