"""How tile pixels are stored (issue 17): ``--pixels lossless | <codec> | none``.

``none`` keeps coordinates only and predict reads the slide: its predictions must be the
stored run's, number for number. A lossy codec must round-trip through the store with its
checksums, and say in ``zarr.json`` what it is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path
from test_run_helpers import write_model, write_slides

from tmequant.cli import main
from tmequant.errors import StoreError
from tmequant.inference.engine import predict_store
from tmequant.models import load_model
from tmequant.store import IMAGES, NO_PIXELS, SlideStore
from tmequant.tiling import TilingParams, open_tiles, tile_slide
from tmequant.tiling.tile import pixels_compression


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / mse) if mse else float("inf")


def test_pixels_option_maps_to_the_store_codec():
    assert pixels_compression("lossless") == "blosc-lz4"
    assert pixels_compression("lossless", "zstd") == "zstd"
    assert pixels_compression("none") == NO_PIXELS
    assert pixels_compression("JPEG-95") == "jpeg-95"
    assert pixels_compression("jpegxl") == "jpegxl-90"  # the codec's default level
    for bad in ("png", "jpeg-101", "jpeg-x", ""):
        with pytest.raises(ValueError, match="--pixels"):
            pixels_compression(bad)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    return write_slides(tmp_path_factory.mktemp("px") / "slides")


def test_no_pixels_store_predicts_exactly_like_a_stored_one(slides, tmp_path: Path):
    model = load_model(write_model(tmp_path / "m"))
    stored = tile_slide(slides["S1"], tmp_path / "a", TilingParams(target_mpp_um=1.0, tile_px=64),
                        progress=False)
    bare = tile_slide(slides["S1"], tmp_path / "b",
                      TilingParams(target_mpp_um=1.0, tile_px=64, compression=NO_PIXELS),
                      progress=False)
    a, b = SlideStore(stored.store_path), SlideStore(bare.store_path)
    assert not (Path(bare.store_path) / IMAGES).exists() and b.stores_pixels is False
    assert b.verify() == []  # a store without pixels is whole, not damaged
    # the tiles read from the slide are the stored tiles, bit for bit
    with pytest.raises(StoreError, match="holds no pixels"):
        b.images  # noqa: B018 - the store itself has none; open_tiles reads the slide
    tiles = open_tiles(b)
    assert np.array_equal(tiles[:], a.images[:])
    idx = np.array([5, 0, 17, 3])
    assert np.array_equal(tiles.get_orthogonal_selection((idx,)), a.images[:][idx])
    assert np.array_equal(open_tiles(a)[:], a.images[:])  # a stored store: its own array
    for p in (stored.store_path, bare.store_path):
        predict_store(p, model, device="cpu", progress=False, num_workers=1)
    name = model.card.name
    assert np.array_equal(SlideStore(bare.store_path).tissue_probs(name),
                          SlideStore(stored.store_path).tissue_probs(name))


def test_detector_cells_are_the_same_without_stored_pixels(tmp_path: Path):
    """The default model (a cell detector reading neighbour tiles) on a real slide."""
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    model = load_model("brca-cells-lite0")
    runs = {}
    for comp in ("blosc-lz4", NO_PIXELS):
        r = tile_slide(svs, tmp_path / comp, TilingParams(compression=comp), progress=False)
        predict_store(r.store_path, model, device="cpu", progress=False)
        st = SlideStore(r.store_path)
        runs[comp] = (st.read_cells(model.card.name), st.tissue_probs(model.card.name))
    (ca, pa), (cb, pb) = runs["blosc-lz4"], runs[NO_PIXELS]
    assert len(ca) > 100
    assert ca.equals(cb)
    assert np.array_equal(pa, pb)


def test_a_changed_or_missing_slide_is_named(slides, tmp_path: Path, capsys):
    src = tmp_path / "S2.tif"
    shutil.copy(slides["S2"], src)
    r = tile_slide(src, tmp_path / "o", TilingParams(target_mpp_um=1.0, tile_px=64,
                                                     compression=NO_PIXELS), progress=False)
    data = bytearray(src.read_bytes())
    data[len(data) // 2] ^= 0xFF
    src.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="changed since tiling"):
        open_tiles(r.store_path)
    src.unlink()
    model = write_model(tmp_path / "m")
    rc = main(["-q", "predict", r.store_path, "--model", str(model)])
    err = capsys.readouterr().err
    assert rc != 0 and "Traceback" not in err
    assert any("S2.zarr" in ln and "cannot be read" in ln for ln in err.splitlines()), err


def test_lossy_codec_round_trips_through_the_store(tmp_path: Path):
    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    ref = tile_slide(svs, tmp_path / "ref", TilingParams(), progress=False)
    rc = main(["-q", "tile", str(svs), "--out", str(tmp_path / "jpg"), "--pixels", "jpeg-95"])
    assert rc == 0
    spath = tmp_path / "jpg" / "CMU-1-Small-Region.zarr"
    meta = json.loads((spath / IMAGES / "zarr.json").read_text())
    inner = meta["codecs"][0]["configuration"]["codecs"]
    assert inner[0] == {"name": "tmequant.image", "configuration": {"codec": "jpeg", "level": 95}}
    assert inner[-1]["name"] == "crc32c"  # checksummed like every chunk
    a, b = SlideStore(ref.store_path).images[:], SlideStore(str(spath)).images[:]
    assert a.shape == b.shape and not np.array_equal(a, b)
    assert _psnr(a, b) > 35  # measured 37.9 dB on this slide (README "Stored pixels")
    assert SlideStore(str(spath)).verify() == []
    jpg_bytes = sum(f.stat().st_size for f in (spath / IMAGES).rglob("*") if f.is_file())
    ref_bytes = sum(f.stat().st_size for f in (Path(ref.store_path) / IMAGES).rglob("*") if f.is_file())
    assert jpg_bytes < 0.5 * ref_bytes
    # a damaged tile is named, not decoded into garbage
    shard = next(p for p in (spath / IMAGES).rglob("*") if p.is_file() and p.name != "zarr.json")
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert SlideStore(str(spath)).verify()
