"""Training a cell detector from point annotations (``tmequant train`` on dots).

Recipe: random crops of ``crop_px`` at the model's MPP (images at another pixel size are
resampled first, with their points), dihedral flips/rotations and HED stain / brightness /
contrast jitter (:mod:`tmequant.training.augment`), Gaussian centre targets
(:func:`tmequant.training.points.heatmap_targets`), the CenterNet focal loss with pixels
outside the annotated region ignored, AdamW with linear warm-up and cosine decay.
After every ``eval_every`` epochs the validation images are detected whole; per-class
peak thresholds are tuned there (the F1-maximising score threshold of each class), and
the checkpoint with the best ``select_metric`` (default: F1 of the lymphocyte-role class)
becomes the model. Splits are by patient (TCGA barcode, else image).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from tmequant.defaults import MPP_UM, TILE_PX
from tmequant.errors import InputError
from tmequant.inference.cells import PAD_VALUE, HeatmapRunner, heatmaps_for_image, resize_to_mpp
from tmequant.inference.runner import usable_runtime
from tmequant.models import create_model, load_model, save_model
from tmequant.models.card import DETECTOR_TISSUE_ROLES, DetectorSpec, ModelCard
from tmequant.models.detector import find_peaks
from tmequant.roles import cell_role
from tmequant.training.augment import AugmentConfig, augment, dihedral
from tmequant.training.dataset import IMAGENET_MEAN, IMAGENET_STD, read_image
from tmequant.training.labels import open_training_slide
from tmequant.training.losses import lr_factor
from tmequant.training.metrics import detection_metrics
from tmequant.training.points import PointSet, heatmap_targets, load_points, region_mask
from tmequant.training.trainer import seed_everything
from tmequant.wsi import read_resampled

log = logging.getLogger("tmequant")

THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.025), 3)


@dataclass
class CellTrainConfig:
    """Everything ``train_cells`` needs; units in names."""

    data: str | Path | PointSet
    out: str | Path
    arch: str = "efficientnet_lite0"
    name: str | None = None
    pretrained: bool = True
    mpp_um: float = MPP_UM  # the model's input pixel size
    image_mpp_um: float | None = None  # pixel size of the images when the data does not say
    slides: bool = False  # the data folder holds whole-slide images with point GeoJSON
    mpp_override_um: float | None = None  # for slides without a pixel size
    tile_px: int = TILE_PX  # the store tile the model expects at inference
    crop_px: int = TILE_PX  # training crop side
    crops_per_image: int = 2  # crops per image per epoch
    epochs: int = 40
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.02
    eval_every: int = 2
    select_metric: str = "auto"  # auto (lymphocyte F1) | f1_mean | f1_<class> | detection
    match_um: float = 6.0
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(scale=0.0))
    val_fraction: float = 0.15
    val_images: list[str] | None = None  # names of validation images (overrides the split)
    classes: list[str] | None = None
    cell_roles: dict[str, str] | None = None
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    description: str = ""
    license: str = "user data: see the data's licence"
    domain: str | list[str] = "unknown"
    training_extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class CellTrainResult:
    out_dir: Path
    card: ModelCard
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: int
    seconds: float


# --- data ---------------------------------------------------------------------------------------

@dataclass
class _Img:
    name: str
    rgb: np.ndarray  # (H, W, 3) uint8 at the model MPP
    xy: np.ndarray  # (n, 2) px at the model MPP
    cls: np.ndarray  # (n,) int
    mask: np.ndarray  # (H, W) bool annotated
    patient: str


def _load_images(ps: PointSet, classes: list[str], mpp_um: float, image_mpp_um: float | None) -> list[_Img]:
    pos = {c: i for i, c in enumerate(classes)}
    out = []
    for im in ps.images:
        if im.slide_box is not None:
            rgb2, s = _read_slide_box(im, mpp_um)
        else:
            rgb = read_image(im.path)
            src_mpp = im.mpp_um or image_mpp_um or mpp_um
            rgb2, s = resize_to_mpp(rgb, src_mpp, mpp_um)
        xy = im.xy * s
        out.append(_Img(im.name, rgb2, xy, np.array([pos[c] for c in im.classes], dtype=np.int64),
                        region_mask(rgb2.shape[:2], im.region_polygons, s), im.patient_id))
    return out


def _read_slide_box(im: Any, mpp_um: float) -> tuple[np.ndarray, float]:
    """A slide region at ``mpp_um`` (as tiling reads slides) and its scale (px per level-0 px)."""
    x0, y0, x1, y1 = im.slide_box
    with open_training_slide(im.path, im.mpp_override_um) as slide:
        assert slide.info.mpp_um is not None
        s = slide.info.mpp_um / mpp_um
        w, h = max(1, round((x1 - x0) * s)), max(1, round((y1 - y0) * s))
        rgb = read_resampled(slide, slide.best_level_for_mpp(mpp_um), (x0, y0, x1, y1), (w, h))
    return np.ascontiguousarray(rgb, dtype=np.uint8), s


def split_by_patient(images: list[Any], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Image indices (train, val): whole patients go to val until ``val_fraction`` of images."""
    patients = sorted({im.patient for im in images})
    rng = np.random.default_rng(seed)
    rng.shuffle(patients)
    target = max(1, round(val_fraction * len(images))) if val_fraction > 0 else 0
    val_p: set[str] = set()
    n = 0
    for p in patients:
        if n >= target:
            break
        val_p.add(p)
        n += sum(im.patient == p for im in images)
    tr = [i for i, im in enumerate(images) if im.patient not in val_p]
    va = [i for i, im in enumerate(images) if im.patient in val_p]
    return tr, va


