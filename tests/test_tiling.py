"""Tiling slides into zarr slide stores: exact tile sets, pixels, resume, CLI."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openslide
import pytest
import zarr
from conftest import shared_path
from PIL import Image

from tmequant.cli import main
from tmequant.errors import StoreError
from tmequant.inputs import SlideSpec
from tmequant.tiling import SlideStore, TilingParams, plan_grid, store_is_complete, tile_slide
from tmequant.wsi import write_pyramid_tiff

PINK = (200, 90, 160)
PURPLE = (120, 60, 170)
BG = (240, 238, 242)
T0 = 448  # level-0 px of a 224-px tile at 0.5 um/px on a 0.25 um/px slide
# tissue rectangles in grid cells (rows r0:r1, cols c0:c1) -> the exact expected tile set
RECTS = [((1, 3), (1, 4), PINK), ((3, 5), (5, 6), PURPLE)]
EXPECTED = {(r, c) for (r0, r1), (c0, c1), _ in RECTS for r in range(r0, r1) for c in range(c0, c1)}
SUFFIX = {"svs": ".svs", "tiff": ".tif", "ome": ".ome.tiff"}

STORE_ATTRS = [
    "schema_version", "slide_id", "source_path", "source_size_bytes", "source_fingerprint",
    "reader", "vendor", "level0_width_px", "level0_height_px", "slide_mpp_um", "mpp_source",
    "target_mpp_um", "tile_px", "tile_um", "tile_level0_px", "read_level", "tissue",
    "min_tissue_fraction", "tiling_params", "params_hash", "package_version", "n_tiles", "complete",
]


def _grid_image(n_rows: int = 6, n_cols: int = 8, extra: int = 150) -> np.ndarray:
    img = np.empty((n_rows * T0 + extra, n_cols * T0 + extra, 3), np.uint8)
    img[:] = BG
    for (r0, r1), (c0, c1), col in RECTS:
        img[r0 * T0 : r1 * T0, c0 * T0 : c1 * T0] = col
    return img


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("slides")
    img = _grid_image()
    return {f: write_pyramid_tiff(d / f"synth_{f}{SUFFIX[f]}", img, 0.25, flavor=f, quality=95)
            for f in ("svs", "tiff", "ome")}


@pytest.mark.parametrize("flavor", ["svs", "tiff", "ome"])
def test_exact_tile_set_and_attrs(synth, tmp_path, flavor):
    res = tile_slide(synth[flavor], tmp_path, TilingParams(), progress=False, workers=2)
    assert not res.reused and res.n_tiles == len(EXPECTED)
    s = SlideStore(res.store_path)
    assert set(map(tuple, s.grid.tolist())) == EXPECTED
    assert s.attrs["tile_level0_px"] == pytest.approx(448.0)  # 0.25 um/px slide, 0.5 target
    assert np.array_equal(s.coords, s.grid[:, ::-1].astype(np.int64) * T0)
    assert all(k in s.attrs for k in STORE_ATTRS), set(STORE_ATTRS) - set(s.attrs)
    assert s.attrs["complete"] is True and s.attrs["n_tiles"] == len(EXPECTED)
    assert s.attrs["mpp_source"] == {"svs": "vendor", "tiff": "tiff-resolution", "ome": "ome"}[flavor]
    assert s.tile_um == pytest.approx(112.0) and s.attrs["read_level"] == 0
    assert np.all(s.tissue_fraction >= 0.9)  # mask edges: one JPEG-blurred mask pixel at most
    # row-major order, and each tile is the colour of its rectangle
    key = s.grid[:, 0] * 1000 + s.grid[:, 1]
    assert np.all(np.diff(key) > 0)
    imgs = s.images[...]
    assert imgs.shape == (len(EXPECTED), 224, 224, 3)
    for (r, c), tile in zip(s.grid.tolist(), imgs):
        want = PURPLE if c >= 5 else PINK
        assert np.abs(tile.astype(int) - want).mean() < 2
    assert s.tissue_mask.shape == s.thumbnail.shape[:2]
    assert s.mask_downsample == pytest.approx(32.0)
    assert Path(res.qc_png).is_file() and Image.open(res.qc_png).size[::-1] == s.tissue_mask.shape


def test_tiles_match_direct_openslide_read(synth, tmp_path):
    """A tile is the 2x2 area mean of the level-0 region it covers (read directly)."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (3 * T0, 3 * T0, 3), dtype=np.uint8)
    img[:, :, 1] //= 3  # saturated enough to count as tissue everywhere
    p = write_pyramid_tiff(tmp_path / "noise.tif", img, 0.25, flavor="tiff", compression="zlib")
    res = tile_slide(p, tmp_path / "out", progress=False)
    s = SlideStore(res.store_path)
    assert res.n_tiles == 9
    with openslide.OpenSlide(str(p)) as osr:
        for i in (0, 4, 8):
            x, y = s.coords[i].tolist()
            ref = np.asarray(osr.read_region((x, y), 0, (T0, T0)).convert("RGB")).astype(np.float64)
            ref = ref.reshape(224, 2, 224, 2, 3).mean(axis=(1, 3))
            assert np.abs(s.images[i].astype(np.float64) - ref).max() <= 1.0


