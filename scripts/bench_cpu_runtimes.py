#!/usr/bin/env python
"""What an inference runtime buys on the CPU, at unchanged outputs.

For three networks on the same uint8 tiles of a real slide store (CMU-1-Small-Region tiled at
0.5 um/px, cycled to ``--n-tiles``): tmequant's efficientnet_lite0 and resnet18 tile
classifiers (seeded random weights, which cost what trained ones cost) on 224 px tiles, and
the bundled cell detector ``brca-cells-lite0`` on 288 px canvases (224 px tiles with their
32 px context, as ``predict_store`` runs it). Each network, same threads and batch, is run as:

* ``eager``: PyTorch, fp32, NCHW (the baseline every ratio is against);
* ``channels_last``: PyTorch fp32 NHWC (tmequant's torch path for classifiers);
* ``compile``: channels_last + ``torch.compile`` (inductor; compile time reported apart);
* ``bf16``: channels_last under ``torch.autocast("cpu", bfloat16)``;
* ``onnx``: ONNX Runtime through :class:`tmequant.inference.runner.DeviceNet` (the default
  on the CPU since this change), export time reported apart;
* ``openvino``: OpenVINO on the same exported graph, if ``openvino`` imports.

Columns: tiles/s, tiles per CPU-second (user + sys), the ratio to eager per CPU-second, and
the outputs against eager: max |diff| of the tissue probabilities (classifiers; the issue's
tolerance is 0.02) or of the sigmoid heatmaps and the change in the number of cells found
(detector; tolerance 1%). A row whose outputs are outside tolerance says so.

    python scripts/bench_cpu_runtimes.py                 # 128 tiles per network, 2 threads
    python scripts/bench_cpu_runtimes.py --skip compile  # without the minutes of compiling

Prints a table and writes JSON (default ``bench_cpu_runtimes.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_inference import DEFAULT_SLIDE, Rate, make_store

VARIANTS = ("eager", "channels_last", "compile", "bf16", "onnx", "openvino")
PROB_TOL = 0.02  # tissue probabilities, max |diff| (issue 17)
COUNT_TOL = 0.01  # cells found, relative


def _classifier(arch: str) -> Any:
    from tmequant.models import LoadedModel, ModelCard, create_model

    card = ModelCard(name=f"bench-{arch}", arch=arch, tile_px=224, mpp_um=0.5,
                     tissue_classes=["tumor", "stroma", "immune", "other"],
                     tissue_roles={"tumor": "tumor", "stroma": "stroma", "immune": "immune",
                                   "other": "other_tissue"})
    torch.manual_seed(0)
    return LoadedModel(model=create_model(card).eval(), card=card, source="random")


def _canvases(tiles: np.ndarray, margin: int) -> np.ndarray:
    """(n, T + 2m, T + 2m, 3): each tile inside glass plus real neighbouring pixels (the
    next tile's), padded to a multiple of 32 as the detector path does."""
    from tmequant.inference.cell_store import _pad_batch

    n, t = len(tiles), tiles.shape[1]
    side = t + 2 * margin
    out = np.full((n, side, side, 3), 255, np.uint8)
    out[:, margin:margin + t, margin:margin + t] = tiles
    nxt = np.roll(tiles, -1, axis=0)
    out[:, margin:margin + t, margin + t:] = nxt[:, :, :margin]
    return _pad_batch(out)


def _openvino_fn(loaded: Any, side: int) -> tuple[Callable[[np.ndarray], dict], float]:
    import openvino as ov

    from tmequant.inference.runner import _Normalised

    net = loaded.model.eval()
    with torch.inference_mode():
        keys = sorted(net(torch.zeros(1, 3, side, side)).keys())
    wrapped = _Normalised(net, loaded.card, keys).eval()
    t0 = time.perf_counter()
    om = ov.convert_model(wrapped, example_input=torch.full((2, side, side, 3), 255,
                                                                  dtype=torch.uint8))
    cm = ov.Core().compile_model(om, "CPU", {"INFERENCE_NUM_THREADS": torch.get_num_threads(),
                                             "INFERENCE_PRECISION_HINT": "f32"})
    setup = time.perf_counter() - t0

    def run(x: np.ndarray) -> dict:
        res = cm(x)
        return {k: torch.from_numpy(np.asarray(res[i])) for i, k in enumerate(keys)}

    return run, setup


def _runner_fn(loaded: Any, variant: str) -> tuple[Callable[[np.ndarray], dict], float]:
    """(batch uint8 NHWC numpy -> output dict, set-up seconds) for one variant."""
    from tmequant.inference.runner import DeviceNet

    cpu = torch.device("cpu")
    # the variants change the net in place (memory format): each gets its own copy
    import copy

    model = copy.deepcopy(loaded.model)
    t0 = time.perf_counter()
    if variant == "openvino":
        return _openvino_fn(type(loaded)(model=model, card=loaded.card, source=""), 224)
    kw: dict[str, Any] = {
        "eager": {}, "channels_last": {"channels_last": True},
        "compile": {"channels_last": True, "compile": True},
        "bf16": {"channels_last": True, "amp": torch.bfloat16},
        "onnx": {"runtime": "onnx"}}[variant]
    dn = DeviceNet(model, loaded.card, cpu, **kw)
    return (lambda x: dn.forward(torch.from_numpy(x))), time.perf_counter() - t0


def _post(card: Any, out: dict) -> torch.Tensor:
    if card.is_detector:
        return out["heatmap_logits"].float().sigmoid()
    return out["tissue_logits"].float().softmax(1)


def _n_cells(card: Any, heat: torch.Tensor) -> int:
    from tmequant.models.detector import peaks_table

    return len(peaks_table(heat, card.detector, card.cell_classes, card.mpp_um)["b"])


def bench_network(loaded: Any, batches: list[np.ndarray], skip: set[str]) -> list[dict]:
    card = loaded.card
    n = sum(len(b) for b in batches)
    rows, ref, ref_cells = [], None, None
    for v in VARIANTS:
        row: dict[str, Any] = {"network": card.name, "variant": v}
        if v in skip:
            row["skipped"] = "--skip"
            rows.append(row)
            continue
        try:
            fn, setup = _runner_fn(loaded, v)
            w0 = time.perf_counter()
            fn(batches[0])  # warm-up: compilation, allocator, graph optimisation
            row["setup_s"] = round(setup + time.perf_counter() - w0, 2)
            outs = []
            with torch.inference_mode(), Rate(n) as r:
                for b in batches:
                    outs.append(_post(card, fn(b)))
        except Exception as e:  # noqa: BLE001 - a runtime missing or failing: say which, go on
            row["skipped"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            rows.append(row)
            continue
        y = torch.cat(outs)
        row.update(tiles_per_s=r.per_s, tiles_per_cpu_s=r.per_cpu_s)
        if ref is None:
            ref = y
            if card.is_detector:
                ref_cells = _n_cells(card, ref)
        row["max_abs_diff"] = float((y - ref).abs().max())
        if card.is_detector:
            cells = _n_cells(card, y)
            row["cells"] = cells
            row["cells_rel_diff"] = (cells - ref_cells) / max(ref_cells, 1)
            row["unchanged"] = abs(row["cells_rel_diff"]) <= COUNT_TOL
        else:
            row["unchanged"] = row["max_abs_diff"] <= PROB_TOL
        rows.append(row)
    base = rows[0].get("tiles_per_cpu_s")
    for row in rows:
        if base and row.get("tiles_per_cpu_s"):
            row["x_eager_per_cpu_s"] = row["tiles_per_cpu_s"] / base
            row["x_eager_wall"] = row["tiles_per_s"] / rows[0]["tiles_per_s"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'network':22s} {'variant':14s} {'tiles/s':>8s} {'/CPU-s':>8s} {'x eager':>8s} "
          f"{'(wall)':>7s} {'set-up s':>8s} {'max|diff|':>10s} {'cells':>7s} {'unchanged':>9s}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['network']:22s} {r['variant']:14s} skipped: {r['skipped']}")
            continue
        cells = f"{r['cells']:7d}" if "cells" in r else f"{'':7s}"
        print(f"{r['network']:22s} {r['variant']:14s} {r['tiles_per_s']:8.1f} "
              f"{r['tiles_per_cpu_s']:8.1f} {r.get('x_eager_per_cpu_s', 0):8.2f} "
              f"{r.get('x_eager_wall', 0):7.2f} {r.get('setup_s', 0):8.1f} "
              f"{r['max_abs_diff']:10.2e} {cells} {'yes' if r['unchanged'] else 'NO':>9s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--slide", default=str(DEFAULT_SLIDE))
    ap.add_argument("--store", default=None, help="use this 224 px / 0.5 um store instead")
    ap.add_argument("--n-tiles", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", nargs="*", default=[], choices=VARIANTS)
    ap.add_argument("--out", default="bench_cpu_runtimes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from tmequant.models import load_model
    from tmequant.tiling.store import SlideStore

    with tempfile.TemporaryDirectory() as tmp:
        store_path, info = make_store(args, Path(tmp))
        tiles = np.asarray(SlideStore(store_path).images[:])
    bs = args.batch_size
    batches = [tiles[i:i + bs] for i in range(0, len(tiles), bs)]
    det = load_model("brca-cells-lite0")
    det_batches = [_canvases(b, int(det.card.detector.context_px)) for b in batches]
    rows: list[dict] = []
    for loaded, bb in ((_classifier("efficientnet_lite0"), batches),
                       (_classifier("resnet18"), batches), (det, det_batches)):
        rows += bench_network(loaded, bb, set(args.skip))
    print_table(rows)

    def version(pkg: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(pkg)
        except Exception:  # noqa: BLE001
            return None

    report = {
        "command": " ".join(sys.argv), "store": info, "threads": args.threads,
        "batch_size": bs, "machine": {"cpu": platform.processor() or platform.machine(),
                                      "cpus": __import__("os").cpu_count()},
        "versions": {p: version(p) for p in ("torch", "timm", "onnxruntime", "onnx", "openvino")},
        "tolerances": {"tissue_probs_max_abs": PROB_TOL, "cells_rel": COUNT_TOL},
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
