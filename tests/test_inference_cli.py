"""`tmequant predict` and `tmequant models` through the CLI entry point, and a real slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from test_inference import make_store, tiny_card

from tmequant.cli import main
from tmequant.models import create_model, save_model
from tmequant.tiling.store import SlideStore


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    card = tiny_card()
    return save_model(tmp_path_factory.mktemp("m") / "tiny", create_model(card), card)


def test_predict_cli_isolates_failures_and_exits_1(tmp_path: Path, tiny_model: Path, capsys):
    good = make_store(tmp_path / "stores" / "good.zarr", 20)
    make_store(tmp_path / "stores" / "wrongmpp.zarr", 5, mpp_um=0.25)
    make_store(tmp_path / "stores" / "unfinished.zarr", 5, complete=False)
    rc = main(["-q", "predict", str(tmp_path / "stores"), "--model", str(tiny_model),
               "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "1 succeeded, 2 failed" in err
    assert "FAILED wrongmpp" in err and "FAILED unfinished" in err
    probs = np.asarray(SlideStore(good).predictions("tiny")["tissue_probs"][...])
    assert probs.shape == (20, 3)
    # Rerun only the good one: already complete, exit 0.
    assert main(["-q", "predict", str(good), "--model", str(tiny_model), "--device", "cpu"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_predict_cli_usage_errors(tmp_path: Path, tiny_model: Path, capsys):
    store = make_store(tmp_path / "s.zarr", 3)
    assert main(["predict", str(store), "--model", str(tiny_model), "--device", "tpu"]) == 2
    pt = tmp_path / "w.pt"
    torch.save({"a": torch.zeros(1)}, pt)
    assert main(["predict", str(store), "--model", str(pt)]) == 1
    assert "tmequant models import" in capsys.readouterr().err


def test_models_cli_list_show_import(tmp_path: Path, capsys):
    assert main(["models", "list"]) == 0
    assert "random-efficientnet_lite0" in capsys.readouterr().out
    assert main(["models", "show", "random-efficientnet_lite0"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["arch"] == "efficientnet_lite0" and shown["training"]["untrained"] is True
    card = tiny_card(cell_classes=[], cell_roles={})
    net = create_model(card)
    torch.save(net.state_dict(), tmp_path / "sd.pth")
    card.save(tmp_path / "card.json")
    out = tmp_path / "imported"
    assert main(["models", "import", str(tmp_path / "sd.pth"), "--card", str(tmp_path / "card.json"),
                 "--out", str(out), "--arch", card.arch]) == 0
    assert (out / "model.safetensors").exists()
    assert main(["models", "show", str(out)]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["name"] == "tiny"
    assert main(["models", "show", "no-such-model"]) == 2  # a wrong name is a usage error


def test_predict_on_a_store_from_a_real_slide(tmp_path: Path):
    """Tile the real CMU-1-Small-Region.svs and predict with the random smoke-test model."""
    slide = shared_path("slides", "CMU-1-Small-Region.svs")
    tile_mod = pytest.importorskip("tmequant.tiling.tile", reason="tiling not available yet")
    from tmequant.inference import predict_store
    from tmequant.inputs import SlideSpec

    params = tile_mod.TilingParams(target_mpp_um=2.0, tile_px=64)
    res = tile_mod.tile_slide(SlideSpec("cmu", slide), tmp_path, params)
    store = SlideStore(res.store_path)
    assert store.n_tiles > 0
    from tmequant.models import ModelCard, load_model

    loaded = load_model("random-efficientnet_lite0")
    # The random model's card is 224 px @ 0.5 um/px: the engine refuses this store...
    from tmequant.errors import StoreError

    with pytest.raises(StoreError, match="allow-mismatch"):
        predict_store(res.store_path, loaded, device="cpu", num_workers=0, progress=False)
    # ...so use a card matching the store (same weights, any input size works for a CNN).
    card = ModelCard(**{**loaded.card.to_dict(), "name": "cmu-smoke", "tile_px": 64,
                        "mpp_um": 2.0})
    loaded.model.card = card
    loaded.card = card
    out = predict_store(res.store_path, loaded, device="cpu", num_workers=1, progress=False)
    g = SlideStore(res.store_path).predictions("cmu-smoke")
    probs = np.asarray(g["tissue_probs"][...], dtype=np.float32)
    assert out.n_computed == store.n_tiles and probs.shape == (store.n_tiles, 6)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=3e-3)
    assert g["cell_counts"].shape == (store.n_tiles, 3)
