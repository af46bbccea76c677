"""DCT-domain scaled decoding of JPEG slide tiles against full decode + box average (issue 17)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path

from tmequant.store import SlideStore
from tmequant.tiling import TilingParams, tile_slide
from tmequant.tiling.tile import hashed_params
from tmequant.wsi import open_slide
from tmequant.wsi.resample import read_resampled
from tmequant.wsi.write import write_pyramid_tiff

# measured: mean |diff| 1.03 (x2) and 0.6 (x4) grey levels on a noisy synthetic 4:2:0 pyramid,
# 0.3 on the Aperio CMU slide (rounding at 8 x 8 block edges, chroma upsampling); the
# colour-space mistake this guards against (RGB JPEG decoded as YCbCr) gives ~50
MAD_MAX = 1.5


def _he_like(h: int, w: int) -> np.ndarray:
    """Smooth pink/purple blobs with fine texture: JPEG-compressible like tissue."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([200 + 40 * np.sin(xx / 37.0) * np.cos(yy / 23.0),
                     120 + 60 * np.sin(xx / 19.0 + yy / 41.0),
                     190 + 30 * np.cos(yy / 29.0)], axis=-1)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def jpeg_pyramid(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("dct") / "he.svs"
    write_pyramid_tiff(p, _he_like(2048, 2560), mpp_um=0.25, tile_px=256, quality=90,
                       downsample=2, n_levels=3)
    return p


@pytest.mark.parametrize("factor", [2, 4])
def test_scaled_decode_matches_the_box_average(jpeg_pyramid: Path, factor: int):
    with open_slide(jpeg_pyramid) as s:
        loc, size = (512, 768), (1024, 768)  # level-0 px, on the 4-px grid, inside level 0
        scaled = s.read_region_scaled(loc, 0, size, factor)
        assert scaled is not None and scaled.shape == (768 // factor, 1024 // factor, 3)
        full = s.read_region(loc, 0, size).astype(np.float64)
        h, w = full.shape[0] // factor, full.shape[1] // factor
        box = full.reshape(h, factor, w, factor, 3).mean(axis=(1, 3))
        diff = np.abs(scaled.astype(np.float64) - box)
        assert diff.mean() <= MAD_MAX, diff.mean()
        assert np.percentile(diff, 99) <= 8


def test_read_resampled_uses_it_only_when_asked(jpeg_pyramid: Path):
    with open_slide(jpeg_pyramid) as s:
        box = (448.0, 896.0, 448.0 + 896, 896.0 + 896)  # 224 px tiles at 0.5 um/px
        plain = read_resampled(s, 0, box, (448, 448))
        fast = read_resampled(s, 0, box, (448, 448), dct_scaled=True)
        assert plain.shape == fast.shape
        assert not np.array_equal(plain, fast)  # really another decoder
        assert np.abs(plain.astype(float) - fast).mean() <= MAD_MAX


def test_where_it_cannot_be_exact_it_declines(jpeg_pyramid: Path, tmp_path: Path):
    with open_slide(jpeg_pyramid) as s:
        assert s.read_region_scaled((513, 768), 0, (512, 512), 2) is None  # off the 2-px grid
        assert s.read_region_scaled((0, 0), 0, (512, 512), 3) is None  # not a DCT scale
        assert s.read_region_scaled((2048, 0), 0, (1024, 512), 2) is None  # runs off the slide
    lossless = tmp_path / "z.tif"
    write_pyramid_tiff(lossless, _he_like(512, 512), mpp_um=0.25, compression="zlib", n_levels=1)
    with open_slide(lossless) as s:
        assert s.read_region_scaled((0, 0), 0, (512, 512), 2) is None  # not JPEG


def test_aperio_rgb_jpeg_keeps_its_colours():
    """Aperio stores Photometric=RGB JPEG without a marker: decoded as YCbCr it turns green."""
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    with open_slide(svs) as s:
        loc, size = (480, 960), (960, 960)  # on the 240-px JPEG tiles' 2-px grid
        scaled = s.read_region_scaled(loc, 0, size, 2)
        assert scaled is not None
        full = s.read_region(loc, 0, size).astype(np.float64)
        box = full.reshape(480, 2, 480, 2, 3).mean(axis=(1, 3))
        assert np.abs(scaled - box).mean() <= MAD_MAX
        assert s.read_region_scaled(loc, 0, size, 4) is None  # 240 is not a multiple of 32


def test_tiling_with_dct_scaling_is_its_own_store(jpeg_pyramid: Path, tmp_path: Path):
    plain = tile_slide(jpeg_pyramid, tmp_path / "a", TilingParams(), progress=False)
    fast = tile_slide(jpeg_pyramid, tmp_path / "b", TilingParams(jpeg_dct_scaling=True),
                      progress=False)
    a, b = SlideStore(plain.store_path), SlideStore(fast.store_path)
    assert a.n_tiles == b.n_tiles > 0 and np.array_equal(a.coords, b.coords)
    diff = np.abs(a.images[:].astype(float) - b.images[:])
    assert diff.mean() <= MAD_MAX
    # other pixels, other params hash: neither store is ever taken for the other
    assert a.params_hash != b.params_hash
    # while the default keeps the hash of stores made before the option existed (the field
    # is left out of it at its default)
    assert "jpeg_dct_scaling" not in hashed_params(TilingParams())
    assert hashed_params(TilingParams(jpeg_dct_scaling=True))["jpeg_dct_scaling"] is True
