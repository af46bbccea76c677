"""Whole shards of ``tiles/images`` encoded in one synchronous call, byte for byte as zarr writes them.

zarr-python encodes a shard chunk by chunk through asyncio, a thread hop per inner chunk:
0.5-0.7 ms of CPU per 224 px tile on the reference machine, more than the lz4 compression
itself (0.19 ms) and half of the JPEG decode that tiling cannot avoid (1.4 ms). A slide's
tiles are written once, in whole shards, with a codec chain this package chose, so the
tiler encodes each shard here: every inner chunk through the same codec implementations
zarr calls (numcodecs Blosc/Zstd, :mod:`tmequant.codecs`, google-crc32c), laid out per the
zarr v3 ``sharding_indexed`` spec (chunks in order, then the index of (offset, nbytes)
uint64 little-endian pairs and its crc32c), and hands zarr's store the bytes. Reading stays
zarr's. ``tests/test_shards.py`` holds the bytes equal to zarr's own for every chain.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import google_crc32c
import numpy as np
from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec, ShardingCodec, ZstdCodec

from tmequant.codecs import ImageCodec, encode_image

_ABSENT = np.uint64(2**64 - 1)  # the spec's (offset, nbytes) of a chunk not stored
Parts = list[Any]  # bytes-like pieces of one encoded chunk, in order (joined once per shard)
ChunkEncoder = Callable[[np.ndarray], Parts]


def _crc32c(parts: Parts) -> bytes:
    crc = 0
    for p in parts:
        # google-crc32c takes bytes only (no memoryview): copies just the uncompressed chain
        crc = google_crc32c.extend(crc, p if isinstance(p, bytes) else bytes(p))
    return int(crc).to_bytes(4, "little")


def _step(codec: Any) -> Callable[[Any], Parts] | None:
    """One codec of an inner chain as a function (the chunk array, or the parts the codec
    before it made -> parts); None for a codec this module does not encode. No step copies
    what it does not transform: tiles are ~150 KB and every copy costs page faults."""
    if isinstance(codec, BytesCodec):  # uint8: no byte order to apply
        return lambda a: [np.ascontiguousarray(a).data.cast("B")]
    if isinstance(codec, ImageCodec):
        def image(a: np.ndarray) -> Parts:
            n, h, w, c = a.shape
            return [encode_image(np.ascontiguousarray(a.reshape(n * h, w, c)), codec.codec, codec.level)]
        return image
    if isinstance(codec, (BloscCodec, ZstdCodec)):
        # the numcodecs object zarr itself encodes with (a private attribute: if a zarr
        # release renames it, the chain is "unknown" and zarr writes the shard)
        impl = getattr(codec, "_blosc_codec" if isinstance(codec, BloscCodec) else "_zstd_codec", None)
        if impl is None:
            return None
        return lambda parts: [impl.encode(parts[0] if len(parts) == 1 else b"".join(parts))]
    if isinstance(codec, Crc32cCodec):
        return lambda parts: [*parts, _crc32c(parts)]
    return None


def chunk_encoder(sharding: ShardingCodec) -> ChunkEncoder | None:
    """(n, H, W, 3) uint8 inner chunk -> the parts of its stored bytes, through
    ``sharding``'s inner codecs; None when a codec of the chain is not one this module
    encodes."""
    steps = [_step(c) for c in sharding.codecs]
    if any(s is None for s in steps) or not isinstance(sharding.codecs[0], (BytesCodec, ImageCodec)):
        return None

    def encode(a: np.ndarray) -> Parts:
        out: Any = a
        for s in steps:
            assert s is not None
            out = s(out)
        return list(out)

    return encode


def index_supported(sharding: ShardingCodec) -> bool:
    """Whether the shard index is the layout :func:`encode_shard` writes (zarr's default)."""
    ic = sharding.index_codecs
    return (sharding.index_location.value == "end" and len(ic) == 2
            and isinstance(ic[0], BytesCodec) and isinstance(ic[1], Crc32cCodec))


def encode_shard(tiles: np.ndarray, chunk_tiles: int, shard_tiles: int, encode: ChunkEncoder) -> bytes:
    """One shard of ``shard_tiles`` tiles from ``tiles`` (n <= shard_tiles, H, W, 3) uint8,
    inner chunks of ``chunk_tiles`` along the first axis. A shorter last shard (the array
    ends inside it) pads its last chunk with the fill value 0 and stores no chunk past it,
    as zarr does."""
    n = len(tiles)
    n_chunks = shard_tiles // chunk_tiles
    index = np.full((n_chunks, 2), _ABSENT, dtype="<u8")
    parts: Parts = []
    offset = 0
    for k in range(-(-n // chunk_tiles)):
        a = tiles[k * chunk_tiles:(k + 1) * chunk_tiles]
        if len(a) < chunk_tiles:
            pad = np.zeros((chunk_tiles, *a.shape[1:]), np.uint8)
            pad[:len(a)] = a
            a = pad
        data = encode(a)
        size = sum(memoryview(p).nbytes for p in data)
        index[k] = (offset, size)
        parts += data
        offset += size
    ib = index.reshape(n_chunks, *([1] * (tiles.ndim - 1)), 2).tobytes()
    return b"".join([*parts, ib, _crc32c([ib])])


__all__ = ["ChunkEncoder", "chunk_encoder", "encode_shard", "index_supported"]
