"""Benchmark of ``tmequant run``'s own work: per-stage times, the cost of a rerun, Dask, QuPath files.

Part 1 (``geojson``): one synthetic store of ``--geojson-tiles`` tiles (a whole resection is
~70,000 tiles at 0.5 um/px and 224 px) -> biomarkers -> QuPath GeoJSON as plain JSON, zip
(what QuPath imports) and gzip: seconds, MB and tiles/s, each as a ratio to plain JSON.

Part 2 (``run``): ``tmequant run`` on ``--slide`` (default: the shared benchmark slide) with
``--model`` (default: the untrained random-efficientnet_lite0, 224 px at 0.5 um/px):
per-stage seconds and tiles/s of a first run, then a rerun (every stage skipped, pictures
reused) and, with ``--local-workers N``, the same first run on a Dask LocalCluster; the
rerun and the cluster run are given as ratios to the serial first run.

    python scripts/bench_report.py --json /work/bench/bench_report.json
    python scripts/bench_report.py --skip-run            # the GeoJSON part only (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def bench_geojson(n_side: int, work: Path) -> list[dict]:
    """Build an n_side x n_side store by hand, compute biomarkers, write the GeoJSON 3 ways."""
    import zarr

    from tmequant.biomarkers import TileGrid, compute_biomarkers
    from tmequant.pipeline import write_slide_geojson
    from tmequant.roles import TISSUE_ROLES
    from tmequant.tiling.store import SlideStore

    rng = np.random.default_rng(0)
    n = n_side * n_side
    rr, cc = np.meshgrid(np.arange(n_side), np.arange(n_side), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.int32)
    k = len(TISSUE_ROLES)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[:, 0] += 2.0 * ((rr.ravel() - n_side / 2) ** 2 + (cc.ravel() - n_side / 2) ** 2 < (n_side / 3) ** 2)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    path = work / "geo.zarr"
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    tile_l0 = 448.0
    root.create_array("tiles/coords", data=(grid[:, ::-1] * tile_l0).astype(np.int64))
    root.create_array("tiles/grid", data=grid)
    root.create_array("tiles/tissue_fraction", data=np.ones(n, np.float32))
    card = {"name": "m", "version": "1", "tissue_classes": list(TISSUE_ROLES),
            "tissue_roles": {r: r for r in TISSUE_ROLES}, "cell_classes": [], "cell_roles": {}}
    g = root.create_group("predictions/m")
    g.create_array("tissue_probs", data=probs.astype(np.float16))
    g.attrs.update({"card": card, "params_hash": "p", "complete": True})
    ng = root.create_group("nuclei")
    ng.create_array("counts", data=rng.poisson(8, (n, 2)).astype(np.float32))
    ng.attrs.update({"columns": ["lymphocyte", "other"], "params_hash": "n", "complete": True})
    root.attrs.update({"schema_version": 1, "slide_id": "G", "source_path": "/x.svs", "slide_mpp_um": 0.25,
                       "target_mpp_um": 0.5, "tile_px": 224, "tile_um": 112.0, "tile_level0_px": tile_l0,
                       "params_hash": "s", "n_tiles": n, "complete": True})
    store = SlideStore(path)
    t0 = time.perf_counter()
    res = compute_biomarkers(TileGrid.from_store(store, "m"))
    t_bio = time.perf_counter() - t0
    rows = []
    for suffix in (".geojson", ".geojson.zip", ".geojson.gz"):
        t0 = time.perf_counter()
        p = write_slide_geojson(work / f"G{suffix}", store, "m", res)
        dt = time.perf_counter() - t0
        rows.append({"what": f"geojson {suffix}", "tiles": n, "s": dt, "tiles_per_s": n / dt,
                     "MB": p.stat().st_size / 1e6})
    rows.append({"what": "biomarkers (same store)", "tiles": n, "s": t_bio, "tiles_per_s": n / t_bio, "MB": None})
    base = rows[0]["s"]
    for r in rows:
        r["x_plain"] = r["s"] / base
    return rows


def bench_run(slide: str, model: str, work: Path, local_workers: int, device: str) -> list[dict]:
    from tmequant.pipeline import run_batch

    rows = []

    def one(label: str, out: Path, **kw) -> dict:
        t0 = time.perf_counter()
        res = run_batch([slide], out, model, device=device, progress=False, **kw)
        total = time.perf_counter() - t0
        (run,) = res.slides.values()
        if run.failure is not None:
            sys.exit(f"{label}: {run.failure.stage}: {run.failure.reason}")
        row = {"what": label, "tiles": run.n_tiles, "total_s": total,
               "stages_s": {k: round(v, 3) for k, v in run.seconds.items()},
               "stages_tiles_per_s": {k: round(v, 1) for k, v in run.tiles_per_s.items()},
               "stages": dict(run.stages), "cohort_and_report_s": total - sum(run.seconds.values())}
        rows.append(row)
        return row

    first = one("serial first run", work / "serial")
    one("serial rerun (all skipped)", work / "serial")
    if local_workers:
        one(f"LocalCluster({local_workers}) first run", work / "dask", local_workers=local_workers)
    for r in rows:
        r["x_first"] = r["total_s"] / first["total_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default="/work/bench/bench_slide.svs")
    ap.add_argument("--model", default="random-efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--local-workers", type=int, default=2)
    ap.add_argument("--geojson-tiles", type=int, default=70_000)
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default="/work/bench/bench_report.json")
    a = ap.parse_args()

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="bench_report_"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = _load()
    out: dict = {"cpu_count": os.cpu_count(), "load_before": load0}
    try:
        geo = bench_geojson(round(a.geojson_tiles ** 0.5), work)
        out["geojson"] = geo
        print(f"load {load0:.1f}")
        print(f"{'what':28s} {'tiles':>7s} {'s':>7s} {'tiles/s':>9s} {'MB':>7s} {'x plain':>8s}")
        for r in geo:
            mb = f"{r['MB']:7.1f}" if r["MB"] is not None else "      -"
            print(f"{r['what']:28s} {r['tiles']:7d} {r['s']:7.2f} {r['tiles_per_s']:9.0f} {mb} {r['x_plain']:8.2f}")
        if not a.skip_run:
            if not Path(a.slide).exists():
                sys.exit(f"no slide {a.slide}: pass --slide or --skip-run")
            runs = bench_run(a.slide, a.model, work / "run", a.local_workers, a.device)
            out["run"] = {"slide": a.slide, "model": a.model, "rows": runs}
            print()
            print(f"{'run':32s} {'tiles':>6s} {'total s':>8s} {'x first':>8s}  stage s (tiles/s)")
            for r in runs:
                st = ", ".join(f"{k} {v:.1f}" + (f" ({r['stages_tiles_per_s'][k]:.0f}/s)"
                                                 if k in r["stages_tiles_per_s"] else "")
                               for k, v in r["stages_s"].items() if k != "cells")
                print(f"{r['what']:32s} {r['tiles']:6d} {r['total_s']:8.1f} {r['x_first']:8.2f}  {st}; "
                      f"cohort+report {r['cohort_and_report_s']:.1f}")
        out["load_after"] = _load()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1, default=str))
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
