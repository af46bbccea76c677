"""`tmequant models list | show NAME | import STATE_DICT --card CARD --out DIR`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tmequant.cli._app import app

models_app = typer.Typer(help="List, show and import models (folders of model.safetensors + model.json).",
                         no_args_is_help=True, rich_markup_mode=None,
                         context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
app.add_typer(models_app, name="models")


@models_app.command("list")
def list_cmd() -> None:
    """Named models: name, domain (what it was trained on), source and description.

    Built-in smoke-test models (untrained), shipped models and $TMEQUANT_MODELS folders.
    """
    from tmequant.models import list_models

    for m in list_models():
        typer.echo(f"{m.name}\t{m.domain}\t{m.source}\t{m.description}")


@models_app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="Registered name, model folder or model.json."),
) -> None:
    """Print a model's card as JSON (no weights are loaded for registered names)."""
    from tmequant.errors import ModelError
    from tmequant.models import ModelCard, get_card

    p = Path(name)
    if p.exists():
        card = ModelCard.load(p)
        if p.is_dir() and not (p / "model.safetensors").exists():
            raise ModelError("no model.safetensors next to the card", p)
    else:
        card, _ = get_card(name)
    typer.echo(json.dumps(card.to_dict(), indent=2))


@models_app.command("import")
def import_cmd(
    state_dict: Path = typer.Argument(..., help="A plain PyTorch state dict (.pt/.pth), read with weights_only."),
    card: Path = typer.Option(..., "--card", help="The model card (model.json) describing the network."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model folder."),
    arch: str | None = typer.Option(None, "--arch", help="timm architecture (must match the card's; default: the card's)."),
) -> None:
    """Convert a plain state dict into a model folder (safetensors + card); no code is unpickled."""
    from tmequant.models import import_state_dict

    folder = import_state_dict(state_dict, card, out, arch=arch)
    typer.echo(f"wrote {folder / 'model.safetensors'} and {folder / 'model.json'}")
