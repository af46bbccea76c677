"""The resumable checkpoint of a ``train`` run, and the weights a run starts from.

A checkpoint folder (``checkpoints/last`` of the output folder) holds::

    model.safetensors, model.json   the model folder of that step
    optimizer.safetensors           optimizer moments and RNG states (torch, CUDA)
    state.json                      step, epoch, history, the optimizer's scalars; written last

Nothing is pickled: tensors are safetensors, everything else JSON.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tmequant.errors import ModelError
from tmequant.models import ModelCard, TmeNet, load_state_into, save_model
from tmequant.provenance import to_jsonable

log = logging.getLogger("tmequant")

LAST_DIR = "checkpoints/last"
STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.safetensors"


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


def save_checkpoint(
    folder: Path, model: TmeNet, card: ModelCard, opt: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """``folder``: model.safetensors + model.json + optimizer.safetensors + state.json."""
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


def load_checkpoint(folder: Path, model: TmeNet, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Weights, optimizer state and RNG states from ``folder`` into ``model``, ``opt`` and
    torch; returns the saved state (``state.json``)."""
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


def saved_config(folder: Path) -> dict[str, Any]:
    """The run settings recorded in the checkpoint ``folder`` (``state.json`` "config")."""
    return json.loads((folder / STATE_FILE).read_text(encoding="utf-8")).get("config", {})


def init_weights(model: TmeNet, init_from: str) -> None:
    """Start from a model folder (heads too when their shapes fit) or a backbone state dict."""
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
