"""Slide reading, MPP resolution, tissue detection and the pyramid writer."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile
from conftest import shared_path

from tmequant.errors import SlideError
from tmequant.wsi import TissueParams, detect_tissue, open_slide, write_pyramid_tiff
from tmequant.wsi.tissue import tissue_fraction_of_boxes

PINK = (200, 90, 160)
BG = (240, 238, 242)
SUFFIX = {"svs": ".svs", "tiff": ".tif", "ome": ".ome.tiff"}
SOURCE = {"svs": "vendor", "tiff": "tiff-resolution", "ome": "ome"}


def _image(h: int = 1100, w: int = 1500) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:] = BG
    img[200:700, 300:900] = PINK
    return img


@pytest.mark.parametrize("flavor", ["svs", "tiff", "ome"])
def test_writer_flavors_open_with_mpp(tmp_path, flavor):
    img = _image()
    p = write_pyramid_tiff(tmp_path / f"s{SUFFIX[flavor]}", img, 0.25, flavor=flavor, tile_px=256)
    with tifffile.TiffFile(p) as tf:
        levels = tf.series[0].levels
        assert [lv.shape[:2] for lv in levels] == [(1100, 1500), (275, 375), (69, 94)]
        assert np.abs(levels[0].asarray().astype(int) - img).mean() < 2.0
        if flavor == "ome":
            assert tf.is_ome and 'PhysicalSizeX="0.25"' in tf.ome_metadata
    if flavor != "ome":
        with openslide.OpenSlide(str(p)) as osr:
            assert osr.properties["openslide.vendor"] == ("aperio" if flavor == "svs" else "generic-tiff")
            assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.25)
            assert osr.level_count == 3
    with open_slide(p) as s:
        assert s.info.mpp_um == pytest.approx(0.25)
        assert s.info.mpp_source == SOURCE[flavor]
        assert s.info.reader == ("tifffile" if flavor == "ome" else "openslide")
        assert s.info.level_dimensions == ((1500, 1100), (375, 275), (94, 69))
        assert s.info.level_downsamples[1] == pytest.approx(4.0)
        region = s.read_region((400, 300), 0, (100, 50))
        assert region.shape == (50, 100, 3) and region.dtype == np.uint8
        assert np.abs(region.astype(int) - PINK).mean() < 3
        lvl1 = s.read_region((400, 300), 1, (20, 10))  # level-0 coords, level-1 size
        assert np.abs(lvl1.astype(int) - PINK).mean() < 3
        outside = s.read_region((1490, 1090), 0, (20, 20))
        assert (outside[10:, :] == 255).all() and (outside[:, 10:] == 255).all()
        thumb = s.read_thumbnail(8.0)
        assert thumb.shape == (35, 47, 3)


def test_writer_callable_source_matches_array(tmp_path):
    img = _image(700, 900)
    a = write_pyramid_tiff(tmp_path / "a.tif", img, 0.5, flavor="tiff", compression="zlib")
    b = write_pyramid_tiff(tmp_path / "b.tif", lambda y, x, h, w: img[y : y + h, x : x + w], 0.5,
                           flavor="tiff", compression="zlib", shape=img.shape[:2])
    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        for la, lb in zip(ta.series[0].levels, tb.series[0].levels):
            assert np.array_equal(la.asarray(), lb.asarray())
        assert np.array_equal(ta.series[0].levels[0].asarray(), img)  # lossless round trip


@pytest.mark.parametrize("flavor", ["svs", "tiff", "ome"])
def test_missing_mpp_refused_then_override(tmp_path, flavor):
    p = write_pyramid_tiff(tmp_path / f"nompp{SUFFIX[flavor]}", _image(300, 400), None, flavor=flavor)
    with pytest.raises(SlideError) as e:
        open_slide(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg and "--mpp-override" in msg and "mpp" in msg
    with open_slide(p, mpp_override_um=0.3) as s:
        assert (s.info.mpp_um, s.info.mpp_source) == (0.3, "override")


def test_implausible_mpp(tmp_path):
    svs = write_pyramid_tiff(tmp_path / "far.svs", _image(300, 400), 50.0, flavor="svs")
    with pytest.raises(SlideError, match="outside 0.05-20"):
        open_slide(svs)
    with open_slide(svs, mpp_override_um=0.5) as s:  # an explicit override fixes it
        assert s.info.mpp_source == "override"
    # resolution tags with an implausible value (72 dpi screen image) are never used, and the
    # error names the value (it read "has no pixel size": issue 16)
    tif = write_pyramid_tiff(tmp_path / "dpi.tif", _image(300, 400), 25400 / 72, flavor="tiff")
    with pytest.raises(SlideError, match=r"pixel size 352.8 um/px \(tiff-resolution\) is outside"):
        open_slide(tif)
    with pytest.raises(SlideError, match="override"):
        open_slide(svs, mpp_override_um=100.0)


def _bad_files(tmp_path):
    real = shared_path("slides", "CMU-1-Small-Region.svs").read_bytes()
    (tmp_path / "trunc_head.svs").write_bytes(real[:50_000])
    (tmp_path / "random.svs").write_bytes(np.random.default_rng(0).bytes(20_000))
    (tmp_path / "empty.svs").write_bytes(b"")
    (tmp_path / "text.tif").write_text("not a slide\n")
    (tmp_path / "folder.svs").mkdir()
    return ["trunc_head.svs", "random.svs", "empty.svs", "text.tif", "folder.svs"]


def test_bad_files_one_line_errors(tmp_path):
    for name in _bad_files(tmp_path):
        with pytest.raises(SlideError) as e:
            open_slide(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)


def test_truncated_tail_fails_on_read(tmp_path):
    """A slide cut after its header opens but its missing tiles are a SlideError, not a crash."""
    src = write_pyramid_tiff(tmp_path / "full.svs", np.random.default_rng(1).integers(
        0, 255, (1024, 1024, 3), dtype=np.uint8), 0.5, flavor="svs")
    data = src.read_bytes()
    cut = tmp_path / "cut.svs"
    # levels are written finest first: keep the header of IFD 0 and cut into its tiles
    with tifffile.TiffFile(src) as tf:
        first_tile_end = int(tf.pages[0].dataoffsets[0]) + int(tf.pages[0].databytecounts[0])
    cut.write_bytes(data[: first_tile_end + 1000])
    try:
        s = open_slide(cut)
    except SlideError as e:
        assert "\n" not in str(e)
        return
    with s, pytest.raises(SlideError) as e:
        s.read_region((0, 0), 0, (1024, 1024))
    assert "\n" not in str(e.value)


def test_real_slides():
    cmu = shared_path("slides", "CMU-1-Small-Region.svs")
    with open_slide(cmu) as s:
        assert s.info.vendor == "aperio" and s.info.mpp_source == "vendor"
        assert s.info.mpp_um == pytest.approx(0.499, abs=1e-3)
        assert s.info.dimensions == (2220, 2967)
        assert set(s.info.associated_images) >= {"label", "macro", "thumbnail"}
        direct = s.read_region((1000, 1200), 0, (300, 200))  # tiles decoded by tmequant
    with openslide.OpenSlide(str(cmu)) as osr:
        ref = np.asarray(osr.read_region((1000, 1200), 0, (300, 200)).convert("RGB"))
    assert np.abs(direct.astype(int) - ref).max() <= 1
    tcga = shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    with pytest.raises(SlideError, match="--mpp-override"):
        open_slide(tcga)
    with open_slide(tcga, mpp_override_um=0.5) as s:  # JPEG 2000 tiles decode
        assert s.info.level_dimensions == ((4443, 3567), (2221, 1783))
        px = s.read_region((2000, 1700), 0, (64, 64))
        assert px.std() > 5  # real tissue, not blank
    with openslide.OpenSlide(str(tcga)) as osr:
        ref = np.asarray(osr.read_region((2000, 1700), 0, (64, 64)).convert("RGB"))
    assert np.abs(px.astype(int) - ref).max() <= 1


def test_detect_tissue_units():
    mpp = 8.0
    rgb = np.full((200, 300, 3), BG, np.uint8)
    rgb[40:140, 50:200] = PINK  # 100 x 150 px = 0.96 mm^2
    rgb[80:84, 100:104] = BG  # a small hole: 16 px = 0.001 mm^2, filled
    rgb[170:172, 250:252] = PINK  # a speck: 4 px = 0.000256 mm^2, removed
    mask = detect_tissue(rgb, mpp, TissueParams(mask_mpp_um=mpp))
    expected = np.zeros((200, 300), bool)
    expected[40:140, 50:200] = True
    assert np.array_equal(mask, expected)
    # with a minimum area above the big object, nothing is left
    assert not detect_tissue(rgb, mpp, TissueParams(min_object_area_mm2=2.0)).any()
    # a blank slide has no tissue (JPEG-like noise is not thresholded into tissue)
    noise = np.random.default_rng(0).integers(-3, 4, (200, 300, 3))
    blank = (np.full((200, 300, 3), BG, int) + noise).astype(np.uint8)
    assert not detect_tissue(blank, mpp).any()


def test_tissue_fraction_of_boxes():
    mask = np.zeros((10, 10), bool)
    mask[:, :5] = True
    f = tissue_fraction_of_boxes(mask, np.array([[0, 0, 5, 5], [3, 0, 7, 4], [5, 5, 10, 10],
                                                  [8, 8, 12, 12]], float))
    assert f.tolist() == [1.0, 0.5, 0.0, 0.0]
