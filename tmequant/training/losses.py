"""The training objective and schedule of ``train``: cross-entropy over labelled tiles plus a
count loss over tiles with known counts, class weights, and the learning-rate factor
(linear warm-up, then cosine decay; the cell detector's schedule too).

``evaluate_labels`` computes the validation loss with ``compute_loss``, so this module
imports neither ``trainer`` nor ``evaluate``.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from tmequant.errors import InputError
from tmequant.training.labels import LabelSet


class LossSettings(Protocol):
    """The settings ``compute_loss`` reads (a ``TrainConfig`` has them)."""

    count_loss: str  # "poisson" | "mse_log"
    count_weight: float


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def class_weights(labels: LabelSet, mode: str) -> torch.Tensor | None:
    """Cross-entropy class weights: None for ``"none"``, inverse class frequency for
    ``"balanced"`` (classes without tiles weigh 0)."""
    if mode == "none":
        return None
    if mode != "balanced":
        raise InputError(f"class_weights must be 'none' or 'balanced', not {mode!r}")
    n = np.array([labels.label_counts().get(c, 0) for c in labels.tissue_classes], float)
    w = np.where(n > 0, n.sum() / np.maximum(n, 1) / max((n > 0).sum(), 1), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def compute_loss(
    out: dict[str, torch.Tensor],
    y: torch.Tensor,
    counts: torch.Tensor,
    cfg: LossSettings,
    weight: torch.Tensor | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE over labelled tiles + count loss over tiles with known counts (float32)."""
    parts: dict[str, float] = {}
    total = out["tissue_logits"].new_zeros((), dtype=torch.float32)
    has = y >= 0
    if has.any():
        ce = F.cross_entropy(
            out["tissue_logits"][has].float(),
            y[has],
            weight=None if weight is None else weight.to(y.device),
        )
        total = total + ce
        parts["ce"] = float(ce.detach())
    if "cell_counts" in out and counts.numel():
        known = torch.isfinite(counts)
        if known.any():
            pred = out["cell_counts"].float()[known]
            true = counts[known]
            if cfg.count_loss == "poisson":
                cl = F.poisson_nll_loss(pred, true, log_input=False, full=False, eps=1e-6)
            elif cfg.count_loss == "mse_log":
                cl = F.mse_loss(torch.log1p(pred), torch.log1p(true))
            else:
                raise InputError(
                    f"count_loss must be 'poisson' or 'mse_log', not {cfg.count_loss!r}"
                )
            total = total + cfg.count_weight * cl
            parts["count"] = float(cl.detach())
    return total, parts
