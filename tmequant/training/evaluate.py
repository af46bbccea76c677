"""``evaluate(data, model) -> EvalResult``: a model against any label source.

Tissue: accuracy, balanced accuracy, macro F1, per-class precision/recall, confusion
matrix. Counts: MAE, bias, Pearson and Spearman per tile and per image (sums over the
tiles of one slide/image).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmequant.errors import InputError
from tmequant.inference.runner import resolve_device
from tmequant.models import LoadedModel, load_model
from tmequant.models.stain import MacenkoNormalizer
from tmequant.progress import ProgressBar
from tmequant.provenance import to_jsonable
from tmequant.training.dataset import TileDataset, macenko_from_target
from tmequant.training.labels import LabelSet, load_labels
from tmequant.training.losses import compute_loss
from tmequant.training.metrics import classification_metrics, count_metrics
from tmequant.training.splits import read_split_csv

log = logging.getLogger("tmequant")


@dataclass
class EvalResult:
    """Metrics plus the per-tile predictions they came from.

    ``probs`` (N, K) softmax over ``card.tissue_classes``; ``counts`` (N, C) predicted
    cells per tile (empty (N, 0) without a count head); ``labels`` the LabelSet in the
    model's class vocabulary (same order as the rows).
    """

    metrics: dict[str, Any]
    probs: np.ndarray
    counts: np.ndarray
    labels: LabelSet
    model_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def confusion_matrix(self) -> np.ndarray | None:
        t = self.metrics.get("tissue")
        return None if t is None else np.asarray(t["confusion_matrix"])

    def to_json(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(
            json.dumps(to_jsonable({"model": self.model_name, **self.metrics}), indent=1),
            encoding="utf-8",
        )
        return p


@torch.no_grad()
def predict_labels(
    model,
    card,
    labels: LabelSet,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    macenko=None,
    progress: bool | None = None,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(probs (N, K) float32, counts (N, C) float32) of ``model`` on every tile of ``labels``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    ds = TileDataset(
        labels.with_classes(card.tissue_classes, card.cell_classes)
        if labels.tissue_classes != list(card.tissue_classes)
        else labels,
        card.tile_px,
        card.mpp_um,
        card.mean,
        card.std,
        None,
        0,
        macenko,
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    probs, counts = [], []
    with ProgressBar(len(ds), "evaluate", unit="tiles", enabled=progress) as bar:
        for x, _, _ in loader:
            o = model(x.to(device))
            probs.append(torch.softmax(o["tissue_logits"].float(), 1).cpu().numpy())
            if "cell_counts" in o:
                counts.append(o["cell_counts"].float().cpu().numpy())
            bar.update(len(x))
    model.train(was_training)
    n = len(ds)
    p = np.concatenate(probs) if probs else np.zeros((n, card.n_tissue), np.float32)
    c = np.concatenate(counts) if counts else np.zeros((n, 0), np.float32)
    return p.astype(np.float32), c.astype(np.float32)


def metrics_from_predictions(
    labels: LabelSet, card, probs: np.ndarray, counts: np.ndarray
) -> dict[str, Any]:
    """Metrics of predictions against ``labels`` (already in the card's vocabulary)."""
    out: dict[str, Any] = {"n_tiles": len(labels)}
    cls = {c: i for i, c in enumerate(card.tissue_classes)}
    has = np.array([s.label is not None for s in labels.samples], bool)
    if has.any():
        y = np.array([cls[s.label] for s in labels.samples if s.label is not None])
        out["tissue"] = classification_metrics(y, probs[has].argmax(1), list(card.tissue_classes))
    has_c = np.array([s.counts is not None for s in labels.samples], bool)
    if has_c.any() and counts.shape[1]:
        true = np.array([s.counts for s in labels.samples if s.counts is not None], float)
        ids = [s.slide_id for s in labels.samples if s.counts is not None]
        out["counts"] = count_metrics(true, counts[has_c], list(card.cell_classes), ids)
    return out


def evaluate_labels(
    model,
    card,
    labels: LabelSet,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    macenko=None,
    progress: bool | None = None,
    loss_cfg=None,
) -> dict[str, Any]:
    """Metrics dict of ``model`` on ``labels`` (plus the mean loss when ``loss_cfg``)."""
    labels = labels.with_classes(card.tissue_classes, card.cell_classes)
    probs, counts = predict_labels(model, card, labels, batch_size, device, macenko, progress)
    m = metrics_from_predictions(labels, card, probs, counts)
    if loss_cfg is not None:
        cls = {c: i for i, c in enumerate(card.tissue_classes)}
        y = torch.tensor([cls[s.label] if s.label is not None else -1 for s in labels.samples])
        ct = torch.tensor(
            [
                s.counts if s.counts is not None else [float("nan")] * card.n_cell
                for s in labels.samples
            ],
            dtype=torch.float32,
        ).reshape(len(y), -1)
        o = {"tissue_logits": torch.log(torch.from_numpy(probs).clamp_min(1e-12))}
        if counts.shape[1]:
            o["cell_counts"] = torch.from_numpy(counts)
        m["loss"] = float(compute_loss(o, y, ct, loss_cfg, None)[0])
    return m


def evaluate(
    data: str | Path | LabelSet,
    model: Any,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool | None = None,
    split: str | None = None,
    macenko_target: str | None = None,
) -> EvalResult:
    """Evaluate ``model`` (a LoadedModel, a model folder or a registry name) on ``data``
    (any label source; tiles are read at the card's tile size and MPP).

    ``split``: with a model folder holding ``split.csv`` (written by ``train``), evaluate
    only the tiles of that split (``val``, ``test`` or ``train``). ``macenko_target``: an
    image to normalise stains to, overriding the card's ``stain_normalization`` (which
    applies by default); ``EvalResult.extra["stain_normalization"]`` records what was used.
    """
    dev = resolve_device(device)
    lm = model if isinstance(model, LoadedModel) else load_model(model, dev)
    lm.model.to(dev)
    card = lm.card
    labels = load_labels(
        data, card.tile_px, card.mpp_um, classes=None, cell_classes=None, allow_empty_classes=True
    )
    labels = labels.with_classes(card.tissue_classes, card.cell_classes, what=f"model {card.name}")
    if split is not None:
        sc = Path(lm.source) / "split.csv"
        if not sc.is_file():
            raise InputError("--split needs the model folder's split.csv", sc)
        sp = read_split_csv(sc, labels)
        labels = labels.subset([i for i, s in enumerate(sp) if s == split])
        if not len(labels):
            raise InputError(f"split {split!r} of this model holds no tiles of the data", sc)
    # The card's stain normalisation by default (what training and predict_store apply);
    # an explicit target overrides it and is recorded in ``extra``.
    stain: dict[str, Any] | None = None
    if macenko_target:
        macenko, stain = macenko_from_target(macenko_target)
    elif card.stain_normalization is not None:
        stain = card.stain_normalization.model_dump()
        macenko = MacenkoNormalizer.from_params(stain)
    else:
        macenko = None
    probs, counts = predict_labels(lm.model, card, labels, batch_size, dev, macenko, progress)
    metrics = metrics_from_predictions(labels, card, probs, counts)
    return EvalResult(
        metrics=metrics, probs=probs, counts=counts, labels=labels, model_name=card.name,
        extra={"stain_normalization": stain,
               "stain_normalization_from": "macenko_target" if macenko_target
               else ("card" if stain else None)},
    )
