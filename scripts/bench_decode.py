"""Full JPEG decode + box average against DCT-domain scaled decode (``--fast-decode``).

Speed: ``tile_slide`` on the bench slide (0.25 um/px JPEG, tiled at 0.5 um/px: an exact 2x
reduction), alternating the two modes ``--repeats`` times; wall and CPU seconds (user + sys of
this process) per run. Fidelity: a real-H&E crop of the bench slide written as its own
pyramid, tiled both ways, and the bundled cell detector run on both stores: pixel mean
absolute difference, tissue-probability differences and per-class cell counts.

    python scripts/bench_decode.py --slide /work/bench/bench_slide.svs --json bench_decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from tmequant.domain import DEFAULT_MODEL
from tmequant.inference.engine import predict_store
from tmequant.models import load_model
from tmequant.store import SlideStore
from tmequant.tiling import TilingParams, tile_slide
from tmequant.wsi import open_slide
from tmequant.wsi.write import write_pyramid_tiff


def speed(slide: Path, work: Path, repeats: int, workers: int) -> list[dict]:
    rows = []
    for rep in range(repeats):
        for dct in (False, True):
            out = work / f"speed-{int(dct)}"
            shutil.rmtree(out, ignore_errors=True)
            c0, t0 = os.times(), time.perf_counter()
            r = tile_slide(slide, out, TilingParams(jpeg_dct_scaling=dct), progress=False,
                           workers=workers, overwrite=True)
            t1, c1 = time.perf_counter(), os.times()
            cpu = (c1.user - c0.user) + (c1.system - c0.system)
            rows.append({"dct": dct, "repeat": rep, "n_tiles": r.n_tiles, "wall_s": t1 - t0,
                         "cpu_s": cpu, "tiles_s": r.seconds.get("tiles")})
            print(f"  {'dct ' if dct else 'full'} run {rep}: {r.n_tiles} tiles, {t1 - t0:.1f} s wall, "
                  f"{cpu:.1f} s CPU", flush=True)
    return rows


def fidelity(slide: Path, work: Path, crop_px: int) -> dict:
    with open_slide(slide) as s:
        w, h = s.dimensions
        img = s.read_region(((w - crop_px) // 2 // 256 * 256, (h - crop_px) // 2 // 256 * 256), 0,
                            (crop_px, crop_px))
        mpp = s.info.mpp_um
    crop = work / "crop.svs"
    write_pyramid_tiff(crop, img, mpp_um=mpp, tile_px=256, quality=90)
    model = load_model(DEFAULT_MODEL)
    res = {}
    for dct in (False, True):
        r = tile_slide(crop, work / f"fid-{int(dct)}", TilingParams(jpeg_dct_scaling=dct), progress=False)
        predict_store(r.store_path, model, device="cpu", progress=False)
        st = SlideStore(r.store_path)
        res[dct] = (st.images[:], st.tissue_probs(model.card.name).astype(np.float64),
                    st.read_cells(model.card.name)["class"].value_counts().to_dict())
    (ia, pa, ca), (ib, pb, cb) = res[False], res[True]
    return {"n_tiles": len(ia), "pixel_mad": float(np.abs(ia.astype(float) - ib).mean()),
            "probs_max_abs_diff": float(np.abs(pa - pb).max()),
            "probs_mean_abs_diff": float(np.abs(pa - pb).mean()),
            "counts_full": {str(k): int(v) for k, v in ca.items()},
            "counts_dct": {str(k): int(v) for k, v in cb.items()},
            "count_rel_diff": {str(k): (cb.get(k, 0) - v) / v for k, v in ca.items() if v}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slide", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--crop-px", type=int, default=8960)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the detector")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        sp = speed(a.slide, Path(d), a.repeats, a.workers)
        fid = fidelity(a.slide, Path(d), a.crop_px)
    full = [r for r in sp if not r["dct"]]
    dct = [r for r in sp if r["dct"]]
    n = full[0]["n_tiles"]
    print("\n| decode | tiles | wall s (best) | CPU s (best) | tiles per CPU-s | vs full, per CPU-s |")
    print("|---|---|---|---|---|---|")
    best_full = min(r["cpu_s"] for r in full)
    for name, rs in (("full + box average", full), ("DCT-scaled (--fast-decode)", dct)):
        bc = min(r["cpu_s"] for r in rs)
        print(f"| {name} | {n} | {min(r['wall_s'] for r in rs):.1f} | {bc:.1f} | {n / bc:.0f} | "
              f"{best_full / bc:.2f}x |")
    print(f"\nfidelity on a {a.crop_px} px real-H&E crop ({fid['n_tiles']} tiles), bundled detector: "
          f"pixel MAD {fid['pixel_mad']:.2f} grey levels, tissue probs max |diff| "
          f"{fid['probs_max_abs_diff']:.3f} (mean {fid['probs_mean_abs_diff']:.4f}), counts "
          + ", ".join(f"{k} {fid['counts_full'][k]} -> {fid['counts_dct'].get(k, 0)} "
                      f"({fid['count_rel_diff'][k]:+.1%})" for k in fid["count_rel_diff"]))
    if a.json:
        a.json.write_text(json.dumps({"speed": sp, "fidelity": fid}, indent=1))


if __name__ == "__main__":
    main()
