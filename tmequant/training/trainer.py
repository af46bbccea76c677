"""``train(TrainConfig) -> TrainResult``: fine-tune a tissue classifier / cell-count head.

The output folder is a model folder (``model.safetensors`` + ``model.json``, the best
checkpoint) that ``tmequant predict`` takes unchanged, plus::

    split.csv              the split of every tile (by patient > slide > file)
    metrics.json           validation/test (and training-subset) metrics of the best model
    confusion_matrix.png   on the validation split (training split when there is none)
    training_curves.png    loss, validation metric and learning rate per epoch
    checkpoints/last/      model.safetensors, optimizer.safetensors, state.json (resume)

Nothing is pickled: optimizer moments and RNG states are safetensors tensors, everything
else JSON. Reproducible on the CPU: the order of tiles and every augmentation derive from
(seed, epoch, index), so a resumed run ends with the weights an uninterrupted one has.

``train`` tells the run as a sequence of steps (below it, in order); the loss and learning-
rate schedule are in :mod:`tmequant.training.losses`, the checkpoint files and starting
weights in :mod:`tmequant.training.checkpoint`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tmequant.defaults import MPP_UM, TILE_PX
from tmequant.errors import InputError
from tmequant.inference.runner import resolve_device
from tmequant.models import LoadedModel, ModelCard, TmeNet, create_model, load_folder, save_model
from tmequant.progress import ProgressBar
from tmequant.provenance import package_version, params_hash, to_jsonable
from tmequant.training.augment import AugmentConfig, MacenkoNormalizer
from tmequant.training.checkpoint import (
    LAST_DIR,
    STATE_FILE,
    init_weights,
    load_checkpoint,
    save_checkpoint,
    saved_config,
)
from tmequant.training.dataset import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TileDataset,
    macenko_from_target,
)
from tmequant.training.evaluate import evaluate_labels
from tmequant.training.labels import LabelSet, load_labels
from tmequant.training.losses import class_weights, compute_loss, lr_factor
from tmequant.training.plots import plot_confusion, plot_curves
from tmequant.training.splits import group_key, read_split_csv, split_labels, write_split_csv

log = logging.getLogger("tmequant")

COUNT_ONLY_CLASS = "tissue"  # the card needs a tissue head; count-only models get one class


@dataclass
class TrainConfig:
    """Everything ``train`` needs; units in names. ``data`` is any label source."""

    data: str | Path | LabelSet
    out: str | Path
    arch: str = "efficientnet_lite0"
    name: str | None = None  # model name (store group predictions/<name>); default: out's name
    pretrained: bool = True  # offline ImageNet weights (efficientnet_lite0), else random init
    init_from: str | None = None  # a model folder or a .safetensors state dict to start from
    tile_px: int = TILE_PX
    mpp_um: float = MPP_UM
    epochs: int = 10
    max_steps: int | None = None  # caps the schedule (optimizer steps in all)
    stop_after_steps: int | None = None  # stop early as if interrupted (job time limits)
    batch_size: int = 32
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # linear warm-up over this share of steps, then cosine
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max gradient norm; 0 switches clipping off
    class_weights: str = "none"  # "none" | "balanced" (inverse class frequency)
    count_loss: str = "poisson"  # "poisson" | "mse_log"
    count_weight: float = 1.0
    linear_probe: bool = False  # freeze the backbone, train the heads only
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    patience: int = 5  # epochs without a better validation metric before stopping; 0: never
    select_metric: str = "auto"  # balanced_accuracy | macro_f1 | count_mae | val_loss | auto
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    macenko_target: str | None = None  # image whose stains every tile is normalised to
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # mixed precision on CUDA only
    num_workers: int = 0
    resume: bool = False
    eval_train_max: int = 2000  # tiles of the training split evaluated at the end
    classes: list[str] | None = None
    cell_classes: list[str] | None = None
    roles: dict[str, str] | None = None
    cell_roles: dict[str, str] | None = None
    allow_empty_classes: bool = False
    description: str = ""
    progress: bool | None = None


@dataclass
class TrainResult:
    out_dir: Path
    card: Any  # ModelCard
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_step: int
    steps: int
    stopped_early: bool
    split_counts: dict[str, int]


# --------------------------------------------------------------------------------------
# helpers

_class_weights = class_weights  # its former name here (tests import it from this module)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _select(cfg: TrainConfig, labels: LabelSet) -> str:
    if cfg.select_metric != "auto":
        return cfg.select_metric
    return "balanced_accuracy" if labels.has_tissue else "count_mae"


def _score(metric: str, ev: dict[str, Any]) -> float:
    """Higher is better."""
    if metric in ("balanced_accuracy", "macro_f1", "accuracy"):
        return float(ev.get("tissue", {}).get(metric, math.nan))
    if metric == "count_mae":
        maes = [m["mae_per_tile"] for m in ev.get("counts", {}).values()]
        return -float(np.nanmean(maes)) if maes else math.nan
    if metric == "val_loss":
        return -float(ev.get("loss", math.nan))
    raise InputError(
        f"select_metric {metric!r} is not one of balanced_accuracy, macro_f1, "
        "accuracy, count_mae, val_loss"
    )


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    perm = np.random.default_rng([seed, epoch, 7]).permutation(n)
    out = [perm[i : i + batch_size].tolist() for i in range(0, n, batch_size)]
    if len(out) > 1 and len(out[-1]) == 1:
        # BatchNorm cannot train on one tile (1x1 feature maps): fold it into the batch before
        out[-2].extend(out.pop())
    return out


def _steps_per_epoch(n: int, batch_size: int) -> int:
    return len(_batches(n, batch_size, 0, 0))


def build_card(cfg: TrainConfig, labels: LabelSet):
    name = cfg.name or "".join(
        ch if ch.isalnum() or ch in "._+-" else "_" for ch in Path(cfg.out).resolve().name
    )
    tissue = labels.tissue_classes or [COUNT_ONLY_CLASS]
    roles = labels.tissue_roles if labels.tissue_classes else {COUNT_ONLY_CLASS: "other_tissue"}
    desc = cfg.description or (
        f"Fine-tuned by tmequant train on {labels.source or 'user data'}"
        + ("" if labels.tissue_classes else "; count-only: the tissue head has one class")
    )
    return ModelCard(
        name=name,
        arch=cfg.arch,
        tile_px=cfg.tile_px,
        mpp_um=cfg.mpp_um,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        tissue_classes=list(tissue),
        tissue_roles=roles,
        cell_classes=list(labels.cell_classes),
        cell_roles=dict(labels.cell_roles),
        description=desc,
        license="user data: see the data's licence",
    )


# --------------------------------------------------------------------------------------
# train


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model as ``cfg`` says and write the model folder ``cfg.out``."""
    t_start = time.time()
    resuming = _check_output_folder(cfg)
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)
    data = _load_data(cfg, resuming)
    run = _build_run(cfg, data, device)
    if resuming:
        _restore_checkpoint(run)
    run.cfg_json = _config_json(cfg, data.labels)

    _train_epochs(run)
    finished = _end_training(run)

    best = load_folder(run.out, device)
    metrics = _evaluate_best(run, best, finished)
    _write_figures(run, metrics)
    card = _record_in_card(run, best.card, metrics, finished, t_start)
    return TrainResult(
        out_dir=run.out,
        card=card,
        metrics=metrics,
        history=run.state["history"],
        best_step=run.state["best_step"],
        steps=run.state["step"],
        stopped_early=run.state["stopped_early"],
        split_counts={s: len(v) for s, v in data.idx.items()},
    )


