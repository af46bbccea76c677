"""Cell detection on real human dots (BRCA-M2C): the bundled detector, the weight-free nucleus
counter and a tile count head, side by side on the same images; prints tables, writes JSON.

Validation, not demonstration: the truth is one human dot per cell (Abousamra et al., ICCV 2021).
Figures (matching one-to-one within 6 um, per class, the MCSpatNet protocol):

* ``val``: the bundled model on the data set's val split (10 patches). Two of its patients
  also have a patch in the train split, so the figures on the 8 patient-disjoint patches are
  given too.
* ``cv``: patient-level 5-fold cross-validation over train+val (90 patches): each fold
  trains the bundled model's recipe from ImageNet on the other folds (an inner patient split
  chooses the epoch and thresholds) and is scored on patches whose patients it never saw.
* ``counter``: the weight-free nucleus counter's lymphocytes on the same patches.
* ``count_head``: a tile classifier's count head (the previous way to count cells with a
  model) trained on the train split's 224 px tiles, scored per patch on val.
* ``other_organs``: the bundled model on the histolytics ovarian-carcinoma nest (labels from
  a segmentation model: a demonstration, not a validation).

    python scripts/bench_cells_brca.py --data ../shared/testdata/brca-m2c \
        --model tmequant/data/models/brca-cells-lite0 --folds 5 --cv-epochs 16 --json cells_brca.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from brca_m2c_to_points import convert

from tmequant.inference.cells import detect_image
from tmequant.inference.runner import resolve_runtime
from tmequant.models import load_model
from tmequant.training.dataset import read_image
from tmequant.training.metrics import detection_metrics
from tmequant.training.points import PointSet, load_points

MATCH_UM = 6.0
MPP_UM = 0.5
CLASSES = ["lymphocyte", "tumor_cell", "stromal"]


def _truth(ps: PointSet) -> list[tuple[np.ndarray, np.ndarray]]:
    pos = {c: i for i, c in enumerate(CLASSES)}
    return [(im.xy, np.array([pos[c] for c in im.classes], dtype=np.int64)) for im in ps.images]


def detect_all(model: Any, ps: PointSet, runtime: str = "auto",
               ) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Detections per image and the seconds spent (pixels already in memory); the first
    image is detected once before timing (ONNX export, allocator)."""
    pos = {c: i for i, c in enumerate(model.card.cell_classes)}
    imgs = [read_image(im.path) for im in ps.images]
    if imgs:
        detect_image(model, imgs[0], MPP_UM, runtime=runtime)
    t0 = time.perf_counter()
    out = []
    for rgb in imgs:
        df = detect_image(model, rgb, MPP_UM, runtime=runtime)
        out.append((df[["x", "y"]].to_numpy(), df["class"].map(pos).to_numpy(dtype=np.int64)))
    return out, time.perf_counter() - t0


def counter_all(ps: PointSet) -> list[tuple[np.ndarray, np.ndarray]]:
    """Weight-free counter: its lymphocytes as class 0, every other nucleus as class -1."""
    from tmequant.inference.nuclei import detect_nuclei

    out = []
    for im in ps.images:
        df = detect_nuclei(read_image(im.path), MPP_UM)
        cls = np.where(df["class"].to_numpy() == "lymphocyte", 0, -1)
        out.append((df[["x_px", "y_px"]].to_numpy(), cls))
    return out


