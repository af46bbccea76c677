"""Training figures, drawn on matplotlib ``Figure`` objects (no pyplot, no backend switch).

Using the object API keeps a caller's plotting state (a notebook's backend, open figures)
untouched and works in headless worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _subplots(nrows: int, ncols: int, figsize: tuple[float, float], dpi: int = 100) -> tuple[Any, Any]:
    from matplotlib.figure import Figure  # lazy: matplotlib takes about a second to import

    fig = Figure(figsize=figsize, dpi=dpi)
    return fig, fig.subplots(nrows, ncols)


def plot_confusion(
    path: str | Path, cm: np.ndarray, classes: Sequence[str], title: str = ""
) -> Path:
    """Row-normalised confusion matrix (truth rows) with raw counts in each cell."""
    cm = np.asarray(cm)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    fig, ax = _subplots(1, 1, figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            if cm[i, j]:
                ax.text(
                    j,
                    i,
                    str(int(cm[i, j])),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black",
                )
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def plot_curves(path: str | Path, history: list[dict[str, Any]], metric: str) -> Path:
    """Training loss, validation loss/metric and learning rate per epoch."""
    fig, axes = _subplots(1, 3, figsize=(11, 3.2))
    ep = [h["epoch"] for h in history]
    axes[0].plot(ep, [h.get("train_loss", np.nan) for h in history], "o-", label="train")
    if any("val_loss" in h for h in history):
        axes[0].plot(ep, [h.get("val_loss", np.nan) for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    key = f"val_{metric}"
    vals = [h.get(key, np.nan) for h in history]
    if metric == "count_mae":
        vals = [-v for v in vals]  # stored negated (higher is better)
    if any(np.isfinite(v) for v in vals):
        axes[1].plot(ep, vals, "o-")
    else:
        axes[1].text(
            0.5, 0.5, "no validation split", ha="center", va="center", transform=axes[1].transAxes
        )
    axes[1].set_title(f"validation {metric}")
    axes[2].plot(ep, [h.get("lr", np.nan) for h in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for a in axes:
        a.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)
