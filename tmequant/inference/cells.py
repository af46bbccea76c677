"""Cell detection with a detector model (:mod:`tmequant.models.detector`).

``detect_image`` finds the cells of one RGB image (a patch, a TMA core, a crop) and is what
evaluation and training use; ``detect_store`` (in :mod:`tmequant.inference.cell_store`) runs
the same network over the tiles of a slide store, each tile with ``context_px`` of its
neighbours around it, and keeps a cell only in the tile that holds its centre, so a cell on
a tile border is counted exactly once.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import torch

from tmequant.errors import InputError
from tmequant.inference.runner import DeviceNet, usable_runtime
from tmequant.models.card import ModelCard
from tmequant.models.detector import peaks_table

PAD_VALUE = 255  # glass: what lies beyond an image or a slide's tissue tiles
ALIGN_PX = 32  # input sides are padded to a multiple of the backbone's largest stride


class HeatmapRunner(DeviceNet):
    """uint8 NHWC on the device -> (B, C, h, w) heatmaps in 0-1 (sigmoid), fp32."""

    def __init__(self, net: torch.nn.Module, card: ModelCard, device: torch.device,
                 amp: torch.dtype | None = None, runtime: str = "torch"):
        super().__init__(net, card, device, amp=amp, runtime=runtime)

    def __call__(self, x_u8: torch.Tensor) -> torch.Tensor:
        logits = self.forward(x_u8)["heatmap_logits"]
        with torch.inference_mode():
            return logits.float().sigmoid()


def pad_to(rgb: np.ndarray, multiple: int = ALIGN_PX, min_side: int = 0) -> np.ndarray:
    """Pad (H, W, 3) at the bottom/right with glass to a multiple of ``multiple`` px."""
    h, w = rgb.shape[:2]
    H = max(min_side, int(math.ceil(h / multiple) * multiple))
    W = max(min_side, int(math.ceil(w / multiple) * multiple))
    if (H, W) == (h, w):
        return rgb
    out = np.full((H, W, 3), PAD_VALUE, dtype=np.uint8)
    out[:h, :w] = rgb
    return out


def resize_to_mpp(rgb: np.ndarray, mpp_um: float, target_mpp_um: float) -> tuple[np.ndarray, float]:
    """Resample an image to ``target_mpp_um``; returns (image, scale = new px / old px)."""
    if abs(mpp_um - target_mpp_um) <= 0.01 * target_mpp_um:
        return rgb, 1.0
    from PIL import Image

    s = mpp_um / target_mpp_um
    h, w = rgb.shape[:2]
    size = (max(1, round(w * s)), max(1, round(h * s)))
    filt = Image.Resampling.BOX if s < 1 else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(size, filt)), s


def heatmaps_for_image(runner: HeatmapRunner, rgb: np.ndarray) -> torch.Tensor:
    """(C, h, w) heatmaps of one (H, W, 3) uint8 image at the model's MPP (padded inside)."""
    h, w = rgb.shape[:2]
    x = torch.from_numpy(np.array(pad_to(rgb), copy=True))[None]  # writable, contiguous
    heat = runner(x)[0]
    s = runner.card.detector.output_stride if runner.card.detector else 1
    return heat[:, : math.ceil(h / s), : math.ceil(w / s)]


def detect_image(
    model: Any, rgb: np.ndarray, mpp_um: float | None = None, *, device: str | torch.device = "cpu",
    thresholds: dict[str, float] | None = None, runtime: str = "auto",
) -> pd.DataFrame:
    """Cells of one image: DataFrame ``x, y`` (px of the image given), ``class``, ``score``.

    ``model``: a LoadedModel (or anything with ``.model`` and ``.card``) whose card has a
    ``detector``; ``rgb``: (H, W, 3) uint8; ``mpp_um``: the image's pixel size (None: the
    model's own); ``thresholds`` override the card's per class; ``runtime``: as in
    ``predict_store`` (``auto``: ONNX Runtime on the CPU, exported once per process).
    """
    card: ModelCard = model.card
    if card.detector is None:
        raise InputError(f"model {card.name!r} is not a cell detector (its card has no detector)")
    img, scale = resize_to_mpp(rgb, mpp_um or card.mpp_um, card.mpp_um)
    dev = torch.device(device)
    runner = HeatmapRunner(model.model, card, dev,
                           runtime=usable_runtime(runtime, model.model, card, dev))
    heat = heatmaps_for_image(runner, img)
    spec = card.detector
    if thresholds:
        spec = spec.model_copy(update={"thresholds": {**spec.thresholds, **thresholds}})
    pk = peaks_table(heat[None], spec, card.cell_classes, card.mpp_um)
    keep = (pk["x"] < img.shape[1]) & (pk["y"] < img.shape[0])
    return pd.DataFrame({
        "x": pk["x"][keep] / scale,
        "y": pk["y"][keep] / scale,
        "class": np.asarray(card.cell_classes, dtype=object)[pk["cls"][keep]],
        "score": pk["score"][keep],
    })

