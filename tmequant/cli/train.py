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
        None, "--init", help="Start from a model folder or a .safetensors state dict (no pickle) "
        "(default: --pretrained/--no-pretrained decides)."
    ),
    epochs: int = typer.Option(
        10, "--epochs", help="Passes over the training split.", show_default=True
    ),
    max_steps: int | None = typer.Option(
        None, "--max-steps", help="Cap on optimizer steps (the schedule spans min(epochs, this); default: no cap)."
    ),
    stop_after: int | None = typer.Option(
        None,
        "--stop-after-steps",
        help="Stop after this many steps as if interrupted (resume later with --resume; "
        "default: run to the end).",
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Tiles (crops for point labels) per optimizer step (default: 32; 8 for "
        "point labels)."),
    lr: float | None = typer.Option(
        None, "--lr", help="Peak AdamW learning rate (default: 3e-4; 1e-3 for point labels)."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay (decoupled, per step).",
                                      show_default=True),
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
        None, "--macenko-target", help="Normalise every tile's stains to this image (Macenko; default: no stain "
        "normalisation)."
    ),
    classes: str | None = typer.Option(
        None,
        "--classes",
        help="Comma-separated tissue classes (fixes order; unknown labels become an error; "
        "default: every label in the data, sorted).",
    ),
    role: list[str] | None = typer.Option(
        None,
        "--role",
        help="CLASS=ROLE for a tissue class "
        "(tumor, stroma, immune, necrosis, other_tissue, background); repeatable "
        "(default: roles guessed from the class names, tmequant.roles).",
    ),
    cell_role: list[str] | None = typer.Option(
        None,
        "--cell-role",
        help="CLASS=ROLE for a cell class (lymphocyte, tumor_cell, other); repeatable "
        "(default: roles guessed from the class names).",
    ),
    device: str = typer.Option(
        "auto", "--device", help="auto, cpu, cuda, cuda:1, mps.", show_default=True
    ),
    workers: int = typer.Option(
        0, "--workers", "-j", help="DataLoader worker processes.", show_default=True
    ),
    image_mpp: float | None = typer.Option(
        None, "--image-mpp", help="Pixel size of point-annotated images, um/px, when the CSV has no "
        "mpp column (default: taken to be --mpp; other sizes are resampled to --mpp)."),
    select_metric: str = typer.Option(
        "auto", "--select-metric", help="Point labels: checkpoint choice, auto (F1 of the lymphocyte "
        "class), f1_mean, detection or f1_<class>.", show_default=True),
    crop_px: int = typer.Option(
        224, "--crop-px", help="Point labels: training crop side, px (multiple of 32).", show_default=True),
    threads: int | None = typer.Option(
        None, "--threads", help="CPU threads for torch (default: torch's; 1 is fastest on a busy "
        "machine)."),
    task: str = typer.Option(
        "auto", "--task", help="tiles (tissue classifier / count head), cells (cell detector from "
        "points; a folder of slides with point GeoJSON and Region polygons needs it) or auto "
        "(cells for a point CSV or images with point GeoJSON, else tiles).", show_default=True),
    mpp_override: float | None = typer.Option(
        None, "--mpp-override", help="Pixel size, um/px, of slides that have none (point labels on "
        "slides; default: none, such slides are refused)."),
) -> None:
    """Fine-tune a tissue classifier (and a cell-count head), or a cell detector on point labels.

    Tile labels: splits by patient, else slide, else file (split.csv in --out); AdamW with
    warm-up and cosine decay, mixed precision on CUDA, early stopping, best + last checkpoints.
    Point labels (CSV image,x,y,class[,split][,patient_id][,mpp], or images with <name>.geojson
    points beside them): a cell detector; each dot becomes a Gaussian peak of its class's
    heatmap, pixels outside a GeoJSON 'Region' polygon are ignored by the loss (an image
    without one counts as fully annotated), splits by patient (TCGA barcode), the checkpoint
    and per-class thresholds are chosen on the validation images.
    """
    from tmequant.training import AugmentConfig, TrainConfig, train
    from tmequant.training.points import is_point_source

    if task not in ("auto", "tiles", "cells"):
        fail(f"--task {task!r}: use auto, tiles or cells", 2)
    if task == "cells" or (task == "auto" and is_point_source(data)):
        slides = Path(data).is_dir() and not is_point_source(data)
        _train_points(data, out, arch, name, pretrained, mpp, tile_px, epochs, batch_size, lr,
                      weight_decay, val_fraction, seed, device, image_mpp, select_metric, crop_px,
                      threads, cell_role, no_augment, slides, mpp_override)
        return
    if threads:
        import torch

        torch.set_num_threads(threads)
    batch_size = batch_size or 32
    lr = lr or 3e-4

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