# The steps of ``train``, in the order it runs them. The order is part of the result: torch's
# random numbers (head initialisation, DataLoader seeds) are drawn in it, and a resumed run
# must draw the ones an uninterrupted run draws.


@dataclass
class _Data:
    """A run's labels and their split (``idx``: tile indices of train, val and test)."""

    labels: LabelSet
    idx: dict[str, list[int]]
    train: LabelSet
    val: LabelSet
    test: LabelSet


def _fresh_state() -> dict[str, Any]:
    return {
        "step": 0,
        "epoch": 0,
        "best_score": None,
        "best_step": -1,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "stopped_early": False,
    }


@dataclass
class _Run:
    """What the steps of one run share, built once by ``_build_run``. ``state`` is what
    ``checkpoints/last/state.json`` holds (step, epoch, best model, history); it changes
    as the run trains and is replaced by the saved one on resume."""

    cfg: TrainConfig
    out: Path
    device: torch.device
    data: _Data
    card: ModelCard
    macenko: MacenkoNormalizer | None
    model: TmeNet
    params: list[torch.nn.Parameter]  # the trained ones (heads only for a linear probe)
    opt: torch.optim.Optimizer
    ds: TileDataset  # the training split, augmented
    steps_per_epoch: int
    total: int  # optimizer steps of the schedule
    sched: torch.optim.lr_scheduler.LambdaLR
    weight: torch.Tensor | None  # cross-entropy class weights
    use_amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    metric: str  # the validation metric that picks the best model
    state: dict[str, Any] = field(default_factory=_fresh_state)
    cfg_json: dict[str, Any] = field(default_factory=dict)

    @property
    def last_dir(self) -> Path:
        return self.out / LAST_DIR


