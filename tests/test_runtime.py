"""The inference runtime: ONNX Runtime on the CPU gives torch's outputs, is chosen by ``auto``,
is recorded and hashed, falls back (or refuses) when a network does not export, and a session
is reused only for the very same network."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from tests.test_inference import _read, make_store, tiny_card
from tests.test_reliability_helpers import cli, stderr_lines
from tmequant.errors import InputError, StoreError
from tmequant.inference import predict_store
from tmequant.inference import runner as rt
from tmequant.inference.runner import DeviceNet, onnx_session, resolve_runtime, usable_runtime
from tmequant.models import create_model, load_model, save_model
from tmequant.store import SlideStore


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    card = tiny_card()
    return save_model(tmp_path_factory.mktemp("m") / "tiny", create_model(card), card)


def test_resolve_runtime():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_runtime("auto", cpu) == "onnx"
    assert resolve_runtime("AUTO", gpu) == "torch"
    assert resolve_runtime("auto", cpu, compile=True) == "torch"  # compile is a torch thing
    assert resolve_runtime("torch", cpu) == "torch"
    assert resolve_runtime("onnx", cpu) == "onnx"
    with pytest.raises(InputError, match="runs on the CPU"):
        resolve_runtime("onnx", gpu)
    with pytest.raises(InputError, match="--compile"):
        resolve_runtime("onnx", cpu, compile=True)
    with pytest.raises(InputError, match="use auto, torch, onnx"):
        resolve_runtime("tensorrt", cpu)


def test_auto_without_onnxruntime_is_torch(monkeypatch):
    monkeypatch.setattr(rt, "_onnxruntime", lambda: None)
    assert resolve_runtime("auto", torch.device("cpu")) == "torch"
    with pytest.raises(InputError, match="pip install onnxruntime"):
        resolve_runtime("onnx", torch.device("cpu"))


def test_onnx_equals_torch_on_raw_outputs(tiny_model: Path):
    loaded = load_model(tiny_model)
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), np.uint8))
    a = DeviceNet(loaded.model, loaded.card, torch.device("cpu"), runtime="torch").forward(x)
    b = DeviceNet(loaded.model, loaded.card, torch.device("cpu"), runtime="onnx").forward(x)
    assert sorted(a) == sorted(b) == ["cell_counts", "tissue_logits"]
    for k in a:
        assert b[k].shape == a[k].shape
        np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), atol=1e-4, rtol=1e-4)
    # another batch size and image size go through the same (dynamic-shape) graph
    y = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), np.uint8))
    a2 = DeviceNet(loaded.model, loaded.card, torch.device("cpu"), runtime="torch").forward(y)
    b2 = DeviceNet(loaded.model, loaded.card, torch.device("cpu"), runtime="onnx").forward(y)
    np.testing.assert_allclose(b2["tissue_logits"].numpy(), a2["tissue_logits"].numpy(),
                               atol=1e-4, rtol=1e-4)


def test_predict_store_onnx_matches_torch_and_is_recorded(tmp_path: Path, tiny_model: Path):
    s1 = make_store(tmp_path / "a.zarr", 40, seed=3)
    s2 = make_store(tmp_path / "b.zarr", 40, seed=3)
    r1 = predict_store(s1, tiny_model, device="cpu", batch_size=8, num_workers=0,
                       progress=False, runtime="torch")
    r2 = predict_store(s2, tiny_model, device="cpu", batch_size=8, num_workers=0,
                       progress=False)  # auto -> onnx on the CPU
    assert (r1.runtime, r2.runtime) == ("torch", "onnx")
    p1, c1 = _read(s1)
    p2, c2 = _read(s2)
    assert np.abs(p1.astype(np.float32) - p2.astype(np.float32)).max() <= 2e-3
    np.testing.assert_allclose(c2, c1, rtol=1e-4, atol=1e-4)
    g1, g2 = SlideStore(s1).predictions("tiny"), SlideStore(s2).predictions("tiny")
    assert g1.attrs["runtime"].startswith("torch-")
    assert g2.attrs["runtime"].startswith("onnxruntime-")
    assert g1.attrs["params_hash"] != g2.attrs["params_hash"]  # never mixed, never reused
    # finished torch predictions are not silently replaced by (or taken for) onnx ones
    with pytest.raises(StoreError, match="other parameters"):
        predict_store(s1, tiny_model, device="cpu", num_workers=0, progress=False,
                      runtime="onnx")
    assert predict_store(s1, tiny_model, device="cpu", num_workers=0, progress=False,
                         runtime="torch").skipped


def test_onnx_default_batch_is_smaller_and_counts_detector_canvases():
    from tmequant.inference.engine import CPU_BATCH, ONNX_CPU_BATCH, default_batch_size

    assert ONNX_CPU_BATCH < CPU_BATCH
    assert default_batch_size("cpu", 224, "onnx") == ONNX_CPU_BATCH
    assert default_batch_size("cpu", 224, "torch") == CPU_BATCH
    assert default_batch_size("cuda", 224, "torch") > CPU_BATCH
    # 224 px tiles with 32 px of context on each side: 288 px canvases, 9 of them
    assert default_batch_size("cpu", 288, "onnx") == 16 * 224 * 224 // (288 * 288) == 9


def test_detector_onnx_matches_torch(tmp_path: Path):
    """The bundled cell detector over a store: the same cells with either runtime."""
    loaded = load_model("brca-cells-lite0")
    card = loaded.card
    rng = np.random.default_rng(7)
    # dark blobs on pink: something for the detector to find
    img = np.full((6, 224, 224, 3), (230, 200, 220), np.uint8)
    yy, xx = np.mgrid[:224, :224]
    for t in range(6):
        for cy, cx in rng.integers(8, 216, (40, 2)):
            img[t][(yy - cy) ** 2 + (xx - cx) ** 2 < 16] = (60, 40, 120)
    s = {}
    for name in ("torch", "onnx"):
        p = make_store(tmp_path / f"{name}.zarr", 6, tile_px=card.tile_px, mpp_um=card.mpp_um)
        zarr.open_group(str(p), mode="r+")["tiles/images"][...] = img
        r = predict_store(p, loaded, device="cpu", num_workers=0, progress=False, runtime=name)
        assert r.batch_size == (9 if name == "onnx" else 19)  # canvases of 288 px
        s[name] = SlideStore(p).predictions(card.name)
    ct = np.asarray(s["torch"]["cell_counts"][...])
    co = np.asarray(s["onnx"]["cell_counts"][...])
    assert ct.sum() > 50  # the check means something
    np.testing.assert_array_equal(co, ct)


def test_export_failure_falls_back_under_auto_and_refuses_when_asked(monkeypatch, caplog,
                                                                    tiny_model: Path):
    loaded = load_model(tiny_model)
    monkeypatch.setattr(rt, "_SESSIONS", type(rt._SESSIONS)())

    def broken(*a, **k):
        raise RuntimeError("Unsupported: aten::fancy_op")

    monkeypatch.setattr(torch.onnx, "export", broken)
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="tmequant"):
        assert usable_runtime("auto", loaded.model, loaded.card, cpu) == "torch"
    assert "does not export to ONNX" in caplog.text and "fancy_op" in caplog.text
    with pytest.raises(InputError, match="--runtime onnx: model 'tiny' does not export"):
        usable_runtime("onnx", loaded.model, loaded.card, cpu)


def test_session_reused_only_for_the_same_network(monkeypatch, tiny_model: Path):
    monkeypatch.setattr(rt, "_SESSIONS", type(rt._SESSIONS)())
    calls = []
    real = torch.onnx.export
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (calls.append(1), real(*a, **k)))
    loaded = load_model(tiny_model)
    s1, _ = onnx_session(loaded.model, loaded.card)
    s2, _ = onnx_session(loaded.model, loaded.card)
    assert s1 is s2 and len(calls) == 1
    with torch.no_grad():  # one weight changes: a new export, not the old graph
        next(loaded.model.parameters()).add_(0.5)
    s3, _ = onnx_session(loaded.model, loaded.card)
    assert s3 is not s1 and len(calls) == 2
    s4, _ = onnx_session(loaded.model, loaded.card.model_copy(update={"std": (0.2, 0.2, 0.2)}))
    assert s4 is not s3 and len(calls) == 3  # the normalisation is inside the graph


def test_cli_bad_runtime_is_one_line(tmp_path: Path, tiny_model: Path, capsys):
    store = make_store(tmp_path / "s.zarr", 4)
    rc, _, err = cli(["predict", str(store), "--model", str(tiny_model), "--runtime",
                        "tensorrt", "--counter", "off"], capsys)
    assert rc == 2 and stderr_lines(err) == [
        "error: --runtime 'tensorrt': use auto, torch, onnx"], err
    rc, _, err = cli(["run", str(store), "--out", str(tmp_path / "o"), "--runtime", "x"],
                     capsys)
    assert rc == 2 and "--runtime 'x': use auto, torch, onnx" in err and "Traceback" not in err


def test_real_slide_same_cells_and_probabilities_with_either_runtime(tmp_path: Path):
    """The bundled detector on the real CMU slide: per-class cell counts and tissue
    probabilities equal between torch and ONNX Runtime (the issue's tolerances are 1% and
    0.02; measured: identical)."""
    from tests.conftest import shared_path
    from tmequant.tiling.tile import tile_slide

    svs = shared_path("slides", "CMU-1-Small-Region.svs")
    ref = tile_slide(svs, tmp_path / "a", progress=False, qc_png=False)
    other = tile_slide(svs, tmp_path / "b", progress=False, qc_png=False)
    loaded = load_model("brca-cells-lite0")
    out = {}
    for name, store in (("torch", ref.store_path), ("onnx", other.store_path)):
        predict_store(store, loaded, device="cpu", progress=False, runtime=name)
        g = SlideStore(store).predictions(loaded.card.name)
        out[name] = (np.asarray(g["tissue_probs"][...], np.float32),
                     np.asarray(g["cell_counts"][...]))
    assert out["torch"][1].sum() > 1000
    counts_t, counts_o = out["torch"][1].sum(0), out["onnx"][1].sum(0)
    assert np.all(np.abs(counts_o - counts_t) <= 0.01 * counts_t), (counts_t, counts_o)
    assert np.abs(out["onnx"][0] - out["torch"][0]).max() <= 0.02
