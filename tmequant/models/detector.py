"""Cell detector: a timm ``features_only`` backbone + a light FPN decoder -> centre heatmaps.

The network predicts, for every cell class of the card, a heatmap at ``1/output_stride`` of
the input resolution whose peaks are cell centres (CenterNet-style; Zhou et al. 2019,
"Objects as Points"). With 0.5 um/px tiles and ``output_stride=2`` the heatmap is at
1 um/px, fine enough to separate touching lymphocytes (nuclei ~7 um across). Peak finding
(:func:`find_peaks`) turns the heatmaps into one row per cell.

Tissue compartments come from the detected cells (:func:`tissue_from_cells`): a tile's
tumour / stroma / immune share is its share of tumour, stromal and lymphocyte detections,
so a detector trained on dots alone drives every tissue-level biomarker.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tmequant.models.card import DETECTOR_TISSUE_ROLES, DetectorSpec, ModelCard

# Cell roles -> the tissue class their share votes for (tissue_from_cells).
_ROLE_TISSUE = {"tumor_cell": "tumor", "lymphocyte": "immune", "other": "stroma"}


class CellDetectorNet(nn.Module):
    """Backbone features at strides 2..16 merged top-down (FPN) to ``output_stride``.

    ``forward(x)``: x (B, 3, H, W) float, normalised with the card's mean/std, H and W
    multiples of 16. Returns ``{"heatmap_logits": (B, C, H/s, W/s)}`` (s = output stride).
    """

    def __init__(self, card: ModelCard, backbone: nn.Module):
        super().__init__()
        assert card.detector is not None
        spec = card.detector
        self.card = card  # plain attribute, not part of the state dict
        self.backbone = backbone
        chans = list(backbone.feature_info.channels())  # type: ignore[union-attr, operator]
        reds = list(backbone.feature_info.reduction())  # type: ignore[union-attr, operator]
        self.reductions = reds
        d = spec.decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c in chans)
        self.out_index = reds.index(spec.output_stride)
        # The heavy 3x3 conv runs one level above the output (4x fewer pixels); the output
        # level gets a depthwise-separable conv: most of the cost of a dense decoder at
        # stride 2 goes away at no loss of localisation (the lateral brings the detail).
        self.smooth = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        self.refine = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, groups=d, bias=False), nn.BatchNorm2d(d),
            nn.ReLU(inplace=True), nn.Conv2d(d, d // 2, 1, bias=False), nn.BatchNorm2d(d // 2),
            nn.ReLU(inplace=True))
        head = nn.Conv2d(d // 2, card.n_cell, 1)
        # CenterNet's prior: heatmaps start near 0.01 so the focal loss is stable at step 0.
        assert head.bias is not None
        nn.init.constant_(head.bias, -4.6)
        self.head = head

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        y = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, self.out_index, -1):
            lat = self.lateral[i](feats[i])
            y = lat + F.interpolate(y, size=lat.shape[-2:], mode="nearest")
        y = self.smooth(y)
        lat = self.lateral[self.out_index](feats[self.out_index])
        y = lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False)
        return {"heatmap_logits": self.head(self.refine(y))}


def build_detector(card: ModelCard, backbone_factory: Any) -> CellDetectorNet:
    """The detector a card describes; ``backbone_factory(arch, **kw)`` makes the timm model."""
    assert card.detector is not None
    bb = backbone_factory(card.arch, pretrained=False, features_only=True,
                          out_indices=tuple(card.detector.out_indices))
    return CellDetectorNet(card, bb)


# --- peaks -----------------------------------------------------------------------------------

def find_peaks(
    heat: torch.Tensor, min_distance_px: float, thresholds: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cell centres from (B, C, h, w) heatmaps in 0-1.

    A peak is a pixel of the class-max map that is the maximum of its
    ``(2r+1)^2`` window (r = ``ceil(min_distance_px)``) and at least the threshold of its
    class (``thresholds``: (C,)). Classes compete at each pixel (argmax), so one cell is
    never reported twice under two classes. Returns (b, y, x, cls) index tensors (1-D);
    :func:`peaks_table` gives the table form with scores and coordinates.
    """
    r = max(1, math.ceil(min_distance_px))
    score, cls = heat.max(dim=1)  # (B, h, w)
    pooled = F.max_pool2d(score[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]
    keep = (score == pooled) & (score >= thresholds.to(score.device)[cls])
    # Two candidates closer than r are equal (each is the maximum of a window holding the
    # other): a plateau. Keep one per window, the last in raster order, so a flat-topped
    # peak (fp16, saturated sigmoid) is one cell, not several.
    h, w = score.shape[-2:]
    order = torch.arange(1, h * w + 1, device=score.device, dtype=torch.float32).view(1, h, w)
    cand = keep.float() * order
    keep &= cand == F.max_pool2d(cand[:, None], 2 * r + 1, stride=1, padding=r)[:, 0]
    b, y, x = torch.nonzero(keep, as_tuple=True)
    return b, y, x, cls[b, y, x]


def peaks_table(heat: torch.Tensor, spec: DetectorSpec, classes: list[str], mpp_um: float) -> dict[str, np.ndarray]:
    """Peaks of (B, C, h, w) heatmaps as arrays: ``b`` (image), ``x``, ``y`` (input px, at the
    centre of the heatmap pixel), ``cls`` (index into ``classes``), ``score`` (0-1)."""
    stride = spec.output_stride
    min_dist_px = spec.min_distance_um / (mpp_um * stride)
    thr = torch.tensor([spec.thresholds.get(c, 0.5) for c in classes], dtype=heat.dtype)
    b, y, x, cls = find_peaks(heat, min_dist_px, thr)
    sc = heat[b, cls, y, x]
    # Heatmap pixel i covers input pixels [i*s, (i+1)*s): its centre is (i + 0.5) * s.
    return {
        "b": b.cpu().numpy().astype(np.int64),
        "x": (x.cpu().numpy().astype(np.float64) + 0.5) * stride,
        "y": (y.cpu().numpy().astype(np.float64) + 0.5) * stride,
        "cls": cls.cpu().numpy().astype(np.uint8),
        "score": sc.float().cpu().numpy().astype(np.float32),
    }


# --- tissue compartments from cells -----------------------------------------------------------

TISSUE_FROM_CELLS_CLASSES = list(DETECTOR_TISSUE_ROLES)  # tumor, stroma, immune, paucicellular


def tissue_from_cells(counts: np.ndarray, roles: list[str], area_um2: np.ndarray,
                      spec: DetectorSpec) -> np.ndarray:
    """Tissue probabilities (N, 4) over ``TISSUE_FROM_CELLS_CLASSES`` from cell counts.

    ``counts``: (N, C) expected cells per tile; ``roles``: the C cell roles; ``area_um2``:
    (N,) tissue area per tile. A tile with fewer than ``paucicellular_per_mm2`` cells is
    paucicellular (fat, loose or acellular tissue). Otherwise its tumour / stroma / immune
    probabilities are the shares of tumour, other and lymphocyte cells, except that
    lymphocytes make tissue "immune" only where they are dense (``immune_per_mm2``, a
    lymphoid aggregate); sparse lymphocytes count towards the stroma they sit in.
    """
    n = counts.shape[0]
    out = np.zeros((n, 4), dtype=np.float32)
    if n == 0:
        return out
    area_mm2 = np.maximum(area_um2.astype(np.float64), 1.0) * 1e-6
    by_role = {r: counts[:, [i for i, rr in enumerate(roles) if rr == r]].sum(axis=1)
               for r in _ROLE_TISSUE}
    tum, lym, oth = by_role["tumor_cell"], by_role["lymphocyte"], by_role["other"]
    total = tum + lym + oth
    dens = total / area_mm2
    lym_dens = lym / area_mm2
    # smooth step from 0 to 1 over +/- 25% around the immune threshold
    w_imm = 1.0 / (1.0 + np.exp(-(lym_dens - spec.immune_per_mm2) / (0.25 * spec.immune_per_mm2)))
    # A tenth of a cell in favour of stroma: equal counts (1 tumour and 1 stromal cell) are
    # not a tie, which the biomarkers would leave without a role; stroma is the cautious call.
    safe = total + 0.1
    p_t = tum / safe
    p_i = lym * w_imm / safe
    p_s = (oth + lym * (1.0 - w_imm) + 0.1) / safe
    cellular = 1.0 / (1.0 + np.exp(-(dens - spec.paucicellular_per_mm2)
                                   / (0.25 * spec.paucicellular_per_mm2)))
    out[:, 0] = p_t * cellular
    out[:, 1] = p_s * cellular
    out[:, 2] = p_i * cellular
    out[:, 3] = 1.0 - cellular
    out[total <= 0] = np.array([0, 0, 0, 1], dtype=np.float32)
    return out