def _check_output_folder(cfg: TrainConfig) -> bool:
    """Whether the run resumes the checkpoint in ``cfg.out``. Refuses a folder holding a
    run unless ``cfg.resume``, and a batch size, epoch count or learning rate of no use."""
    out = Path(cfg.out)
    last_dir = out / LAST_DIR
    resuming = cfg.resume and (last_dir / STATE_FILE).is_file()
    if cfg.resume and not resuming:
        log.info("no checkpoint in %s: starting from scratch", last_dir)
    if not cfg.resume and (last_dir / STATE_FILE).is_file():
        raise InputError(
            "holds a training run already; pass --resume to continue it or choose another --out",
            out,
        )
    if cfg.batch_size < 1 or cfg.epochs < 1 or cfg.lr <= 0:
        raise InputError("batch_size and epochs must be >= 1 and lr > 0")
    return resuming


def _load_data(cfg: TrainConfig, resuming: bool) -> _Data:
    """Labels and their split: ``split.csv`` of the run when resuming, else a new split
    written there (the output folder is created here)."""
    labels = load_labels(
        cfg.data,
        cfg.tile_px,
        cfg.mpp_um,
        cfg.classes,
        cfg.cell_classes,
        cfg.roles,
        cfg.cell_roles,
        cfg.allow_empty_classes,
    )
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    split_csv = out / "split.csv"
    if resuming and split_csv.is_file():
        splits = read_split_csv(split_csv, labels)
    else:
        splits = split_labels(labels, cfg.val_fraction, cfg.test_fraction, cfg.seed)
        write_split_csv(split_csv, labels, splits)
    idx = {s: [i for i, x in enumerate(splits) if x == s] for s in ("train", "val", "test")}
    if not idx["train"]:
        raise InputError("the training split is empty", labels.source or None)
    train_set, val_set, test_set = (labels.subset(idx[s]) for s in ("train", "val", "test"))
    missing = [c for c, n in train_set.label_counts().items() if n == 0]
    if missing and labels.has_tissue:
        log.warning("classes %s have no training tiles (all in val/test)", missing)
    return _Data(labels, idx, train_set, val_set, test_set)


