"""Whole shards of tiles/images encoded by tmequant.shards: the bytes zarr itself writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tmequant import shards
from tmequant.store import SlideStore


def _tiles(n: int, px: int = 32) -> np.ndarray:
    rng = np.random.default_rng(n)
    t = rng.integers(0, 256, (n, px, px, 3), dtype=np.uint8)
    t[:, :, : px // 2] = 200  # compressible, like glass next to tissue
    return t


def _shard_files(store: Path) -> dict[str, bytes]:
    root = store / "tiles" / "images" / "c"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _write(path: Path, tiles: np.ndarray, compression: str, per_chunk: int, *, by_zarr: bool) -> None:
    with SlideStore.open(path, "w") as st:
        st.create_images(len(tiles), tiles.shape[1], tiles_per_chunk=per_chunk, tiles_per_shard=4,
                         compression=compression, mpp_um=0.5)
        if by_zarr:  # zarr's own writer, chunk by chunk
            st._zarray("tiles/images")[:] = tiles
        else:
            for a in range(0, len(tiles), 4):
                st.write_tiles(a, tiles[a:a + 4])


@pytest.mark.parametrize("compression,per_chunk", [
    ("blosc-lz4", 2), ("zstd", 2), ("zstd-1", 4), ("none", 2), ("jpeg-95", 1), ("jpegxl-90", 1),
])
@pytest.mark.parametrize("n", [8, 11])  # whole shards; a last shard the array ends inside
def test_shard_bytes_equal_zarrs(tmp_path: Path, compression: str, per_chunk: int, n: int):
    tiles = _tiles(n)
    _write(tmp_path / "zarr.zarr", tiles, compression, per_chunk, by_zarr=True)
    _write(tmp_path / "ours.zarr", tiles, compression, per_chunk, by_zarr=False)
    ref, ours = _shard_files(tmp_path / "zarr.zarr"), _shard_files(tmp_path / "ours.zarr")
    assert len(ref) == -(-n // 4) and ref == ours
    back = SlideStore(tmp_path / "ours.zarr", require_complete=False).images[:]  # zarr reads them
    if not compression.startswith("jpeg"):
        assert np.array_equal(back, tiles)
    else:
        assert back.shape == tiles.shape and np.abs(back.astype(int) - tiles).mean() < 20


def test_a_write_that_is_not_whole_shards_goes_through_zarr(tmp_path: Path, monkeypatch):
    calls = []
    real = shards.encode_shard
    monkeypatch.setattr(shards, "encode_shard", lambda *a: calls.append(1) or real(*a))
    tiles = _tiles(8)
    with SlideStore.open(tmp_path / "s.zarr", "w") as st:
        st.create_images(8, 32, tiles_per_chunk=2, tiles_per_shard=4, compression="blosc-lz4",
                         mpp_um=0.5)
        st.write_tiles(0, tiles[:4])  # a whole shard: encoded here
        st.write_tiles(4, tiles[4:6])  # half a shard: zarr's writer
        st.write_tiles(6, tiles[6:])
        assert len(calls) == 1
        assert np.array_equal(st.images[:], tiles)


def test_unknown_codecs_are_left_to_zarr():
    from zarr.codecs import BytesCodec, Crc32cCodec, GzipCodec, ShardingCodec

    ok = ShardingCodec(chunk_shape=(2, 8, 8, 3), codecs=[BytesCodec(), Crc32cCodec()])
    assert shards.chunk_encoder(ok) is not None and shards.index_supported(ok)
    gz = ShardingCodec(chunk_shape=(2, 8, 8, 3), codecs=[BytesCodec(), GzipCodec()])
    assert shards.chunk_encoder(gz) is None
    start = ShardingCodec(chunk_shape=(2, 8, 8, 3), codecs=[BytesCodec()], index_location="start")
    assert not shards.index_supported(start)


def test_absent_chunks_past_the_array_end(tmp_path: Path):
    """A last shard the array ends inside stores no chunk past it: (2^64-1, 2^64-1) in the index."""
    tiles = _tiles(5)
    _write(tmp_path / "s.zarr", tiles, "none", 2, by_zarr=False)
    last = (tmp_path / "s.zarr" / "tiles" / "images" / "c" / "1" / "0" / "0" / "0").read_bytes()
    index = np.frombuffer(last[-(2 * 16 + 4):-4], "<u8").reshape(2, 2)
    chunk_bytes = 2 * 32 * 32 * 3 + 4  # uncompressed chunk + its crc32c
    assert index[0].tolist() == [0, chunk_bytes]  # tile 4 and a padded one
    assert (index[1] == 2**64 - 1).all()
