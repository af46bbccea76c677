#!/usr/bin/env python
"""Inference throughput: tmequant's engine from a real slide store vs its ceiling and a naive loop.

For each architecture (efficientnet_lite0, resnet18, resnet50 at 224 px; seeded random weights,
which cost the same as trained ones), in one run on one machine:

* ``ceiling``: the engine's compute alone (on-device normalisation + network, same batch size,
  precision and memory format) on synthetic uint8 tensors already on the device;
* ``engine``: :func:`tmequant.inference.predict_store` end to end on the store (DataLoader
  readers, host->device copies, writing predictions), DataLoader start-up included;
* ``naive``: one tile at a time through PIL + torchvision ToTensor/Normalize, fp32, no
  workers, default memory format: the loop a notebook would write.

Ratios: engine / ceiling (goal >= 0.8) and engine / naive. With CUDA present, a GPU section
adds eager fp32 vs AMP + channels_last + torch.compile on synthetic tensors, naming the GPU.

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


def bench_ceiling(loaded, dev: torch.device, n: int, bs: int, compile: bool = False) -> float:
    """Tiles/s of the engine's own compute on uint8 tensors already on the device."""
    from tmequant.inference.engine import _Runner

    runner = _Runner(loaded.model, loaded.card, dev, compile)
    x = torch.randint(0, 256, (bs, 224, 224, 3), dtype=torch.uint8, device=dev)
    for _ in range(3 if compile else 1):  # warm-up (compilation, cudnn autotune, allocator)
        runner(x)
    _sync(dev)
    n_batches = max(1, -(-n // bs))
    t0 = time.perf_counter()
    for _ in range(n_batches):
        out = runner(x)
    _sync(dev)
    del out
    return n_batches * bs / (time.perf_counter() - t0)


def bench_naive(arch: str, store_path: str, dev: torch.device, n: int) -> float:
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
        t0 = time.perf_counter()
        for i in range(n):
            x = tf(Image.fromarray(np.asarray(images[i])))[None].to(dev)
            net(x)["tissue_logits"].softmax(1).cpu()
    return n / (time.perf_counter() - t0)


def bench_engine(loaded, store_path: str, dev: torch.device, bs: int, workers: int | None,
                 compile: bool = False) -> tuple[float, float]:
    """(tiles/s reported by predict_store, wall tiles/s including its setup)."""
    from tmequant.inference import predict_store
    from tmequant.tiling.store import SlideStore

    n = SlideStore(store_path).n_tiles
    t0 = time.perf_counter()
    r = predict_store(store_path, loaded, device=dev, batch_size=bs, num_workers=workers,
                      compile=compile, overwrite=True, progress=False)
    _sync(dev)
    return r.tiles_per_s, n / (time.perf_counter() - t0)


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
        fast = bench_ceiling(build_random(arch), dev, n, bs, compile=True)
        e2e, e2e_wall = bench_engine(build_random(arch), store_path, dev, bs, args.workers,
                                     compile=True)
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
    ap.add_argument("--out", default="bench_inference.json")
    args = ap.parse_args()

    import logging

    logging.getLogger("tmequant").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    from tmequant.inference import resolve_device
    from tmequant.inference.engine import CPU_BATCH, CUDA_BATCH, _precision_name, autocast_dtype
    from tmequant.models.registry import build_random

    dev = resolve_device(args.device)
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
            "torch": torch.__version__, "batch_size": bs, "precision": _precision_name(autocast_dtype(dev)),
            "store": store_info, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "rows": [],
        }
        for arch in args.archs:
            naive = bench_naive(arch, store_path, dev, n)
            ceiling = bench_ceiling(build_random(arch), dev, n, bs)
            engine, engine_wall = bench_engine(build_random(arch), store_path, dev, bs, args.workers)
            result["rows"].append({
                "arch": arch, "naive_tiles_per_s": naive, "ceiling_tiles_per_s": ceiling,
                "engine_tiles_per_s": engine, "engine_wall_tiles_per_s": engine_wall,
                "engine_over_ceiling": engine / ceiling, "engine_over_naive": engine / naive,
            })
            print(f"  {arch}: done", file=sys.stderr)
        if dev.type == "cuda":
            result["gpu"] = gpu_section(args, store_path, dev)
        result["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    print(f"\ninference on {result['device']} ({result['device_name']}), {n} real tiles 224 px, "
          f"batch {bs}, {result['precision']}, torch threads {result['torch_threads']}, "
          f"load avg {result['load_average_at_start']}")
    hdr = f"{'arch':<20}{'naive':>9}{'ceiling':>9}{'engine':>9}{'eng(wall)':>10}{'eng/ceil':>9}{'eng/naive':>10}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in result["rows"]:
        print(f"{r['arch']:<20}{r['naive_tiles_per_s']:>9.1f}{r['ceiling_tiles_per_s']:>9.1f}"
              f"{r['engine_tiles_per_s']:>9.1f}{r['engine_wall_tiles_per_s']:>10.1f}"
              f"{r['engine_over_ceiling']:>9.2f}{r['engine_over_naive']:>10.2f}")
    print("(tiles/s; engine = predict_store's compute loop incl. DataLoader start-up; "
          "eng(wall) adds model transfer and store set-up)")
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