def _build_run(cfg: TrainConfig, data: _Data, device: torch.device) -> _Run:
    """The card, the model (initial weights), optimizer, learning-rate schedule, loss
    weights and mixed-precision scaler of a fresh run."""
    card = build_card(cfg, data.labels)
    macenko = None
    if cfg.macenko_target:
        # Fitted once; the card carries it so `tmequant predict` and `evaluate` apply it too.
        macenko, card.stain_normalization = macenko_from_target(cfg.macenko_target)
    model = create_model(card, pretrained=cfg.pretrained and not cfg.init_from)
    if cfg.init_from:
        init_weights(model, cfg.init_from)
    model.to(device)
    if cfg.linear_probe:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    ds = TileDataset(
        data.train, cfg.tile_px, cfg.mpp_um, card.mean, card.std, cfg.augment, cfg.seed, macenko
    )
    steps_per_epoch = _steps_per_epoch(len(data.train), cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(round(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio)
    )
    weight = class_weights(data.train, cfg.class_weights)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    return _Run(
        cfg=cfg,
        out=Path(cfg.out),
        device=device,
        data=data,
        card=card,
        macenko=macenko,
        model=model,
        params=params,
        opt=opt,
        ds=ds,
        steps_per_epoch=steps_per_epoch,
        total=total,
        sched=sched,
        weight=weight,
        use_amp=use_amp,
        amp_dtype=amp_dtype,
        scaler=scaler,
        metric=_select(cfg, data.labels),
    )


# Settings a resumed run may change: none of them changes the weights it ends with.
_FREE_ON_RESUME = frozenset(
    {"resume", "stop_after_steps", "progress", "device", "num_workers", "data", "out",
     "eval_train_max"}
)


def _restore_checkpoint(run: _Run) -> None:
    """Continue from ``checkpoints/last``: refuse changed settings, then restore weights,
    optimizer, RNG states, the schedule's step and the loss scaler."""
    cfg = run.cfg
    saved = saved_config(run.last_dir)
    now = to_jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg)})
    changed = sorted(
        k for k in now if k not in _FREE_ON_RESUME and k in saved and saved[k] != now[k]
    )
    if changed:
        raise InputError(
            f"--resume with changed settings {changed}: the run would not be the "
            "one that was started (use the same options or a new --out)",
            run.out,
        )
    state = run.state = load_checkpoint(run.last_dir, run.model, run.opt)
    run.sched.last_epoch = state["step"]  # the optimizer state holds that step's learning rate
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    log.info("resuming %s at step %d (epoch %d)", run.out, state["step"], state["epoch"])


def _config_json(cfg: TrainConfig, labels: LabelSet) -> dict[str, Any]:
    """The run's settings as JSON (``data``: the label source), for checkpoints and card."""
    # fields one by one: asdict() would deep-copy a LabelSet passed as data
    cfg_json = to_jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "data"})
    cfg_json["data"] = labels.source
    return cfg_json


def _save_last(run: _Run) -> None:
    run.state["scaler"] = run.scaler.state_dict() if run.scaler.is_enabled() else None
    run.state["config"] = run.cfg_json
    save_checkpoint(run.last_dir, run.model, run.card, run.opt, run.state)


def _train_epochs(run: _Run) -> None:
    """Epochs until the schedule ends or early stopping; stopped by ``stop_after_steps``
    mid-epoch, the run is saved for ``--resume``."""
    cfg, state = run.cfg, run.state
    stop_at = run.total if cfg.stop_after_steps is None else min(run.total, cfg.stop_after_steps)
    with ProgressBar(run.total, "train", unit="steps", enabled=cfg.progress) as bar:
        bar.update(state["step"])
        while state["step"] < stop_at and not state["stopped_early"]:
            epoch = state["epoch"]
            losses = _train_epoch(run, epoch, stop_at, bar)
            epoch_done = state["step"] - epoch * run.steps_per_epoch >= run.steps_per_epoch
            if not epoch_done and state["step"] < run.total:
                # interrupted mid-epoch (stop_after_steps): save and leave, resumable
                _save_last(run)
                break
            _end_epoch(run, epoch, losses)
            if state["step"] >= run.total:
                break


