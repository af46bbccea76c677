#!/usr/bin/env python
"""Inference throughput: tmequant's engine from a real slide store vs a plain timm model and a naive loop.

For each architecture (efficientnet_lite0, resnet18, resnet50 at 224 px; seeded random weights,
which cost the same as trained ones), in one run on one machine, same torch threads
(``--threads``) and batch size for all:

* ``ceiling``: the plain timm model, ``timm.create_model(arch, num_classes=6)``, eval, fp32
  (autocast on CUDA), default (NCHW) memory format, on random float tensors already on the
  device: what the network alone costs, with nothing of tmequant in it;
* ``runner``: tmequant's own compute alone (on-device uint8 -> float normalisation + its
  TmeNet, channels_last, the engine's precision) on uint8 tensors already on the device
  (informative: the difference from ``ceiling`` is tmequant's per-batch overhead or gain);
* ``engine``: :func:`tmequant.inference.predict_store` end to end on the store (DataLoader
  readers, host->device copies, writing predictions), DataLoader start-up included;
* ``naive``: one tile at a time through PIL + torchvision ToTensor/Normalize, fp32, no
  workers, default memory format: the loop a notebook would write.

Every row has tiles/s and tiles per CPU-second (user + sys of this process and its reaped
children: the engine's DataLoader readers), which a busy shared machine distorts less.
Ratios, each by wall and by CPU: engine / ceiling (goal >= 0.8) and engine / naive. With CUDA
present, a GPU section adds eager fp32 vs AMP + channels_last + torch.compile on synthetic
tensors, naming the GPU.

    python scripts/bench_inference.py                      # CMU-1-Small-Region, 96 tiles, CPU
    python scripts/bench_inference.py --n-tiles 2048 --device cuda --out bench_gpu.json

Prints a table and writes JSON (default ``bench_inference.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = REPO.parent / "shared" / "testdata" / "slides" / "CMU-1-Small-Region.svs"
ARCHS = ("efficientnet_lite0", "resnet18", "resnet50")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _cpu() -> float:
    """User + sys seconds of this process and its reaped children (DataLoader readers)."""
    import resource

    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Rate:
    """Tiles per wall second and per CPU-second of the code inside ``with Rate(n) as r``."""

    def __init__(self, n: int, dev: torch.device | None = None) -> None:
        self.n, self.dev = n, dev

    def __enter__(self) -> Rate:
        self.t0, self.c0 = time.perf_counter(), _cpu()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.dev is not None:
            _sync(self.dev)
        self.wall, self.cpu = time.perf_counter() - self.t0, _cpu() - self.c0
        self.per_s = self.n / max(self.wall, 1e-9)
        self.per_cpu_s = self.n / max(self.cpu, 1e-9)


def make_store(args: argparse.Namespace, tmp: Path) -> tuple[str, dict]:
    """A real store of exactly ``n_tiles`` 224-px tiles at 0.5 um/px (cycled if the slide is small)."""
    import zarr

    from tmequant.tiling.store import SlideStore

    if args.store:
        src_path = args.store
    else:
        from tmequant.inputs import SlideSpec
        from tmequant.tiling.tile import TilingParams, tile_slide

        slide = Path(args.slide)
        if not slide.exists():
            sys.exit(f"slide not found: {slide} (pass --slide or --store)")
        params = TilingParams(target_mpp_um=0.5, tile_px=224, min_tissue_fraction=0.0)
        src_path = tile_slide(SlideSpec("bench-src", slide), tmp, params, progress=False,
                              qc_png=False).store_path
    src = SlideStore(src_path)
    if (src.tile_px, round(src.target_mpp_um, 3)) != (224, 0.5):
        sys.exit(f"{src_path}: need a 224 px / 0.5 um/px store, got {src.tile_px} / {src.target_mpp_um}")
    n_src, n = src.n_tiles, args.n_tiles
    idx = np.arange(n) % n_src
    images = np.asarray(src.images[: min(n, n_src)])[idx % min(n, n_src)]
    dst_path = str(tmp / "bench.zarr")
    root = zarr.open_group(dst_path, mode="w", zarr_format=3)
    arr = src.images
    # Same chunking, sharding and codec as the source store: reading costs what it costs there.
    root.create_array("tiles/images", data=images, chunks=arr.chunks,
                      shards=getattr(arr, "shards", None), compressors=arr.compressors)
    for name in ("tiles/coords", "tiles/grid", "tiles/tissue_fraction"):
        root.create_array(name, data=np.asarray(src.root[name][...])[idx])
    attrs = dict(src.attrs)
    attrs.update(n_tiles=n, slide_id="bench", params_hash=f"bench-{n}")
    root.attrs.update(attrs)
    info = {"source_store": str(src_path), "source_tiles": n_src, "n_tiles": n,
            "cycled": n > n_src, "chunks": list(arr.chunks),
            "shards": list(arr.shards) if getattr(arr, "shards", None) else None,
            "compressors": [type(c).__name__ for c in arr.compressors]}
    return dst_path, info


def bench_plain_timm(arch: str, dev: torch.device, n: int, bs: int) -> Rate:
    """The ceiling: a plain timm model on random float tensors already on the device
    (NCHW, fp32 on the CPU, the device's autocast dtype on CUDA), same threads and batch."""
    import timm

    from tmequant.inference.runner import autocast_dtype

    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=6).to(dev).eval()
    x = torch.randn(bs, 3, 224, 224, device=dev)
    amp = autocast_dtype(dev)
    n_batches = max(1, -(-n // bs))
    with torch.inference_mode(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        net(x)  # warm-up (allocator, cudnn)
        _sync(dev)
        with Rate(n_batches * bs, dev) as r:
            for _ in range(n_batches):
                out = net(x).float().softmax(1)
    del out
    return r


def bench_ceiling(loaded, dev: torch.device, n: int, bs: int, compile: bool = False,
                  runtime: str = "torch") -> Rate:
    """tmequant's own compute (its runner) on uint8 tensors already on the device."""
    from tmequant.inference.engine import _Runner

    runner = _Runner(loaded.model, loaded.card, dev, compile, runtime)
    x = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=dev)
    for _ in range(3 if compile else 1):  # warm-up (compilation, cudnn autotune, allocator)
        runner(x)
    _sync(dev)
    n_batches = max(1, -(-n // bs))
    with Rate(n_batches * bs, dev) as r:
        for _ in range(n_batches):
            out = runner(x)
    del out
    return r


def bench_naive(arch: str, store_path: str, dev: torch.device, n: int) -> Rate:
    """One tile at a time: zarr -> PIL -> ToTensor/Normalize -> fp32 model -> CPU."""
    from PIL import Image
    from torchvision import transforms

    from tmequant.models.registry import build_random
    from tmequant.tiling.store import SlideStore

    loaded = build_random(arch)
    net = loaded.model.to(dev).eval()
    tf = transforms.Compose([transforms.ToTensor(),
                             transforms.Normalize(loaded.card.mean, loaded.card.std)])
    images = SlideStore(store_path).images
    with torch.inference_mode():  # one warm-up tile, as for the others
        net(tf(Image.fromarray(np.asarray(images[0])))[None].to(dev))
        _sync(dev)
        with Rate(n, dev) as r:
            for i in range(n):
                x = tf(Image.fromarray(np.asarray(images[i])))[None].to(dev)
                net(x)["tissue_logits"].softmax(1).cpu()
    return r


def bench_engine(loaded, store_path: str, dev: torch.device, bs: int, workers: int | None,
                 compile: bool = False, runtime: str = "torch") -> tuple[float, Rate]:
    """(tiles/s reported by predict_store, the whole call's Rate including its set-up)."""
    from tmequant.inference import predict_store
    from tmequant.tiling.store import SlideStore

    n = SlideStore(store_path).n_tiles
    with Rate(n, dev) as rate:
        r = predict_store(store_path, loaded, device=dev, batch_size=bs, num_workers=workers,
                          compile=compile, overwrite=True, progress=False, runtime=runtime)
    return r.tiles_per_s, rate


def gpu_section(args: argparse.Namespace, store_path: str, dev: torch.device) -> dict:
    """Eager fp32 (NCHW) vs AMP + channels_last + compile, synthetic tensors on the GPU."""
    from tmequant.inference.engine import autocast_dtype
    from tmequant.models.registry import build_random

    bs = args.batch_size or 256
    amp = autocast_dtype(dev)
    out = {"gpu": torch.cuda.get_device_name(dev), "batch_size": bs,
           "amp_dtype": str(amp).replace("torch.", ""), "rows": []}
    n = max(args.n_tiles, 8 * bs)
    for arch in args.archs:
        net = build_random(arch).model.to(dev).eval()
        x = torch.randn(bs, 3, 224, 224, device=dev)
        with torch.inference_mode():
            net(x)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(n // bs):
                net(x)
            _sync(dev)
        eager = (n // bs) * bs / (time.perf_counter() - t0)
        del net
        fast = bench_ceiling(build_random(arch), dev, n, bs, compile=True).per_s
        e2e, e2e_rate = bench_engine(build_random(arch), store_path, dev, bs, args.workers,
                                     compile=True)
        e2e_wall = e2e_rate.per_s
        row = {"arch": arch, "eager_fp32_tiles_per_s": eager, "amp_cl_compile_tiles_per_s": fast,
               "speedup": fast / eager, "engine_compile_tiles_per_s": e2e,
               "engine_compile_wall_tiles_per_s": e2e_wall, "engine_over_ceiling": e2e / fast}
        out["rows"].append(row)
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slide", default=str(DEFAULT_SLIDE), help="slide to tile (0.5 um/px, 224 px)")
    ap.add_argument("--store", default=None, help="use this 224 px / 0.5 um/px store instead")
    ap.add_argument("--n-tiles", type=int, default=96, help="tiles per measurement (CPU: keep small)")
    ap.add_argument("--archs", nargs="+", default=list(ARCHS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the engine's (32 CPU, 256 CUDA)")
    ap.add_argument("--workers", type=int, default=None, help="engine readers (default: the engine's)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (shared machine: 2)")
    ap.add_argument("--runtime", default="auto",
                    help="runtime of the runner and engine rows: auto (ONNX Runtime on the CPU), torch, onnx")
    ap.add_argument("--out", default="bench_inference.json")
    args = ap.parse_args()

    import logging

    logging.getLogger("tmequant").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    from tmequant.inference import resolve_device
    from tmequant.inference.engine import CPU_BATCH, CUDA_BATCH
    from tmequant.inference.runner import autocast_dtype, precision_name
    from tmequant.models.registry import build_random

    dev = resolve_device(args.device)
    from tmequant.inference.runner import resolve_runtime

    runtime = resolve_runtime(args.runtime, dev)
    bs = args.batch_size or (CUDA_BATCH if dev.type == "cuda" else CPU_BATCH)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    with tempfile.TemporaryDirectory(prefix="tmq-bench-") as tmpd:
        store_path, store_info = make_store(args, Path(tmpd))
        n = store_info["n_tiles"]
        result = {
            "benchmark": "inference", "device": str(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "torch": torch.__version__, "batch_size": bs, "runtime": runtime, "precision": precision_name(autocast_dtype(dev)),
            "store": store_info, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "rows": [],
        }
        for arch in args.archs:
            naive = bench_naive(arch, store_path, dev, n)
            ceiling = bench_plain_timm(arch, dev, n, bs)
            runner = bench_ceiling(build_random(arch), dev, n, bs, runtime=runtime)
            engine, eng = bench_engine(build_random(arch), store_path, dev, bs, args.workers,
                                       runtime=runtime)
            result["rows"].append({
                "arch": arch,
                "naive_tiles_per_s": naive.per_s, "naive_tiles_per_cpu_s": naive.per_cpu_s,
                "ceiling_tiles_per_s": ceiling.per_s, "ceiling_tiles_per_cpu_s": ceiling.per_cpu_s,
                "runner_tiles_per_s": runner.per_s, "runner_tiles_per_cpu_s": runner.per_cpu_s,
                "engine_tiles_per_s": engine, "engine_wall_tiles_per_s": eng.per_s,
                "engine_wall_tiles_per_cpu_s": eng.per_cpu_s,
                "engine_cpu_s": eng.cpu, "engine_wall_s": eng.wall,
                "engine_over_ceiling": eng.per_s / ceiling.per_s,
                "engine_over_ceiling_cpu": eng.per_cpu_s / ceiling.per_cpu_s,
                "engine_over_naive": eng.per_s / naive.per_s,
                "engine_over_naive_cpu": eng.per_cpu_s / naive.per_cpu_s,
                "runner_over_ceiling": runner.per_s / ceiling.per_s,
            })
            print(f"  {arch}: done", file=sys.stderr)
        if dev.type == "cuda":
            result["gpu"] = gpu_section(args, store_path, dev)
        result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print(f"\ninference on {result['device']} ({result['device_name']}), {n} real tiles 224 px, "
          f"batch {bs}, {result['precision']}, runtime {runtime}, torch threads {result['torch_threads']}, "
          f"load avg {result['load_average_at_start']}")
    hdr = (f"{'arch':<20}{'':<9}{'naive':>8}{'ceiling':>9}{'runner':>8}{'engine':>8}"
           f"{'eng/ceil':>9}{'eng/naive':>10}")
    print(hdr + "\n" + "-" * len(hdr))
    for r in result["rows"]:
        print(f"{r['arch']:<20}{'tiles/s':<9}{r['naive_tiles_per_s']:>8.1f}{r['ceiling_tiles_per_s']:>9.1f}"
              f"{r['runner_tiles_per_s']:>8.1f}{r['engine_wall_tiles_per_s']:>8.1f}"
              f"{r['engine_over_ceiling']:>9.2f}{r['engine_over_naive']:>10.2f}")
        print(f"{'':<20}{'/CPU-s':<9}{r['naive_tiles_per_cpu_s']:>8.2f}{r['ceiling_tiles_per_cpu_s']:>9.2f}"
              f"{r['runner_tiles_per_cpu_s']:>8.2f}{r['engine_wall_tiles_per_cpu_s']:>8.2f}"
              f"{r['engine_over_ceiling_cpu']:>9.2f}{r['engine_over_naive_cpu']:>10.2f}")
    print("naive: 1 tile at a time, PIL + torchvision, no readers; ceiling: plain timm model on "
          "random float tensors in memory (NCHW); runner: tmequant's compute on uint8 tensors in "
          "memory; engine: predict_store on the store, whole call (set-up, DataLoader start-up, "
          "writing). Ratios by wall (tiles/s) and by CPU (tiles per CPU-second).")
    if "gpu" in result:
        g = result["gpu"]
        print(f"\nGPU {g['gpu']}: eager fp32 vs AMP({g['amp_dtype']}) + channels_last + compile, batch {g['batch_size']}")
        hdr = f"{'arch':<20}{'eager fp32':>11}{'amp+cl+cmp':>11}{'speedup':>9}{'engine':>9}{'eng/ceil':>9}"
        print(hdr + "\n" + "-" * len(hdr))
        for r in g["rows"]:
            print(f"{r['arch']:<20}{r['eager_fp32_tiles_per_s']:>11.1f}{r['amp_cl_compile_tiles_per_s']:>11.1f}"
                  f"{r['speedup']:>9.2f}{r['engine_compile_tiles_per_s']:>9.1f}{r['engine_over_ceiling']:>9.2f}")
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
