"""What a model was trained on (its card's ``domain``), and what follows from it.

Kept apart from :mod:`tmequant.models` (which imports torch) so the biomarker and report
code can ask "may this count head count?" without loading a deep-learning stack.

``domain`` is ``synthetic`` (phantoms only), ``untrained`` (random weights), the tissues of
the training slides (text or list, e.g. ``["breast carcinoma H&E"]``), or ``unknown`` (cards
written before the field existed). A synthetic or untrained model's numbers on real tissue
mean nothing: the CLI warns, the report shows a banner, and an untrained count head never
replaces the nucleus counter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DOMAIN_UNKNOWN = "unknown"
DOMAIN_SYNTHETIC = "synthetic"
DOMAIN_UNTRAINED = "untrained"
NOT_FOR_REAL_TISSUE = (DOMAIN_SYNTHETIC, DOMAIN_UNTRAINED)
# The model `run` and `predict` use when none is named: the bundled real-tissue cell detector
# (here, not in tmequant.models, so the CLI can name it without importing torch).
DEFAULT_MODEL = "brca-cells-lite0"


def domain_label(domain: Any) -> str:
    """A card's ``domain`` (text, list of texts or None) as one line: ``unknown`` when absent."""
    if domain is None or domain == "" or domain == []:
        return DOMAIN_UNKNOWN
    if isinstance(domain, (list, tuple)):
        return "; ".join(str(x) for x in domain)
    return str(domain)


def card_domain(card: Any) -> str:
    """The domain label of a card given as a ModelCard or a dict (a stored predictions card).

    Cards made before the ``domain`` field: ``untrained`` when ``training.untrained`` says
    so (the built-in ``random-*`` models), else ``unknown``.
    """
    if hasattr(card, "domain") and hasattr(card, "training"):  # a ModelCard
        d: Any = card.domain
        training: Any = card.training
    else:
        d = (card or {}).get("domain")
        training = (card or {}).get("training") or {}
    if (d is None or d == DOMAIN_UNKNOWN) and isinstance(training, dict) and training.get("untrained"):
        return DOMAIN_UNTRAINED
    return domain_label(d)


def domain_warning(model_name: str, domain: Any) -> str | None:
    """One line saying why the numbers of a synthetic or untrained model mean nothing, or None."""
    label = domain_label(domain)
    if label == DOMAIN_SYNTHETIC:
        return (f"model {model_name!r} was trained on synthetic phantoms only: its tissue classes "
                "and biomarkers on real slides mean nothing (train a model on your tissue with "
                "`tmequant train`)")
    if label == DOMAIN_UNTRAINED:
        return (f"model {model_name!r} is UNTRAINED (random weights, for smoke tests): its tissue "
                "classes and biomarkers mean nothing")
    return None


def truth_dir_for(slide_path: str | os.PathLike[str]) -> Path:
    """Folder of a phantom's truth files: ``<name>.truth/`` next to ``<name>.svs``."""
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth")


def is_phantom_slide(path: Any) -> bool:
    """Whether ``path`` is a tmequant phantom (its truth folder lies next to it): a synthetic
    model on a phantom is what the demo does, and needs no warning."""
    if not path or "://" in str(path):
        return False
    try:
        return (truth_dir_for(path) / "truth.json").is_file()
    except (OSError, ValueError):
        return False


def count_head_trusted(card: Any) -> bool:
    """Whether a card's count head may give cell counts (never an untrained one's)."""
    return card_domain(card) != DOMAIN_UNTRAINED


__all__ = ["DOMAIN_SYNTHETIC", "DOMAIN_UNKNOWN", "DOMAIN_UNTRAINED", "NOT_FOR_REAL_TISSUE",
           "card_domain", "count_head_trusted", "domain_label", "domain_warning", "is_phantom_slide"]