def test_real_slides(tmp_path):
    cmu = shared_path("slides", "CMU-1-Small-Region.svs")
    res = tile_slide(cmu, tmp_path, progress=False)
    s = SlideStore(res.store_path)
    assert s.attrs["mpp_source"] == "vendor" and s.slide_mpp_um == pytest.approx(0.499, abs=1e-3)
    assert s.tile_level0_px == pytest.approx(112.0 / 0.499)
    # partial edge tiles too: 2220 / 224.45 -> 10 columns, 2967 / 224.45 -> 14 rows
    assert s.grid[:, 1].max() <= 9 and s.grid[:, 0].max() == 13
    assert 20 < s.n_tiles <= 10 * 14
    t = s.tile_level0_px
    # a partial edge tile: glass beyond the slide, its tissue fraction at most its share on it
    edge = int(np.flatnonzero(s.grid[:, 0] == 13)[0])
    on_rows = round((2967 - 13 * t) / t * 224)
    assert (s.images[edge][on_rows + 1:] == 255).all()
    assert s.tissue_fraction[edge] <= (2967 - 13 * t) / t + 1e-6
    whole = [i for i in range(s.n_tiles) if (s.grid[i, 0] + 1) * t <= 2967 and (s.grid[i, 1] + 1) * t <= 2220]
    with openslide.OpenSlide(str(cmu)) as osr:  # pixels against a direct read + resize
        for i in (whole[0], whole[len(whole) // 2], whole[-1]):
            r, c = s.grid[i].tolist()
            box = (c * t, r * t, (c + 1) * t, (r + 1) * t)
            x0, y0 = int(box[0]), int(box[1])
            reg = osr.read_region((x0 - 4, y0 - 4), 0, (int(t) + 10, int(t) + 10)).convert("RGB")
            rel = (box[0] - x0 + 4, box[1] - y0 + 4, box[2] - x0 + 4, box[3] - y0 + 4)
            # same geometry and area filter from an independent read: equal up to rounding
            ref = np.asarray(reg.resize((224, 224), Image.Resampling.BOX, box=rel)).astype(int)
            assert np.abs(s.images[i].astype(int) - ref).max() <= 1
            # and close to a Lanczos resize (a different filter, so only on average)
            lz = np.asarray(reg.resize((224, 224), Image.Resampling.LANCZOS, box=rel)).astype(int)
            assert np.abs(s.images[i].astype(int) - lz).mean() < 8

    tcga = shared_path("slides", "TCGA-CR-7395-01A-01-TS1.svs")
    out = tmp_path / "cli"
    assert main(["-q", "tile", str(tcga), "--out", str(out)]) == 1
    assert not (out / "TCGA-CR-7395-01A-01-TS1.zarr").exists()
    assert "--mpp-override" in (out / "failures.csv").read_text()
    assert main(["-q", "tile", str(tcga), "--out", str(out), "--mpp-override", "0.5"]) == 0
    s = SlideStore(out / "TCGA-CR-7395-01A-01-TS1.zarr")
    assert s.attrs["mpp_source"] == "override" and s.slide_mpp_um == 0.5
    assert s.tile_level0_px == pytest.approx(224.0) and s.n_tiles > 100
    assert s.images[0].std() > 5


def test_rerun_params_overwrite_unfinished(synth, tmp_path):
    p = synth["svs"]
    a = tile_slide(p, tmp_path, progress=False)
    mtime = os.stat(Path(a.store_path) / "zarr.json").st_mtime_ns
    b = tile_slide(p, tmp_path, progress=False)
    assert b.reused and b.n_tiles == a.n_tiles
    assert os.stat(Path(a.store_path) / "zarr.json").st_mtime_ns == mtime  # nothing written
    with pytest.raises(StoreError, match="overwrite"):
        tile_slide(p, tmp_path, TilingParams(tile_px=256), progress=False)
    c = tile_slide(p, tmp_path, TilingParams(tile_px=256), progress=False, overwrite=True)
    assert not c.reused and SlideStore(c.store_path).tile_px == 256
    # an unfinished store is never reused
    root = zarr.open_group(c.store_path, mode="r+")
    del root.attrs["complete"]
    assert not store_is_complete(c.store_path)
    with pytest.raises(StoreError, match="unfinished"):
        SlideStore(c.store_path)
    d = tile_slide(p, tmp_path, TilingParams(tile_px=256), progress=False)
    assert not d.reused and store_is_complete(d.store_path)
    # a folder in the way that is not a store is not deleted
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.svs.zarr").mkdir()
    (tmp_path / "other" / "x.svs.zarr" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a zarr"):
        tile_slide(SlideSpec("x.svs", p), tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "x.svs.zarr" / "keep.txt").exists()


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_zero_tissue_and_memory_store(tmp_path):
    blank = np.full((1200, 1500, 3), BG, np.uint8)
    p = write_pyramid_tiff(tmp_path / "blank.svs", blank, 0.5, flavor="svs")
    handler = _ListHandler()  # the CLI's setup_logging may have switched propagation off
    logging.getLogger("tmequant").addHandler(handler)
    try:
        res = tile_slide(p, tmp_path / "out", progress=False)
    finally:
        logging.getLogger("tmequant").removeHandler(handler)
    assert res.n_tiles == 0 and any("no tissue" in m for m in handler.messages)
    s = SlideStore(res.store_path)
    assert s.images.shape == (0, 224, 224, 3) and s.coords.shape == (0, 2)
    assert not s.tissue_mask.any()
    # fsspec URL store
    res = tile_slide(p, "memory://tmequant-test", progress=False)
    assert res.store_path.startswith("memory://")
    assert SlideStore(res.store_path).n_tiles == 0


def test_plan_grid_is_pure_and_exact():
    mask = np.zeros((40, 40), bool)
    mask[0:10, 0:5] = True  # tile (0,0) half covered, at mask downsample 10 and tile 100 px
    plan = plan_grid((395, 400), 100.0, mask, 10.0, 0.5)
    assert plan.n_cols == 3 and plan.n_rows == 4  # only full tiles inside level 0
    assert plan.grid.tolist() == [[0, 0]] and plan.tissue_fraction.tolist() == [0.5]
    assert plan_grid((395, 400), 100.0, mask, 10.0, 0.51).n_tiles == 0


_KILL_SCRIPT = """
import sys, time
import tmequant.tiling.tile as tt
from tmequant.tiling import TilingParams
orig = tt._read_block
def slow(*a, **k):
    time.sleep(0.15)
    return orig(*a, **k)
tt._read_block = slow
tt.tile_slide(sys.argv[1], sys.argv[2], TilingParams(tiles_per_chunk=2, tiles_per_shard=4, block_tiles=2),
              workers=1, progress=False)
"""


@pytest.mark.slow
def test_sigkill_then_rerun_gives_identical_store(tmp_path):
    img = np.full((8 * T0, 8 * T0, 3), PINK, np.uint8)
    img[::7] = PURPLE  # texture so that tiles differ
    p = write_pyramid_tiff(tmp_path / "big.svs", img, 0.25, flavor="svs")
    params = TilingParams(tiles_per_chunk=2, tiles_per_shard=4, block_tiles=2)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(p), str(killed)])
    shard_dir = killed / "big.zarr" / "tiles" / "images" / "c"
    t_end = time.time() + 60
    while time.time() < t_end and proc.poll() is None:
        if shard_dir.exists() and len(list(shard_dir.iterdir())) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not store_is_complete(killed / "big.zarr")
    res = tile_slide(p, killed, params, progress=False)
    assert not res.reused
    ref = tile_slide(p, tmp_path / "clean", params, progress=False)
    a, b = zarr.open_group(res.store_path, mode="r"), zarr.open_group(ref.store_path, mode="r")
    assert dict(a.attrs) == dict(b.attrs)
    for name in ("tissue_mask", "thumbnail", "tiles/coords", "tiles/grid", "tiles/tissue_fraction",
                 "tiles/images"):
        assert np.array_equal(a[name][...], b[name][...]), name
    assert a["tiles/images"].shape[0] == 64


def test_cli_batch_isolation(synth, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "random.svs").write_bytes(np.random.default_rng(0).bytes(5000))
    (bad / "empty.svs").write_bytes(b"")
    (bad / "text.tif").write_text("hello")
    (bad / "folder.svs").mkdir()
    out = tmp_path / "out"
    rc = main(["-q", "tile", str(bad / "*"), str(synth["tiff"]), "--out", str(out), "--workers", "1"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for name in ("random", "empty", "text", "folder"):
        assert f"FAILED {name} [tile]" in err
    assert "1 succeeded, 4 failed" in err
    assert SlideStore(out / "synth_tiff.zarr").n_tiles == len(EXPECTED)
    # manifest with an mpp column
    man = tmp_path / "m.csv"
    man.write_text(f"slide_id,path,mpp\nviaman,{synth['svs']},0.25\n")
    assert main(["-q", "tile", str(man), "--out", str(out), "--min-tissue", "0.5"]) == 0
    s = SlideStore(out / "viaman.zarr")
    assert s.attrs["mpp_source"] == "override" and s.attrs["min_tissue_fraction"] == 0.5
