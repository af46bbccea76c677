"""Nucleus counter vs the histolytics nucleus labels (the README figure).

Images: ``hgsc_nest.jpg`` (tumour nest rimmed by lymphocytes; type and instance masks beside
it) and ``hgsc_stromal_he.jpg`` (stroma; nucleus polygons in ``hgsc_stromal_cells.parquet``),
both from the histolytics 0.3.0 wheel (BSD-3). Their pixel size is not published: treated as
0.5 um/px. The labels are a segmentation model's output, not manual ground truth.

Measures, for the counter's ``lymphocyte`` class against ``inflammatory`` nuclei:
- per-window counts on 112 um (224 px) windows of the nest image: Spearman and Pearson;
- detection precision / recall / F1: one-to-one matching (Hungarian) of detections to label
  centroids within ``--match-um`` (default 4 um);
- the same on the stromal image (few lymphocytes: false positives among fibroblasts).

    python scripts/eval_counter_histolytics.py [--testdata ../shared/testdata] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment
from scipy.stats import pearsonr, spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tmequant.inference.nuclei import NucleusCounterParams, count_tiles, detect_nuclei

MPP_UM = 0.5  # assumed: histolytics does not state the pixel size
WINDOW_PX = 224  # 112 um at 0.5 um/px
INFLAMMATORY = "inflammatory"


def nest_labels(folder: Path) -> tuple[np.ndarray, dict[int, str]]:
    """Centroids (M, 2) x, y px of inflammatory instances, and the type-id -> class map.

    The type mask stores ids, not names; each id is named by matching its instance count to
    the ``class_name`` counts of ``hgsc_nest.parquet`` (same nuclei, same crop).
    """
    import pandas as pd

    types = np.load(folder / "hgsc_nest_type_mask.npz")["nuc_raster"]
    inst = np.load(folder / "hgsc_nest_inst_mask.npz")["nuc_raster"]
    names = pd.read_parquet(folder / "hgsc_nest.parquet")["class_name"].value_counts()
    id_count = {}
    for t in np.unique(types[types > 0]):
        ids = np.unique(inst[types == t])
        id_count[int(t)] = int((ids > 0).sum())
    id_to_name = {t: min(names.index, key=lambda nm: abs(int(names[nm]) - c))
                  for t, c in id_count.items()}
    inf_id = [t for t, nm in id_to_name.items() if nm == INFLAMMATORY]
    assert len(inf_id) == 1, id_to_name
    ids = np.unique(inst[types == inf_id[0]])
    ids = ids[ids > 0]
    cy, cx = np.asarray(ndi.center_of_mass(np.ones_like(inst), inst, ids)).T
    return np.c_[cx, cy], id_to_name


def polygon_centroids(parquet: Path, class_name: str) -> np.ndarray:
    import pandas as pd
    import shapely

    df = pd.read_parquet(parquet)
    geom = shapely.from_wkb(df.loc[df["class_name"] == class_name, "geometry"].to_numpy())
    c = shapely.centroid(geom)
    return np.c_[shapely.get_x(c), shapely.get_y(c)]


def match(det_xy: np.ndarray, true_xy: np.ndarray, radius_px: float) -> dict[str, float]:
    """One-to-one matching within ``radius_px``: tp, precision, recall, f1."""
    if len(det_xy) == 0 or len(true_xy) == 0:
        tp = 0
    else:
        d = np.sqrt(((det_xy[:, None, :] - true_xy[None, :, :]) ** 2).sum(-1))
        cost = np.where(d <= radius_px, d, 1e6)
        r, c = linear_sum_assignment(cost)
        tp = int((cost[r, c] <= radius_px).sum())
    p = tp / len(det_xy) if len(det_xy) else float("nan")
    rc = tp / len(true_xy) if len(true_xy) else float("nan")
    f1 = 2 * tp / (len(det_xy) + len(true_xy)) if len(det_xy) + len(true_xy) else float("nan")
    return {"n_detected": len(det_xy), "n_labelled": len(true_xy), "tp": tp,
            "precision": p, "recall": rc, "f1": f1}


def window_counts(image: np.ndarray, true_xy: np.ndarray, params: NucleusCounterParams,
                  window_px: int = WINDOW_PX) -> tuple[np.ndarray, np.ndarray]:
    """Counter lymphocytes and labelled centroids per non-overlapping window."""
    h, w = image.shape[:2]
    tiles, truth = [], []
    for y0 in range(0, h - window_px + 1, window_px):
        for x0 in range(0, w - window_px + 1, window_px):
            tiles.append(image[y0 : y0 + window_px, x0 : x0 + window_px])
            inside = ((true_xy[:, 0] >= x0) & (true_xy[:, 0] < x0 + window_px)
                      & (true_xy[:, 1] >= y0) & (true_xy[:, 1] < y0 + window_px))
            truth.append(int(inside.sum()))
    counts = count_tiles(np.stack(tiles), MPP_UM, params)
    return counts[:, 0], np.asarray(truth)


def evaluate(folder: Path, params: NucleusCounterParams, match_um: float) -> dict:
    from skimage import io

    out: dict = {"mpp_um_assumed": MPP_UM, "window_um": WINDOW_PX * MPP_UM,
                 "match_radius_um": match_um, "params": params.to_dict(),
                 "params_hash": params.params_hash}
    nest = io.imread(folder / "hgsc_nest.jpg")[..., :3]
    true_xy, id_to_name = nest_labels(folder)
    out["nest_type_ids"] = {str(k): v for k, v in id_to_name.items()}
    pred, truth = window_counts(nest, true_xy, params)
    out["nest_windows"] = {
        "n_windows": len(truth),
        "spearman": float(spearmanr(pred, truth)[0]),
        "pearson": float(pearsonr(pred, truth)[0]),
        "counter_total": float(pred.sum()), "labelled_total": int(truth.sum()),
    }
    t0 = time.perf_counter()
    det = detect_nuclei(nest, MPP_UM, params)
    out["nest_detect_seconds"] = time.perf_counter() - t0
    lym = det[det["class"] == "lymphocyte"][["x_px", "y_px"]].to_numpy()
    out["nest_detection"] = match(lym, true_xy, match_um / MPP_UM)

    stroma = folder / "hgsc_stromal_he.jpg"
    if stroma.exists():
        img = io.imread(stroma)[..., :3]
        t_xy = polygon_centroids(folder / "hgsc_stromal_cells.parquet", INFLAMMATORY)
        det = detect_nuclei(img, MPP_UM, params)
        lym = det[det["class"] == "lymphocyte"][["x_px", "y_px"]].to_numpy()
        out["stroma_detection"] = match(lym, t_xy, match_um / MPP_UM)
        out["stroma_detection"]["n_other_detected"] = int((det["class"] == "other").sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--testdata", type=Path,
                    default=Path(os.environ.get("TMEQUANT_TESTDATA",
                                                REPO.parent / "shared" / "testdata")))
    ap.add_argument("--match-um", type=float, default=4.0)
    ap.add_argument("--stain-normalize", action="store_true")
    ap.add_argument("--json", type=Path, default=Path("counter_histolytics.json"))
    args = ap.parse_args()
    params = NucleusCounterParams(stain_normalize=args.stain_normalize)
    res = evaluate(args.testdata / "histolytics", params, args.match_um)

    w, d = res["nest_windows"], res["nest_detection"]
    print(f"nucleus counter vs histolytics labels (assumed {MPP_UM} um/px, "
          f"params {res['params_hash']})")
    print(f"{'measure':44s} {'value':>10s}")
    print(f"{'nest: windows (112 um)':44s} {w['n_windows']:>10d}")
    print(f"{'nest: Spearman, lymphocytes vs inflammatory':44s} {w['spearman']:>10.3f}")
    print(f"{'nest: Pearson':44s} {w['pearson']:>10.3f}")
    print(f"{'nest: total counter / labelled':44s} "
          f"{w['counter_total']:>5.0f} / {w['labelled_total']:<4d}")
    label = f"nest: detection precision (<= {args.match_um:g} um)"
    print(f"{label:44s} {d['precision']:>10.3f}")
    print(f"{'nest: detection recall':44s} {d['recall']:>10.3f}")
    print(f"{'nest: detection F1':44s} {d['f1']:>10.3f}")
    if "stroma_detection" in res:
        s = res["stroma_detection"]
        print(f"{'stroma: lymphocytes detected / labelled':44s} "
              f"{s['n_detected']:>5d} / {s['n_labelled']:<4d}")
        print(f"{'stroma: precision / recall':44s} {s['precision']:>5.2f} / {s['recall']:.2f}")
    args.json.write_text(json.dumps(res, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