def summary(m: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    keep = ("precision", "recall", "f1", "n_true", "n_pred", "count_pearson_per_image",
            "count_spearman_per_image", "count_mae_per_image")
    return {c: {k: m[c][k] for k in keep} for c in [*classes, "detection"] if c in m}


def print_table(title: str, s: dict[str, Any]) -> None:
    print(f"\n{title}")
    print(f"  {'class':12s} {'P':>6s} {'R':>6s} {'F1':>6s} {'true':>6s} {'pred':>6s} {'r img':>6s} {'rho img':>7s}")
    for c, m in s.items():
        print(f"  {c:12s} {m['precision']:6.3f} {m['recall']:6.3f} {m['f1']:6.3f} {m['n_true']:6d} "
              f"{m['n_pred']:6d} {m['count_pearson_per_image']:6.3f} {m['count_spearman_per_image']:7.3f}")


def patient_folds(ps: PointSet, k: int, seed: int = 0) -> list[list[int]]:
    """k folds of image indices with whole patients, balanced by image count."""
    patients = sorted({im.patient_id for im in ps.images})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    folds: list[list[int]] = [[] for _ in range(k)]
    for p in sorted(patients, key=lambda p: -sum(im.patient_id == p for im in ps.images)):
        f = min(range(k), key=lambda i: len(folds[i]))
        folds[f].extend(i for i, im in enumerate(ps.images) if im.patient_id == p)
    return folds


def run_cv(ps: PointSet, k: int, epochs: int, work: Path, threads: int | None) -> dict[str, Any]:
    from train_brca_model import recipe

    from tmequant.training.cells import train_cells

    folds = patient_folds(ps, k)
    preds: list[Any] = [None] * len(ps.images)
    secs = []
    for f, test_idx in enumerate(folds):
        tr = [i for i in range(len(ps.images)) if i not in set(test_idx)]
        sub = ps.subset(tr)
        for im in sub.images:
            im.split = None  # inner patient split (15%) chooses epoch and thresholds
        cfg = recipe(work, work / f"fold{f}", epochs, seed=f, threads=threads)
        cfg.data = sub
        cfg.val_fraction = 0.15
        t0 = time.time()
        res = train_cells(cfg)
        secs.append(time.time() - t0)
        model = load_model(res.out_dir)
        p, _ = detect_all(model, ps.subset(test_idx))
        for i, pi in zip(test_idx, p):
            preds[i] = pi
        print(f"  fold {f}: {len(test_idx)} test images, best epoch {res.best_epoch}, "
              f"{secs[-1]:.0f} s", flush=True)
    m = detection_metrics(preds, _truth(ps), CLASSES, MATCH_UM / MPP_UM)
    return {"summary": summary(m, CLASSES), "f1_mean": m["f1_mean"], "folds": k, "epochs": epochs,
            "train_seconds_per_fold": secs, "fold_images": [len(f) for f in folds]}


def _count_tiles(ps: PointSet) -> Any:
    """A LabelSet of the four 224-px corner tiles of each patch with per-class dot counts."""
    from tmequant.training.labels import LabelSet, Sample

    samples = []
    train_patients = {im.patient_id for im in ps.images if im.split == "train"}
    for im in ps.images:
        # the data set's val split shares two patients with train: those patches train too,
        # so the count head is scored on the 8 patient-disjoint val patches
        split = "val" if im.split == "val" and im.patient_id not in train_patients else "train"
        h, w = read_image(im.path).shape[:2]
        cls = np.array([CLASSES.index(c) for c in im.classes], dtype=np.int64)
        for x0, y0 in ((0, 0), (w - 224, 0), (0, h - 224), (w - 224, h - 224)):
            inb = ((im.xy[:, 0] >= x0) & (im.xy[:, 0] < x0 + 224) & (im.xy[:, 1] >= y0)
                   & (im.xy[:, 1] < y0 + 224))
            counts = tuple(float(v) for v in np.bincount(cls[inb], minlength=3))
            samples.append(Sample(path=im.path, label=None, slide_id=im.name, patient_id=im.patient_id,
                                  kind="image", box=(float(x0), float(y0), 224.0), counts=counts,
                                  split=split))
    return LabelSet(samples, [], list(CLASSES), {}, {"lymphocyte": "lymphocyte",
                    "tumor_cell": "tumor_cell", "stromal": "other"}, source="BRCA-M2C tiles")


def count_head(ps: PointSet, work: Path, epochs: int, threads: int | None) -> dict[str, Any]:
    """The previous way to count with a model: a tile classifier's count head (tmequant train
    on per-tile dot counts), trained on the train split and scored per patch on the
    patient-disjoint val patches."""
    from tmequant.training import TrainConfig, train
    from tmequant.training.evaluate import evaluate_labels

    labels = _count_tiles(ps)
    t0 = time.time()
    res = train(TrainConfig(data=labels, out=work / "count_head", epochs=epochs, batch_size=16,
                            lr=3e-4, patience=0, seed=0, device="cpu", progress=False))
    secs = time.time() - t0
    val = labels.subset([i for i, s in enumerate(labels.samples) if s.split == "val"])
    m = evaluate_labels(load_model(work / "count_head").model, res.card, val)
    per = {c: {k: m["counts"][c][k] for k in ("pearson_per_image", "spearman_per_image",
                                              "mae_per_image", "mae_per_tile")} for c in CLASSES}
    return {"epochs": epochs, "train_seconds": secs, "n_val_images": len({s.slide_id for s in val.samples}),
            "note": "four 224-px corner tiles per patch (covering ~83% of it)", "counts": per}


def other_organs(model: Any, testdata: Path) -> dict[str, Any]:
    """histolytics HGSC nest: inflammatory / neoplastic / connective nuclei centroids (labels
    from a segmentation model, pixel size assumed 0.5 um): a demonstration."""
    nest = testdata / "histolytics" / "hgsc_nest.jpg"
    if not nest.exists():
        return {}
    inst = np.load(testdata / "histolytics" / "hgsc_nest_inst_mask.npz")
    typ = np.load(testdata / "histolytics" / "hgsc_nest_type_mask.npz")
    inst_m = inst[inst.files[0]]
    type_m = typ[typ.files[0]]
    from scipy import ndimage

    ids = np.unique(inst_m)
    ids = ids[ids > 0]
    cy_cx = np.array(ndimage.center_of_mass(np.ones_like(inst_m), inst_m, ids)).reshape(-1, 2)
    t = np.array([np.bincount(type_m[inst_m == i]).argmax() for i in ids])
    # histolytics type ids: see its docs; map by name through the parquet if present
    names = _histolytics_type_names(testdata)
    cls_name = [names.get(int(v), str(v)) for v in t]
    mapping = {"inflammatory": 0, "neoplastic": 1, "connective": 2}
    tc = np.array([mapping.get(n, -1) for n in cls_name])
    rgb = read_image(nest)
    df = detect_image(model, rgb, MPP_UM)
    pos = {c: i for i, c in enumerate(model.card.cell_classes)}
    pred = [(df[["x", "y"]].to_numpy(), df["class"].map(pos).to_numpy(dtype=np.int64))]
    truth = [(cy_cx[:, ::-1] + 0.5, tc)]
    m = detection_metrics(pred, truth, CLASSES, MATCH_UM / MPP_UM)
    return {"image": nest.name, "labels": "histolytics segmentation model (not human)",
            "summary": summary(m, CLASSES), "type_names": names}


def _histolytics_type_names(testdata: Path) -> dict[int, str]:
    # The nest's type mask uses the histolytics class ids; the README lists the counts
    # (inflammatory 633, connective 374, neoplastic 288): identify ids by their counts.
    import pandas as pd

    pq = testdata / "histolytics" / "hgsc_nest.parquet"
    inst = np.load(testdata / "histolytics" / "hgsc_nest_inst_mask.npz")
    typ = np.load(testdata / "histolytics" / "hgsc_nest_type_mask.npz")
    inst_m, type_m = inst[inst.files[0]], typ[typ.files[0]]
    df = pd.read_parquet(pq)
    counts = df["class_name"].value_counts().to_dict() if "class_name" in df else {}
    ids = np.unique(inst_m)
    ids = ids[ids > 0]
    per = {}
    for i in ids:
        v = int(np.bincount(type_m[inst_m == i]).argmax())
        per[v] = per.get(v, 0) + 1
    out = {}
    for v, n in per.items():
        best = min(counts.items(), key=lambda kv: abs(kv[1] - n), default=(str(v), 0))
        out[v] = best[0]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--model", default="brca-cells-lite0")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cv-epochs", type=int, default=16)
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--count-head-epochs", type=int, default=10,
                    help="epochs of the count-head baseline (0: skip it)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--runtime", default="auto", help="inference runtime: auto, torch or onnx")
    ap.add_argument("--json", type=Path, default=Path("cells_brca.json"))
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    out: dict[str, Any] = {"match_um": MATCH_UM, "mpp_um": MPP_UM, "truth": "human dots (BRCA-M2C)"}
    with tempfile.TemporaryDirectory() as td:
        csv_path = Path(td) / "points.csv"
        convert(a.data, csv_path)
        ps = load_points(csv_path, CLASSES)
        val = ps.subset([i for i, im in enumerate(ps.images) if im.split == "val"])
        train_patients = {im.patient_id for im in ps.images if im.split == "train"}
        val_disj = val.subset([i for i, im in enumerate(val.images) if im.patient_id not in train_patients])

        model = load_model(a.model)
        for name, sub in (("val", val), ("val_patient_disjoint", val_disj)):
            p, secs = detect_all(model, sub, a.runtime)
            m = detection_metrics(p, _truth(sub), CLASSES, MATCH_UM / MPP_UM)
            out[name] = {"n_images": len(sub), "summary": summary(m, CLASSES), "f1_mean": m["f1_mean"]}
            print_table(f"{name}: bundled model {model.card.name} ({len(sub)} patches)", out[name]["summary"])
            if name == "val":
                n_cells = sum(len(x[0]) for x in p)
                px = sum(read_image(im.path).shape[0] * read_image(im.path).shape[1] for im in sub.images)
                out["speed_cpu"] = {"cells_per_s": n_cells / secs, "seconds": secs,
                                    "runtime": resolve_runtime(a.runtime, torch.device("cpu")),
                                    "tiles224_per_s": px / (224 * 224) / secs}
                print(f"  speed (CPU): {n_cells / secs:.0f} cells/s, {px / 50176 / secs:.1f} "
                      "224-px tiles/s")

        for name, sub in (("val", val), ("all_90", ps)):
            c = counter_all(sub)
            m = detection_metrics(c, _truth(sub), ["lymphocyte"], MATCH_UM / MPP_UM)
            out[f"counter_{name}"] = {"lymphocyte": summary(m, ["lymphocyte"])["lymphocyte"]}
            print_table(f"weight-free nucleus counter, lymphocytes ({name})", out[f"counter_{name}"])
        json_partial(a.json, out)

        if a.count_head_epochs:
            out["count_head_val"] = ch = count_head(ps, Path(td), a.count_head_epochs, a.threads)
            print(f"\ncount head (tile classifier, {a.count_head_epochs} epochs), val split, per patch:")
            for c, m in ch["counts"].items():
                print(f"  {c:12s} r {m['pearson_per_image']:.3f} rho {m['spearman_per_image']:.3f} "
                      f"MAE {m['mae_per_image']:.1f} cells/patch")
            json_partial(a.json, out)

        if not a.skip_cv:
            print(f"\npatient-level {a.folds}-fold cross-validation ({a.cv_epochs} epochs per fold)")
            out["cv"] = run_cv(ps, a.folds, a.cv_epochs, Path(td), a.threads)
            print_table(f"cv: {a.folds} folds over train+val (90 patches)", out["cv"]["summary"])

        testdata = a.data.parent
        oo = other_organs(model, testdata)
        if oo:
            out["other_organs"] = oo
            print_table("other organ: HGSC nest (ovary; labels from a model: demonstration)", oo["summary"])
    json_partial(a.json, out)
    print(f"\nwrote {a.json}")


def json_partial(path: Path, out: dict[str, Any]) -> None:
    """Write what is measured so far (a long cross-validation may be stopped)."""
    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (float, np.floating)):
            return None if math.isnan(float(o)) else float(o)
        if isinstance(o, np.integer):
            return int(o)
        return o

    path.write_text(json.dumps(clean(out), indent=1))


if __name__ == "__main__":
    main()
