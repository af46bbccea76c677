"""Tiles read from a pyramid level match tiles made from level 0 (issue 17, grid alignment).

A level-k pixel covers level-0 pixels [i * 2^k, (i + 1) * 2^k) on the pyramids tmequant and
the common scanners write; a reader that placed the tile grid half a level pixel off would
soften every tile (mean absolute difference of several grey levels). With a lossless
pyramid the only difference left is the rounding of the stored level means.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tmequant.wsi import open_slide
from tmequant.wsi.resample import read_resampled
from tmequant.wsi.write import write_pyramid_tiff

MPP0 = 0.25
# measured: 0.00 (level 1), 0.22 (level 2), 0.37 (level 3) grey levels: rounding of the means
ALIGNED_MAD = 0.6


def _texture(h: int, w: int) -> np.ndarray:
    """Sharp, non-periodic texture: a misaligned read cannot hide in flat areas."""
    rng = np.random.default_rng(7)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(small, 4, 0), 4, 1)[:h, :w]
    noise = rng.integers(-20, 21, (h, w, 3))
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    # 3,000 x 2,600: not a multiple of the level factors, so level sizes are rounded up
    p = tmp_path_factory.mktemp("align") / "pyr.tif"
    write_pyramid_tiff(p, _texture(2600, 3000), mpp_um=MPP0, downsample=2, n_levels=5,
                       compression="zlib")
    return p


def _box_mean(a: np.ndarray, f: int) -> np.ndarray:
    h, w = a.shape[0] // f * f, a.shape[1] // f * f
    return a[:h, :w].reshape(h // f, f, w // f, f, 3).astype(np.float64).mean(axis=(1, 3))


@pytest.mark.parametrize("target_um", [0.5, 1.0, 2.0, 4.0])
def test_tiles_from_a_level_match_tiles_from_level_0(pyramid: Path, target_um: float):
    tile_px = 112
    t0 = tile_px * target_um / MPP0  # tile side in level-0 px
    with open_slide(pyramid) as s:
        level = s.best_level_for_mpp(target_um)
        assert level > 0  # the read really comes from a coarser level
        mads = []
        for c, r in [(0, 0), (1, 2), (2, 1)]:
            box = (c * t0, r * t0, (c + 1) * t0, (r + 1) * t0)
            if box[2] > 3000 or box[3] > 2600:
                continue
            from_level = read_resampled(s, level, box, (tile_px, tile_px)).astype(np.float64)
            from_l0 = read_resampled(s, 0, box, (tile_px, tile_px)).astype(np.float64)
            mads.append(np.abs(from_level - from_l0).mean())
        assert mads and max(mads) <= ALIGNED_MAD, (level, mads)


def test_half_a_level_pixel_off_would_be_seen(pyramid: Path):
    """The tolerance above is tight enough to catch the defect it guards against."""
    with open_slide(pyramid) as s:
        level = s.best_level_for_mpp(2.0)
        ds = int(s.info.level_downsamples[level])
        t0 = 112 * 2.0 / MPP0
        box = (t0, t0, 2 * t0, 2 * t0)
        good = read_resampled(s, 0, box, (112, 112)).astype(np.float64)
        shifted = (box[0] + ds / 2, box[1] + ds / 2, box[2] + ds / 2, box[3] + ds / 2)
        off = read_resampled(s, 0, shifted, (112, 112)).astype(np.float64)
        assert np.abs(off - good).mean() > 5 * ALIGNED_MAD
        # and the level-0 box mean is what the tile holds (the reference itself is right)
        with_level0 = s.read_region((int(t0), int(t0)), 0, (int(t0), int(t0)))
        ref = _box_mean(with_level0, int(t0) // 112)
        assert np.abs(ref - good).mean() <= ALIGNED_MAD
