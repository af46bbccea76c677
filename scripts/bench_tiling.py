"""Benchmark tiling a large slide at 0.5 um/px / 224 px; prints one table and writes JSON.

Methods, each run in its own subprocess (peak RSS from wait4), on the same slide and
the same kept tiles (the tmequant store's coordinates):

- ``tmequant``: ``tile_slide`` end to end (open, tissue mask, read, resize, write zarr).
- ``naive``: one OpenSlide ``read_region`` per tile at level 0 (448 px) + Pillow resize to
  224 px, single thread, nothing written (an even sample of ``--naive-max-tiles`` of the
  kept tiles). It uses one core where tmequant uses ``--workers``: compare tiles per
  CPU-second as well as tiles/s.
- ``decode``: the machine's decode-only limit: every JPEG tile of level 0 read and decoded
  with imagecodecs in a thread pool, nothing else; tiles/s is expressed as kept-tile
  equivalents (level-0 megapixels per second / megapixels per kept tile). Glass tiles
  decode fast, so this limit is optimistic.
- ``decode_kept``: the same, restricted to the JPEG tiles under the kept tiles: the
  decode-only limit of this task, in kept tiles per second.
- ``histolab``: histolab 0.7.0 (its own venv, --peer-python) doing the same job as far as it
  allows: its ``TissueMask`` on its thumbnail, its ``GridTiler`` grid at level 0 keeping the
  tiles whose area lies >= 25 % inside the mask (its in-mask share, a module constant of
  0.8, set to tmequant's 0.25; no per-tile tissue check), 448-px level-0 reads through its
  ``extract_tile`` + Pillow box resize to 224 px (histolab resamples to an MPP only through
  large_image), each tile saved as PNG (its output format; tmequant writes blosc-lz4
  zarr), over the whole slide (``--peer-max-tiles 0``; any cap keeps >= 1000 tiles).
  Single-threaded, like the naive loop.

tmequant and the two decode-only limits run ``--repeats`` times (default 3), interleaved, and
each row is the run of median tiles per CPU-second; the per-run shares of the decode limit are
printed and kept in the JSON. Every row reports tiles/s and tiles per CPU-second (user + sys of its child process,
imports included) and tmequant's ratio on both.

Also measures the lossless codecs for ``tiles/images`` on tiles of the store (bytes per
tile, encode and decode MB/s, one thread).

    python scripts/make_bench_slide.py --out /work/bench/bench_slide.svs
    python scripts/bench_tiling.py --slide /work/bench/bench_slide.svs --workers 2 \
        --peer-python /work/peers/histolab/bin/python --json /work/bench/bench_tiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET_MPP, TILE_PX = 0.5, 224


def _cpu() -> float:
    """User + sys seconds of this process (all its threads) and its reaped children."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# --- methods, run as `bench_tiling.py --method NAME ...` in a child process -----------
def run_tmequant(a: argparse.Namespace) -> dict:
    from tmequant.tiling import TilingParams, tile_slide

    params = TilingParams(target_mpp_um=TARGET_MPP, tile_px=TILE_PX, compression=a.compression)
    t0, c0 = time.perf_counter(), _cpu()
    r = tile_slide(a.slide, a.work, params, overwrite=True, workers=a.workers, progress=False)
    dt, dc = time.perf_counter() - t0, _cpu() - c0
    images = Path(r.store_path) / "tiles" / "images"
    nbytes = sum(f.stat().st_size for f in images.rglob("*") if f.is_file())
    return {"n_tiles": r.n_tiles, "seconds": dt, "cpu_s": dc, "stage_seconds": r.seconds,
            "stored_bytes_per_tile": nbytes / max(r.n_tiles, 1), "store": r.store_path}


def _coords(a: argparse.Namespace) -> np.ndarray:
    import zarr

    c = np.asarray(zarr.open_group(a.store, mode="r")["tiles/coords"][...])
    if a.max_tiles and len(c) > a.max_tiles:  # an even sample over the whole slide
        c = c[np.linspace(0, len(c) - 1, a.max_tiles).astype(int)]
    return c


