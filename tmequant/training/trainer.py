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
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tmequant.errors import InputError, ModelError
from tmequant.progress import ProgressBar
from tmequant.provenance import package_version, params_hash, to_jsonable
from tmequant.training.augment import AugmentConfig, MacenkoNormalizer
from tmequant.training.dataset import IMAGENET_MEAN, IMAGENET_STD, TileDataset, read_image
from tmequant.training.labels import LabelSet, load_labels
from tmequant.training.splits import read_split_csv, split_labels, write_split_csv

log = logging.getLogger("tmequant")

LAST_DIR = "checkpoints/last"
STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.safetensors"
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
    tile_px: int = 224
    mpp_um: float = 0.5
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


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(total - warmup, 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def _class_weights(labels: LabelSet, mode: str) -> torch.Tensor | None:
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
    cfg: TrainConfig,
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


def _optimizer_to_safetensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{pid}.{k}"] = v.detach().cpu().contiguous().clone()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_safetensors(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta.get("scalars", {}).items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(folder: Path, model, card, opt, state: dict[str, Any]) -> None:
    """``folder``: model.safetensors + model.json + optimizer.safetensors + state.json."""
    from safetensors.torch import save_file

    from tmequant.models import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(folder, model, card)
    tensors, meta = _optimizer_to_safetensors(opt)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    tmp = folder / (OPTIM_FILE + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / OPTIM_FILE)
    full = dict(state, optimizer=meta)
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(to_jsonable(full), indent=1), encoding="utf-8")
    os.replace(tmp, folder / STATE_FILE)  # written last: a complete checkpoint has it


def load_checkpoint(folder: Path, model, opt) -> dict[str, Any]:
    from safetensors.torch import load_file

    from tmequant.models import load_state_into

    state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    load_state_into(model, load_file(str(folder / "model.safetensors")), folder)
    tensors = load_file(str(folder / OPTIM_FILE))
    rng = tensors.pop("rng.torch")
    cuda_rng = [
        tensors.pop(k) for k in sorted(k for k in list(tensors) if k.startswith("rng.cuda."))
    ]
    _optimizer_from_safetensors(opt, tensors, state["optimizer"])
    torch.set_rng_state(rng)
    if cuda_rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_rng)
    return state