def _crop(img: _Img, crop: int, rng: np.random.Generator, cfg: CellTrainConfig, n_cls: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(crop, crop, 3) float32 augmented pixels, (C, h, w) targets, (1, h, w) loss mask.

    With ``cfg.augment.scale`` s > 0 a square of ``crop / f`` px (f in 1 +/- s) is resampled
    to ``crop`` px and the points with it: the detector sees cells a little larger or smaller
    than at its nominal MPP, as scanners' calibrations differ.
    """
    s = cfg.augment.scale
    f = 1.0 + float(rng.uniform(-s, s)) if s > 0 else 1.0
    src = max(8, int(round(crop / f)))
    h, w = img.rgb.shape[:2]
    margin = src // 8  # crops may run past the image edge: glass there, as at slide edges
    y0 = int(rng.integers(-margin, max(h - src + margin, -margin) + 1))
    x0 = int(rng.integers(-margin, max(w - src + margin, -margin) + 1))
    pix = np.full((src, src, 3), PAD_VALUE, dtype=np.uint8)
    msk = np.ones((src, src), dtype=bool)  # beyond the image: glass, truly cell-free
    ys, xs = slice(max(y0, 0), min(y0 + src, h)), slice(max(x0, 0), min(x0 + src, w))
    yd, xd = slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0)
    pix[yd, xd] = img.rgb[ys, xs]
    msk[yd, xd] = img.mask[ys, xs]
    xy = (img.xy - np.array([x0, y0])) * (crop / src)
    if src != crop:
        pix = np.asarray(Image.fromarray(pix).resize((crop, crop), Image.Resampling.BILINEAR))
        msk = np.asarray(Image.fromarray(msk).resize((crop, crop), Image.Resampling.NEAREST))
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < crop) & (xy[:, 1] >= 0) & (xy[:, 1] < crop)
    xy, cls = xy[inside], img.cls[inside]
    k = int(rng.integers(8))
    pix, msk = dihedral(pix, k), dihedral(msk, k)
    xy = _dihedral_points(xy, k, crop)
    stride = cfg.detector.output_stride
    sigma = cfg.detector.sigma_um / (cfg.mpp_um * stride)
    tgt = heatmap_targets(xy, cls, n_cls, (crop, crop), stride, sigma)
    m = np.asarray(msk.reshape(crop // stride, stride, crop // stride, stride).all(axis=(1, 3)))
    a = augment(np.ascontiguousarray(pix), rng,
                AugmentConfig(**{**asdict(cfg.augment), "flips": False, "scale": 0.0}),
                allow_scale=False)
    return a, tgt, m[None].astype(np.float32)


def _dihedral_points(xy: np.ndarray, k: int, side: int) -> np.ndarray:
    """Points moved as :func:`dihedral` moves pixels (rot90 k%4 times, then a left-right flip
    for k >= 4) in a ``side`` square (pixel centres at +0.5)."""
    x, y = xy[:, 0].copy(), xy[:, 1].copy()
    for _ in range(k % 4):  # np.rot90 (counter-clockwise): (x, y) -> (y, side - x)
        x, y = y, side - x
    if k >= 4:
        x = side - x
    return np.stack([x, y], axis=1)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CenterNet's penalty-reduced focal loss (alpha 2, beta 4) over masked pixels,
    normalised by the number of cells (target peaks == 1)."""
    p = logits.sigmoid().clamp(1e-4, 1 - 1e-4)
    pos = (target >= 0.999).float() * mask
    neg = (1 - pos) * mask
    pos_loss = -torch.log(p) * (1 - p) ** 2 * pos
    neg_loss = -torch.log(1 - p) * p ** 2 * (1 - target) ** 4 * neg
    n = pos.sum().clamp(min=1.0)
    return (pos_loss.sum() + neg_loss.sum()) / n


# --- evaluation ---------------------------------------------------------------------------------

def _peaks_low(heat: torch.Tensor, card: ModelCard) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All peaks above the lowest grid threshold: xy (px), class, score."""
    spec = card.detector
    assert spec is not None
    s = spec.output_stride
    thr = torch.full((card.n_cell,), float(THRESHOLD_GRID[0]))
    _, y, x, c = find_peaks(heat[None], spec.min_distance_um / (card.mpp_um * s), thr)
    sc = heat[c, y, x].numpy()
    xy = np.stack([(x.numpy() + 0.5) * s, (y.numpy() + 0.5) * s], axis=1)
    return xy, c.numpy(), sc


def evaluate_images(net: torch.nn.Module, card: ModelCard, images: list[_Img], device: torch.device,
                    match_um: float, tune: bool, runtime: str = "torch",
                    ) -> tuple[dict[str, Any], dict[str, float]]:
    """Detect every image whole; (metrics, thresholds). ``tune``: choose each class's
    threshold on these images (else the card's). ``runtime``: as in ``predict_store``."""
    runner = HeatmapRunner(net, card, device, runtime=runtime)
    raw = []
    for im in images:
        xy, c, sc = _peaks_low(heatmaps_for_image(runner, im.rgb).cpu(), card)
        ok = (xy[:, 0] < im.rgb.shape[1]) & (xy[:, 1] < im.rgb.shape[0])
        ok &= im.mask[np.minimum(xy[:, 1].astype(int), im.mask.shape[0] - 1),
                      np.minimum(xy[:, 0].astype(int), im.mask.shape[1] - 1)]
        raw.append((xy[ok], c[ok], sc[ok]))
    truths = [(im.xy, im.cls) for im in images]
    radius = match_um / card.mpp_um
    assert card.detector is not None
    thr = {c: card.detector.thresholds.get(c, 0.5) for c in card.cell_classes}
    if tune:
        for k, cname in enumerate(card.cell_classes):
            best = (-1.0, thr[cname])
            # class k alone, relabelled 0, so each threshold costs one class's matching
            tr = [(txy[tc == k], np.zeros(int((tc == k).sum()), np.int64)) for txy, tc in truths]
            for t in THRESHOLD_GRID:
                preds = [(xy[(c == k) & (sc >= t)], np.zeros(int(((c == k) & (sc >= t)).sum()), np.int64))
                         for xy, c, sc in raw]
                f1 = detection_metrics(preds, tr, [cname], radius)[cname]["f1"]
                if f1 > best[0]:
                    best = (f1, float(t))
            thr[cname] = best[1]
    tv = np.array([thr[c] for c in card.cell_classes])
    preds = [(xy[sc >= tv[c]], c[sc >= tv[c]]) for xy, c, sc in raw]
    m = detection_metrics(preds, truths, card.cell_classes, radius)
    m["match_um"] = match_um
    return m, thr


def _select_value(metric: str, m: dict[str, Any], card: ModelCard) -> float:
    if metric == "auto":
        lym = [c for c in card.cell_classes if card.cell_roles.get(c) == "lymphocyte"]
        metric = f"f1_{lym[0]}" if lym else "f1_mean"
    if metric == "f1_mean":
        return float(m["f1_mean"])
    if metric == "detection":
        return float(m["detection"]["f1"])
    if metric.startswith("f1_") and metric[3:] in card.cell_classes:
        return float(m[metric[3:]]["f1"])
    raise InputError(f"select metric {metric!r}: use auto, f1_mean, detection or "
                     f"f1_<class> with a class of {card.cell_classes}")


# --- the loop -----------------------------------------------------------------------------------

def build_detector_card(cfg: CellTrainConfig, classes: list[str], roles: dict[str, str]) -> ModelCard:
    name = cfg.name or "".join(ch if ch.isalnum() or ch in "._+-" else "_"
                               for ch in Path(cfg.out).resolve().name)
    return ModelCard(
        name=name, arch=cfg.arch, tile_px=cfg.tile_px, mpp_um=cfg.mpp_um,
        mean=IMAGENET_MEAN, std=IMAGENET_STD,
        tissue_classes=list(DETECTOR_TISSUE_ROLES), tissue_roles=dict(DETECTOR_TISSUE_ROLES),
        cell_classes=classes, cell_roles=roles, detector=cfg.detector,
        description=cfg.description or "Cell detector trained by tmequant train on point labels",
        license=cfg.license, domain=cfg.domain,
    )


def train_cells(cfg: CellTrainConfig) -> CellTrainResult:
    """Train a detector as ``cfg`` says; writes ``cfg.out`` (model folder, metrics.json,
    split.csv, history.json). Returns the result with validation metrics."""
    t0 = time.time()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if cfg.device == "auto" else cfg.device))
    ps = cfg.data if isinstance(cfg.data, PointSet) else load_points(
        cfg.data, cfg.classes, slides=cfg.slides, mpp_override_um=cfg.mpp_override_um)
    classes = list(cfg.classes or ps.classes)
    if not classes:
        raise InputError("no classified points in the data", ps.source or None)
    roles = {c: (cfg.cell_roles or {}).get(c) or cell_role(c) for c in classes}
    if cfg.crop_px % 32:
        raise InputError(f"crop_px {cfg.crop_px} must be a multiple of 32")
    images = _load_images(ps, classes, cfg.mpp_um, cfg.image_mpp_um)
    tr, va = _split_images(cfg, ps, images)
    if not tr:
        raise InputError("no training images", ps.source or None)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_split_csv(out / "split.csv", images, tr, va)

    card = build_detector_card(cfg, classes, roles)
    net = create_model(card, pretrained=cfg.pretrained).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = math.ceil(len(tr) * cfg.crops_per_image / cfg.batch_size)
    total = per_epoch * cfg.epochs
    warm = int(cfg.warmup_fraction * total)
    mean = torch.tensor(card.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(card.std).view(1, 3, 1, 1) * 255
    # Density check for prediction time: the densest training crop, in cells per mm^2.
    area_mm2 = (cfg.crop_px * cfg.mpp_um / 1000) ** 2
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, Any], dict[str, float]] = (-math.inf, -1, {}, {})
    step = 0
    max_cells = 0.0
    for epoch in range(cfg.epochs):
        net.train()
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(np.repeat(tr, cfg.crops_per_image))
        losses = []
        for bi in range(0, len(order), cfg.batch_size):
            batch = [_crop(images[i], cfg.crop_px, rng, cfg, len(classes))
                     for i in order[bi:bi + cfg.batch_size]]
            if len(batch) < 2:
                continue  # BatchNorm needs two samples
            lr = cfg.lr * lr_factor(step, total, warm, cfg.min_lr_ratio)
            loss, cells = _train_step(net, opt, batch, mean, std, device, lr)
            max_cells = max(max_cells, cells)
            losses.append(loss)
            step += 1
        rec: dict[str, Any] = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else math.nan,
                               "seconds": round(time.time() - t0, 1)}
        last = epoch + 1 == cfg.epochs
        if va and ((epoch + 1) % cfg.eval_every == 0 or last):
            net.eval()
            m, thr = evaluate_images(net, card, [images[i] for i in va], device, cfg.match_um, tune=True)
            score = _select_value(cfg.select_metric, m, card)
            rec.update({"select": score, "f1": {c: m[c]["f1"] for c in classes},
                        "thresholds": thr})
            if score > best[0]:
                best = (score, epoch + 1, m, thr)
                card.detector = card.detector.model_copy(update={"thresholds": thr})  # type: ignore[union-attr]
                save_model(out, net, card)
        elif not va and last:
            save_model(out, net, card)
        history.append(rec)
        log.info("epoch %d/%d loss %.4f%s", epoch + 1, cfg.epochs, rec["loss"],
                 f" select {rec['select']:.3f}" if "select" in rec else "")
    secs = time.time() - t0
    metrics = {"val": best[2], "best_epoch": best[1], "thresholds": best[3],
               "n_train_images": len(tr), "n_val_images": len(va)}
    card = ModelCard.load(out)
    card.training = {
        "data": ps.source, "n_images": len(images), "classes": classes,
        "cells_per_class": ps.class_counts(), "epochs": cfg.epochs, "best_epoch": best[1],
        "crop_px": cfg.crop_px, "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": cfg.seed,
        "select_metric": cfg.select_metric, "match_um": cfg.match_um, "seconds": round(secs, 1),
        "device": str(device), "max_cells_per_mm2_in_training": round(max_cells / area_mm2, 1),
        "split": "patient", **cfg.training_extra,
    }
    card.metrics = {"val": _short(best[2], classes)} if best[2] else {}
    card.save(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=float), encoding="utf-8")
    (out / "history.json").write_text(json.dumps(history, indent=1, default=float), encoding="utf-8")
    return CellTrainResult(out, card, metrics, history, best[1], secs)


