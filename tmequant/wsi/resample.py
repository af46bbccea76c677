"""Read a level-0 box from a slide at any output size, antialiased (area filter)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from tmequant.wsi.jpeg import SCALES

if TYPE_CHECKING:
    from tmequant.wsi.slide import Slide

_MARGIN_PX = 2  # level pixels read around the box for bicubic upscaling


def read_resampled(
    slide: Slide,
    level: int,
    box_level0: tuple[float, float, float, float],
    out_size: tuple[int, int],
    *,
    dct_scaled: bool = False,
    only: np.ndarray | None = None,
) -> np.ndarray:
    """Pixels of ``box_level0`` = (x0, y0, x1, y1) in level-0 px, read at ``level`` and
    resampled to ``out_size`` = (w, h): (h, w, 3) uint8.

    Downscaling uses an area (box) filter: the exact mean for integer ratios and area
    weights otherwise, so no aliasing; upscaling is bicubic. A region that maps 1:1 onto
    integer level pixels is sliced without resampling. The box and the output need not have
    one aspect ratio: on a slide with non-square pixels (0.25 x 0.5 um/px read at 1 um/px)
    the axes scale by different factors (4 and 2), and each axis decides (area filter when
    both shrink, bicubic, antialiased where it shrinks, when one grows). On square pixels
    the x axis decides, as it always has.

    ``dct_scaled``: an exact 2x or 4x reduction from a level of JPEG tiles is decoded at that
    scale in the DCT domain (:meth:`Slide.read_region_scaled`) instead of decoded in full and
    box-averaged; the two differ by rounding at 8 x 8 block edges (tests/test_jpeg_scaled.py).
    Without it such a reduction still goes one JPEG tile at a time where it can (decoded in
    full, then box-averaged: the same pixels as reading the region and reducing it).

    ``only``: (k, 4) boxes (x0, y0, x1, y1) in output px the caller will use; where the read
    goes one JPEG tile at a time, tiles under none of them are skipped (their pixels white).
    """
    ow, oh = int(out_size[0]), int(out_size[1])
    lds = slide.info.level_downsamples[level]
    bx0, by0, bx1, by1 = (v / lds for v in box_level0)
    if (abs(bx1 - bx0 - ow) < 1e-6 and abs(by1 - by0 - oh) < 1e-6
            and abs(bx0 - round(bx0)) < 1e-6 and abs(by0 - round(by0)) < 1e-6):
        return slide.read_region((round(round(bx0) * lds), round(round(by0) * lds)), level, (ow, oh))
    fx, fy = (bx1 - bx0) / ow, (by1 - by0) / oh
    square = _square_pixels(slide)
    # square pixels: exactly the rule (and so the pixels) of before non-square support
    down = (bx1 - bx0) >= ow if square else (fx >= 1 - 1e-9 and fy >= 1 - 1e-9)
    if (down and abs(fx - round(fx)) < 1e-9 and abs(fy - round(fy)) < 1e-9
            and (round(fx) == round(fy) or not square)
            and abs(bx0 - round(bx0)) < 1e-6 and abs(by0 - round(by0)) < 1e-6):
        # integer factor on whole pixels (0.25 -> 0.5 um/px): Pillow's reduce() is the same
        # box mean as resize(BOX) at about 40% of its cost (per axis on non-square pixels)
        f, g = int(round(fx)), int(round(fy))
        ix0, iy0 = int(round(bx0)), int(round(by0))
        if f == g:  # one JPEG tile at a time: exact, or in the DCT domain when asked
            scaled = slide.read_region_scaled((round(ix0 * lds), round(iy0 * lds)), level,
                                              (ow * f, oh * g), f, dct=dct_scaled and f in SCALES,
                                              only=only)
            if scaled is not None:
                return scaled
        region = slide.read_region((round(ix0 * lds), round(iy0 * lds)), level, (ow * f, oh * g))
        return np.asarray(Image.fromarray(region).reduce(f if f == g else (f, g)))
    # the box filter only weighs pixels inside the box; bicubic needs neighbours
    m = 0 if down else _MARGIN_PX
    ix0, iy0 = math.floor(bx0) - m, math.floor(by0) - m
    ix1, iy1 = math.ceil(bx1 - 1e-9) + m, math.ceil(by1 - 1e-9) + m
    region = slide.read_region((round(ix0 * lds), round(iy0 * lds)), level, (ix1 - ix0, iy1 - iy0))
    img = Image.fromarray(region)
    out = img.resize(
        (ow, oh),
        resample=Image.Resampling.BOX if down else Image.Resampling.BICUBIC,
        box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0),
    )
    return np.asarray(out)


def _square_pixels(slide: Slide) -> bool:
    """Whether the slide's level-0 pixels are square (unknown sizes count as square)."""
    info = slide.info
    mx, my = getattr(info, "mpp_x_um", None), getattr(info, "mpp_y_um", None)
    return mx is None or my is None or mx == my
