"""A small registry of named models.

Names resolve, in order, to
  * ``random-<arch>``: an UNTRAINED, seeded random network for smoke tests and benchmarks,
    built on the fly for any timm architecture (``random-efficientnet_lite0`` is listed);
  * a model folder shipped as package data under ``tmequant/data/models/<name>/``;
  * a folder under ``$TMEQUANT_MODELS/<name>/`` when that variable is set.
A Hugging Face id (``hf-hub:org/name``) is fetched only when the user names one.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from tmequant.defaults import MPP_UM, TILE_PX
from tmequant.domain import DEFAULT_MODEL as _DEFAULT_MODEL
from tmequant.errors import ModelError
from tmequant.models.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from tmequant.models.factory import create_model
from tmequant.models.io import (
    PICKLE_SUFFIXES,
    LoadedModel,
    load_folder,
    looks_pickled,
    refuse_pickle,
)
from tmequant.roles import CELL_ROLES, TISSUE_ROLES

RANDOM_PREFIX = "random-"
DEFAULT_MODEL = _DEFAULT_MODEL  # re-exported: tmequant.domain holds it, torch-free
LISTED_RANDOM = ("random-efficientnet_lite0",)
RANDOM_SEED = 0


class UnknownModelError(ModelError):
    """The model named on the command line is not a folder, a registered name or an hf-hub id:
    a usage error (exit code 2), like any other bad option value."""

    exit_code = 2


@dataclass(frozen=True)
class ModelInfo:
    """One registry entry: its name, where it comes from, a one-line description and its
    domain (what it was trained on: ``synthetic``, ``untrained``, tissues, or ``unknown``)."""

    name: str
    source: str  # "built-in", a folder path
    description: str
    domain: str = "unknown"


def random_card(arch: str, tile_px: int = TILE_PX, mpp_um: float = MPP_UM) -> ModelCard:
    """Card of the untrained ``random-<arch>`` model: one class per role, identity role maps."""
    import timm

    if not timm.is_model(arch):
        raise UnknownModelError(f"unknown model {RANDOM_PREFIX}{arch}: {arch!r} is not a timm "
                                "architecture (see `tmequant models list`)")
    return ModelCard(
        name=f"{RANDOM_PREFIX}{arch}",
        version="0",
        arch=arch,
        tile_px=tile_px,
        mpp_um=mpp_um,
        tissue_classes=list(TISSUE_ROLES),
        tissue_roles={r: r for r in TISSUE_ROLES},
        cell_classes=list(CELL_ROLES),
        cell_roles={r: r for r in CELL_ROLES},
        description=(f"UNTRAINED: seeded random {arch} weights for smoke tests and benchmarks; "
                     "its predictions mean nothing."),
        license="Apache-2.0",
        training={"untrained": True, "seed": RANDOM_SEED},
        metrics={},
        domain="untrained",
    )


def build_random(arch: str):
    """The seeded, untrained ``random-<arch>`` network and its card (same weights every call)."""
    card = random_card(arch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_SEED)
        model = create_model(card, pretrained=False)
    return LoadedModel(model=model.eval(), card=card, source=f"built-in:{card.name}")


def _package_models_dir() -> Path | None:
    try:
        root = importlib.resources.files("tmequant") / "data" / "models"
    except (ModuleNotFoundError, TypeError):  # pragma: no cover
        return None
    p = Path(str(root))
    return p if p.is_dir() else None


def _folders() -> dict[str, Path]:
    """Model folders by name: package data first, then $TMEQUANT_MODELS (which may override)."""
    out: dict[str, Path] = {}
    roots = [_package_models_dir()]
    env = os.environ.get("TMEQUANT_MODELS")
    if env:
        roots.append(Path(env))
    for root in roots:
        if root is None or not root.is_dir():
            continue
        for d in sorted(root.iterdir()):
            if (d / CARD_FILE).is_file():
                out[d.name] = d
    return out


def list_models() -> list[ModelInfo]:
    """Every named model: the listed built-ins and each shipped or user model folder."""
    from tmequant.models.card import card_domain

    infos = []
    for n in LISTED_RANDOM:
        c = random_card(n[len(RANDOM_PREFIX):])
        infos.append(ModelInfo(n, "built-in", c.description, card_domain(c)))
    for name, d in _folders().items():
        domain = "unknown"
        try:
            card = ModelCard.load(d)
            desc, domain = card.description or "(no description)", card_domain(card)
        except ModelError as e:
            desc = f"INVALID: {e.message}"
        infos.append(ModelInfo(name, str(d), desc.splitlines()[0] if desc else "", domain))
    return infos


def get_card(name: str) -> tuple[ModelCard, str]:
    """The card of a named model (no weights loaded) and its source."""
    folders = _folders()
    if name in folders:
        return ModelCard.load(folders[name]), str(folders[name])
    if name.startswith(RANDOM_PREFIX):
        return random_card(name[len(RANDOM_PREFIX):]), "built-in"
    raise _unknown(name)


def _unknown(name: str) -> ModelError:
    return UnknownModelError(f"unknown model {name!r}: not a folder, a registered name "
                      "(`tmequant models list`) or hf-hub:org/name")


def load_registered(name: str, device: str | torch.device = "cpu"):
    """Load a registered model by name."""
    folders = _folders()
    if name in folders:
        return load_folder(folders[name], device)
    if name.startswith(RANDOM_PREFIX):
        loaded = build_random(name[len(RANDOM_PREFIX):])
        loaded.model.to(device)
        return loaded
    raise _unknown(name)


def fetch_hf(repo_id: str) -> Path:
    """Download (or find in the cache) ``model.json`` + ``model.safetensors`` of a HF repo."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError(f"hf-hub:{repo_id}: huggingface_hub is not installed") from None
    try:
        path = snapshot_download(repo_id, allow_patterns=[CARD_FILE, "model.safetensors"])
    except Exception as e:  # noqa: BLE001 - offline, 404, auth: all become one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"hf-hub:{repo_id}: cannot fetch from the Hugging Face hub "
                         f"(offline or no such repo): {first[:200]}") from None
    return Path(path)


def load_model(name_or_path: str | os.PathLike[str], device: str | torch.device = "cpu") -> LoadedModel:
    """Load a model by folder path, card/weights file path, registry name or ``hf-hub:org/name``.

    Pickle files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``...) are refused with the
    ``tmequant models import`` command that converts them.
    """
    s = str(name_or_path)
    if s.startswith("hf-hub:"):
        return load_folder(fetch_hf(s[len("hf-hub:"):]), device)
    p = Path(s).expanduser()
    if p.exists():
        if p.is_dir():
            return load_folder(p, device)
        if p.suffix.lower() in PICKLE_SUFFIXES or looks_pickled(p):
            raise refuse_pickle(p)
        if p.name in (CARD_FILE, WEIGHTS_FILE) or p.suffix in (".json", ".safetensors"):
            return load_folder(p.parent, device)
        raise ModelError("not a model folder, model.json or model.safetensors", p)
    if p.suffix.lower() in PICKLE_SUFFIXES or os.sep in s:
        raise UnknownModelError("no such model file or folder", p)
    return load_registered(s, device)
