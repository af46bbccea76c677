"""A network on its device: device choice, precision, and uint8 NHWC in.

The one place that turns a device name into a ``torch.device``, picks the autocast dtype, and
feeds a network uint8 NHWC batches normalised on the device (4x fewer bytes travel than with
float input). The tissue engine (:mod:`tmequant.inference.engine`), the cell detector
(:mod:`tmequant.inference.cells`) and training all use it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

from tmequant.errors import InputError
from tmequant.models.card import ModelCard


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU if any, else the CPU; ``cuda:N`` is checked to exist.
    A name that is not a device raises InputError (exit 2 in the CLI)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        s = str(device).strip().lower()
        if s == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        try:
            dev = torch.device(s)
        except RuntimeError:
            raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is available (use --device cpu)")
        idx = 0 if dev.index is None else dev.index
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", idx)
    if dev.type not in ("cpu", "mps"):
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it, else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` | ``bf16`` | ``fp16``: the name results record (outputs of two precisions differ)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


class DeviceNet:
    """``net`` in eval mode on ``device``, called with uint8 (B, H, W, 3) batches.

    The card's mean/std are folded into one multiply-add on the device; ``amp`` is the
    autocast dtype (None: fp32); ``channels_last`` stores the net NHWC (the input is already
    NHWC, so the permuted view needs no copy); ``compile`` wraps it in ``torch.compile``.
    Calling returns the net's output dict, computed under ``torch.inference_mode``.
    """

    def __init__(self, net: torch.nn.Module, card: ModelCard, device: torch.device, *,
                 amp: torch.dtype | None = None, channels_last: bool = False,
                 compile: bool = False):
        self.card, self.device, self.amp = card, device, amp
        net = net.to(device).eval()
        if channels_last and device.type != "mps":
            net = net.to(memory_format=torch.channels_last)
        self.net: Any = torch.compile(net) if compile else net
        # (x / 255 - mean) / std == x * scale + shift, folded into one fused op.
        std = torch.tensor(card.std, dtype=torch.float32, device=device)
        mean = torch.tensor(card.mean, dtype=torch.float32, device=device)
        self.scale = (1.0 / (255.0 * std)).view(1, 3, 1, 1)
        self.shift = (-mean / std).view(1, 3, 1, 1)

    @torch.inference_mode()
    def forward(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, W, 3) uint8 -> the net's outputs (autocast dtype; callers cast)."""
        x = x_u8.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale).add_(self.shift)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with ctx:
            out: dict[str, torch.Tensor] = self.net(x)
        return out