def run_naive(a: argparse.Namespace) -> dict:
    import openslide
    from PIL import Image

    coords = _coords(a)
    t0, c0 = time.perf_counter(), _cpu()
    osr = openslide.OpenSlide(a.slide)
    side = round(TILE_PX * TARGET_MPP / float(osr.properties["openslide.mpp-x"]))
    for x, y in coords.tolist():
        im = osr.read_region((x, y), 0, (side, side)).convert("RGB")
        np.asarray(im.resize((TILE_PX, TILE_PX), Image.Resampling.BOX))
    return {"n_tiles": len(coords), "seconds": time.perf_counter() - t0, "cpu_s": _cpu() - c0}


def run_decode(a: argparse.Namespace) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs
    import tifffile

    t0, c0 = time.perf_counter(), _cpu()
    with tifffile.TiffFile(a.slide) as tf:
        page = tf.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        tables = page.jpegtables
        w, h = page.imagewidth, page.imagelength
    fd = os.open(a.slide, os.O_RDONLY)

    def dec(i: int) -> int:
        data = os.pread(fd, counts[i], offsets[i])
        return imagecodecs.jpeg8_decode(data, tables=tables).shape[0]

    with ThreadPoolExecutor(a.workers) as pool:
        for _ in pool.map(dec, range(len(offsets)), chunksize=64):
            pass
    os.close(fd)
    dt = time.perf_counter() - t0
    return {"n_jpeg_tiles": len(offsets), "seconds": dt, "cpu_s": _cpu() - c0,
            "level0_megapixels": w * h / 1e6}


