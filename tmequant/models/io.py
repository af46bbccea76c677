"""Checkpoint I/O: a model folder is ``model.safetensors`` + ``model.json``; nothing is unpickled.

``save_model`` / ``load_model`` are the only way weights go in and out. A ``.pt``/``.pth``/
pickle file given as a model is refused; ``import_state_dict`` (``tmequant models import``)
converts a plain state dict explicitly, with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tmequant.errors import ModelError
from tmequant.models.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from tmequant.models.factory import TmeNet, create_model

log = logging.getLogger("tmequant")

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")


@dataclass
class LoadedModel:
    """A network ready for inference: ``model`` in eval mode on ``device``, its card, its source."""

    model: TmeNet
    card: ModelCard
    source: str

    @property
    def name(self) -> str:
        return self.card.name


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the module; DataParallel/DDP too. Save the real one.
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(
        model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) else model


def save_model(folder: str | os.PathLike[str], model: nn.Module, card: ModelCard) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/model.json``; returns the folder."""
    from safetensors.torch import save_file

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    net = _unwrap(model)
    # clone: safetensors refuses tensors sharing storage; contiguous cpu copies are safe.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "tmequant_model": card.name,
                                           "arch": card.arch})
    os.replace(tmp, out / WEIGHTS_FILE)
    card.save(out / CARD_FILE)
    return out


def looks_pickled(path: Path) -> bool:
    """A zip (torch.save) or raw pickle file, judged by its first bytes."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def refuse_pickle(path: Path) -> ModelError:
    return ModelError(
        "pickle checkpoints are never loaded; convert it once with `tmequant models import "
        f"{path.name} --card model.json --out MODEL_DIR` (a plain state dict)",
        path,
    )


def load_state_into(model: TmeNet, tensors: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load ``tensors`` into ``model`` strictly; ModelError names the file and the tensor."""
    expected = model.state_dict()
    for k, v in tensors.items():
        if k not in expected:
            if k.startswith("count_head.") and model.count_head is None:
                raise ModelError(f"tensor {k}: weights have a count head but the card has no "
                                 "cell_classes", source)
            raise ModelError(f"unexpected tensor {k} for architecture {model.card.arch}", source)
    for k, e in expected.items():  # model order: the first misfit named is the natural one
        if k in tensors and tuple(tensors[k].shape) != tuple(e.shape):
            raise ModelError(f"tensor {k} has shape {tuple(tensors[k].shape)}, the card's model "
                             f"expects {tuple(e.shape)}", source)
    missing = [k for k in expected if k not in tensors]
    if missing:
        hint = " (the card has cell_classes but the weights no count head)" if any(
            k.startswith("count_head.") for k in missing) else ""
        raise ModelError(f"missing tensor {missing[0]} ({len(missing)} missing){hint}", source)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()}, strict=True)


def load_folder(folder: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model folder (``model.json`` + ``model.safetensors``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(folder)
    card = ModelCard.load(d / CARD_FILE)
    wpath = d / WEIGHTS_FILE
    if not wpath.exists():
        pickles = [p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise refuse_pickle(pickles[0])
        raise ModelError(f"no {WEIGHTS_FILE} next to the card", d)
    try:
        tensors = load_file(str(wpath), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        if looks_pickled(wpath):
            raise refuse_pickle(wpath) from None
        raise ModelError(f"not a readable safetensors file: {e}", wpath) from None
    model = create_model(card, pretrained=False)
    load_state_into(model, tensors, wpath)
    model.to(device).eval()
    return LoadedModel(model=model, card=card, source=str(d.resolve()))


# --- explicit conversion of a plain state dict ------------------------------------------

def _plain_state_dict(obj: Any, source: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError("not a plain state dict of tensors", source)
    out = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod.", "model."):
            k = k.removeprefix(prefix)
        out[k] = v
    return out


def import_state_dict(
    state_dict_path: str | os.PathLike[str],
    card: ModelCard | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    arch: str | None = None,
) -> Path:
    """Convert a plain PyTorch state dict into a model folder (safetensors + card).

    Accepts a TmeNet state dict (``backbone.*``, ``tissue_head.*``, ``count_head.*``) or a
    plain timm classifier state dict whose classifier has the card's tissue classes (it
    becomes the tissue head). Loaded with ``torch.load(weights_only=True)``: no code runs.
    """
    src = Path(state_dict_path)
    if not isinstance(card, ModelCard):
        card = ModelCard.load(card)
    if arch is not None and arch != card.arch:
        raise ModelError(f"--arch {arch} differs from the card's arch {card.arch}", src)
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelError("no such file", src) from None
    except Exception as e:  # noqa: BLE001 - unpickling errors of every kind
        raise ModelError(f"cannot read as a plain state dict (weights_only): "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", src) from None
    sd = _plain_state_dict(obj, src)
    model = create_model(card, pretrained=False)
    if not any(k.startswith("backbone.") for k in sd):
        sd = _timm_to_tmenet(sd, model)
    load_state_into(model, sd, src)
    return save_model(out_dir, model, card)


def _timm_to_tmenet(sd: dict[str, torch.Tensor], model: TmeNet) -> dict[str, torch.Tensor]:
    """A timm model's own keys: backbone.* plus its classifier as the tissue head."""
    clf = getattr(model.backbone, "pretrained_cfg", {}).get("classifier", "classifier")
    clf_names = [clf] if isinstance(clf, str) else list(clf)
    out = {}
    for k, v in sd.items():
        head = next((c for c in clf_names if k.startswith(c + ".")), None)
        if head is not None:
            out["tissue_head." + k[len(head) + 1:]] = v
        else:
            out["backbone." + k] = v
    return out
