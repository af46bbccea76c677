"""Model card validation, the factory, safetensors I/O, registry, and the ImageNet weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tmequant.errors import ModelError
from tmequant.models import (
    ModelCard,
    TmeNet,
    create_model,
    import_state_dict,
    list_models,
    load_model,
    random_card,
    save_model,
)


def card_dict(**over) -> dict:
    d = {
        "name": "tiny",
        "version": "1.0",
        "arch": "resnet18",
        "tile_px": 64,
        "mpp_um": 1.0,
        "tissue_classes": ["TUM", "STR", "LYM", "BACK"],
        "tissue_roles": {"TUM": "tumor", "STR": "stroma", "LYM": "immune", "BACK": "background"},
        "cell_classes": ["lym", "tc"],
        "cell_roles": {"lym": "lymphocyte", "tc": "tumor_cell"},
    }
    d.update(over)
    return d


# --- card validation ----------------------------------------------------------------------

@pytest.mark.parametrize("field", ["name", "arch", "tissue_classes", "tissue_roles"])
def test_card_missing_required_field_is_named(tmp_path: Path, field: str):
    d = card_dict()
    del d[field]
    p = tmp_path / "model.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ModelError) as e:
        ModelCard.load(p)
    assert field in str(e.value)
    assert str(p) in str(e.value)


def test_card_role_naming_unknown_class_is_refused():
    roles = dict(card_dict()["tissue_roles"], NOPE="tumor")
    with pytest.raises(ModelError, match=r"tissue_roles.*NOPE"):
        ModelCard.from_dict(card_dict(tissue_roles=roles))


def test_card_unmapped_class_and_unknown_role_are_refused():
    roles = dict(card_dict()["tissue_roles"])
    del roles["BACK"]
    with pytest.raises(ModelError, match=r"tissue_roles.*BACK"):
        ModelCard.from_dict(card_dict(tissue_roles=roles))
    with pytest.raises(ModelError, match=r"cell_roles.*macrophage"):
        ModelCard.from_dict(card_dict(cell_roles={"lym": "lymphocyte", "tc": "macrophage"}))


def test_card_count_head_without_cell_classes_is_refused():
    with pytest.raises(ModelError, match=r"cell_roles.*cell_classes"):
        ModelCard.from_dict(card_dict(cell_classes=[]))


def test_card_bad_values_name_their_field():
    for field, value in [("tile_px", 0), ("mpp_um", -1.0), ("std", [0.2, 0.0, 0.2]),
                         ("name", "a/b"), ("tissue_classes", ["A", "A"])]:
        with pytest.raises(ModelError, match=field):
            ModelCard.from_dict(card_dict(**{field: value}))
    with pytest.raises(ModelError, match="colour"):  # unknown keys are refused, named
        ModelCard.from_dict(card_dict(colour="pink"))


def test_card_roles_and_json_round_trip(tmp_path: Path):
    card = ModelCard.from_dict(card_dict())
    assert card.role_of("LYM") == "immune" and card.role_of("lym") == "lymphocyte"
    assert card.classes_with_role("stroma") == ["STR"]
    with pytest.raises(KeyError):
        card.role_of("nope")
    card.save(tmp_path)
    assert ModelCard.load(tmp_path) == card


# --- factory -------------------------------------------------------------------------------

# mobilenetv3: its pooled features are wider (head_hidden_size) than num_features
@pytest.mark.parametrize("arch", ["resnet18", "efficientnet_lite0", "mobilenetv3_small_050"])
def test_factory_heads_and_shapes(arch: str):
    card = ModelCard.from_dict(card_dict(arch=arch))
    net = create_model(card).eval()
    assert isinstance(net, TmeNet)
    with torch.no_grad():
        out = net(torch.randn(3, 3, 64, 64))
    assert out["tissue_logits"].shape == (3, 4)
    assert out["cell_counts"].shape == (3, 2)
    assert (out["cell_counts"] >= 0).all()  # softplus


def test_factory_without_cell_classes_has_no_count_head():
    card = ModelCard.from_dict(card_dict(cell_classes=[], cell_roles={}))
    net = create_model(card).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 64, 64))
    assert set(out) == {"tissue_logits"} and net.count_head is None


def test_factory_unknown_arch_is_a_model_error():
    with pytest.raises(ModelError, match="not_a_net"):
        create_model(ModelCard.from_dict(card_dict(arch="not_a_net")))


def test_pretrained_elsewhere_warns_or_refuses(caplog, monkeypatch):
    monkeypatch.delenv("TMEQUANT_ALLOW_DOWNLOAD", raising=False)
    card = ModelCard.from_dict(card_dict())
    with caplog.at_level("WARNING", logger="tmequant"):
        create_model(card, pretrained=True)
    assert "resnet18" in caplog.text
    with pytest.raises(ModelError, match="resnet18"):
        create_model(card, pretrained="require")


def test_imagenet_weights_are_real_chelsea_is_a_cat():
    """The untouched ImageNet classifier puts a cat (281-285) in its top 5 for chelsea()."""
    import timm
    from PIL import Image
    from skimage import data

    from tmequant.models import imagenet_efficientnet_lite0

    net = imagenet_efficientnet_lite0().eval()
    cfg = timm.data.resolve_data_config({}, model=net)
    x = timm.data.create_transform(**cfg)(Image.fromarray(data.chelsea()))[None]
    with torch.no_grad():
        top5 = net(x).topk(5).indices[0].tolist()
    assert set(top5) & set(range(281, 286)), top5
    # And a random network does not agree (the check can fail).
    card = random_card("efficientnet_lite0")
    feats = create_model(card, pretrained=True).backbone.state_dict()
    ref = net.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in feats.items())


# --- safetensors I/O -----------------------------------------------------------------------

def test_safetensors_round_trip(tmp_path: Path):
    card = ModelCard.from_dict(card_dict())
    torch.manual_seed(1)
    net = create_model(card).eval()
    save_model(tmp_path / "m", net, card)
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "model.json"}
    loaded = load_model(tmp_path / "m")
    assert loaded.card == card and not loaded.model.training
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        a, b = net(x), loaded.model(x)
    assert torch.equal(a["tissue_logits"], b["tissue_logits"])
    assert torch.equal(a["cell_counts"], b["cell_counts"])
    # Also by the card or the weights file path.
    assert load_model(tmp_path / "m" / "model.json").card == card


def test_pickle_refused(tmp_path: Path):
    card = ModelCard.from_dict(card_dict())
    net = create_model(card)
    pt = tmp_path / "weights.pt"
    torch.save(net.state_dict(), pt)
    with pytest.raises(ModelError, match="tmequant models import"):
        load_model(pt)
    # A pickle disguised as model.safetensors is refused too, never unpickled.
    d = tmp_path / "disguised"
    d.mkdir()
    card.save(d)
    (d / "model.safetensors").write_bytes(pt.read_bytes())
    with pytest.raises(ModelError, match="tmequant models import"):
        load_model(d)


def test_wrong_shapes_name_file_and_tensor(tmp_path: Path):
    card = ModelCard.from_dict(card_dict())
    save_model(tmp_path / "m", create_model(card), card)
    # Same folder, a card with 3 tissue classes: the tissue head no longer fits.
    three = card_dict(tissue_classes=["TUM", "STR", "LYM"],
                      tissue_roles={"TUM": "tumor", "STR": "stroma", "LYM": "immune"})
    ModelCard.from_dict(three).save(tmp_path / "m")
    with pytest.raises(ModelError) as e:
        load_model(tmp_path / "m")
    assert "tissue_head.weight" in str(e.value) and "model.safetensors" in str(e.value)
    # A card without cell classes for weights with a count head.
    ModelCard.from_dict(card_dict(cell_classes=[], cell_roles={})).save(tmp_path / "m")
    with pytest.raises(ModelError, match="count_head"):
        load_model(tmp_path / "m")


def test_import_state_dict(tmp_path: Path):
    card = ModelCard.from_dict(card_dict(cell_classes=[], cell_roles={}))
    torch.manual_seed(2)
    net = create_model(card).eval()
    # A DataParallel-style prefix and a TmeNet layout.
    torch.save({"state_dict": {"module." + k: v for k, v in net.state_dict().items()}},
               tmp_path / "a.pth")
    card.save(tmp_path / "card.json")
    out = import_state_dict(tmp_path / "a.pth", tmp_path / "card.json", tmp_path / "out")
    loaded = load_model(out)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x)["tissue_logits"], net(x)["tissue_logits"])
    # A plain timm classifier (fc -> tissue head).
    import timm

    plain = timm.create_model("resnet18", num_classes=4)
    torch.save(plain.state_dict(), tmp_path / "b.pt")
    loaded = load_model(import_state_dict(tmp_path / "b.pt", card, tmp_path / "out2"))
    assert torch.equal(loaded.model.tissue_head.weight, plain.fc.weight)
    with pytest.raises(ModelError, match="arch"):
        import_state_dict(tmp_path / "b.pt", card, tmp_path / "out3", arch="resnet50")


# --- registry ------------------------------------------------------------------------------

def test_registry_random_model_is_listed_untrained_and_seeded():
    names = [m.name for m in list_models()]
    assert "random-efficientnet_lite0" in names
    a = load_model("random-efficientnet_lite0")
    b = load_model("random-efficientnet_lite0")
    assert a.card.training.get("untrained") is True and "UNTRAINED" in a.card.description
    assert torch.equal(a.model.tissue_head.weight, b.model.tissue_head.weight)


def test_registry_env_folder_and_unknown_names(tmp_path: Path, monkeypatch):
    card = ModelCard.from_dict(card_dict(name="mine"))
    save_model(tmp_path / "mine", create_model(card), card)
    monkeypatch.setenv("TMEQUANT_MODELS", str(tmp_path))
    assert "mine" in [m.name for m in list_models()]
    assert load_model("mine").card.name == "mine"
    with pytest.raises(ModelError, match="models list"):
        load_model("no-such-model")
    with pytest.raises(ModelError, match="not a timm architecture"):
        load_model("random-not_a_net")


def test_hf_hub_offline_is_one_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError) as e:
        load_model("hf-hub:tmequant-nonexistent/nothing-here")
    msg = str(e.value)
    assert "hf-hub:tmequant-nonexistent/nothing-here" in msg and "\n" not in msg
