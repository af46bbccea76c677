#!/usr/bin/env python
"""End to end, slide -> biomarkers: tmequant against LazySlide and TIAToolbox, per stage.

Every method does the same job on the same slide, each in its own child process (peers in
their own virtual environments, ``--peer-python NAME=PATH``): tissue mask, tiles of 224 px
at 0.5 um/px over the tissue, a timm ``resnet18`` tile classifier with seeded random
weights (as costly as trained ones) on the CPU with ``torch.set_num_threads(--threads)``
and batches of ``--batch-size``, then a per-slide read-out. Stages, each with wall
seconds, CPU seconds (user + sys of the process and its reaped children, e.g. DataLoader
readers) and peak RSS (the process's high-water mark within the stage, reset through
``/proc/self/clear_refs``; the child's whole-run peak comes from ``os.wait4``):

- ``open_tissue``: open the slide, thumbnail, tissue mask (and the tile grid);
- ``tiling``: tiles at 0.5 um/px. tmequant reads, resamples and writes them into its zarr
  store; LazySlide only lays out tile coordinates (pixels are read during inference);
  TIAToolbox has no separate tiling step (its patch predictor reads each patch while
  predicting): its ``tiling`` is 0 and reading is inside ``inference``;
- ``inference``: model built + every kept tile through the network (tmequant: from its
  store via ``predict_store``, predictions written to the store);
- ``biomarkers``: tmequant: ``biomarkers_for_store`` (TIL densities, compartments,
  phenotype, TLS from the model's class probabilities and count head); the peers: a
  per-class tile count from the predictions (argmax), i.e. a trivial read-out: the
  comparison is about tiling + inference throughput and memory.

Models: tmequant ``random-resnet18`` (timm resnet18 backbone + tissue head + count head), run
by ONNX Runtime (its CPU default; ``--torch-row`` adds the same job on ``--runtime torch``);
LazySlide and TIAToolbox: ``timm.create_model("resnet18", num_classes=N)``; ``--plain-timm``
adds a row for that plain model on random float tensors already in memory (the inference
ceiling: no reading, no normalisation, channels_last off), same threads and batch size.

Tissue thresholds, as close as each allows: tmequant keeps tiles >= 25 % tissue
(``--min-tissue``); LazySlide ``tile_tissues(..., background_fraction=1 - min_tissue)``;
TIAToolbox keeps a patch when its share of mask pixels is >= ``min_mask_ratio``
(``--min-tissue``) with its own Otsu mask. Each finds its own tissue, so the tile counts
differ: compare tiles/s and tiles per CPU-second, not seconds.

    python scripts/make_bench_slide.py --out /work/bench/bench_slide.svs
    python scripts/bench_e2e.py --slide /work/bench/bench_slide.svs --plain-timm --torch-row \\
        --peer-python lazyslide=/work/peers/lazyslide/bin/python \\
        --peer-python tiatoolbox=/work/peers/tiatoolbox/bin/python \\
        --json /work/bench/bench_e2e.json

Prints one table (method, tiles, wall s, CPU s, tiles/s, tiles per CPU-s, peak RSS, and how
many times tmequant's tiles/s and tiles per CPU-s are the method's) plus a per-stage table,
and writes everything to ``--json``. Run on a shared machine with ``nice -n 5``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("open_tissue", "tiling", "inference", "biomarkers")
N_CLASSES = 6  # the random-<arch> card's tissue classes (tmequant.roles.TISSUE_ROLES)


# --- measuring, inside a child ---------------------------------------------------------
def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _hwm_mb() -> float | None:
    try:
        m = re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text())
        return int(m.group(1)) / 1024 if m else None
    except OSError:
        return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux >= 4.0: reset VmHWM to VmRSS
        return True
    except OSError:
        return False


class Stages:
    """begin(name) / end(name): wall, CPU and in-stage peak RSS of each stage."""

    def __init__(self) -> None:
        self.rows: dict[str, dict] = {}
        self._open: dict[str, tuple[float, float]] = {}

    def begin(self, name: str) -> None:
        self.rows[name] = {"hwm_reset": _reset_hwm()}
        self._open[name] = (time.perf_counter(), _cpu())

    def end(self, name: str, **extra: object) -> None:
        t0, c0 = self._open.pop(name)
        self.rows[name].update(wall_s=time.perf_counter() - t0, cpu_s=_cpu() - c0,
                               peak_rss_mb=_hwm_mb(),
                               children_peak_rss_mb=resource.getrusage(
                                   resource.RUSAGE_CHILDREN).ru_maxrss / 1024, **extra)

    def skip(self, name: str, why: str) -> None:
        self.rows[name] = {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mb": None, "note": why}


def _argmax_counts(probs) -> dict[str, int]:
    import numpy as np

    idx = np.asarray(probs).argmax(axis=1)
    return {str(k): int(v) for k, v in zip(*np.unique(idx, return_counts=True))}


# --- methods (each runs in its own child process) --------------------------------------
def run_tmequant(a: argparse.Namespace, runtime: str = "auto") -> dict:
    import logging

    import torch

    torch.set_num_threads(a.threads)
    logging.getLogger("tmequant").setLevel(logging.WARNING)
    import tmequant as tq
    import tmequant.tiling.tile as tt

    st = Stages()
    # tile_slide opens the slide, finds tissue, plans the grid and then writes the tiles
    # (its _write_tiles): wrap that to split open_tissue from tiling.
    orig = getattr(tt, "_write_tiles", None)
    if orig is not None:
        def split(*args, **kw):
            st.end("open_tissue")
            st.begin("tiling")
            return orig(*args, **kw)
        tt._write_tiles = split
    params = tq.TilingParams(target_mpp_um=a.mpp, tile_px=a.tile_px, min_tissue_fraction=a.min_tissue)
    st.begin("open_tissue")
    r = tq.tile_slide(a.slide, a.work, params, overwrite=True, workers=a.tile_workers, progress=False)
    if orig is None:  # no hook: all of tile_slide counts as tiling
        st.end("open_tissue")
        st.rows["tiling"] = st.rows.pop("open_tissue")
        st.skip("open_tissue", "inside tiling (no _write_tiles hook)")
    else:
        st.end("tiling")
    n = r.n_tiles
    st.rows["tiling"]["tile_slide_seconds"] = r.seconds

    st.begin("inference")
    model = tq.load_model(f"random-{a.arch}")
    p = tq.predict_store(r.store_path, model, device="cpu", batch_size=a.batch_size,
                         overwrite=True, progress=False, runtime=runtime)
    st.end("inference", engine_tiles_per_s=p.tiles_per_s, runtime=p.runtime)

    st.begin("biomarkers")
    res = tq.biomarkers_for_store(r.store_path, model.card.name, nucleus_counts=False)
    row = {k: v for k, v in res.row.items() if isinstance(v, (int, float, str)) and v is not None}
    st.end("biomarkers", n_values=len(row))
    keep = ("til_density_stromal_per_mm2", "til_density_intratumoral_per_mm2", "immune_phenotype")
    return {"n_tiles": n, "stages": st.rows, "store": r.store_path,
            "biomarkers_sample": {k: row.get(k) for k in keep},
            "model": model.card.name, "runtime": p.runtime,
            "reader_workers": "predict_store default (1 on CPU)",
            "tile_workers": a.tile_workers}


def run_plain_timm(a: argparse.Namespace) -> dict:
    import timm
    import torch

    torch.set_num_threads(a.threads)
    st = Stages()
    st.begin("inference")
    torch.manual_seed(0)
    net = timm.create_model(a.arch, pretrained=False, num_classes=N_CLASSES).eval()
    x = torch.rand(a.batch_size, 3, a.tile_px, a.tile_px)
    n_batches = max(1, a.plain_tiles // a.batch_size)
    with torch.inference_mode():
        net(x)  # warm-up
        t0, c0 = time.perf_counter(), _cpu()
        for _ in range(n_batches):
            net(x).softmax(1)
        dt, dc = time.perf_counter() - t0, _cpu() - c0
    st.end("inference")
    # the ceiling is the timed loop alone (model build and warm-up excluded)
    st.rows["inference"].update(wall_s=dt, cpu_s=dc, note="timed loop only")
    return {"n_tiles": n_batches * a.batch_size, "stages": st.rows, "model": f"timm {a.arch}"}


def _timm_classifier(arch: str):
    import timm
    import torch

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, num_classes=N_CLASSES).eval()


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def run_lazyslide(a: argparse.Namespace) -> dict:  # runs inside the LazySlide venv
    import torch

    torch.set_num_threads(a.threads)
    import lazyslide as zs
    from torchvision.transforms import v2 as T

    st = Stages()
    st.begin("open_tissue")
    wsi = zs.open_wsi(a.slide, store=str(Path(a.work) / "lazyslide.zarr"))
    zs.pp.find_tissues(wsi)  # its defaults (Otsu on an automatically chosen level)
    st.end("open_tissue", n_tissues=len(wsi.shapes["tissues"]))

    st.begin("tiling")  # coordinates only: pixels are read in inference
    zs.pp.tile_tissues(wsi, a.tile_px, mpp=a.mpp, background_fraction=1.0 - a.min_tissue)
    n = len(wsi.shapes["tiles"])
    st.end("tiling")

    st.begin("inference")
    net = _timm_classifier(a.arch)
    tf = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                    T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    probs = zs.tl.feature_extraction(
        wsi, net, model_name=f"timm-{a.arch}", transform=tf, device="cpu", amp=False,
        batch_size=a.batch_size, num_workers=a.peer_readers, pbar=False, return_features=True)
    wsi.write()  # persist tiles and predictions in its SpatialData store, as tmequant does
    st.end("inference")

    st.begin("biomarkers")
    counts = _argmax_counts(probs)
    st.end("biomarkers", note="per-class tile count (argmax)")
    import importlib.metadata as md

    return {"n_tiles": n, "stages": st.rows, "class_tile_counts": counts,
            "model": f"timm {a.arch} (feature_extraction with the classifier as the model)",
            "versions": {p: md.version(p) for p in ("lazyslide", "wsidata", "torch", "timm")},
            "reader_workers": a.peer_readers,
            "reader": type(wsi.reader).__name__}


_TIA_MIN_MASK_RATIO = 0.0


def _tia_dataset_class(base):
    """TIAToolbox's WSIPatchDataset with ``min_mask_ratio`` set: its patch filter has the
    setting, its PatchPredictor engine does not pass it (and keeps any patch touching the
    mask)."""

    class WSIPatchDatasetMinRatio(base):
        def __init__(self, *args, **kw):
            kw.setdefault("min_mask_ratio", _TIA_MIN_MASK_RATIO)
            super().__init__(*args, **kw)

    return WSIPatchDatasetMinRatio


def run_tiatoolbox(a: argparse.Namespace) -> dict:  # runs inside the TIAToolbox venv
    global _TIA_MIN_MASK_RATIO
    import logging

    import numpy as np
    import torch

    torch.set_num_threads(a.threads)
    import tiatoolbox.models.engine.engine_abc as eabc
    from PIL import Image
    from tiatoolbox import logger as tia_logger
    from tiatoolbox.models.architecture.vanilla import TimmModel
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor
    from tiatoolbox.wsicore.wsireader import WSIReader

    tia_logger.setLevel(logging.WARNING)
    _TIA_MIN_MASK_RATIO = a.min_tissue
    eabc.WSIPatchDataset = _tia_dataset_class(eabc.WSIPatchDataset)
    work = Path(a.work)
    st = Stages()
    st.begin("open_tissue")  # what its engine does with auto_get_mask, done explicitly
    reader = WSIReader.open(a.slide)
    try:
        mask = reader.tissue_mask(resolution=1.25, units="power")
    except ValueError:
        mask = reader.tissue_mask(resolution=6.0, units="mpp")
    mask_png = work / "tissue_mask.png"
    Image.fromarray((np.asarray(mask.img) > 0).astype(np.uint8) * 255).convert("RGB").save(mask_png)
    st.end("open_tissue")
    st.skip("tiling", "no separate step: patches are read during inference")

    st.begin("inference")
    model = TimmModel(a.arch, num_classes=N_CLASSES, pretrained=False)
    pred = PatchPredictor(model=model, batch_size=a.batch_size, num_workers=a.peer_readers,
                          device="cpu", verbose=False)
    io = IOPatchPredictorConfig(input_resolutions=[{"units": "mpp", "resolution": a.mpp}],
                                patch_input_shape=(a.tile_px, a.tile_px),
                                stride_shape=(a.tile_px, a.tile_px))
    out = pred.run([Path(a.slide)], masks=[mask_png], patch_mode=False, ioconfig=io,
                   save_dir=work / "tia_out", overwrite=True, output_type="zarr",
                   return_probabilities=True)
    st.end("inference")

    st.begin("biomarkers")
    import zarr

    path = next(iter(out.values())) if isinstance(out, dict) else out
    g = zarr.open_group(str(path), mode="r")
    keys = list(g.array_keys())
    probs = np.asarray(g["probabilities"][...]) if "probabilities" in keys else None
    if probs is not None and probs.ndim == 2:
        counts = _argmax_counts(probs)
        n = len(probs)
    else:
        labels = np.asarray(g["predictions"][...]).ravel()
        counts = {str(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
        n = len(labels)
    st.end("biomarkers", note="per-class tile count (argmax)")
    import importlib.metadata as md

    return {"n_tiles": n, "stages": st.rows, "class_tile_counts": counts, "zarr_arrays": keys,
            "model": f"tiatoolbox TimmModel({a.arch}) = timm {a.arch} backbone + linear",
            "min_mask_ratio": a.min_tissue, "mask": "WSIReader.tissue_mask (Otsu) at 1.25x",
            "reader": type(reader).__name__, "reader_workers": a.peer_readers,
            "versions": {p: md.version(p) for p in ("tiatoolbox", "torch", "timm")}}


METHODS = {"tmequant": run_tmequant, "plain_timm": run_plain_timm, "lazyslide": run_lazyslide,
           "tiatoolbox": run_tiatoolbox,
           "tmequant_torch": lambda a: run_tmequant(a, runtime="torch")}


# --- orchestration ---------------------------------------------------------------------
def child(python: str, method: str, a: argparse.Namespace) -> dict:
    """Run one method in a child process; its whole-run peak RSS and CPU come from wait4."""
    work = Path(a.work) / method
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    args = [python, str(Path(__file__).resolve()), "--method", method, "--slide", a.slide,
            "--work", str(work), "--threads", str(a.threads), "--batch-size", str(a.batch_size),
            "--arch", a.arch, "--mpp", str(a.mpp), "--tile-px", str(a.tile_px),
            "--min-tissue", str(a.min_tissue), "--tile-workers", str(a.tile_workers),
            "--plain-tiles", str(a.plain_tiles), "--peer-readers", str(a.peer_readers)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if python == sys.executable:
        env["PYTHONPATH"] = str(REPO)
    else:
        env.pop("PYTHONPATH", None)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        p = subprocess.Popen(args, stdout=out, stderr=err, env=env, cwd=str(work))
        _, status, ru = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        text, etext = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if code != 0:
        return {"error": f"exit {code}", "stderr": etext[-3000:], "stdout": text[-1000:]}
    try:
        res = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"error": "no JSON result", "stderr": etext[-3000:], "stdout": text[-1000:]}
    res["process_wall_s"] = wall  # imports and interpreter start-up included
    res["process_cpu_s"] = ru.ru_utime + ru.ru_stime  # the child and its reaped children
    res["wait4_maxrss_mb"] = ru.ru_maxrss / 1024  # child + reaped children, since the last reset
    stages = res.get("stages", {})
    # Resetting VmHWM per stage (clear_refs) also resets what wait4 reports for the child, so
    # the whole-run peak is the largest of every stage's peak, its readers' and wait4's.
    res["peak_rss_mb"] = max([res["wait4_maxrss_mb"]]
                             + [v for st in stages.values()
                                for v in (st.get("peak_rss_mb"), st.get("children_peak_rss_mb"))
                                if v is not None])
    res["loadavg_1min_before"] = load
    res["wall_s"] = sum(s.get("wall_s") or 0.0 for s in stages.values())
    res["cpu_s"] = sum(s.get("cpu_s") or 0.0 for s in stages.values())
    return res


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_report(report: dict) -> None:
    res = report["methods"]
    print(f"slide {report['slide']}  {report['arch']}, {report['threads']} torch threads, "
          f"batch {report['batch_size']}, CPU; load {report['loadavg_before'][0]:.1f} -> "
          f"{report['loadavg_after'][0]:.1f}")
    hdr = (f"{'method':<15}{'tiles':>7}{'wall s':>8}{'CPU s':>8}{'tiles/s':>9}{'tiles/CPU-s':>12}"
           f"{'peak RSS MB':>12}{'tmq x wall':>11}{'tmq x CPU':>10}{'start-up s':>11}")
    print(hdr + "\n" + "-" * len(hdr))
    for name, r in res.items():
        if "error" in r:
            print(f"{name:<15} ERROR {r['error']}")
            continue
        label = name + (" *" if name == "plain_timm" else "")
        print(f"{label:<15}{r['n_tiles']:>7}{r['wall_s']:>8.1f}{r['cpu_s']:>8.1f}{r['tiles_per_s']:>9.1f}"
              f"{r['tiles_per_cpu_s']:>12.2f}{r['peak_rss_mb']:>12.0f}{_fmt(r.get('tmequant_x'), '.2f'):>11}"
              f"{_fmt(r.get('tmequant_x_cpu'), '.2f'):>10}{r['process_wall_s'] - r['wall_s']:>11.1f}")
    print("wall/CPU s: sum of the four stages (start-up and imports excluded: start-up s is the "
          "rest of the child's wall time; process totals in the JSON); peak RSS: the child and "
          "its reader processes; tmq x = tmequant's tiles/s (per CPU-s) / the method's: > 1 means "
          "tmequant is faster. * plain timm on random tensors in memory: inference only, "
          "its tmq x compares tmequant's inference stage with it (the share of the ceiling).")
    print(f"\n{'method':<15}{'stage':<13}{'wall s':>8}{'CPU s':>8}{'peak RSS MB':>12}  note")
    for name, r in res.items():
        if "error" in r:
            continue
        for s in STAGES:
            row = r["stages"].get(s)
            if row is None:
                continue
            print(f"{name:<15}{s:<13}{row['wall_s']:>8.1f}{row['cpu_s']:>8.1f}"
                  f"{_fmt(row.get('peak_rss_mb'), '.0f'):>12}  {row.get('note', '')}")
    if any("inference_tmequant_x" in r for r in res.values()):
        print(f"\n{'inference stage':<16}{'tiles/s':>9}{'tiles/CPU-s':>12}{'tmq x wall':>11}{'tmq x CPU':>10}")
        for name, r in res.items():
            if "inference_tiles_per_s" in r and name != "plain_timm":
                print(f"{name:<16}{r['inference_tiles_per_s']:>9.1f}{r['inference_tiles_per_cpu_s']:>12.2f}"
                      f"{_fmt(r.get('inference_tmequant_x'), '.2f'):>11}"
                      f"{_fmt(r.get('inference_tmequant_x_cpu'), '.2f'):>10}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slide", default="/work/bench/bench_slide.svs")
    ap.add_argument("--work", default="/work/bench/e2e", help="scratch folder (stores, peers' outputs)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (and OMP/MKL) per method")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--mpp", type=float, default=0.5)
    ap.add_argument("--tile-px", type=int, default=224)
    ap.add_argument("--min-tissue", type=float, default=0.25)
    ap.add_argument("--tile-workers", type=int, default=2, help="tmequant tiling reader threads")
    ap.add_argument("--peer-readers", type=int, default=1,
                    help="DataLoader reader processes for the peers (tmequant's CPU default is 1)")
    ap.add_argument("--peer-python", action="append", default=[], metavar="NAME=PATH",
                    help="a peer (lazyslide, tiatoolbox) and the python of its venv; repeatable")
    ap.add_argument("--plain-timm", action="store_true", help="add the plain-timm ceiling row")
    ap.add_argument("--torch-row", action="store_true",
                    help="add tmequant with --runtime torch (the default row runs ONNX Runtime)")
    ap.add_argument("--plain-tiles", type=int, default=640, help="tiles for the plain-timm row")
    ap.add_argument("--skip-tmequant", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", default="/work/bench/bench_e2e.json")
    ap.add_argument("--keep", action="store_true", help="keep --work (stores) afterwards")
    ap.add_argument("--from-json", metavar="JSON", help="print the tables of a saved run and exit")
    ap.add_argument("--method", choices=sorted(METHODS), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.method:  # child
        print(json.dumps(METHODS[a.method](a), default=str))
        return
    if a.from_json:
        print_report(json.loads(Path(a.from_json).read_text()))
        return

    if not Path(a.slide).exists():
        sys.exit(f"slide not found: {a.slide} (make it with scripts/make_bench_slide.py)")
    peers: dict[str, str] = {}
    for spec in a.peer_python:
        name, _, py = spec.partition("=")
        if name not in METHODS or not py:
            sys.exit(f"--peer-python {spec!r}: use NAME=PATH with NAME in {sorted(set(METHODS) - {'tmequant', 'tmequant_torch', 'plain_timm'})}")
        peers[name] = py
    Path(a.work).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    res: dict[str, dict] = {}
    order = ([] if a.skip_tmequant else [("tmequant", sys.executable)]) + list(peers.items())
    if a.torch_row:
        order.append(("tmequant_torch", sys.executable))
    if a.plain_timm:
        order.append(("plain_timm", sys.executable))
    for name, py in order:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        res[name] = child(py, name, a)
        if "error" in res[name]:
            print(f"  {name} failed: {res[name]['error']}\n{res[name]['stderr'][-1500:]}",
                  file=sys.stderr)
    load_after = os.getloadavg()

    for r in res.values():
        if "error" in r:
            continue
        r["tiles_per_s"] = r["n_tiles"] / max(r["wall_s"], 1e-9)
        r["tiles_per_cpu_s"] = r["n_tiles"] / max(r["cpu_s"], 1e-9)
        inf = r["stages"].get("inference", {})
        if inf.get("wall_s"):
            r["inference_tiles_per_s"] = r["n_tiles"] / inf["wall_s"]
            r["inference_tiles_per_cpu_s"] = r["n_tiles"] / max(inf["cpu_s"], 1e-9)
    tq = res.get("tmequant", {})
    for name, r in res.items():
        if "error" in r or "error" in tq or not tq:
            continue
        if name == "plain_timm":  # the ceiling compares with tmequant's inference stage
            r["tmequant_x"] = tq.get("inference_tiles_per_s", 0) / r["tiles_per_s"]
            r["tmequant_x_cpu"] = tq.get("inference_tiles_per_cpu_s", 0) / r["tiles_per_cpu_s"]
        else:
            r["tmequant_x"] = tq["tiles_per_s"] / r["tiles_per_s"]
            r["tmequant_x_cpu"] = tq["tiles_per_cpu_s"] / r["tiles_per_cpu_s"]
            r["inference_tmequant_x"] = tq["inference_tiles_per_s"] / r["inference_tiles_per_s"]
            r["inference_tmequant_x_cpu"] = (tq["inference_tiles_per_cpu_s"]
                                             / r["inference_tiles_per_cpu_s"])

    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    report = {
        "benchmark": "e2e", "slide": a.slide, "slide_bytes": Path(a.slide).stat().st_size,
        "arch": a.arch, "threads": a.threads, "batch_size": a.batch_size, "mpp": a.mpp,
        "tile_px": a.tile_px, "min_tissue": a.min_tissue, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "tmequant": version("tmequant"), "torch": version("torch"), "timm": version("timm"),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "methods": res,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    if not a.keep:
        shutil.rmtree(a.work, ignore_errors=True)

    print_report(report)
    print(f"\nJSON: {a.json}")


if __name__ == "__main__":
    main()