def _init_weights(model, init_from: str) -> None:
    """Start from a model folder (heads too when their shapes fit) or a backbone state dict."""
    from safetensors.torch import load_file

    p = Path(init_from)
    if p.is_dir():
        p = p / "model.safetensors"
    if p.suffix != ".safetensors" or not p.is_file():
        raise ModelError("--init expects a model folder or a .safetensors file (no pickle)", p)
    tensors = load_file(str(p))
    own = model.state_dict()
    if not any(k.startswith("backbone.") for k in tensors):
        tensors = {"backbone." + k: v for k, v in tensors.items()}
    fit = {k: v for k, v in tensors.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    n_bb = sum(k.startswith("backbone.") for k in own)
    n_fit_bb = sum(k.startswith("backbone.") for k in fit)
    if n_fit_bb < n_bb:
        raise ModelError(f"only {n_fit_bb} of {n_bb} backbone tensors fit {model.card.arch}", p)
    model.load_state_dict(fit, strict=False)
    log.info(
        "initialised from %s (%d tensors, heads %s)",
        p,
        len(fit),
        "kept" if len(fit) == len(own) else "new",
    )


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


# --------------------------------------------------------------------------------------
# train


def macenko_from_target(path: str | Path) -> tuple[MacenkoNormalizer, dict[str, Any]]:
    """(normaliser, ``ModelCard.stain_normalization`` dict) fitted on the image ``path``."""
    import hashlib

    p = Path(path)
    try:
        norm = MacenkoNormalizer(read_image(p))
    except ValueError as e:
        raise InputError(f"--macenko-target: {e}; choose a tile with more tissue", p) from None
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return norm, norm.card_params(source=f"{p.name} sha256:{sha}")


def build_card(cfg: TrainConfig, labels: LabelSet):
    from tmequant.models import ModelCard

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


def train(cfg: TrainConfig) -> TrainResult:
    """Train a model as ``cfg`` says and write the model folder ``cfg.out``."""
    from tmequant.models import create_model, save_model
    from tmequant.training.evaluate import evaluate_labels
    from tmequant.training.plots import plot_confusion, plot_curves

    t_start = time.time()
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
    seed_everything(cfg.seed)
    device = resolve_device(cfg.device)

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

    card = build_card(cfg, labels)
    macenko = None
    if cfg.macenko_target:
        # Fitted once; the card carries it so `tmequant predict` and `evaluate` apply it too.
        macenko, card.stain_normalization = macenko_from_target(cfg.macenko_target)
    model = create_model(card, pretrained=cfg.pretrained and not cfg.init_from)
    if cfg.init_from:
        _init_weights(model, cfg.init_from)
    model.to(device)
    if cfg.linear_probe:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    ds = TileDataset(
        train_set, cfg.tile_px, cfg.mpp_um, card.mean, card.std, cfg.augment, cfg.seed, macenko
    )
    steps_per_epoch = _steps_per_epoch(len(train_set), cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    warmup = int(round(cfg.warmup_fraction * total))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio)
    )
    weight = _class_weights(train_set, cfg.class_weights)
    use_amp = cfg.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    metric = _select(cfg, labels)

    state: dict[str, Any] = {
        "step": 0,
        "epoch": 0,
        "best_score": None,
        "best_step": -1,
        "best_epoch": -1,
        "bad_epochs": 0,
        "history": [],
        "stopped_early": False,
    }
    if resuming:
        saved = json.loads((last_dir / STATE_FILE).read_text(encoding="utf-8")).get("config", {})
        free = {
            "resume",
            "stop_after_steps",
            "progress",
            "device",
            "num_workers",
            "data",
            "out",
            "eval_train_max",
        }
        now = to_jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg)})
        changed = sorted(k for k in now if k not in free and k in saved and saved[k] != now[k])
        if changed:
            raise InputError(
                f"--resume with changed settings {changed}: the run would not be the "
                "one that was started (use the same options or a new --out)",
                out,
            )
        state = load_checkpoint(last_dir, model, opt)
        sched.last_epoch = state["step"]  # the optimizer state holds that step's learning rate
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        log.info("resuming %s at step %d (epoch %d)", out, state["step"], state["epoch"])

    # fields one by one: asdict() would deep-copy a LabelSet passed as data
    cfg_json = to_jsonable({f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "data"})
    cfg_json["data"] = labels.source
    stop_at = total if cfg.stop_after_steps is None else min(total, cfg.stop_after_steps)

    def save_last() -> None:
        state["scaler"] = scaler.state_dict() if scaler.is_enabled() else None
        state["config"] = cfg_json
        save_checkpoint(last_dir, model, card, opt, state)

    with ProgressBar(total, "train", unit="steps", enabled=cfg.progress) as bar:
        bar.update(state["step"])
        while state["step"] < stop_at and not state["stopped_early"]:
            epoch = state["epoch"]
            ds.set_epoch(epoch)
            batches = _batches(len(train_set), cfg.batch_size, cfg.seed, epoch)
            done_in_epoch = state["step"] - epoch * steps_per_epoch
            loader = torch.utils.data.DataLoader(
                ds, batch_sampler=batches[done_in_epoch:], num_workers=cfg.num_workers
            )
            model.train()
            if cfg.linear_probe:
                model.backbone.eval()  # frozen: keep BatchNorm statistics and no dropout
            losses = []
            for x, y, counts in loader:
                x, y, counts = x.to(device), y.to(device), counts.to(device)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    o = model(x)
                loss, _ = compute_loss(o, y, counts, cfg, weight)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip > 0:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                scaler.step(opt)
                scaler.update()
                sched.step()
                state["step"] += 1
                losses.append(float(loss.detach()))
                bar.update(1, stage=f"epoch {epoch + 1} loss {losses[-1]:.3f}")
                if state["step"] >= stop_at:
                    break
            epoch_done = state["step"] - epoch * steps_per_epoch >= steps_per_epoch
            if not epoch_done and state["step"] < total:
                # interrupted mid-epoch (stop_after_steps): save and leave, resumable
                save_last()
                break
            row: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": state["step"],
                "lr": float(opt.param_groups[0]["lr"]),
                "train_loss": float(np.mean(losses)) if losses else math.nan,
            }
            if len(val_set):
                ev = evaluate_labels(
                    model,
                    card,
                    val_set,
                    cfg.batch_size,
                    device,
                    macenko,
                    progress=False,
                    loss_cfg=cfg,
                )
                row["val_loss"] = ev.get("loss")
                row[f"val_{metric}"] = score = _score(metric, ev)
            else:
                score = -row["train_loss"]  # no validation split: keep the last model
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
                state.update(
                    best_score=score, best_step=state["step"], best_epoch=epoch + 1, bad_epochs=0
                )
                save_model(out, model, card)
            else:
                state["bad_epochs"] += 1
                if cfg.patience and state["bad_epochs"] >= cfg.patience and len(val_set):
                    state["stopped_early"] = True
                    log.info("early stop: no better val %s for %d epochs", metric, cfg.patience)
            state["epoch"] = epoch + 1
            save_last()
            if state["step"] >= total:
                break

    finished = state["step"] >= total or state["stopped_early"]
    if not finished:
        log.info("stopped at step %d of %d; rerun with --resume to continue", state["step"], total)
    if not (out / "model.safetensors").is_file():  # stopped before the first epoch ended
        save_model(out, model, card)

    # final evaluation of the best model
    from tmequant.models import load_folder

    best = load_folder(out, device)
    metrics: dict[str, Any] = {
        "select_metric": metric,
        "best_epoch": state["best_epoch"],
        "best_step": state["best_step"],
        "steps": state["step"],
        "total_steps": total,
        "finished": finished,
        "stopped_early": state["stopped_early"],
    }
    for split_name, subset in (("val", val_set), ("test", test_set)):
        if len(subset):
            metrics[split_name] = evaluate_labels(
                best.model,
                best.card,
                subset,
                cfg.batch_size,
                device,
                macenko,
                progress=cfg.progress,
            )
    tr = train_set
    if cfg.eval_train_max <= 0:
        tr = train_set.subset([])
    elif len(tr) > cfg.eval_train_max:
        pick = np.random.default_rng([cfg.seed, 99]).choice(
            len(tr), cfg.eval_train_max, replace=False
        )
        tr = tr.subset(sorted(pick.tolist()))
    if len(tr):
        metrics["train"] = evaluate_labels(
            best.model, best.card, tr, cfg.batch_size, device, macenko, progress=cfg.progress
        )
    (out / "metrics.json").write_text(json.dumps(to_jsonable(metrics), indent=1), encoding="utf-8")
    shown = metrics.get("val") or metrics.get("train") or {}
    if "tissue" in shown:
        plot_confusion(
            out / "confusion_matrix.png",
            np.asarray(shown["tissue"]["confusion_matrix"]),
            shown["tissue"]["classes"],
            title=f"{card.name}: {'validation' if 'val' in metrics else 'training'} split",
        )
    plot_curves(out / "training_curves.png", state["history"], metric)

    # provenance and metrics into the card of the best model
    card = best.card
    card.training = {
        "data": labels.source,
        "n_tiles": {s: len(v) for s, v in idx.items()},
        "split_by": _split_level(labels),
        "config": cfg_json,
        "params_hash": params_hash(cfg_json),
        "init": cfg.init_from or ("imagenet" if cfg.pretrained else "random"),
        "steps": state["step"],
        "best_step": state["best_step"],
        "best_epoch": state["best_epoch"],
        "device": device.type,
        "amp": use_amp,
        "package_version": package_version(),
        "torch_version": torch.__version__,
        "wall_s": round(time.time() - t_start, 1),
        "finished": finished,
    }
    card.metrics = _card_metrics(metrics)
    card.save(out / "model.json")
    return TrainResult(
        out_dir=out,
        card=card,
        metrics=metrics,
        history=state["history"],
        best_step=state["best_step"],
        steps=state["step"],
        stopped_early=state["stopped_early"],
        split_counts={s: len(v) for s, v in idx.items()},
    )


def _split_level(labels: LabelSet) -> str:
    from tmequant.training.splits import group_key

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