def _train_points(data: str, out: Path, arch: str, name: str | None, pretrained: bool, mpp: float,
                  tile_px: int, epochs: int, batch_size: int | None, lr: float | None,
                  weight_decay: float, val_fraction: float, seed: int, device: str,
                  image_mpp: float | None, select_metric: str, crop_px: int,
                  threads: int | None, cell_role: list[str] | None, no_augment: bool,
                  slides: bool = False, mpp_override: float | None = None) -> None:
    from tmequant.training.augment import AugmentConfig
    from tmequant.training.cells import CellTrainConfig, format_detection_table, train_cells

    aug = AugmentConfig(flips=True, hed_sigma=0, hed_bias=0, brightness=0, contrast=0, scale=0) \
        if no_augment else AugmentConfig(scale=0.0)
    cfg = CellTrainConfig(
        data=data, out=out, arch=arch, name=name, pretrained=pretrained, mpp_um=mpp,
        image_mpp_um=image_mpp, tile_px=tile_px, crop_px=crop_px, epochs=epochs,
        batch_size=batch_size or 8, lr=lr or 1e-3, weight_decay=weight_decay,
        val_fraction=val_fraction, seed=seed, device=device, threads=threads,
        select_metric=select_metric, cell_roles=_roles(cell_role, "--cell-role"), augment=aug,
        slides=slides, mpp_override_um=mpp_override)
    res = train_cells(cfg)
    val = res.metrics.get("val")
    typer.echo(f"cell detector written to {res.out_dir} (best epoch {res.best_epoch}, "
               f"{res.seconds:.0f} s)", err=True)
    if val:
        typer.echo(format_detection_table(val, res.card.cell_classes), err=True)


@app.command("evaluate")
def evaluate_cmd(
    data: str = typer.Argument(..., help=_DATA_HELP),
    model: str = typer.Option(..., "--model", "-m", help="Model folder or registry name."),
    split: str | None = typer.Option(
        None,
        "--split",
        help="Only tiles of this split (train, val, test) of the model folder's split.csv "
        "(default: every tile).",
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Write the metrics as JSON here (default: stdout only)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Tiles per inference batch.", show_default=True),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", show_default=True),
) -> None:
    """Balanced accuracy, macro F1, per-class precision/recall, confusion matrix; for counts
    MAE and Pearson/Spearman per tile and per image. Prints JSON to stdout."""
    from tmequant.provenance import to_jsonable
    from tmequant.training import evaluate
    from tmequant.training.points import is_point_source

    if is_point_source(data):  # a detector against dots: per class P/R/F1 and per-image r
        from tmequant.training.cells import evaluate_points, format_detection_table

        m = evaluate_points(data, model, split=split, device="cpu" if device == "auto" else device)
        text = json.dumps(to_jsonable(m), indent=1)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text, encoding="utf-8")
        typer.echo(text)
        classes = [c for c in m if isinstance(m[c], dict) and "f1" in m[c] and c != "detection"]
        typer.echo(format_detection_table(m, classes), err=True)
        return
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