def _split_images(cfg: CellTrainConfig, ps: PointSet, images: list[_Img]) -> tuple[list[int], list[int]]:
    """Training and validation image indices: ``cfg.val_images``, else the data's own split,
    else by patient (seeded); warns when a patient is in both."""
    if cfg.val_images is not None:
        vset = set(cfg.val_images)
        va = [i for i, im in enumerate(images) if im.name in vset]
        tr = [i for i, im in enumerate(images) if im.name not in vset]
    elif any(im.split for im in ps.images):
        va = [i for i, im in enumerate(ps.images) if im.split == "val"]
        tr = [i for i, im in enumerate(ps.images) if im.split in (None, "train")]
    else:
        tr, va = split_by_patient(images, cfg.val_fraction, cfg.seed)
    leak = {images[i].patient for i in tr} & {images[i].patient for i in va}
    if leak:
        log.warning("patients in both training and validation images: %s", sorted(leak)[:5])
    return tr, va


def _write_split_csv(path: Path, images: list[_Img], tr: list[int], va: list[int]) -> None:
    """``split.csv``: each image's patient and split."""
    path.write_text("image,patient_id,split\n" + "".join(
        f"{images[i].name},{images[i].patient},{s}\n" for s, idx in (("train", tr), ("val", va))
        for i in idx), encoding="utf-8")