def run_decode_kept(a: argparse.Namespace) -> dict:
    """Decode-only limit for this task: the level-0 JPEG tiles under the kept tiles."""
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs
    import tifffile

    coords = _coords(a)
    t0, c0 = time.perf_counter(), _cpu()
    with tifffile.TiffFile(a.slide) as tf:
        page = tf.pages[0]
        offsets, counts = list(page.dataoffsets), list(page.databytecounts)
        tables, tw, th = page.jpegtables, page.tilewidth, page.tilelength
        ntx = -(-page.imagewidth // tw)
        mpp = float(tf.pages[0].description.split("MPP = ")[1].split("|")[0])
    side = round(TILE_PX * TARGET_MPP / mpp)
    need = set()
    for x, y in coords.tolist():
        for ty in range(y // th, (y + side - 1) // th + 1):
            for tx in range(x // tw, (x + side - 1) // tw + 1):
                need.add(ty * ntx + tx)
    fd = os.open(a.slide, os.O_RDONLY)

    def dec(i: int) -> int:
        return imagecodecs.jpeg8_decode(os.pread(fd, counts[i], offsets[i]), tables=tables).shape[0]

    with ThreadPoolExecutor(a.workers) as pool:
        for _ in pool.map(dec, sorted(need), chunksize=64):
            pass
    os.close(fd)
    return {"n_tiles": len(coords), "n_jpeg_tiles": len(need), "seconds": time.perf_counter() - t0,
            "cpu_s": _cpu() - c0}


def run_histolab(a: argparse.Namespace) -> dict:  # runs inside the peer venv
    import itertools

    import histolab
    import histolab.tiler as htiler
    from histolab.masks import TissueMask
    from histolab.slide import Slide
    from histolab.tiler import GridTiler
    from PIL import Image

    out = Path(a.work) / "histolab"
    out.mkdir(parents=True, exist_ok=True)
    # tmequant keeps tiles >= 25 % tissue on its mask; histolab's grid keeps tiles > 80 %
    # inside its mask (a module constant): set it to the same 25 %
    htiler.COORDS_WITHIN_EXTRACTION_MASK_THRESHOLD = 0.25
    t0, c0 = time.perf_counter(), _cpu()
    slide = Slide(a.slide, processed_path=str(out))
    side = round(TILE_PX * TARGET_MPP / float(slide.properties["openslide.mpp-x"]))
    tiler = GridTiler(tile_size=(side, side), level=0, check_tissue=False, pixel_overlap=0)
    tiler.tile_size = tiler._tile_size(slide)  # what GridTiler.extract does first
    gen = tiler._tiles_generator(slide, TissueMask())
    n, t_first = 0, None
    for n, (tile, coords) in enumerate(itertools.islice(gen, a.max_tiles or None), start=1):
        if t_first is None:
            t_first = time.perf_counter() - t0  # open, thumbnail, mask, grid start
        img = tile.image.convert("RGB").resize((TILE_PX, TILE_PX), Image.Resampling.BOX)
        img.save(str(out / tiler._tile_filename(coords, n)))
    return {"n_tiles": n, "seconds": time.perf_counter() - t0, "cpu_s": _cpu() - c0,
            "first_tile_s": t_first,
            "level0_px_read": side, "tile_px_saved": TILE_PX, "histolab": histolab.__version__,
            "note": ("its TissueMask + GridTiler at level 0 (tiles >= 25 % inside the mask), "
                     f"{side}-px reads resized to {TILE_PX} px with Pillow, PNG files")}


METHODS = {"tmequant": run_tmequant, "naive": run_naive, "decode": run_decode,
           "decode_kept": run_decode_kept, "histolab": run_histolab}


# --- orchestration --------------------------------------------------------------------
def child(python: str, method: str, a: argparse.Namespace, **extra: object) -> dict:
    """Run one method in a child process; adds its peak RSS (MB) from wait4."""
    args = [python, __file__, "--method", method, "--slide", a.slide, "--work", a.work,
            "--workers", str(a.workers), "--compression", a.compression]
    for k, v in extra.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if python != sys.executable:
        env.pop("PYTHONPATH")
    load = os.getloadavg()[0]
    with tempfile.TemporaryFile() as out:
        p = subprocess.Popen(args, stdout=out, env=env)
        _, status, ru = os.wait4(p.pid, 0)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}", "output": text[-2000:]}
    res = json.loads(text.strip().splitlines()[-1])
    res["peak_rss_mb"] = ru.ru_maxrss / 1024
    res["process_cpu_seconds"] = ru.ru_utime + ru.ru_stime  # whole child, imports included
    # per-CPU figures use the CPU of the timed part (the same span as "seconds")
    res["cpu_seconds"] = res.get("cpu_s", res["process_cpu_seconds"])
    res["loadavg_1min_before"] = load
    return res


def _cpu_rate(r: dict) -> float:
    """Tiles (kept-tile equivalents for ``decode``) per CPU-second of one run."""
    if "error" in r:
        return float("nan")
    n = r["n_tiles"] if "n_tiles" in r else r["level0_megapixels"] / (TILE_PX * TARGET_MPP / 0.25) ** 2 * 1e6
    return n / max(r["cpu_seconds"], 1e-9)


def _median_run(rs: list[dict]) -> dict:
    """The run of median tiles per CPU-second (lower median for an even count), with every
    run's rate under ``runs_tiles_per_cpu_s``."""
    ok = [r for r in rs if "error" not in r]
    if not ok:
        return rs[0]
    ok.sort(key=_cpu_rate)
    out = dict(ok[(len(ok) - 1) // 2])
    out["runs_tiles_per_cpu_s"] = [round(_cpu_rate(r), 1) for r in rs]
    return out


def codec_table(store: str, n: int = 256) -> list[dict]:
    import zarr
    from zarr.codecs import BloscCodec, ZstdCodec

    tiles = np.asarray(zarr.open_group(store, mode="r")["tiles/images"][:n])
    raw = tiles.tobytes()
    import numcodecs

    rows = []
    for name, codec in [("none", None), ("zstd-1", numcodecs.Zstd(level=1)), ("zstd", numcodecs.Zstd(level=3)),
                        ("zstd-9", numcodecs.Zstd(level=9)),
                        ("blosc-lz4", numcodecs.Blosc(cname="lz4", clevel=5, shuffle=0))]:
        chunks = [tiles[i : i + 4].tobytes() for i in range(0, len(tiles), 4)]  # 4 tiles per chunk
        t0 = time.perf_counter()
        enc = [c if codec is None else codec.encode(c) for c in chunks]
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        for e in enc:
            if codec is not None:
                codec.decode(e)
        td = time.perf_counter() - t0
        size = sum(len(e) for e in enc)
        rows.append({"codec": name, "bytes_per_tile": size / len(tiles), "ratio": len(raw) / size,
                     "encode_MBps": len(raw) / 1e6 / max(te, 1e-9), "decode_MBps": len(raw) / 1e6 / max(td, 1e-9)})
    # for reference only: lossy JPEG q90 per tile (a second JPEG generation; not offered)
    import imagecodecs

    t0 = time.perf_counter()
    enc = [imagecodecs.jpeg8_encode(t, level=90) for t in tiles]
    te = time.perf_counter() - t0
    t0 = time.perf_counter()
    for e in enc:
        imagecodecs.jpeg8_decode(e)
    td = time.perf_counter() - t0
    size = sum(len(e) for e in enc)
    rows.append({"codec": "jpeg-q90*", "bytes_per_tile": size / len(tiles), "ratio": len(raw) / size,
                 "encode_MBps": len(raw) / 1e6 / te, "decode_MBps": len(raw) / 1e6 / td})
    del ZstdCodec, BloscCodec
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default="/work/bench/bench_slide.svs")
    ap.add_argument("--work", default="/work/bench/work")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--compression", default="blosc-lz4")
    ap.add_argument("--naive-max-tiles", type=int, default=1000)
    ap.add_argument("--peer-python", default="/work/peers/histolab/bin/python")
    ap.add_argument("--peer-max-tiles", type=int, default=0,
                    help="cap histolab's tiles (0: the whole slide; keep >= 1000 to be above "
                         "its start-up)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="interleaved runs of tmequant and the decode-only limits (median reported)")
    ap.add_argument("--json", default="/work/bench/bench_tiling.json")
    ap.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--max-tiles", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.method:  # child
        print(json.dumps(METHODS[a.method](a)))
        return

    Path(a.work).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    res: dict[str, dict] = {}
    # tmequant and the decode-only limits run --repeats times, interleaved, so that a noisy
    # neighbour on a shared machine hits both sides; each row is the run of median tiles per
    # CPU-second and the JSON keeps every run
    runs: dict[str, list[dict]] = {"tmequant": [], "decode_kept": [], "decode": []}
    store = None
    for _ in range(max(1, a.repeats)):
        r = child(sys.executable, "tmequant", a)
        if "error" in r:
            sys.exit(f"tmequant failed: {r}")
        store = r["store"]
        runs["tmequant"].append(r)
        runs["decode_kept"].append(child(sys.executable, "decode_kept", a, store=store))
        runs["decode"].append(child(sys.executable, "decode", a))
    res["tmequant"] = _median_run(runs["tmequant"])
    res["naive"] = child(sys.executable, "naive", a, store=store, max_tiles=a.naive_max_tiles)
    res["decode"] = _median_run(runs["decode"])
    res["decode_kept"] = _median_run(runs["decode_kept"])
    if a.peer_python and Path(a.peer_python).exists():
        if 0 < a.peer_max_tiles < 1000:
            sys.exit("--peer-max-tiles: use 0 (all) or >= 1000 so that start-up does not dominate")
        res["histolab"] = child(a.peer_python, "histolab", a, max_tiles=a.peer_max_tiles)
        shutil.rmtree(Path(a.work) / "histolab", ignore_errors=True)
    load_after = os.getloadavg()

    mp_per_tile = (TILE_PX * TARGET_MPP / 0.25) ** 2 / 1e6  # level-0 MP per kept tile (0.25 um/px)
    for name, r in res.items():
        if "error" in r:
            continue
        if name == "decode":
            r["MPps"] = r["level0_megapixels"] / r["seconds"]
            r["tiles_per_s"] = r["MPps"] / mp_per_tile
        else:
            r["tiles_per_s"] = r["n_tiles"] / r["seconds"]
            r["MPps"] = r["tiles_per_s"] * mp_per_tile
        # the machine is shared: tiles per CPU-second is the figure that load does not skew
        n_equiv = r["tiles_per_s"] * r["seconds"]
        r["tiles_per_cpu_s"] = n_equiv / max(r["cpu_seconds"], 1e-9)
    tq = res["tmequant"]["tiles_per_s"]
    tqc = res["tmequant"]["tiles_per_cpu_s"]
    for name, r in res.items():
        if "tiles_per_s" in r:
            r["tmequant_ratio"] = tq / r["tiles_per_s"]
            r["tmequant_ratio_cpu"] = tqc / r["tiles_per_cpu_s"]
    codecs = codec_table(store)
    report = {
        "slide": a.slide, "slide_bytes": Path(a.slide).stat().st_size, "workers": a.workers,
        "target_mpp_um": TARGET_MPP, "tile_px": TILE_PX, "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "methods": res, "codecs": codecs,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1, default=str))

    threads = {"tmequant": a.workers, "naive": 1, "decode": a.workers, "decode_kept": a.workers,
               "histolab": 1}
    differs = {
        "tmequant": "reference: mask, grid >= 25 %, read+resize, zarr (blosc-lz4) written",
        "naive": f"kept tiles given (no mask), nothing written, {res['naive'].get('n_tiles', '?')}-tile sample",
        "decode": "decode only, every level-0 JPEG tile (glass too), kept-tile equivalents",
        "decode_kept": "decode only, the JPEG tiles under the kept tiles",
        "histolab": "own mask/grid (>= 25 % in mask), PNG files written",
    }
    for name, r in res.items():
        r["threads"], r["differs"] = threads.get(name), differs.get(name)
    (Path(a.json)).write_text(json.dumps(report, indent=1, default=str))
    print(f"slide {a.slide}  workers {a.workers}  load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    print(f"{'method':<11} {'thr':>3} {'tiles':>6} {'s':>7} {'CPU s':>7} {'tiles/s':>8} {'tiles/CPU-s':>11} "
          f"{'tmq x':>6} {'tmq x CPU':>9} {'RSS MB':>7} {'B/tile':>7}  what differs")
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<11} ERROR {r['error']}")
            continue
        n = r.get("n_tiles") or r.get("n_jpeg_tiles")
        bpt = r.get("stored_bytes_per_tile")
        print(f"{name:<11} {r['threads']:>3} {n:>6} {r['seconds']:>7.1f} {r['cpu_seconds']:>7.1f} "
              f"{r['tiles_per_s']:>8.1f} {r['tiles_per_cpu_s']:>11.1f} {r['tmequant_ratio']:>6.2f} "
              f"{r['tmequant_ratio_cpu']:>9.2f} {r['peak_rss_mb']:>7.0f} {'-' if bpt is None else round(bpt):>7}"
              f"  {r['differs']}")
    print("tmq x = tmequant's tiles/s (per CPU-s) / the method's: > 1 means tmequant is faster. "
          "s and CPU s: the method's timed part (process totals with imports in the JSON).")
    pairs = [_cpu_rate(t) / _cpu_rate(d) for t, d in zip(runs["tmequant"], runs["decode_kept"])]
    report["tmequant_share_of_decode_limit_per_run"] = [round(x, 3) for x in pairs]
    (Path(a.json)).write_text(json.dumps(report, indent=1, default=str))
    print(f"tmequant / decode-only limit (kept tiles), per CPU-s, run by run: "
          f"{', '.join(f'{x:.2f}' for x in pairs)}; rows: the median of {len(pairs)} interleaved runs")
    print(f"\n{'codec':<10} {'B/tile':>9} {'ratio':>6} {'enc MB/s':>9} {'dec MB/s':>9}")
    for c in codecs:
        print(f"{c['codec']:<10} {c['bytes_per_tile']:>9.0f} {c['ratio']:>6.2f} {c['encode_MBps']:>9.0f} "
              f"{c['decode_MBps']:>9.0f}")
    print("* lossy, for reference only: tmequant stores tiles losslessly")
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
