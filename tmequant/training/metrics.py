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
    from scipy.stats import rankdata

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