def _train_step(net: torch.nn.Module, opt: torch.optim.Optimizer, batch: list[Any], mean: torch.Tensor,
                std: torch.Tensor, device: torch.device, lr: float) -> tuple[float, float]:
    """One optimiser step on a batch of crops at learning rate ``lr``: the loss, and the most
    cells in one crop of the batch."""
    x = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    x = ((x - mean) / std).to(device)
    tgt = torch.from_numpy(np.stack([b[1] for b in batch])).to(device)
    msk = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
    cells = float((tgt >= 0.999).sum(dim=(1, 2, 3)).max())
    for g in opt.param_groups:
        g["lr"] = lr
    loss = focal_loss(net(x)["heatmap_logits"], tgt, msk)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
    opt.step()
    return float(loss.detach()), cells


def _short(m: dict[str, Any], classes: list[str]) -> dict[str, Any]:
    """The card's summary of detection metrics (rounded)."""
    keep = ("precision", "recall", "f1", "count_pearson_per_image", "count_spearman_per_image")
    return {c: {k: round(float(m[c][k]), 4) for k in keep} for c in [*classes, "detection"]} | {
        "match_um": m.get("match_um"), "n_images": m.get("n_images")}


def evaluate_points(data: str | Path | PointSet, model: Any, *, split: str | None = None,
                    match_um: float = 6.0, image_mpp_um: float | None = None,
                    device: str = "cpu", runtime: str = "auto") -> dict[str, Any]:
    """A detector against point labels: per class precision / recall / F1 (one-to-one within
    ``match_um``) and per-image count Pearson / Spearman / MAE (``detection_metrics``).
    ``runtime``: the one ``predict_store`` would use (``auto``: ONNX Runtime on the CPU), so
    the figures are those of the predictions.

    ``model``: a LoadedModel (or name / folder); ``split``: only images of that split (the
    CSV's ``split`` column, else the model folder's split.csv).
    """
    loaded = model if hasattr(model, "card") else load_model(model)
    card: ModelCard = loaded.card
    if card.detector is None:
        raise InputError(f"model {card.name!r} is not a cell detector; point labels evaluate "
                         "detectors (tile labels evaluate classifiers)")
    ps = data if isinstance(data, PointSet) else load_points(data)
    unknown = sorted(set(ps.classes) - set(card.cell_classes))
    if unknown:
        raise InputError(f"cell classes {unknown} of the labels are not classes of model "
                         f"{card.name!r} ({card.cell_classes})", ps.source or None)
    if split is not None:
        names = _split_names(loaded, split)
        keep = [i for i, im in enumerate(ps.images)
                if im.split == split or (im.split is None and im.name in names)]
        if not keep:
            raise InputError(f"no images of split {split!r}", ps.source or None)
        ps = ps.subset(keep)
    images = _load_images(ps, card.cell_classes, card.mpp_um, image_mpp_um)
    dev = torch.device(device)
    rt = usable_runtime(runtime, loaded.model, card, dev)
    m, _ = evaluate_images(loaded.model, card, images, dev, match_um, tune=False, runtime=rt)
    m["model"] = card.name
    m["runtime"] = rt
    return m


def _split_names(loaded: Any, split: str) -> set[str]:
    src = Path(str(getattr(loaded, "source", "")))
    f = src / "split.csv"
    if not f.is_file():
        return set()
    rows = [ln.split(",") for ln in f.read_text(encoding="utf-8").splitlines()[1:] if ln]
    return {r[0] for r in rows if len(r) >= 3 and r[2] == split}


def format_detection_table(m: dict[str, Any], classes: list[str]) -> str:
    """The per-class figures of ``detection_metrics`` as an aligned text table."""
    lines = [f"{'class':14s} {'precision':>9s} {'recall':>7s} {'F1':>6s} {'true':>6s} {'found':>6s} "
             f"{'r/image':>8s} {'rho/image':>9s}"]
    for c in [*classes, "detection"]:
        x = m[c]
        lines.append(f"{c:14s} {x['precision']:9.3f} {x['recall']:7.3f} {x['f1']:6.3f} "
                     f"{x['n_true']:6d} {x['n_pred']:6d} {x['count_pearson_per_image']:8.3f} "
                     f"{x['count_spearman_per_image']:9.3f}")
    return "\n".join(lines)
