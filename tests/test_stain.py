"""Stain normalisation: card field, pure normaliser, and training == inference colours."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import shared_path

from tmequant.errors import ModelError
from tmequant.models import LoadedModel, ModelCard, load_model
from tmequant.models.stain import (
    MacenkoNormalizer,
    macenko_fit,
    macenko_normalize,
    macenko_stains,
    normalize_batch,
)
from tmequant.training.dataset import read_image

NCT = ("tiles", "nct-crc-he-samples")
TINY = "test_efficientnet"


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tile(prefix: str) -> np.ndarray:
    src = shared_path(*NCT)
    return read_image(next(src.glob(f"{prefix}-*.tif")))


def _card(**over) -> ModelCard:
    d = {"name": "m", "arch": TINY, "tile_px": 64, "tissue_classes": ["T", "S"],
         "tissue_roles": {"T": "tumor", "S": "stroma"}}
    d.update(over)
    return ModelCard(**d)


# --- the card field -------------------------------------------------------------------------

def test_card_field_round_trips_and_enters_the_dict(tmp_path: Path):
    params = {**macenko_fit(_tile("STR")), "source": "STR.tif sha256:ab"}
    card = _card(stain_normalization=params)
    p = card.save(tmp_path / "model.json")
    back = ModelCard.load(p)
    assert back.stain_normalization is not None
    assert back.stain_normalization.model_dump() == card.stain_normalization.model_dump()
    np.testing.assert_allclose(back.stain_normalization.stain_matrix, params["stain_matrix"])
    assert back.to_dict()["stain_normalization"]["method"] == "macenko"
    # A card without it serialises as before (no null key: old params hashes stay valid).
    assert "stain_normalization" not in _card().to_dict()
    assert ModelCard.from_dict(_card().to_dict()).stain_normalization is None


@pytest.mark.parametrize("bad, field", [
    ({"method": "reinhard"}, "stain_normalization.method"),
    ({"stain_matrix": [[0.6, 0.7, 0.3]]}, "stain_normalization.stain_matrix"),
    ({"stain_matrix": [[0.6, 0.7], [0.1, 0.9]]}, "stain_normalization.stain_matrix"),
    ({"stain_matrix": [[0.6, float("nan"), 0.3], [0.1, 0.9, 0.2]]},
     "stain_normalization.stain_matrix"),
    ({"stain_matrix": [[0, 0, 0], [0.1, 0.9, 0.2]]}, "stain_normalization.stain_matrix"),
    ({"max_concentrations": [1.0, 2.0, 3.0]}, "stain_normalization.max_concentrations"),
    ({"max_concentrations": [1.0, -2.0]}, "stain_normalization.max_concentrations"),
    ({"max_concentrations": [1.0, float("inf")]}, "stain_normalization.max_concentrations"),
    ({"unknown": 1}, "stain_normalization.unknown"),
])
def test_bad_stain_values_refused_naming_the_field(bad, field):
    good = {"method": "macenko", "stain_matrix": [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]],
            "max_concentrations": [1.9, 1.0]}
    d = _card().to_dict()
    d["stain_normalization"] = {**good, **bad}
    with pytest.raises(ModelError, match=field.replace(".", r"\.")):
        ModelCard.from_dict(d, "x/model.json")
    d["stain_normalization"] = good
    assert ModelCard.from_dict(d).stain_normalization is not None


# --- the normaliser ---------------------------------------------------------------------------

def test_normalising_moves_stains_to_target_and_is_nearly_idempotent():
    target = macenko_fit(_tile("STR"))
    src = _tile("TUM")
    once = macenko_normalize(src, target["stain_matrix"], target["max_concentrations"])
    twice = macenko_normalize(once, target["stain_matrix"], target["max_concentrations"])
    assert once.dtype == np.uint8 and once.shape == src.shape
    first = np.abs(once.astype(int) - src).mean()
    second = np.abs(twice.astype(int) - once).mean()
    assert first > 5  # it did change the colours
    assert second < 0.1 * first
    # the normalised tile's own stains are the target's (to a few degrees)
    he, _ = macenko_stains(once)
    cos = np.sum(he * np.asarray(target["stain_matrix"]), axis=1)
    assert cos.min() > 0.99


def test_blank_and_tissue_poor_tiles_pass_through_unchanged():
    p = macenko_fit(_tile("STR"))
    rng = np.random.default_rng(0)
    white = np.full((64, 64, 3), 255, np.uint8)
    near_white = rng.integers(235, 256, (64, 64, 3)).astype(np.uint8)
    flat = np.full((64, 64, 3), (180, 90, 160), np.uint8)  # one colour: one "stain"
    specks = white.copy()
    specks[:3, :3] = (120, 40, 130)  # 9 tissue pixels: below the minimum
    for tile in (white, near_white, flat, specks, np.zeros((64, 64, 3), np.uint8)):
        out = macenko_normalize(tile, p["stain_matrix"], p["max_concentrations"])
        np.testing.assert_array_equal(out, tile)
    with pytest.raises(ValueError):
        macenko_fit(white)


def test_batch_is_per_tile_and_matches_the_callable():
    params = {**macenko_fit(_tile("NORM")), "source": ""}
    tiles = np.stack([_tile(c)[:64, :64] for c in ("TUM", "LYM", "BACK")])
    norm = MacenkoNormalizer.from_params(params)
    full = normalize_batch(tiles, params)
    for i in range(len(tiles)):
        np.testing.assert_array_equal(full[i], norm(tiles[i]))
        np.testing.assert_array_equal(normalize_batch(tiles[i:i + 1], params)[0], full[i])
    assert not np.array_equal(full[0], tiles[0])
    card = _card(stain_normalization=params)
    np.testing.assert_array_equal(normalize_batch(tiles, card.stain_normalization), full)


def test_training_reexports_the_normaliser():
    import tmequant.training as tr
    from tmequant.training.augment import MacenkoNormalizer as AugNorm

    assert tr.MacenkoNormalizer is MacenkoNormalizer is AugNorm


# --- training -> card -> inference ------------------------------------------------------------

def _store_of(path: Path, tiles: np.ndarray, mpp_um: float) -> Path:
    """A finished store whose tiles/images are exactly ``tiles`` (N, H, W, 3) uint8."""
    n, px = len(tiles), tiles.shape[1]
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    grid = np.stack([np.arange(n) // 8, np.arange(n) % 8], 1).astype(np.int32)
    root.create_array("tiles/images", data=tiles, chunks=(4, px, px, 3))
    root.create_array("tiles/coords", data=(grid[:, ::-1] * px).astype(np.int64))
    root.create_array("tiles/grid", data=grid)
    root.create_array("tiles/tissue_fraction", data=np.ones(n, np.float32))
    root.attrs.update({
        "schema_version": 1, "slide_id": path.stem, "source_path": "/nowhere.svs",
        "source_fingerprint": "abc", "slide_mpp_um": mpp_um, "target_mpp_um": mpp_um,
        "tile_px": px, "tile_um": px * mpp_um, "tile_level0_px": float(px),
        "params_hash": "storehash", "n_tiles": n, "complete": True,
    })
    return path


@pytest.mark.slow
def test_macenko_trained_model_predicts_like_evaluate(tmp_path: Path, caplog):
    from test_training_data import make_class_folders

    from tmequant.inference import predict_store
    from tmequant.tiling.store import SlideStore
    from tmequant.training import TrainConfig, evaluate, train
    from tmequant.training.dataset import TileReader

    data = make_class_folders(tmp_path)
    target = next(shared_path(*NCT).glob("STR-*.tif"))
    out = tmp_path / "model"
    with caplog.at_level(logging.WARNING, logger="tmequant"):
        res = train(TrainConfig(data=data, out=out, arch=TINY, pretrained=False, tile_px=64,
                                epochs=8, batch_size=9, lr=1e-2, val_fraction=0.0, augment=None,
                                macenko_target=str(target), progress=False))
    assert not [r for r in caplog.records if "macenko" in r.getMessage().lower()]
    sn = ModelCard.load(out).stain_normalization
    assert sn is not None and sn.method == "macenko"
    assert sn.source.startswith(target.name) and "sha256:" in sn.source
    np.testing.assert_allclose(sn.stain_matrix, macenko_fit(read_image(target))["stain_matrix"])
    assert res.card.stain_normalization == sn
    assert res.metrics["train"]["tissue"]["accuracy"] > 0.2  # it learnt: colours matter

    ev = evaluate(data, out, device="cpu", progress=False)
    assert ev.extra["stain_normalization_from"] == "card"
    reader = TileReader(64, 0.5)
    tiles = np.stack([reader.read(s, None) for s in ev.labels.samples])
    store = _store_of(tmp_path / "s.zarr", tiles, 0.5)
    predict_store(store, str(out), device="cpu", progress=False, num_workers=1)
    g = SlideStore(store).predictions(res.card.name)
    probs = np.asarray(g["tissue_probs"][...], np.float32)
    np.testing.assert_allclose(probs, ev.probs, atol=3e-3)
    hash_norm = g.attrs["params_hash"]
    assert g.attrs["card"]["stain_normalization"]["source"] == sn.source

    # The same weights without the card's normalisation: other params, other numbers.
    lm = load_model(str(out), "cpu")
    raw = lm.card.model_copy(update={"stain_normalization": None})
    predict_store(store, LoadedModel(model=lm.model, card=raw, source="raw"), device="cpu",
                  progress=False, num_workers=0, overwrite=True)
    g = SlideStore(store).predictions(res.card.name)
    assert g.attrs["params_hash"] != hash_norm
    assert np.abs(np.asarray(g["tissue_probs"][...], np.float32) - ev.probs).max() > 1e-2

    # An explicit target overrides the card and is recorded.
    other = next(shared_path(*NCT).glob("NORM-*.tif"))
    ev2 = evaluate(data, out, device="cpu", progress=False, macenko_target=str(other))
    assert ev2.extra["stain_normalization_from"] == "macenko_target"
    assert ev2.extra["stain_normalization"]["source"].startswith(other.name)
    assert not np.allclose(ev2.probs, ev.probs, atol=1e-4)