def _train_epoch(run: _Run, epoch: int, stop_at: int, bar: ProgressBar) -> list[float]:
    """The optimizer steps of ``epoch`` from the run's step on (all of them unless resumed
    mid-epoch), up to step ``stop_at``; returns their losses."""
    cfg, state, device = run.cfg, run.state, run.device
    run.ds.set_epoch(epoch)
    batches = _batches(len(run.data.train), cfg.batch_size, cfg.seed, epoch)
    done_in_epoch = state["step"] - epoch * run.steps_per_epoch
    loader = torch.utils.data.DataLoader(
        run.ds, batch_sampler=batches[done_in_epoch:], num_workers=cfg.num_workers
    )
    run.model.train()
    if cfg.linear_probe:
        run.model.backbone.eval()  # frozen: keep BatchNorm statistics and no dropout
    losses = []
    for x, y, counts in loader:
        x, y, counts = x.to(device), y.to(device), counts.to(device)
        with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.use_amp):
            o = run.model(x)
        loss, _ = compute_loss(o, y, counts, cfg, run.weight)
        run.opt.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            run.scaler.unscale_(run.opt)
            torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip)
        run.scaler.step(run.opt)
        run.scaler.update()
        run.sched.step()
        state["step"] += 1
        losses.append(float(loss.detach()))
        bar.update(1, stage=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
        if state["step"] >= stop_at:
            break
    return losses


def _end_epoch(run: _Run, epoch: int, losses: list[float]) -> None:
    """Validate and log the epoch; keep the model in ``out`` when it is the best so far
    (else count towards early stopping); checkpoint the run."""
    cfg, state, val_set = run.cfg, run.state, run.data.val
    row, score = _validate(run, epoch, losses)
    state["history"].append(row)
    log.info(
        "epoch %d: %s",
        epoch + 1,
        ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float) and k != "epoch"
        ),
    )
    best = state["best_score"]
    if len(val_set) == 0 or best is None or (math.isfinite(score) and score > best):
        state.update(best_score=score, best_step=state["step"], best_epoch=epoch + 1, bad_epochs=0)
        save_model(run.out, run.model, run.card)
    else:
        state["bad_epochs"] += 1
        if cfg.patience and state["bad_epochs"] >= cfg.patience and len(val_set):
            state["stopped_early"] = True
            log.info("early stop: no better val %s for %d epochs", run.metric, cfg.patience)
    state["epoch"] = epoch + 1
    _save_last(run)


def _validate(run: _Run, epoch: int, losses: list[float]) -> tuple[dict[str, Any], float]:
    """The epoch's history row and its score (higher is better): the validation metric, or
    minus the training loss without a validation split."""
    cfg, val_set = run.cfg, run.data.val
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": run.state["step"],
        "lr": float(run.opt.param_groups[0]["lr"]),
        "train_loss": float(np.mean(losses)) if losses else math.nan,
    }
    if len(val_set):
        ev = evaluate_labels(
            run.model,
            run.card,
            val_set,
            cfg.batch_size,
            run.device,
            run.macenko,
            progress=False,
            loss_cfg=cfg,
        )
        row["val_loss"] = ev.get("loss")
        row[f"val_{run.metric}"] = score = _score(run.metric, ev)
    else:
        score = -row["train_loss"]  # no validation split: keep the last model
    return row, score


def _end_training(run: _Run) -> bool:
    """Whether the run finished (else it says how to resume); makes sure ``out`` holds a
    model even when the run stopped before its first epoch ended."""
    state = run.state
    finished = state["step"] >= run.total or state["stopped_early"]
    if not finished:
        log.info("stopped at step %d of %d; rerun with --resume to continue", state["step"], run.total)
    if not (run.out / "model.safetensors").is_file():  # stopped before the first epoch ended
        save_model(run.out, run.model, run.card)
    return finished


