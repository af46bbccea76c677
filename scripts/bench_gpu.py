#!/usr/bin/env python
"""GPU benchmark parts, driven by scripts/bench_gpu.sh (which makes the slide first).

Parts (``--parts``, each recorded on its own, one failing does not stop the others):

- ``tile``: ``tile_slide`` of the slide into a store (224 px at 0.5 um/px), all CPU cores;
- ``infer``: per model (``random-efficientnet_lite0``, ``random-resnet50``, the bundled
  detector ``brca-cells-lite0``): the model's own throughput on tensors already on the
  device (``device``: tmequant's runner, uint8 NHWC normalised on the device, the engine's
  precision and memory format, at the input size the engine feeds: 224 px, or the detector's
  canvas of tile + 2 x context px; ``plain``: for the classifiers, the plain timm model on
  float NCHW tensors under the same autocast) and ``predict_store`` from the store (the
  whole call: model to device, DataLoader start-up, writing), with the store's share of
  the device figure;
- ``decode``: level-0 JPEG tiles of the slide decoded with ``torchvision.io.decode_jpeg``
  on the device (batched lists) against CPU decoding (imagecodecs, a thread pool of 1, 4,
  8, ... workers), in megapixels/s and in kept-tile equivalents (448 x 448 level-0 px per
  224-px tile at 0.5 um/px from a 0.25 um/px slide);
- ``e2e``: ``tmequant run SLIDE`` with the default model (the cell detector) on the device
  in a child process (wall, CPU, peak RSS): slides per hour = 3600 / wall; plus the
  pipelined bound 3600 / max(tiling, inference) when tiling the next slide overlaps.

Writes ``<out>/bench_gpu.json`` and prints a table (also ``<out>/bench_gpu.txt``).

    python scripts/bench_gpu.py --slide /path/slide.svs --out gpu_out --device cuda
    python scripts/bench_gpu.py --slide small.svs --out /tmp/g --device cpu --quick   # CPU test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODELS = ("random-efficientnet_lite0", "random-resnet50", "brca-cells-lite0")
KEPT_TILE_L0_PX = 448 * 448  # a 224-px tile at 0.5 um/px from a 0.25 um/px level 0


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# --- parts -----------------------------------------------------------------------------
def part_tile(a: argparse.Namespace, ctx: dict) -> dict:
    import tmequant as tq

    workers = a.tile_workers or min(16, os.cpu_count() or 1)
    t0, c0 = time.perf_counter(), _cpu()
    r = tq.tile_slide(a.slide, Path(a.work) / "stores", tq.TilingParams(), overwrite=True,
                      workers=workers, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    ctx["store"] = r.store_path
    ctx["tile_s"] = wall
    return {"n_tiles": r.n_tiles, "wall_s": wall, "cpu_s": cpu, "tiles_per_s": r.n_tiles / wall,
            "workers": workers, "stage_seconds": r.seconds, "store": r.store_path}


def _device_rate(loaded, dev, bs: int, n_batches: int) -> dict:
    """The model's own throughput on uint8 tensors already on the device (tmequant's runner)."""
    import torch

    from tmequant.inference.runner import autocast_dtype

    card = loaded.card
    amp = autocast_dtype(dev)
    if card.is_detector:
        from tmequant.inference.cells import ALIGN_PX, HeatmapRunner

        side = -(-(card.tile_px + 2 * int(card.detector.context_px)) // ALIGN_PX) * ALIGN_PX
        runner = HeatmapRunner(loaded.model, card, dev, amp)
    else:
        from tmequant.inference.engine import _Runner

        side = card.tile_px
        runner = _Runner(loaded.model, card, dev, False)
    x = torch.randint(0, 256, (bs, side, side, 3), dtype=torch.uint8, device=dev)
    for _ in range(2):  # warm-up: cudnn autotune, allocator
        runner(x)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        out = runner(x)
    _sync(dev)
    dt = time.perf_counter() - t0
    del out
    return {"tiles_per_s": n_batches * bs / dt, "input_px": side, "batch": bs,
            "precision": str(amp).replace("torch.", "") if amp else "fp32"}


def _plain_rate(arch: str, dev, bs: int, n_batches: int) -> dict:
    import timm
    import torch

    from tmequant.inference.runner import autocast_dtype

    amp = autocast_dtype(dev)
    net = timm.create_model(arch, pretrained=False, num_classes=6).to(dev).eval()
    x = torch.randn(bs, 3, 224, 224, device=dev)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        for _ in range(2):
            net(x)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(n_batches):
            out = net(x)
        _sync(dev)
        dt = time.perf_counter() - t0
    del out, net
    return {"tiles_per_s": n_batches * bs / dt}


def part_infer(a: argparse.Namespace, ctx: dict) -> dict:
    import logging

    import torch

    import tmequant as tq
    from tmequant.inference.engine import default_batch_size
    from tmequant.inference.runner import resolve_device

    logging.getLogger("tmequant").setLevel(logging.WARNING)
    store = ctx.get("store")
    if store is None:
        raise RuntimeError("no store: the tile part failed or was not run")
    dev = resolve_device(a.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    n_tiles = tq.SlideStore(store).n_tiles
    rows = {}
    for name in a.models:
        row: dict = {}
        try:
            loaded = tq.load_model(name)
            bs = a.batch_size or default_batch_size(dev.type, loaded.card.tile_px)
            n_batches = 1 if a.quick else max(4, min(40, 8192 // bs))
            row["device"] = _device_rate(loaded, dev, bs, n_batches)
            if not loaded.card.is_detector:
                row["plain"] = _plain_rate(loaded.card.arch, dev, bs, n_batches)
            loaded = tq.load_model(name)  # a fresh copy for the engine (cudnn already tuned)
            # --quick: one chunk of one batch (the code path, not the figure)
            limit = {"chunk_rows": bs, "max_chunks": 1} if a.quick else {}
            t0, c0 = time.perf_counter(), _cpu()
            r = tq.predict_store(store, loaded, device=dev, batch_size=a.batch_size,
                                 overwrite=True, progress=False, **limit)
            _sync(dev)
            wall, cpu = time.perf_counter() - t0, _cpu() - c0
            done = r.n_computed or n_tiles
            row["store"] = {"n_tiles": done, "wall_s": wall, "cpu_s": cpu,
                            "tiles_per_s": done / wall, "loop_tiles_per_s": r.tiles_per_s,
                            "batch_size": r.batch_size, "precision": r.precision}
            row["share_of_device"] = row["store"]["tiles_per_s"] / row["device"]["tiles_per_s"]
            if "plain" in row:
                row["share_of_plain"] = row["store"]["tiles_per_s"] / row["plain"]["tiles_per_s"]
            if name == a.e2e_model:
                ctx["predict_s"] = wall
        except Exception as e:  # noqa: BLE001  # one model failing must not hide the others
            row["error"] = f"{type(e).__name__}: {e}"
            row["traceback"] = traceback.format_exc()[-2000:]
        rows[name] = row
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"device": str(dev), "n_tiles": n_tiles, "models": rows}


def _jpeg_tiles(slide: str, n: int) -> tuple[list[bytes], int]:
    """Up to n complete JPEG streams of level-0 tiles (the largest: tissue), and the tile side."""
    import tifffile

    with tifffile.TiffFile(slide) as tf:
        page = tf.pages[0]
        offsets, counts = np.asarray(page.dataoffsets), np.asarray(page.databytecounts)
        tables, side = page.jpegtables, page.tilewidth
        order = np.argsort(-counts)[:n]
        fh = tf.filehandle
        data = []
        for i in sorted(order.tolist()):
            fh.seek(int(offsets[i]))
            raw = fh.read(int(counts[i]))
            # abbreviated stream + the shared tables -> one self-contained JPEG
            data.append(raw if not tables else tables[:-2] + raw[2:])
    return data, side


def part_decode(a: argparse.Namespace, ctx: dict) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    import imagecodecs
    import torch
    import torchvision
    from torchvision.io import decode_jpeg

    from tmequant.inference.runner import resolve_device

    dev = resolve_device(a.device)
    n = 256 if a.quick else a.decode_tiles
    data, side = _jpeg_tiles(a.slide, n)
    n = len(data)
    mp = n * side * side / 1e6
    kept_equiv = n * side * side / KEPT_TILE_L0_PX
    out: dict = {"n_jpeg_tiles": n, "tile_px": side, "megapixels": mp, "device": str(dev),
                 "torchvision": torchvision.__version__, "cpu": {}, "device_decode": {}}
    cpus = os.cpu_count() or 1
    for w in sorted({1, 4, 8, cpus} if not a.quick else {1, min(2, cpus)}):
        if w > cpus:
            continue
        with ThreadPoolExecutor(w) as pool:
            list(pool.map(imagecodecs.jpeg8_decode, data[: min(n, 8)]))  # warm-up
            t0, c0 = time.perf_counter(), _cpu()
            for _ in pool.map(imagecodecs.jpeg8_decode, data, chunksize=16):
                pass
            dt, dc = time.perf_counter() - t0, _cpu() - c0
        out["cpu"][f"imagecodecs x{w}"] = {"workers": w, "wall_s": dt, "cpu_s": dc, "MPps": mp / dt,
                                           "kept_tiles_per_s": kept_equiv / dt}
    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
    for bsz in (64, 256) if not a.quick else (64,):
        decode_jpeg(tensors[:bsz], device=dev)  # warm-up (nvjpeg handles, allocator)
        _sync(dev)
        t0, c0 = time.perf_counter(), _cpu()
        for i in range(0, n, bsz):
            imgs = decode_jpeg(tensors[i : i + bsz], device=dev)
        _sync(dev)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
        out["device_decode"][f"decode_jpeg b{bsz}"] = {
            "batch": bsz, "wall_s": dt, "cpu_s": dc, "MPps": mp / dt,
            "kept_tiles_per_s": kept_equiv / dt}
    # the device decoder must give the CPU decoder's pixels (up to IDCT rounding)
    ref = imagecodecs.jpeg8_decode(data[0]).astype(np.int16)
    del imgs
    got = decode_jpeg(tensors[0], device=dev).permute(1, 2, 0).cpu().numpy().astype(np.int16)
    out["max_abs_diff_vs_cpu"] = int(np.abs(ref - got).max())
    out["mean_abs_diff_vs_cpu"] = float(np.abs(ref - got).mean())
    best_cpu = max(out["cpu"].values(), key=lambda r: r["MPps"])
    best_dev = max(out["device_decode"].values(), key=lambda r: r["MPps"])
    out["device_over_best_cpu"] = best_dev["MPps"] / best_cpu["MPps"]
    return out


def part_e2e(a: argparse.Namespace, ctx: dict) -> dict:
    """`tmequant run SLIDE` in a child process (default model: the cell detector)."""
    run_out = Path(a.work) / "run"
    shutil.rmtree(run_out, ignore_errors=True)
    cmd = [sys.executable, "-m", "tmequant", "-q", "run", a.slide, "--out", str(run_out),
           "--device", a.device, "--model", a.e2e_model, "--overwrite"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO))
        try:
            _, status, ru = os.wait4(p.pid, 0)
        except BaseException:  # SIGTERM from the caller's timeout: do not leave it running
            p.kill()
            p.wait()
            raise
        wall = time.perf_counter() - t0
        log.seek(0)
        text = log.read().decode(errors="replace")
    code = os.waitstatus_to_exitcode(status)
    res = {"command": " ".join(cmd), "exit_code": code, "wall_s": wall,
           "cpu_s": ru.ru_utime + ru.ru_stime, "peak_rss_mb": ru.ru_maxrss / 1024,
           "slides_per_hour": 3600 / wall, "log_tail": text[-2000:]}
    cohort = run_out / "cohort.csv"
    if cohort.is_file():
        import csv

        with cohort.open() as f:
            row = next(csv.DictReader(f), {})
        res["n_tiles"] = row.get("n_tiles") or row.get("tiles")
    if code != 0:
        raise RuntimeError(f"tmequant run exited {code}: {text[-800:]}")
    if ctx.get("tile_s") and ctx.get("predict_s") and not a.quick:  # quick predicts one batch
        res["pipelined_slides_per_hour"] = 3600 / max(ctx["tile_s"], ctx["predict_s"])
    return res


PARTS = {"tile": part_tile, "infer": part_infer, "decode": part_decode, "e2e": part_e2e}


def table(res: dict) -> str:
    lines = []
    env = res["env"]
    lines.append(f"device {env['device_name']}  torch {env['torch']}  CPUs {env['cpu_count']}  "
                 f"slide {res['slide']}")
    p = res["parts"]
    t = p.get("tile", {})
    if "error" not in t and t:
        lines.append(f"\ntiling: {t['n_tiles']} tiles in {t['wall_s']:.1f} s "
                     f"({t['tiles_per_s']:.0f} tiles/s, {t['workers']} workers, {t['cpu_s']:.0f} CPU-s)")
    inf = p.get("infer", {})
    if inf.get("models"):
        n_run = {r["store"]["n_tiles"] for r in inf["models"].values() if "store" in r}
        lines.append(f"\ninference from the store ({', '.join(map(str, sorted(n_run))) or '?'} of its "
                     f"{inf['n_tiles']} tiles) as a share of the model on device tensors")
        hdr = f"{'model':<28}{'device t/s':>11}{'plain t/s':>10}{'store t/s':>10}{'share':>7}{'CPU-s':>7}  precision"
        lines += [hdr, "-" * len(hdr)]
        for name, r in inf["models"].items():
            if "error" in r:
                lines.append(f"{name:<28} ERROR {r['error'][:100]}")
                continue
            plain = r.get("plain", {}).get("tiles_per_s")
            lines.append(f"{name:<28}{r['device']['tiles_per_s']:>11.0f}"
                         f"{'-' if plain is None else f'{plain:.0f}':>10}{r['store']['tiles_per_s']:>10.0f}"
                         f"{r['share_of_device']:>7.2f}{r['store']['cpu_s']:>7.0f}  {r['store']['precision']}"
                         f" (input {r['device']['input_px']} px, batch {r['device']['batch']})")
    d = p.get("decode", {})
    if d and "error" not in d:
        lines.append(f"\nJPEG decode of {d['n_jpeg_tiles']} level-0 tiles ({d['tile_px']} px)")
        hdr = f"{'decoder':<22}{'MP/s':>8}{'kept tiles/s':>13}{'CPU-s':>7}"
        lines += [hdr, "-" * len(hdr)]
        for name, r in {**d["cpu"], **d["device_decode"]}.items():
            lines.append(f"{name:<22}{r['MPps']:>8.0f}{r['kept_tiles_per_s']:>13.0f}{r['cpu_s']:>7.1f}")
        lines.append(f"device / best CPU: {d['device_over_best_cpu']:.2f}x; max |diff| vs CPU "
                     f"{d['max_abs_diff_vs_cpu']} (mean {d['mean_abs_diff_vs_cpu']:.2f})")
    e = p.get("e2e", {})
    if e and "error" not in e:
        lines.append(f"\nend to end (`tmequant run`, {e.get('n_tiles', '?')} tiles): {e['wall_s']:.1f} s wall, "
                     f"{e['cpu_s']:.0f} CPU-s, peak RSS {e['peak_rss_mb']:.0f} MB -> "
                     f"{e['slides_per_hour']:.1f} slides/hour"
                     + (f" (pipelined bound {e['pipelined_slides_per_hour']:.1f})"
                        if "pipelined_slides_per_hour" in e else ""))
    for name, r in p.items():
        if isinstance(r, dict) and "error" in r:
            lines.append(f"\n{name}: ERROR {r['error'][:300]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", required=True)
    ap.add_argument("--out", default=os.environ.get("OUT", "gpu_out"))
    ap.add_argument("--work", default=None, help="scratch (stores, run); default <out>/../bench_gpu_work")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--e2e-model", default="brca-cells-lite0")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's")
    ap.add_argument("--tile-workers", type=int, default=None)
    ap.add_argument("--decode-tiles", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--quick", action="store_true", help="few batches and tiles (CPU test)")
    a = ap.parse_args()
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: clean up children
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    a.work = a.work or str(out.resolve().parent / "bench_gpu_work")
    Path(a.work).mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    res: dict = {
        "benchmark": "gpu", "slide": a.slide, "command": " ".join(sys.argv),
        "env": {"device_name": torch.cuda.get_device_name(0) if cuda and a.device != "cpu"
                else platform.processor() or platform.machine(),
                "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
                "python": platform.python_version(), "quick": a.quick, "device": a.device},
        "parts": {},
    }
    ctx: dict = {}
    for name in a.parts:
        print(f"[bench_gpu] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            res["parts"][name] = PARTS[name](a, ctx)
        except Exception as e:  # noqa: BLE001  # each part is recorded on its own
            res["parts"][name] = {"error": f"{type(e).__name__}: {e}",
                                  "traceback": traceback.format_exc()[-3000:]}
            print(f"[bench_gpu] {name} failed: {e}", file=sys.stderr)
        res["parts"][name]["part_wall_s"] = time.perf_counter() - t0
        (out / "bench_gpu.json").write_text(json.dumps(res, indent=1, default=str))  # after each part
    text = table(res)
    (out / "bench_gpu.txt").write_text(text + "\n")
    print(text)
    print(f"\nJSON: {out / 'bench_gpu.json'}")
    sys.exit(1 if any("error" in r for r in res["parts"].values()) else 0)


if __name__ == "__main__":
    main()
