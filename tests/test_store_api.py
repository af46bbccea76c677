"""The slide store as one interface: writing through SlideStore, reading back, cells, errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tmequant.errors import StoreError
from tmequant.store import CELL_COLUMNS, SlideStore, store_state

N_TILES, TILE_PX = 10, 16
ROOT = Path(__file__).resolve().parents[1]


def header(n: int = N_TILES) -> dict:
    return dict(
        slide_id="syn", source_path="/nowhere/syn.svs", source_size_bytes=1,
        source_fingerprint="f", reader="tifffile", vendor="synthetic", level0_width_px=320,
        level0_height_px=32, slide_mpp_um=0.5, mpp_source="override", target_mpp_um=0.5,
        tile_px=TILE_PX, tile_um=8.0, tile_level0_px=16.0, read_level=0, tissue={},
        min_tissue_fraction=0.25, tiling_params={}, params_hash="h", package_version="0")


def make_store(path: Path, n: int = N_TILES, seed: int = 0) -> np.ndarray:
    """A finished synthetic store of ``n`` random tiles in a row; returns the tiles."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (n, TILE_PX, TILE_PX, 3), dtype=np.uint8)
    with SlideStore.open(path, "w") as st:
        st.write_header(**header(n))
        st.write_tissue(np.ones((2, 20), bool), np.full((2, 20, 3), 200, np.uint8),
                        downsample=16.0, mask_mpp_um=8.0)
        cols = np.arange(n)
        st.write_tile_grid(np.stack([cols * 16, np.zeros(n)], 1).astype(np.int64),
                           np.stack([np.zeros(n), cols], 1).astype(np.int32),
                           np.ones(n, np.float32))
        st.create_images(n, TILE_PX, tiles_per_chunk=2, tiles_per_shard=4, compression="zstd",
                         mpp_um=0.5)
        for a in range(0, n, 4):
            st.write_tiles(a, tiles[a:a + 4])
        st.mark_complete(n_tiles=n)
    return tiles


def test_written_store_reads_back(tmp_path):
    tiles = make_store(tmp_path / "s.zarr")
    s = SlideStore.open(tmp_path / "s.zarr")
    assert s.n_tiles == N_TILES and s.tile_px == TILE_PX and s.params_hash == "h"
    assert np.array_equal(s.images[...], tiles) and np.array_equal(np.asarray(s.images), tiles)
    assert s.coords[3].tolist() == [48, 0] and s.grid[3].tolist() == [0, 3]
    assert s.tissue_mask.all() and s.thumbnail.shape == (2, 20, 3) and s.mask_downsample == 16.0
    assert s.prediction_names() == [] and s.nuclei_counts() is None
    assert store_state(tmp_path / "s.zarr") == "complete"
    assert store_state(tmp_path / "nothing.zarr") == "missing"
    assert s.verify() == []


def test_header_must_be_the_documented_attributes(tmp_path):
    with SlideStore.open(tmp_path / "s.zarr", "w") as st:
        with pytest.raises(ValueError, match="missing.*slide_id"):
            st.write_header(**{k: v for k, v in header().items() if k != "slide_id"})
        with pytest.raises(ValueError, match="unknown.*colour"):
            st.write_header(**header(), colour="red")


def test_reader_cannot_write(tmp_path):
    make_store(tmp_path / "s.zarr")
    with pytest.raises(StoreError, match="read-only"):
        SlideStore(tmp_path / "s.zarr").write_nuclei_counts(np.zeros((N_TILES, 2)))


