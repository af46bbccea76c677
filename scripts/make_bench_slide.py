"""Write a large benchmark slide from real pixels (outside the repository), in bounded memory.

A mosaic of 2048-px blocks cut (with flips and rotations) from the two shared slides,
CMU-1-Small-Region.svs and TCGA-CR-7395-01A-01-TS1.svs, inside an elliptical "tissue" area
on glass; level 0 is 40,960 x 30,720 px by default, declared at 0.25 um/px, JPEG tiles of
256 px, a full pyramid (downsample 4) written as an Aperio-like SVS in the layout of
``tmequant.wsi.write_pyramid_tiff(flavor="svs")`` (level 0, a stripped thumbnail, then the
coarser levels; ``MPP`` and ``AppMag`` in the ImageDescription; OpenSlide vendor ``aperio``).

Memory does not grow with the slide: every level is generated strip by strip (256 rows)
straight from the mosaic plan (a block at level L is cut from level L of its source's own
4x pyramid, so the coarse levels carry a sub-pixel offset against level 0), tifffile's
tile encoder gets a small buffer, and nothing is memory-mapped. Peak RSS (``/usr/bin/time
-v``, 2-core machine, 2 encoder threads): 0.22 GB for the default 40,960 x 30,720 px slide (q90,
280 MB file, 28 CPU-s) and 0.36 GB for 100,000 x 100,000 px (q80, 1.5 GB file, 202 CPU-s).
Through ``tmequant.wsi.write_pyramid_tiff`` (the previous version of this script) the
default slide peaked at 0.74 GB: tifffile buffers up to 512 MB of tiles, and the writer
keeps the next level in a memory-mapped file whose pages count in RSS (1/16 of level 0:
1.9 GB for 100k x 100k).

Without the shared slides (``--source auto``, e.g. on a GPU machine) the blocks come from
two rendered phantoms (``tmequant.phantom``): H&E-like, not H&E.

    python scripts/make_bench_slide.py --out /work/bench/bench_slide.svs
    python scripts/make_bench_slide.py --out /work/bench/slide_100k.svs \\
        --width 100000 --height 100000 --quality 80
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from tmequant.wsi import open_slide

TESTDATA = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "slides"
BLOCK = 2048
TILE = 256
DOWNSAMPLE = 4
GLASS = np.array([242, 241, 244], np.uint8)


SHARED = ("CMU-1-Small-Region.svs", "TCGA-CR-7395-01A-01-TS1.svs")


def _sources(testdata: Path) -> list[np.ndarray]:
    out = []
    for name, mpp in zip(SHARED, (None, 0.5)):
        with open_slide(testdata / name, mpp_override_um=mpp) as s:
            w, h = s.dimensions
            out.append(s.read_region((0, 0), 0, (w, h)))
    return out


def _phantom_sources(side: int = 4096) -> list[np.ndarray]:
    """Two rendered H&E-like phantoms (tmequant.phantom): for machines without the shared
    test data (e.g. a GPU machine). Synthetic pixels: they decode and compress like H&E
    roughly, not exactly."""
    from tmequant.phantom.layout import make_layout
    from tmequant.phantom.render import PhantomRenderer
    from tmequant.phantom.spec import scenario_spec

    out = []
    for seed, name in enumerate(("inflamed", "excluded")):
        spec = scenario_spec(name, seed=seed, width_px=side, height_px=side, mpp_um=0.25, n_tls=0)
        out.append(PhantomRenderer(make_layout(spec)).read(0, 0, side, side))
    return out


def _reduce4(a: np.ndarray) -> np.ndarray:
    """Mean of 4 x 4 blocks of an (h, w, 3) uint8 image (edge-replicated to a multiple of 4)."""
    h, w = a.shape[:2]
    if (-h) % 4 or (-w) % 4:
        a = np.pad(a, ((0, (-h) % 4), (0, (-w) % 4), (0, 0)), mode="edge")
    rows = a[0::4].astype(np.uint16)  # sums of strided slices: cheaper than a 5-D reshape
    for i in range(1, 4):
        rows += a[i::4]
    s = rows[:, 0::4].copy()
    for j in range(1, 4):
        s += rows[:, j::4]
    return ((s + 8) // 16).astype(np.uint8)


class Mosaic:
    """The slide as blocks: ``strip(level, y0, h, w)`` gives rows y0..y0+h of a level.

    Level L of a block is the same crop, rotation and flip taken from level L of its
    source's own 4x pyramid (at offsets rounded down to that level's pixels: a sub-pixel
    shift against level 0), so no level is ever held whole.
    """

    def __init__(self, srcs: list[np.ndarray], width: int, height: int, seed: int,
                 n_levels: int) -> None:
        self.width, self.height = width, height
        self.src_levels = []
        for s in srcs:
            levels = [s]
            for _ in range(1, n_levels):
                levels.append(_reduce4(levels[-1]))
            self.src_levels.append(levels)
        rng = np.random.default_rng(seed)
        self.nby, self.nbx = -(-height // BLOCK), -(-width // BLOCK)
        cy, cx = (self.nby - 1) / 2, (self.nbx - 1) / 2
        self.plan: dict[tuple[int, int], tuple[int, int, int, int, bool]] = {}
        for by in range(self.nby):
            for bx in range(self.nbx):
                if ((by - cy) / (self.nby / 2)) ** 2 + ((bx - cx) / (self.nbx / 2)) ** 2 > 0.8:
                    continue  # glass
                k = int(rng.integers(len(srcs)))
                sh, sw = srcs[k].shape[:2]
                y0 = int(rng.integers(0, max(1, sh - BLOCK)))
                x0 = int(rng.integers(0, max(1, sw - BLOCK)))
                self.plan[(by, bx)] = (k, y0, x0, int(rng.integers(4)), bool(rng.integers(2)))

    def _block(self, level: int, by: int, bx: int) -> np.ndarray | None:
        """The block at ``level`` (a view where possible), None for glass."""
        p = self.plan.get((by, bx))
        if p is None:
            return None
        k, y0, x0, rot, flip = p
        ds = DOWNSAMPLE**level
        bs = BLOCK // ds
        crop = self.src_levels[k][level][y0 // ds : y0 // ds + bs, x0 // ds : x0 // ds + bs]
        if crop.shape[:2] != (bs, bs):  # a source smaller than a block: pad with glass
            full = np.empty((bs, bs, 3), np.uint8)
            full[:] = GLASS
            full[: crop.shape[0], : crop.shape[1]] = crop
            crop = full
        b = np.rot90(crop, rot)
        return b[:, ::-1] if flip else b

    def strip(self, level: int, y0: int, h: int, w: int) -> np.ndarray:
        bs = BLOCK // DOWNSAMPLE**level  # block side at this level
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS
        for by in range(y0 // bs, (y0 + h - 1) // bs + 1):
            ys, ye = max(y0, by * bs), min(y0 + h, (by + 1) * bs)
            for bx in range(-(-w // bs)):
                b = self._block(level, by, bx)
                if b is None:
                    continue
                xs, xe = bx * bs, min(w, (bx + 1) * bs)
                out[ys - y0 : ye - y0, xs:xe] = b[ys - by * bs : ye - by * bs, : xe - xs]
        return out


def _svs_description(w: int, h: int, quality: int, mpp: float, level: int, w0: int, h0: int) -> str:
    head = "Aperio Image Library v12.0.15 \r\n"
    if level == 0:
        desc = f"{head}{w}x{h} [0,0 {w}x{h}] ({TILE}x{TILE}) JPEG/RGB Q={quality}"
    else:
        desc = f"{head}{w0}x{h0} [0,0 {w0}x{h0}] ({TILE}x{TILE}) -> {w}x{h} JPEG/RGB Q={quality}"
    return desc + f"|AppMag = {round(10.0 / mpp):g}|MPP = {mpp:.6g}|Filename = tmequant-synthetic"


def _level_shapes(h: int, w: int) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while max(shapes[-1]) > TILE:
        ph, pw = shapes[-1]
        shapes.append((math.ceil(ph / DOWNSAMPLE), math.ceil(pw / DOWNSAMPLE)))
    if DOWNSAMPLE ** (len(shapes) - 1) > BLOCK:
        raise SystemExit(f"slide too large for {BLOCK}-px blocks: {len(shapes)} levels")
    return shapes


def _tiles(m: Mosaic, level: int, h: int, w: int) -> Iterator[np.ndarray]:
    for y in range(0, h, TILE):
        strip = m.strip(level, y, min(TILE, h - y), w)
        for x in range(0, w, TILE):
            yield strip[:, x : x + TILE]


def _thumbnail(m: Mosaic, shapes: list[tuple[int, int]], max_px: int = 768) -> np.ndarray:
    """A nearest-neighbour thumbnail (max side <= max_px) from the coarsest level >= max_px."""
    level = max([i for i, s in enumerate(shapes) if max(s) >= max_px] or [0])
    h, w = shapes[level]
    step = max(1, math.ceil(max(h, w) / max_px))
    rows = []
    for y in range(0, h, TILE):
        s = m.strip(level, y, min(TILE, h - y), w)
        rows.append(s[(-y) % step :: step, ::step].copy())
    return np.ascontiguousarray(np.concatenate(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/work/bench/bench_slide.svs")
    ap.add_argument("--width", type=int, default=20 * BLOCK, help="level-0 width, px")
    ap.add_argument("--height", type=int, default=15 * BLOCK, help="level-0 height, px")
    ap.add_argument("--mpp", type=float, default=0.25, help="declared level-0 um/px")
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--testdata", type=Path,
                    default=Path(os.environ.get("TMEQUANT_TESTDATA", TESTDATA.parent)) / "slides",
                    help="folder of the two shared slides (default: $TMEQUANT_TESTDATA/slides "
                         "or ../shared/testdata/slides)")
    ap.add_argument("--source", choices=("auto", "shared", "phantom"), default="auto",
                    help="pixels: the shared slides, rendered phantoms, or auto (shared when "
                         "present, else phantoms)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                    help="JPEG encoder threads")
    ap.add_argument("--buffer-mb", type=int, default=16,
                    help="raw tiles tifffile may hold while encoding (its default is 512)")
    a = ap.parse_args()
    import tifffile

    t0 = time.perf_counter()
    shapes = _level_shapes(a.height, a.width)
    source = a.source
    if source == "auto":
        source = "shared" if all((a.testdata / n).is_file() for n in SHARED) else "phantom"
    srcs = _sources(a.testdata) if source == "shared" else _phantom_sources()
    m = Mosaic(srcs, a.width, a.height, a.seed, len(shapes))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    h0, w0 = shapes[0]
    try:
        with tifffile.TiffWriter(tmp, bigtiff=h0 * w0 * 3 * 1.4 > 2**31) as tif:
            for level, (lh, lw) in enumerate(shapes):
                tif.write(_tiles(m, level, lh, lw), shape=(lh, lw, 3), dtype=np.uint8,
                          tile=(TILE, TILE), photometric="rgb", compression="jpeg",
                          compressionargs={"level": a.quality}, metadata=None,
                          description=_svs_description(lw, lh, a.quality, a.mpp, level, w0, h0),
                          maxworkers=a.workers, buffersize=a.buffer_mb << 20)
                if level == 0:  # Aperio: IFD 1 is a stripped thumbnail
                    th = _thumbnail(m, shapes)
                    tif.write(th, photometric="rgb", compression="jpeg", metadata=None,
                              compressionargs={"level": 90},
                              description=f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} -> "
                                          f"{th.shape[1]}x{th.shape[0]} - ")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    dt = time.perf_counter() - t0
    with open_slide(out) as s:
        info = s.info
    ru = resource.getrusage(resource.RUSAGE_SELF)
    meta = {
        "path": str(out), "bytes": out.stat().st_size, "level_dimensions": info.level_dimensions,
        "mpp_um": info.mpp_um, "mpp_source": info.mpp_source, "vendor": info.vendor,
        "quality": a.quality, "source": source, "tissue_blocks": len(m.plan), "blocks": m.nby * m.nbx,
        "write_s": round(dt, 1), "cpu_s": round(ru.ru_utime + ru.ru_stime, 1),
        "peak_rss_mb": round(ru.ru_maxrss / 1024, 1),
    }
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
