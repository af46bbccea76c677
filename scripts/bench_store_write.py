"""Write-path cost of the store's chunk checksums (crc32c) and of storing every chunk.

Writes 1024 real tiles (those of a tiled slide, cycled) into a sharded array exactly as
``SlideStore.create_images`` lays it out (4-tile chunks, 128-tile shards, blosc-lz4), with
and without the crc32c codec and ``write_empty_chunks``; prints the best and median CPU
seconds (all threads) of 6 interleaved rounds.

    python3 -m tmequant tile ../shared/testdata/slides/CMU-1-Small-Region.svs --out /tmp/sm
    python3 scripts/bench_store_write.py /tmp/sm/CMU-1-Small-Region.zarr
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from tmequant.store import SlideStore


def main(store: str) -> None:
    src = np.asarray(SlideStore(store).images[...])
    tiles = src[np.arange(1024) % len(src)]
    tp = tiles.shape[1]
    tmp = Path(tempfile.mkdtemp()) / "bench.zarr"

    def write(crc: bool, wec: bool) -> float:
        shutil.rmtree(tmp, ignore_errors=True)
        g = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        comp = [BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle")] + ([Crc32cCodec()] if crc else [])
        a = g.create_array("images", shape=tiles.shape, dtype="uint8", chunks=(4, tp, tp, 3),
                           shards=(128, tp, tp, 3), compressors=comp, fill_value=0,
                           config={"write_empty_chunks": wec})
        c0 = time.process_time()
        for s in range(0, len(tiles), 128):
            a[s:s + 128] = tiles[s:s + 128]
        return time.process_time() - c0

    res: dict[tuple[bool, bool], list[float]] = {}
    for _ in range(6):
        for k in [(False, False), (True, False), (False, True), (True, True)]:
            res.setdefault(k, []).append(write(*k))
    shutil.rmtree(tmp.parent, ignore_errors=True)
    for (crc, wec), v in res.items():
        v = sorted(v)
        print(f"crc32c={crc!s:5} write_empty_chunks={wec!s:5}: CPU best {v[0]:.2f} s, "
              f"median {v[len(v) // 2]:.2f} s per 1024 tiles of {tp} px")


if __name__ == "__main__":
    main(sys.argv[1])
