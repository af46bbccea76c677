"""Write a large benchmark slide from real pixels (outside the repository).

A mosaic of 2048-px blocks cut (with flips and rotations) from the two shared slides,
CMU-1-Small-Region.svs and TCGA-CR-7395-01A-01-TS1.svs, inside an elliptical "tissue" area
on glass; level 0 is 40,960 x 30,720 px declared at 0.25 um/px, JPEG q90 tiles of 256 px,
a full pyramid (downsample 4) written as an Aperio-like SVS with tmequant's writer, one
strip at a time (memory stays ~0.3 GB).

    python scripts/make_bench_slide.py --out /work/bench/bench_slide.svs
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np

from tmequant.wsi import open_slide, write_pyramid_tiff

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "slides"
BLOCK = 2048


def _sources(testdata: Path) -> list[np.ndarray]:
    out = []
    for name, mpp in (("CMU-1-Small-Region.svs", None), ("TCGA-CR-7395-01A-01-TS1.svs", 0.5)):
        with open_slide(testdata / name, mpp_override_um=mpp) as s:
            w, h = s.dimensions
            out.append(s.read_region(0, 0, 0, w, h))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/bench/bench_slide.svs")
    ap.add_argument("--width", type=int, default=20 * BLOCK, help="level-0 width, px")
    ap.add_argument("--height", type=int, default=15 * BLOCK, help="level-0 height, px")
    ap.add_argument("--mpp", type=float, default=0.25, help="declared level-0 um/px")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--testdata", type=Path, default=TESTDATA)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    srcs = _sources(a.testdata)
    rng = np.random.default_rng(a.seed)
    nby, nbx = -(-a.height // BLOCK), -(-a.width // BLOCK)
    cy, cx = (nby - 1) / 2, (nbx - 1) / 2
    plan: dict[tuple[int, int], tuple[int, int, int, int, bool]] = {}
    for by in range(nby):
        for bx in range(nbx):
            if ((by - cy) / (nby / 2)) ** 2 + ((bx - cx) / (nbx / 2)) ** 2 > 0.8:
                continue  # glass
            k = int(rng.integers(len(srcs)))
            sh, sw = srcs[k].shape[:2]
            y0 = int(rng.integers(0, max(1, sh - BLOCK)))
            x0 = int(rng.integers(0, max(1, sw - BLOCK)))
            plan[(by, bx)] = (k, y0, x0, int(rng.integers(4)), bool(rng.integers(2)))
    glass = np.array([242, 241, 244], np.uint8)
    cache: dict[tuple[int, int], np.ndarray] = {}

    def block(by: int, bx: int) -> np.ndarray:
        if (by, bx) not in cache:
            if len(cache) > 24:
                cache.clear()
            p = plan.get((by, bx))
            if p is None:
                b = np.broadcast_to(glass, (BLOCK, BLOCK, 3))
            else:
                k, y0, x0, rot, flip = p
                crop = srcs[k][y0 : y0 + BLOCK, x0 : x0 + BLOCK]
                b = np.full((BLOCK, BLOCK, 3), glass, np.uint8)
                b[: crop.shape[0], : crop.shape[1]] = crop
                b = np.rot90(b, rot)
                if flip:
                    b = b[:, ::-1]
            cache[(by, bx)] = np.ascontiguousarray(b)
        return cache[(by, bx)]

    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        out = np.empty((h, w, 3), np.uint8)
        for by in range(y0 // BLOCK, (y0 + h - 1) // BLOCK + 1):
            for bx in range(x0 // BLOCK, (x0 + w - 1) // BLOCK + 1):
                b = block(by, bx)
                ys, ye = max(y0, by * BLOCK), min(y0 + h, (by + 1) * BLOCK)
                xs, xe = max(x0, bx * BLOCK), min(x0 + w, (bx + 1) * BLOCK)
                out[ys - y0 : ye - y0, xs - x0 : xe - x0] = b[ys - by * BLOCK : ye - by * BLOCK,
                                                              xs - bx * BLOCK : xe - bx * BLOCK]
        return out

    t0 = time.perf_counter()
    path = write_pyramid_tiff(a.out, read, a.mpp, flavor="svs", tile_px=256, compression="jpeg",
                              quality=a.quality, downsample=4, shape=(a.height, a.width))
    dt = time.perf_counter() - t0
    with open_slide(path) as s:
        info = s.info
    meta = {
        "path": str(path), "bytes": path.stat().st_size, "level_dimensions": info.level_dimensions,
        "mpp_um": info.mpp_um, "mpp_source": info.mpp_source, "vendor": info.vendor,
        "tissue_blocks": len(plan), "blocks": nby * nbx, "write_s": round(dt, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
