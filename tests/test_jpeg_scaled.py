"""Reading a 2x/4x reduction one JPEG tile at a time (issue 17): exact (full decode + box
average per tile, bit-identical to reading the region and reducing it) by default, or decoded
in the DCT domain (``dct=True``, ``--fast-decode``) against the box average."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from PIL import Image

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


def _pillow_reduce(rgb: np.ndarray, factor: int) -> np.ndarray:
    """The box mean the tiler always used: the region decoded in full, then Pillow's reduce."""
    return np.asarray(Image.fromarray(np.asarray(rgb, np.uint8)).reduce(factor))


@pytest.mark.parametrize("factor", [2, 4])
@pytest.mark.parametrize("loc", [(512, 768), (1000, 36)])  # on and off the JPEG tile grid
def test_tile_at_a_time_reduction_is_bit_identical(jpeg_pyramid: Path, factor: int, loc):
    with open_slide(jpeg_pyramid) as s:
        size = (1024, 768)
        exact = s.read_region_scaled(loc, 0, size, factor)
        assert exact is not None and exact.shape == (768 // factor, 1024 // factor, 3)
        assert np.array_equal(exact, _pillow_reduce(s.read_region(loc, 0, size), factor))
        # and read_resampled, which the tiler calls, gives those pixels
        box = (float(loc[0]), float(loc[1]), float(loc[0] + size[0]), float(loc[1] + size[1]))
        assert np.array_equal(read_resampled(s, 0, box, (1024 // factor, 768 // factor)), exact)


def test_only_the_tiles_under_kept_boxes_are_decoded(jpeg_pyramid: Path, monkeypatch):
    import imagecodecs

    calls = []
    real = imagecodecs.jpeg8_decode
    monkeypatch.setattr(imagecodecs, "jpeg8_decode", lambda *a, **k: calls.append(1) or real(*a, **k))
    with open_slide(jpeg_pyramid) as s:
        loc, size = (0, 0), (1024, 1024)  # 4 x 4 JPEG tiles of 256 px, 512 x 512 out at 1/2
        full = s.read_region_scaled(loc, 0, size, 2)
        n_all = len(calls)
        only = np.array([[0, 0, 100, 100], [300, 300, 350, 350]])  # output px
        part = s.read_region_scaled(loc, 0, size, 2, only=only)
    assert n_all == 16 and len(calls) - n_all == 2  # JPEG tiles (0, 0) and (2, 2) only
    assert part is not None and full is not None
    assert np.array_equal(part[:128, :128], full[:128, :128])
    assert np.array_equal(part[256:384, 256:384], full[256:384, 256:384])
    assert (part[:128, 128:] == 255).all()  # skipped: white, never used


@pytest.mark.parametrize("factor", [2, 4])
def test_scaled_decode_matches_the_box_average(jpeg_pyramid: Path, factor: int):
    with open_slide(jpeg_pyramid) as s:
        loc, size = (512, 768), (1024, 768)  # level-0 px, on the 4-px grid, inside level 0
        scaled = s.read_region_scaled(loc, 0, size, factor, dct=True)
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
        for dct in (False, True):
            assert s.read_region_scaled((513, 768), 0, (512, 512), 2, dct=dct) is None  # off the 2-px grid
            assert s.read_region_scaled((2048, 0), 0, (1024, 512), 2, dct=dct) is None  # off the slide
        assert s.read_region_scaled((0, 0), 0, (512, 512), 3, dct=True) is None  # not a DCT scale
        assert s.read_region_scaled((0, 0), 0, (516, 516), 3) is None  # 256-px tiles: off the 3-px grid
    lossless = tmp_path / "z.tif"
    write_pyramid_tiff(lossless, _he_like(512, 512), mpp_um=0.25, compression="zlib", n_levels=1)
    with open_slide(lossless) as s:
        assert s.read_region_scaled((0, 0), 0, (512, 512), 2) is None  # not JPEG
        assert s.read_region_scaled((0, 0), 0, (512, 512), 2, dct=True) is None


def test_aperio_rgb_jpeg_keeps_its_colours():
    """Aperio stores Photometric=RGB JPEG without a marker: decoded as YCbCr it turns green."""
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    with open_slide(svs) as s:
        loc, size = (480, 960), (960, 960)  # on the 240-px JPEG tiles' 2-px grid
        scaled = s.read_region_scaled(loc, 0, size, 2, dct=True)
        assert scaled is not None
        full = s.read_region(loc, 0, size).astype(np.float64)
        box = full.reshape(480, 2, 480, 2, 3).mean(axis=(1, 3))
        assert np.abs(scaled - box).mean() <= MAD_MAX
        assert s.read_region_scaled(loc, 0, size, 4, dct=True) is None  # 240: not a multiple of 32
        # the exact path decodes the same RGB JPEG (its own colour-space handling)
        assert np.array_equal(s.read_region_scaled(loc, 0, size, 2), _pillow_reduce(full, 2))
        assert np.array_equal(s.read_region_scaled(loc, 0, size, 4), _pillow_reduce(full, 4))


def test_tiling_stores_the_pixels_of_the_whole_region_path(jpeg_pyramid: Path, tmp_path: Path,
                                                          monkeypatch):
    """The tiler's tile-at-a-time read stores exactly what reading each region and reducing
    it stored before (stores made before it stay valid: same pixels, same params hash)."""
    fast = tile_slide(jpeg_pyramid, tmp_path / "a", TilingParams(), progress=False)
    from tmequant.wsi.slide import Slide

    monkeypatch.setattr(Slide, "read_region_scaled", lambda *a, **k: None)  # the region path
    plain = tile_slide(jpeg_pyramid, tmp_path / "b", TilingParams(), progress=False)
    a, b = SlideStore(fast.store_path), SlideStore(plain.store_path)
    assert a.n_tiles == b.n_tiles > 0 and a.params_hash == b.params_hash
    assert np.array_equal(a.images[:], b.images[:])


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