def test_predictions_chunks_flags_and_resume(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    probs = np.random.default_rng(1).random((N_TILES, 3)).astype(np.float32)
    with SlideStore.open(p, "r+") as st:
        st.create_predictions("m", N_TILES, chunk_rows=4, params_hash="ph", attrs={"card": {}},
                              n_tissue=3, n_cell=2)
        st.write_prediction_chunk("m", 1, tissue_probs=probs[4:8], cell_counts=np.ones((4, 2)))
        state = st.prediction_state("m")
        assert state is not None and state.done.tolist() == [False, True, False]
        assert not state.complete and state.params_hash == "ph" and state.chunk_rows == 4
    with pytest.raises(StoreError, match="unfinished"):
        SlideStore(p).tissue_probs("m")
    with SlideStore.open(p, "r+") as st:  # resume: the rest
        for c, (a, b) in ((0, (0, 4)), (2, (8, 10))):
            st.write_prediction_chunk("m", c, tissue_probs=probs[a:b], cell_counts=np.ones((b - a, 2)))
        st.mark_predictions_complete("m", params_hash="ph")
    s = SlideStore(p)
    assert s.prediction_names() == ["m"] and s.prediction_params_hash("m") == "ph"
    np.testing.assert_allclose(s.tissue_probs("m"), probs, atol=1e-3)  # stored as float16
    assert s.cell_counts("m").shape == (N_TILES, 2) and s.has_cell_counts("m")
    assert s.prediction_card("m") == {} and not s.has_cells("m")
    assert s.verify() == []


def _cells(chunk: int, m: int) -> dict:
    rng = np.random.default_rng(chunk)
    return dict(x=rng.random(m) * 100, y=rng.random(m) * 100, cls=rng.integers(0, 2, m),
                score=rng.random(m), tile=np.full(m, chunk, np.int32))


def test_cells_round_trip_in_chunk_order_and_resume_never_duplicates(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    with SlideStore.open(p, "r+") as st:
        st.create_predictions("det", N_TILES, chunk_rows=4, params_hash="d", attrs={},
                              n_tissue=None, cell_classes=["lymphocyte", "tumor"])
        st.write_prediction_chunk("det", 2, cells=_cells(2, 3))
        st.write_cells("det", 0, **_cells(0, 99))  # killed before its flag: redone below
    with SlideStore.open(p, "r+") as st:
        done = st.prediction_state("det").done
        for c in np.flatnonzero(~done):
            st.write_prediction_chunk("det", int(c), cells=_cells(int(c), 5 if c == 0 else 0))
        with pytest.raises(StoreError, match="unfinished"):
            st.read_cells("det")
        st.mark_predictions_complete("det")
    s = SlideStore(p)
    assert s.has_cells("det")
    df = s.read_cells("det")
    assert list(df.columns) == list(CELL_COLUMNS) and len(df) == 5 + 0 + 3
    assert df["x"].dtype == np.float64 and df["score"].dtype == np.float32
    assert df["tile"].dtype == np.int32 and df["tile"].tolist() == [0] * 5 + [2] * 3
    want = _cells(0, 5)
    np.testing.assert_array_equal(df["x"].to_numpy()[:5], want["x"])
    assert df["class"].tolist()[:5] == [["lymphocyte", "tumor"][k] for k in want["cls"]]
    assert s.verify() == []


def test_empty_cells_frame_has_the_columns(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    with SlideStore.open(p, "r+") as st:
        st.create_cells("det", ["a"], n_chunks=2, attrs={"method": "test"})
        for c in range(2):
            st.write_prediction_chunk("det", c, cells=_cells(c, 0))
        st.mark_predictions_complete("det")
    df = SlideStore(p).read_cells("det")
    assert len(df) == 0 and list(df.columns) == list(CELL_COLUMNS)
    assert isinstance(df, pd.DataFrame)


def test_bad_cells_are_refused(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    with SlideStore.open(p, "r+") as st:
        st.create_cells("det", ["a", "b"], n_chunks=1)
        with pytest.raises(ValueError, match="cls outside"):
            st.write_cells("det", 0, **{**_cells(0, 2), "cls": np.array([0, 2])})
        with pytest.raises(ValueError, match="differ in length"):
            st.write_cells("det", 0, **{**_cells(0, 2), "tile": np.zeros(3)})
        with pytest.raises(ValueError, match="chunk 1 outside"):
            st.write_cells("det", 1, **_cells(0, 1))
    with pytest.raises(StoreError, match="no predictions"):
        SlideStore(p).read_cells("other")


def test_corrupt_chunk_read_names_the_store(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    shard = p / "tiles" / "images" / "c" / "1" / "0" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF  # one flipped bit pattern inside the first inner chunk's bytes
    shard.write_bytes(bytes(data))
    s = SlideStore(p)
    assert np.asarray(s.images[:4]).shape == (4, TILE_PX, TILE_PX, 3)  # shard 0 is intact
    with pytest.raises(StoreError) as e:
        s.images[4:8]
    assert str(p) in str(e.value) and "tiles/images" in str(e.value)
    with pytest.raises(IndexError):  # the caller's own mistake is not the store's
        s.images[0, 0, 0, 0, 0]


def test_no_module_but_the_store_spells_store_keys():
    """Writers and readers go through tmequant.store: its keys appear nowhere else in code."""
    keys = re.compile(r'''["'](tiles/images|tiles/coords|tiles/grid|tiles/tissue_fraction|'''
                      r'''chunk_done|tissue_mask|nuclei|predictions/?)["'\[](?!\s*:)''')
    # (a dict key such as {"predictions": name} in a hash input is not a store key)
    found = []
    for f in sorted((ROOT / "tmequant").rglob("*.py")):
        if f.name == "store.py" and f.parent.name == "tmequant":
            continue
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if keys.search(line):
                found.append(f"{f.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)