def _evaluate_best(run: _Run, best: LoadedModel, finished: bool) -> dict[str, Any]:
    """Metrics of the best model on validation, test and (a sample of) the training split,
    written to ``metrics.json``."""
    cfg, state, data = run.cfg, run.state, run.data
    metrics: dict[str, Any] = {
        "select_metric": run.metric,
        "best_epoch": state["best_epoch"],
        "best_step": state["best_step"],
        "steps": state["step"],
        "total_steps": run.total,
        "finished": finished,
        "stopped_early": state["stopped_early"],
    }
    for split_name, subset in (("val", data.val), ("test", data.test)):
        if len(subset):
            metrics[split_name] = evaluate_labels(
                best.model,
                best.card,
                subset,
                cfg.batch_size,
                run.device,
                run.macenko,
                progress=cfg.progress,
            )
    tr = _train_sample(cfg, data.train)
    if len(tr):
        metrics["train"] = evaluate_labels(
            best.model, best.card, tr, cfg.batch_size, run.device, run.macenko, progress=cfg.progress
        )
    (run.out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=1), encoding="utf-8")
    return metrics


def _train_sample(cfg: TrainConfig, train_set: LabelSet) -> LabelSet:
    """The training tiles evaluated at the end: at most ``eval_train_max`` (a seeded pick)."""
    tr = train_set
    if cfg.eval_train_max <= 0:
        tr = train_set.subset([])
    elif len(tr) > cfg.eval_train_max:
        pick = np.random.default_rng([cfg.seed, 99]).choice(
            len(tr), cfg.eval_train_max, replace=False
        )
        tr = tr.subset(sorted(pick.tolist()))
    return tr


def _write_figures(run: _Run, metrics: dict[str, Any]) -> None:
    """``confusion_matrix.png`` (validation split, else training) and ``training_curves.png``."""
    shown = metrics.get("val") or metrics.get("train") or {}
    if "tissue" in shown:
        plot_confusion(
            run.out / "confusion_matrix.png",
            np.asarray(shown["tissue"]["confusion_matrix"]),
            shown["tissue"]["classes"],
            title=f"{run.card.name}: {'validation' if 'val' in metrics else 'training'} split",
        )
    plot_curves(run.out / "training_curves.png", run.state["history"], run.metric)


def _record_in_card(
    run: _Run, card: ModelCard, metrics: dict[str, Any], finished: bool, t_start: float
) -> ModelCard:
    """Provenance and headline metrics into the best model's card (``out/model.json``)."""
    cfg, state, data = run.cfg, run.state, run.data
    card.training = {
        "data": data.labels.source,
        "n_tiles": {s: len(v) for s, v in data.idx.items()},
        "split_by": _split_level(data.labels),
        "config": run.cfg_json,
        "params_hash": params_hash(run.cfg_json),
        "init": cfg.init_from or ("imagenet" if cfg.pretrained else "random"),
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_epoch": state["best_epoch"],
        "device": run.device.type,
        "amp": run.use_amp,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "wall_s": round(time.time() - t_start, 1),
        "finished": finished,
    }
    card.metrics = _card_metrics(metrics)
    card.save(run.out / "model.json")
    return card


def _split_level(labels: LabelSet) -> str:
    return group_key(labels)[0]


def _card_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers (no confusion matrices) for the card."""
    out: dict[str, Any] = {}
    for split in ("val", "test", "train"):
        ev = metrics.get(split)
        if not ev:
            continue
        m: dict[str, Any] = {"n_tiles": ev.get("n_tiles")}
        if "tissue" in ev:
            m.update({k: ev["tissue"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1")})
        for c, cm in ev.get("counts", {}).items():
            m[f"{c}_mae_per_tile"] = cm["mae_per_tile"]
            m[f"{c}_pearson_per_tile"] = cm["pearson_per_tile"]
        out[split] = m
    return out
