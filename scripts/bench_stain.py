"""Benchmark: the cost of a card's Macenko stain normalisation in ``predict_store``.

    python scripts/bench_stain.py [--tiles 128] [--tile-px 224] [--arch efficientnet_lite0]
                                  [--threads 1] [--workers 1] [--repeat 2] [--json out.json]

Measures (CPU) the per-tile normaliser alone (ms/tile) and ``predict_store`` tiles/s on the
same store with and without ``stain_normalization`` in the card (normalisation runs in the
DataLoader reader processes). Tiles are the shared NCT-CRC-HE samples repeated. Prints a
table (best of --repeat) and writes JSON; ratios are against the unnormalised run.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiles", type=int, default=128)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", default="bench_stain.json")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from conftest import TESTDATA
    from test_stain import _store_of

    from tmequant.inference import predict_store
    from tmequant.models import LoadedModel, ModelCard, create_model
    from tmequant.models.stain import macenko_fit, normalize_batch
    from tmequant.training.dataset import fit_tile, read_image

    src = sorted((TESTDATA / "tiles" / "nct-crc-he-samples").glob("*.tif"))
    base = [np.asarray(fit_tile(read_image(p), a.tile_px, None)) for p in src]
    tiles = np.stack([base[i % len(base)] for i in range(a.tiles)])
    params = {**macenko_fit(read_image(src[-2])), "source": src[-2].name}  # the STR tile

    best = np.inf
    for _ in range(a.repeat):
        t0 = time.perf_counter()
        normalize_batch(tiles, params)
        best = min(best, time.perf_counter() - t0)
    ms_tile = 1000 * best / a.tiles

    card = ModelCard(name="bench", arch=a.arch, tile_px=a.tile_px, mpp_um=0.5,
                     tissue_classes=["T", "S"], tissue_roles={"T": "tumor", "S": "stroma"})
    torch.manual_seed(0)
    net = create_model(card)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = _store_of(Path(tmp) / "s.zarr", tiles, 0.5)
        for label, sn in (("raw tiles", None), ("macenko (card)", params)):
            c = card.model_copy(update={"stain_normalization": None})
            if sn is not None:
                c = ModelCard(**{**card.to_dict(), "stain_normalization": sn})
            lm = LoadedModel(model=net, card=c, source="bench")
            tps = 0.0
            for _ in range(a.repeat):
                r = predict_store(store, lm, device="cpu", progress=False, overwrite=True,
                                  num_workers=a.workers)
                tps = max(tps, r.tiles_per_s)
            rows.append({"run": label, "tiles_per_s": tps})
    for r in rows:
        r["ratio_vs_raw"] = r["tiles_per_s"] / rows[0]["tiles_per_s"]
    out = {"machine": platform.processor() or platform.machine(), "torch_threads": a.threads,
           "workers": a.workers, "tiles": a.tiles, "tile_px": a.tile_px, "arch": a.arch,
           "normalize_ms_per_tile": ms_tile, "predict_store": rows}
    print(f"normaliser alone: {ms_tile:.2f} ms/tile ({a.tile_px} px, numpy, 1 process)")
    print(f"{'predict_store (' + a.arch + ')':<40} {'tiles/s':>9} {'ratio':>7}")
    for r in rows:
        print(f"{r['run']:<40} {r['tiles_per_s']:>9.1f} {r['ratio_vs_raw']:>7.2f}")
    Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
