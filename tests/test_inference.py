"""The prediction engine over slide stores (stores built by hand per docs/store-layout.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tmequant.errors import StoreError
from tmequant.inference import predict_store, resolve_device
from tmequant.models import ModelCard, create_model, load_model, save_model
from tmequant.tiling.store import SlideStore

TILE_PX = 32
MPP_UM = 1.0


def make_store(path: Path, n_tiles: int, tile_px: int = TILE_PX, mpp_um: float = MPP_UM,
               complete: bool = True, seed: int = 0) -> Path:
    """A finished slide store with ``n_tiles`` random RGB tiles (layout per store-layout.md)."""
    rng = np.random.default_rng(seed)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    cols = 8
    grid = np.stack([np.arange(n_tiles) // cols, np.arange(n_tiles) % cols], 1).astype(np.int32)
    root.create_array("tiles/images", data=rng.integers(0, 256, (n_tiles, tile_px, tile_px, 3),
                                                        dtype=np.uint8),
                      chunks=(16, tile_px, tile_px, 3))
    root.create_array("tiles/coords", data=(grid[:, ::-1] * tile_px).astype(np.int64))
    root.create_array("tiles/grid", data=grid)
    root.create_array("tiles/tissue_fraction", data=np.ones(n_tiles, np.float32))
    root.attrs.update({
        "schema_version": 1, "slide_id": path.stem, "source_path": "/nowhere.svs",
        "source_fingerprint": "abc", "slide_mpp_um": mpp_um, "target_mpp_um": mpp_um,
        "tile_px": tile_px, "tile_um": tile_px * mpp_um, "tile_level0_px": float(tile_px),
        "params_hash": "storehash", "n_tiles": n_tiles,
    })
    if complete:
        root.attrs["complete"] = True
    return path


def tiny_card(**over) -> ModelCard:
    d = dict(name="tiny", arch="test_efficientnet", tile_px=TILE_PX, mpp_um=MPP_UM,
             tissue_classes=["T", "S", "L"],
             tissue_roles={"T": "tumor", "S": "stroma", "L": "immune"},
             cell_classes=["lym"], cell_roles={"lym": "lymphocyte"})
    d.update(over)
    return ModelCard(**d)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    card = tiny_card()
    return save_model(tmp_path_factory.mktemp("m") / "tiny", create_model(card), card)


def _read(store: Path, name: str = "tiny") -> tuple[np.ndarray, np.ndarray]:
    g = SlideStore(store).predictions(name)
    return np.asarray(g["tissue_probs"][...]), np.asarray(g["cell_counts"][...])


def test_predict_shapes_probs_and_attrs(tmp_path: Path, tiny_model: Path):
    store = make_store(tmp_path / "s.zarr", 45)
    res = predict_store(store, tiny_model, device="cpu", batch_size=8, num_workers=0,
                        progress=False, chunk_rows=16)
    assert (res.n_tiles, res.n_computed, res.model_name, res.device) == (45, 45, "tiny", "cpu")
    probs, counts = _read(store)
    assert probs.shape == (45, 3) and probs.dtype == np.float16
    assert counts.shape == (45, 1) and counts.dtype == np.float32
    np.testing.assert_allclose(probs.astype(np.float32).sum(1), 1.0, atol=3e-3)
    assert (counts >= 0).all()
    g = SlideStore(store).predictions("tiny")
    assert g.attrs["card"]["name"] == "tiny" and len(g.attrs["params_hash"]) == 16
    assert "tiny" in SlideStore(store).prediction_names()
    # Matches the model applied by hand with the card's normalisation.
    loaded = load_model(tiny_model)
    imgs = torch.from_numpy(np.asarray(SlideStore(store).images[:5])).permute(0, 3, 1, 2).float()
    mean = torch.tensor(loaded.card.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.card.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = loaded.model((imgs / 255 - mean) / std)["tissue_logits"].softmax(1).numpy()
    np.testing.assert_allclose(probs[:5].astype(np.float32), ref, atol=2e-3)
    # A second run with the same model and store is a no-op.
    again = predict_store(store, tiny_model, device="cpu", num_workers=0, progress=False,
                          chunk_rows=16, batch_size=8)
    assert again.skipped and again.n_computed == 0


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path: Path, tiny_model: Path):
    kw = dict(device="cpu", batch_size=8, num_workers=0, progress=False, chunk_rows=16)
    full = make_store(tmp_path / "full.zarr", 50)
    predict_store(full, tiny_model, **kw)
    part = make_store(tmp_path / "part.zarr", 50)
    first = predict_store(part, tiny_model, max_chunks=2, **kw)  # "killed" after 2 chunks
    assert first.n_computed == 32
    with pytest.raises(StoreError, match="unfinished"):
        SlideStore(part).predictions("tiny")
    second = predict_store(part, tiny_model, **kw)
    assert second.resumed and second.n_computed == 50 - 32
    a, b = _read(full), _read(part)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_cpu_determinism_and_workers(tmp_path: Path, tiny_model: Path):
    store = make_store(tmp_path / "s.zarr", 40)
    predict_store(store, tiny_model, device="cpu", batch_size=8, num_workers=0, progress=False)
    a = _read(store)
    predict_store(store, tiny_model, device="cpu", batch_size=8, num_workers=2, progress=False,
                  overwrite=True)
    b = _read(store)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_mpp_and_tile_mismatch_refused_unless_allowed(tmp_path: Path, tiny_model: Path):
    store = make_store(tmp_path / "s.zarr", 10, mpp_um=0.5)
    with pytest.raises(StoreError, match=r"0\.5 um/px.*--allow-mismatch"):
        predict_store(store, tiny_model, device="cpu", num_workers=0, progress=False)
    assert "predictions" not in zarr.open_group(str(store), mode="r")
    res = predict_store(store, tiny_model, device="cpu", num_workers=0, progress=False,
                        allow_mismatch=True)
    assert res.n_computed == 10
    assert SlideStore(store).predictions("tiny").attrs["mismatch_allowed"] is True
    big = make_store(tmp_path / "big.zarr", 4, tile_px=48)
    with pytest.raises(StoreError, match="tile_px 48"):
        predict_store(big, tiny_model, device="cpu", num_workers=0, progress=False)


def test_unfinished_store_refused(tmp_path: Path, tiny_model: Path):
    store = make_store(tmp_path / "s.zarr", 4, complete=False)
    with pytest.raises(StoreError, match="unfinished"):
        predict_store(store, tiny_model, device="cpu", num_workers=0, progress=False)


def test_other_params_refused_without_overwrite(tmp_path: Path, tiny_model: Path):
    store = make_store(tmp_path / "s.zarr", 12)
    predict_store(store, tiny_model, device="cpu", num_workers=0, progress=False)
    torch.manual_seed(5)
    card = tiny_card()
    other = save_model(tmp_path / "other", create_model(card), card)  # same name, new weights
    with pytest.raises(StoreError, match="--overwrite"):
        predict_store(store, other, device="cpu", num_workers=0, progress=False)
    before = _read(store)[0]
    predict_store(store, other, device="cpu", num_workers=0, progress=False, overwrite=True)
    assert not np.array_equal(before, _read(store)[0])


def test_no_count_head_and_empty_store(tmp_path: Path):
    card = tiny_card(name="nocount", cell_classes=[], cell_roles={})
    net = create_model(card)
    store = make_store(tmp_path / "s.zarr", 0)
    res = predict_store(store, net, device="cpu", num_workers=0, progress=False)
    g = SlideStore(store).predictions("nocount")
    assert res.n_tiles == 0 and g["tissue_probs"].shape == (0, 3) and "cell_counts" not in g


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    from tmequant.errors import InputError

    with pytest.raises(InputError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="no CUDA"):
            resolve_device("cuda:0")
