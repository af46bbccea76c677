"""Models: a card (``model.json``), one timm-based factory, safetensors I/O and a small registry.

>>> from tmequant.models import load_model
>>> m = load_model("random-efficientnet_lite0")        # doctest: +SKIP
>>> m.card.tissue_classes, m.model(x)["tissue_logits"].shape   # doctest: +SKIP
"""

from tmequant.models.card import (
    CARD_FILE,
    WEIGHTS_FILE,
    ModelCard,
    StainNormalization,
    format_validation_error,
)
from tmequant.models.factory import (
    TmeNet,
    create_model,
    efficientnet_lite0_weights_path,
    imagenet_efficientnet_lite0,
)
from tmequant.models.io import (
    LoadedModel,
    import_state_dict,
    load_folder,
    load_state_into,
    save_model,
)
from tmequant.models.registry import ModelInfo, get_card, list_models, load_model, random_card
from tmequant.models.stain import MacenkoNormalizer, macenko_fit, macenko_normalize

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "LoadedModel",
    "MacenkoNormalizer",
    "ModelCard",
    "ModelInfo",
    "StainNormalization",
    "TmeNet",
    "create_model",
    "efficientnet_lite0_weights_path",
    "format_validation_error",
    "get_card",
    "imagenet_efficientnet_lite0",
    "import_state_dict",
    "list_models",
    "load_folder",
    "load_model",
    "load_state_into",
    "macenko_fit",
    "macenko_normalize",
    "random_card",
    "save_model",
]
