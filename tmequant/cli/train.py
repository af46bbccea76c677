"""`tmequant train DATA --out MODEL_DIR` and `tmequant evaluate DATA --model DIR`.

The verbs parse options and call the library: ``tmequant.training.train`` (tile labels),
``tmequant.training.cells.train_cells`` (point labels), ``evaluate`` and ``evaluate_points``.
They import it inside their bodies: it imports torch, and `tmequant --help` starts without.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from tmequant.cli._app import app, fail
from tmequant.provenance import to_jsonable

if TYPE_CHECKING:
    from tmequant.training import TrainResult

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


# The arguments and options of `tmequant train`, one type each (typer's Annotated style); the
# defaults stand in the verb's signature.
_Data = Annotated[str, typer.Argument(help=_DATA_HELP)]
_Out = Annotated[Path, typer.Option(
    "--out",
    "-o",
    help="Model folder to write (model.safetensors + model.json, "
    "split.csv, metrics.json, figures); `tmequant predict --model` takes it.",
)]
_Arch = Annotated[str, typer.Option(
    "--arch", help="Any timm architecture name.", show_default=True)]
_Name = Annotated[str | None, typer.Option(
    "--name", help="Model name (default: the --out folder's name).")]
_Pretrained = Annotated[bool, typer.Option(
    "--pretrained/--no-pretrained",
    help="Start from offline ImageNet weights (efficientnet_lite0; other archs start random).",
    show_default=True,
)]
_Init = Annotated[str | None, typer.Option(
    "--init", help="Start from a model folder or a .safetensors state dict (no pickle) "
    "(default: --pretrained/--no-pretrained decides).")]
_Epochs = Annotated[int, typer.Option(
    "--epochs", help="Passes over the training split.", show_default=True)]
_MaxSteps = Annotated[int | None, typer.Option(
    "--max-steps", help="Cap on optimizer steps (the schedule spans min(epochs, this); default: no cap).")]
_StopAfter = Annotated[int | None, typer.Option(
    "--stop-after-steps",
    help="Stop after this many steps as if interrupted (resume later with --resume; "
    "default: run to the end).",
)]
_BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", help="Tiles (crops for point labels) per optimizer step (default: 32; 8 for "
    "point labels).")]
_Lr = Annotated[float | None, typer.Option(
    "--lr", help="Peak AdamW learning rate (default: 3e-4; 1e-3 for point labels).")]
_WeightDecay = Annotated[float, typer.Option(
    "--weight-decay", help="AdamW weight decay (decoupled, per step).", show_default=True)]
_TilePx = Annotated[int, typer.Option(
    "--tile-px", help="Model input tile side in px.", show_default=True)]
_Mpp = Annotated[float, typer.Option(
    "--mpp",
    help="Model input pixel size, um/px (slides are read at "
    "this; tile images are taken to be at it).",
    show_default=True,
)]
_Seed = Annotated[int, typer.Option(
    "--seed", help="Seed of split, order and augmentation.", show_default=True)]
_Resume = Annotated[bool, typer.Option(
    "--resume", help="Continue the run in --out from its last checkpoint.")]
_LinearProbe = Annotated[bool, typer.Option(
    "--linear-probe", help="Freeze the backbone; train the heads only.")]
_ValFraction = Annotated[float, typer.Option(
    "--val-fraction",
    help="Share of groups (patients/slides/files) held out for validation.",
    show_default=True,
)]
_TestFraction = Annotated[float, typer.Option(
    "--test-fraction", help="Share held out as a test split.", show_default=True)]
_Patience = Annotated[int, typer.Option(
    "--patience",
    help="Early stop after this many epochs without a better validation metric (0: never).",
    show_default=True,
)]
_ClassWeights = Annotated[str, typer.Option(
    "--class-weights", help="none or balanced.", show_default=True)]
_CountLoss = Annotated[str, typer.Option(
    "--count-loss", help="poisson or mse_log.", show_default=True)]
_NoAugment = Annotated[bool, typer.Option("--no-augment", help="Switch augmentation off.")]
_Macenko = Annotated[str | None, typer.Option(
    "--macenko-target", help="Normalise every tile's stains to this image (Macenko; default: no stain "
    "normalisation).")]
_Classes = Annotated[str | None, typer.Option(
    "--classes",
    help="Comma-separated tissue classes (fixes order; unknown labels become an error; "
    "default: every label in the data, sorted).",
)]
_Role = Annotated[list[str] | None, typer.Option(
    "--role",
    help="CLASS=ROLE for a tissue class "
    "(tumor, stroma, immune, necrosis, other_tissue, background); repeatable "
    "(default: roles guessed from the class names, tmequant.roles).",
)]
_CellRole = Annotated[list[str] | None, typer.Option(
    "--cell-role",
    help="CLASS=ROLE for a cell class (lymphocyte, tumor_cell, other); repeatable "
    "(default: roles guessed from the class names).",
)]
_Device = Annotated[str, typer.Option(
    "--device", help="auto, cpu, cuda, cuda:1, mps.", show_default=True)]
_Workers = Annotated[int, typer.Option(
    "--workers", "-j", help="DataLoader worker processes.", show_default=True)]
_ImageMpp = Annotated[float | None, typer.Option(
    "--image-mpp", help="Pixel size of point-annotated images, um/px, when the CSV has no "
    "mpp column (default: taken to be --mpp; other sizes are resampled to --mpp).")]
_SelectMetric = Annotated[str, typer.Option(
    "--select-metric", help="Point labels: checkpoint choice, auto (F1 of the lymphocyte "
    "class), f1_mean, detection or f1_<class>.", show_default=True)]
_CropPx = Annotated[int, typer.Option(
    "--crop-px", help="Point labels: training crop side, px (multiple of 32).", show_default=True)]
_Threads = Annotated[int | None, typer.Option(
    "--threads", help="CPU threads for torch (default: torch's; 1 is fastest on a busy "
    "machine).")]
_Task = Annotated[str, typer.Option(
    "--task", help="tiles (tissue classifier / count head), cells (cell detector from "
    "points; a folder of slides with point GeoJSON and Region polygons needs it) or auto "
    "(cells for a point CSV or images with point GeoJSON, else tiles).", show_default=True)]
_MppOverride = Annotated[float | None, typer.Option(
    "--mpp-override", help="Pixel size, um/px, of slides that have none (point labels on "
    "slides; default: none, such slides are refused).")]


@app.command("train")
def train_cmd(
    data: _Data,
    out: _Out,
    arch: _Arch = "efficientnet_lite0",
    name: _Name = None,
    pretrained: _Pretrained = True,
    init: _Init = None,
    epochs: _Epochs = 10,
    max_steps: _MaxSteps = None,
    stop_after: _StopAfter = None,
    batch_size: _BatchSize = None,
    lr: _Lr = None,
    weight_decay: _WeightDecay = 0.01,
    tile_px: _TilePx = 224,
    mpp: _Mpp = 0.5,
    seed: _Seed = 0,
    resume: _Resume = False,
    linear_probe: _LinearProbe = False,
    val_fraction: _ValFraction = 0.2,
    test_fraction: _TestFraction = 0.0,
    patience: _Patience = 5,
    class_weights: _ClassWeights = "none",
    count_loss: _CountLoss = "poisson",
    no_augment: _NoAugment = False,
    macenko: _Macenko = None,
    classes: _Classes = None,
    role: _Role = None,
    cell_role: _CellRole = None,
    device: _Device = "auto",
    workers: _Workers = 0,
    image_mpp: _ImageMpp = None,
    select_metric: _SelectMetric = "auto",
    crop_px: _CropPx = 224,
    threads: _Threads = None,
    task: _Task = "auto",
    mpp_override: _MppOverride = None,
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
    from tmequant.training import AugmentConfig, TrainConfig, train  # lazy: imports torch
    from tmequant.training.points import is_point_source  # lazy: imports torch

    if task not in ("auto", "tiles", "cells"):
        fail(f"--task {task!r}: use auto, tiles or cells", 2)
    if task == "cells" or (task == "auto" and is_point_source(data)):
        slides = Path(data).is_dir() and not is_point_source(data)
        _train_points(data, out, arch, name, pretrained, mpp, tile_px, epochs, batch_size, lr,
                      weight_decay, val_fraction, seed, device, image_mpp, select_metric, crop_px,
                      threads, cell_role, no_augment, slides, mpp_override)
        return
    if threads:
        import torch  # lazy: slow to import, and only for --threads

        torch.set_num_threads(threads)
    cfg = TrainConfig(
        data=data, out=out, arch=arch, name=name, pretrained=pretrained, init_from=init,
        tile_px=tile_px, mpp_um=mpp, epochs=epochs, max_steps=max_steps,
        stop_after_steps=stop_after, batch_size=batch_size or 32, lr=lr or 3e-4,
        weight_decay=weight_decay, class_weights=class_weights, count_loss=count_loss,
        linear_probe=linear_probe, val_fraction=val_fraction, test_fraction=test_fraction,
        patience=patience, augment=None if no_augment else AugmentConfig(),
        macenko_target=macenko, seed=seed, device=device, num_workers=workers, resume=resume,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        roles=_roles(role, "--role"), cell_roles=_roles(cell_role, "--cell-role"),
    )
    typer.echo(_tiles_summary(train(cfg)), err=True)


def _tiles_summary(res: TrainResult) -> str:
    """The one line `tmequant train` prints for a tile model: steps, tiles, headline metrics."""
    head = res.metrics.get("val") or res.metrics.get("train", {})
    parts = [f"{res.steps} steps", f"tiles {res.split_counts}"]
    if "tissue" in head:
        parts.append(
            f"{'val' if 'val' in res.metrics else 'train'} balanced accuracy "
            f"{head['tissue']['balanced_accuracy']:.3f}"
        )
    for c, m in head.get("counts", {}).items():
        parts.append(f"{c} MAE {m['mae_per_tile']:.2f}/tile")
    return f"model written to {res.out_dir}: " + ", ".join(parts)


def _train_points(data: str, out: Path, arch: str, name: str | None, pretrained: bool, mpp: float,
                  tile_px: int, epochs: int, batch_size: int | None, lr: float | None,
                  weight_decay: float, val_fraction: float, seed: int, device: str,
                  image_mpp: float | None, select_metric: str, crop_px: int,
                  threads: int | None, cell_role: list[str] | None, no_augment: bool,
                  slides: bool = False, mpp_override: float | None = None) -> None:
    from tmequant.training.augment import AugmentConfig  # lazy: imports torch
    from tmequant.training.cells import (  # lazy: imports torch
        CellTrainConfig,
        format_detection_table,
        train_cells,
    )

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
    from tmequant.training import evaluate  # lazy: imports torch
    from tmequant.training.points import is_point_source  # lazy: imports torch

    if is_point_source(data):  # a detector against dots: per class P/R/F1 and per-image r
        from tmequant.training.cells import (  # lazy: imports torch
            evaluate_points,
            format_detection_table,
        )

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
