"""Classification and count metrics as pure functions of arrays."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(K, K) int64; rows are the true class, columns the predicted class."""
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, int), np.asarray(y_pred, int)), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, classes: Sequence[str]
) -> dict[str, Any]:
    """Accuracy, balanced accuracy, macro F1, per-class precision/recall/F1/support.

    Balanced accuracy averages recall over classes present in ``y_true``; macro F1
    averages F1 over classes present in ``y_true`` or ``y_pred`` (sklearn's convention
    with absent classes left out). Undefined values are NaN.
    """
    k = len(classes)
    cm = confusion_matrix(y_true, y_pred, k)
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(support > 0, tp / support, np.nan)
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        f1 = np.where((support + predicted) > 0, 2 * tp / (support + predicted), np.nan)
    n = cm.sum()
    present = support > 0
    seen = (support + predicted) > 0
    return {
        "n": int(n),
        "accuracy": float(tp.sum() / n) if n else math.nan,
        "balanced_accuracy": float(np.nanmean(recall[present])) if present.any() else math.nan,
        "macro_f1": float(np.nanmean(f1[seen])) if seen.any() else math.nan,
        "per_class": {
            c: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, c in enumerate(classes)
        },
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }


def _rank(x: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata  # lazy: scipy.stats takes about a second to import

    return rankdata(x)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson r; NaN when either side is constant or fewer than 2 values."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2:
        return math.nan
    return pearson(_rank(np.asarray(a, float)), _rank(np.asarray(b, float)))


def count_metrics(
    true: np.ndarray,
    pred: np.ndarray,
    classes: Sequence[str],
    image_ids: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Per cell class: MAE, bias, Pearson and Spearman per tile, and per image (sums over an
    image's tiles) when ``image_ids`` are given. Rows with NaN truth are left out."""
    true, pred = np.asarray(true, float), np.asarray(pred, float)
    out: dict[str, Any] = {}
    for j, c in enumerate(classes):
        ok = np.isfinite(true[:, j])
        t, p = true[ok, j], pred[ok, j]
        m: dict[str, Any] = {
            "n_tiles": int(ok.sum()),
            "mae_per_tile": float(np.abs(p - t).mean()) if ok.any() else math.nan,
            "bias_per_tile": float((p - t).mean()) if ok.any() else math.nan,
            "mean_true_per_tile": float(t.mean()) if ok.any() else math.nan,
            "pearson_per_tile": pearson(t, p),
            "spearman_per_tile": spearman(t, p),
        }
        if image_ids is not None:
            ids = np.asarray(image_ids, dtype=object)[ok]
            uniq = sorted(set(ids))
            ts = np.array([t[ids == u].sum() for u in uniq])
            ps = np.array([p[ids == u].sum() for u in uniq])
            m.update(
                {
                    "n_images": len(uniq),
                    "mae_per_image": float(np.abs(ps - ts).mean()) if uniq else math.nan,
                    "pearson_per_image": pearson(ts, ps),
                    "spearman_per_image": spearman(ts, ps),
                }
            )
        out[c] = m
    return out


# --- point detection ------------------------------------------------------------------------

def match_points(pred_xy: np.ndarray, true_xy: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching of predicted to true points within ``radius`` (same units).

    Minimises the total distance over all pairs closer than ``radius`` (Hungarian
    assignment, scipy), so one true cell is never credited twice. Returns the matched
    (pred_index, true_index) arrays.
    """
    from scipy.optimize import linear_sum_assignment  # lazy: scipy is slow to import
    from scipy.spatial import cKDTree  # lazy: as above

    pred_xy = np.asarray(pred_xy, float).reshape(-1, 2)
    true_xy = np.asarray(true_xy, float).reshape(-1, 2)
    if not len(pred_xy) or not len(true_xy):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pairs = cKDTree(pred_xy).query_ball_tree(cKDTree(true_xy), r=radius)
    big = 1e9
    cost = np.full((len(pred_xy), len(true_xy)), big)
    for i, js in enumerate(pairs):
        if js:
            cost[i, js] = np.linalg.norm(true_xy[js] - pred_xy[i], axis=1)
    rows, cols = linear_sum_assignment(cost)
    ok = cost[rows, cols] <= radius
    return rows[ok].astype(np.int64), cols[ok].astype(np.int64)


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"tp": tp, "fp": fp, "fn": fn, "precision": p, "recall": r, "f1": f}


def detection_metrics(
    preds: Sequence[tuple[np.ndarray, np.ndarray]],
    truths: Sequence[tuple[np.ndarray, np.ndarray]],
    classes: Sequence[str],
    radius: float,
) -> dict[str, Any]:
    """Point-detection figures over a set of images.

    ``preds`` / ``truths``: per image (xy (n, 2), class index (n,)); ``radius`` in the
    units of xy. Per class: precision, recall and F1 with one-to-one matching of points of
    that class within ``radius`` (the MCSpatNet protocol), and per-image count Pearson /
    Spearman / MAE; ``detection``: the same for all cells regardless of class.
    """
    out: dict[str, Any] = {"radius": radius, "n_images": len(truths)}
    for k, c in enumerate(list(classes) + [None]):  # None: class-agnostic detection
        tp = fp = fn = 0
        n_pred, n_true = [], []
        for (pxy, pc), (txy, tc) in zip(preds, truths):
            pm = np.ones(len(pc), bool) if c is None else np.asarray(pc) == k
            tm = np.ones(len(tc), bool) if c is None else np.asarray(tc) == k
            a, _ = match_points(np.asarray(pxy)[pm], np.asarray(txy)[tm], radius)
            tp += len(a)
            fp += int(pm.sum()) - len(a)
            fn += int(tm.sum()) - len(a)
            n_pred.append(int(pm.sum()))
            n_true.append(int(tm.sum()))
        m: dict[str, Any] = _prf(tp, fp, fn)
        t, p = np.asarray(n_true, float), np.asarray(n_pred, float)
        m.update({
            "n_true": int(t.sum()), "n_pred": int(p.sum()),
            "count_pearson_per_image": pearson(t, p),
            "count_spearman_per_image": spearman(t, p),
            "count_mae_per_image": float(np.abs(p - t).mean()) if len(t) else math.nan,
        })
        out["detection" if c is None else c] = m
    f1s = [out[c]["f1"] for c in classes if math.isfinite(out[c]["f1"])]
    out["f1_mean"] = float(np.mean(f1s)) if f1s else math.nan
    return out
