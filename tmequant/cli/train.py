"""`tmequant train DATA --out MODEL_DIR` and `tmequant evaluate DATA --model DIR`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from tmequant.cli._app import app, fail

_DATA_HELP = (
    "Labels: a folder of class sub-folders (NCT-CRC-HE-100K layout), a CSV "
    "path,label[,slide_id][,patient_id][,split], a folder of slides each with "
    "<name>.geojson (QuPath export) beside it, or a CSV slide,annotations[,slide_id]"
    "[,patient_id][,mpp]."
)


def _roles(items: list[str] | None, what: str) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for it in items:
        if "=" not in it:
            fail(f"{what} {it!r}: expected CLASS=ROLE", 2)
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@app.command("train")
def train_cmd(
    data: str = typer.Argument(..., help=_DATA_HELP),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Model folder to write (model.safetensors + model.json, "
        "split.csv, metrics.json, figures); `tmequant predict --model` takes it.",
    ),
    arch: str = typer.Option(
        "efficientnet_lite0", "--arch", help="Any timm architecture name.", show_default=True
    ),
    name: str | None = typer.Option(
        None, "--name", help="Model name (default: the --out folder's name)."
    ),
    pretrained: bool = typer.Option(
        True,
        "--pretrained/--no-pretrained",
        help="Start from offline ImageNet weights (efficientnet_lite0; other archs start random).",
        show_default=True,
    ),
    init: str | None = typer.Option(
        None, "--init", help="Start from a model folder or a .safetensors state dict (no pickle)."
    ),
    epochs: int = typer.Option(
        10, "--epochs", help="Passes over the training split.", show_default=True
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Cap on optimizer steps (the schedule spans min(epochs, this))."
    ),
    stop_after: int | None = typer.Option(
        None,
        "--stop-after-steps",
        help="Stop after this many steps as if interrupted (resume later with --resume).",
    ),
    batch_size: int = typer.Option(32, "--batch-size", help="Tiles per step.", show_default=True),
    lr: float = typer.Option(3e-4, "--lr", help="Peak AdamW learning rate.", show_default=True),
    weight_decay: float = typer.Option(0.01, "--weight-decay", show_default=True),
    tile_px: int = typer.Option(
        224, "--tile-px", help="Model input tile side in px.", show_default=True
    ),
    mpp: float = typer.Option(
        0.5,
        "--mpp",
        help="Model input pixel size, um/px (slides are read at "
        "this; tile images are taken to be at it).",
        show_default=True,
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of split, order and augmentation.", show_default=True
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue the run in --out from its last checkpoint."
    ),
    linear_probe: bool = typer.Option(
        False, "--linear-probe", help="Freeze the backbone; train the heads only."
    ),
    val_fraction: float = typer.Option(
        0.2,
        "--val-fraction",
        help="Share of groups (patients/slides/files) held out for validation.",
        show_default=True,
    ),
    test_fraction: float = typer.Option(
        0.0, "--test-fraction", help="Share held out as a test split.", show_default=True
    ),
    patience: int = typer.Option(
        5,
        "--patience",
        help="Early stop after this many epochs without a better validation metric (0: never).",
        show_default=True,
    ),
    class_weights: str = typer.Option(
        "none", "--class-weights", help="none or balanced.", show_default=True
    ),
    count_loss: str = typer.Option(
        "poisson", "--count-loss", help="poisson or mse_log.", show_default=True
    ),
    no_augment: bool = typer.Option(False, "--no-augment", help="Switch augmentation off."),
    macenko: str | None = typer.Option(
        None, "--macenko-target", help="Normalise every tile's stains to this image (Macenko)."
    ),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="Comma-separated tissue classes (fixes order; unknown labels become an error).",
    ),
    role: list[str] | None = typer.Option(
        None,
        "--role",
        help="CLASS=ROLE for a tissue class "
        "(tumor, stroma, immune, necrosis, other_tissue, background); repeatable.",
    ),
    cell_role: list[str] | None = typer.Option(
        None,
        "--cell-role",
        help="CLASS=ROLE for a cell class (lymphocyte, tumor_cell, other); repeatable.",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu, cuda, cuda:1, mps.", show_default=True
    ),
    workers: int = typer.Option(
        0, "--workers", "-j", help="DataLoader worker processes.", show_default=True
    ),
) -> None:
    """Fine-tune a tissue classifier (and a cell-count head) on your labels.

    Splits by patient, else slide, else file (split.csv in --out); AdamW with warm-up and
    cosine decay, mixed precision on CUDA, early stopping, best + last checkpoints.
    """
    from tmequant.training import AugmentConfig, TrainConfig, train

    cfg = TrainConfig(
        data=data,
        out=out,
        arch=arch,
        name=name,
        pretrained=pretrained,
        init_from=init,
        tile_px=tile_px,
        mpp_um=mpp,
        epochs=epochs,
        max_steps=max_steps,
        stop_after_steps=stop_after,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        class_weights=class_weights,
        count_loss=count_loss,
        linear_probe=linear_probe,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        patience=patience,
        augment=None if no_augment else AugmentConfig(),
        macenko_target=macenko,
        seed=seed,
        device=device,
        num_workers=workers,
        resume=resume,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        roles=_roles(role, "--role"),
        cell_roles=_roles(cell_role, "--cell-role"),
    )
    res = train(cfg)
    head = res.metrics.get("val") or res.metrics.get("train", {})
    parts = [f"{res.steps} steps", f"tiles {res.split_counts}"]
    if "tissue" in head:
        parts.append(
            f"{'val' if 'val' in res.metrics else 'train'} balanced accuracy "
            f"{head['tissue']['balanced_accuracy']:.3f}"
        )
    for c, m in head.get("counts", {}).items():
        parts.append(f"{c} MAE {m['mae_per_tile']:.2f}/tile")
    typer.echo(f"model written to {res.out_dir}: " + ", ".join(parts), err=True)


@app.command("evaluate")
def evaluate_cmd(
    data: str = typer.Argument(..., help=_DATA_HELP),
    model: str = typer.Option(..., "--model", "-m", help="Model folder or registry name."),
    split: str | None = typer.Option(
        None,
        "--split",
        help="Only tiles of this split (train, val, test) of the model folder's split.csv.",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here."),
    batch_size: int = typer.Option(64, "--batch-size", show_default=True),
    device: str = typer.Option("auto", "--device", show_default=True),
) -> None:
    """Balanced accuracy, macro F1, per-class precision/recall, confusion matrix; for counts
    MAE and Pearson/Spearman per tile and per image. Prints JSON to stdout."""
    from tmequant.provenance import to_jsonable
    from tmequant.training import evaluate

    res = evaluate(data, model, batch_size=batch_size, device=device, split=split)
    text = json.dumps(to_jsonable({"model": res.model_name, **res.metrics}), indent=1)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
    typer.echo(text)
    t = res.metrics.get("tissue")
    if t is not None:
        typer.echo(
            f"{res.metrics['n_tiles']} tiles: balanced accuracy {t['balanced_accuracy']:.3f}, "
            f"macro F1 {t['macro_f1']:.3f}",
            err=True,
        )
    for c, m in res.metrics.get("counts", {}).items():
        r = m["pearson_per_tile"]
        typer.echo(
            f"{c}: MAE {m['mae_per_tile']:.2f} cells/tile, Pearson "
            f"{'n/a' if math.isnan(r) else f'{r:.3f}'}",
            err=True,
        )
