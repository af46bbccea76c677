"""Training loop: learning happens, resume is exact, predict matches evaluate, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_path
from test_training_data import _point, _polygon, _write_geojson, make_class_folders

from tmequant.errors import InputError
from tmequant.training import TrainConfig, evaluate, train

TINY = "test_efficientnet"  # timm's test network: ~0.1 M parameters, fast on the CPU


@pytest.fixture(autouse=True)
def _one_thread():
    # Two threads on a shared 2-core machine thrash (10x slower than one); one is steady.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _csv(tmp_path: Path) -> Path:
    src = shared_path("tiles", "nct-crc-he-samples")
    rows = ["path,label,patient_id"]
    for i, f in enumerate(sorted(src.glob("*.tif"))):
        rows.append(f"{f},{f.name.split('-')[0]},P{i}")
    p = tmp_path / "labels.csv"
    p.write_text("\n".join(rows) + "\n")
    return p


@pytest.mark.slow
def test_learning_happens_on_real_tiles(tmp_path):
    folder = make_class_folders(tmp_path)
    out = tmp_path / "model"
    res = train(
        TrainConfig(
            data=folder,
            out=out,
            tile_px=64,
            epochs=12,
            batch_size=9,
            lr=2e-3,
            val_fraction=0.0,
            augment=None,
            progress=False,
        )
    )
    losses = [h["train_loss"] for h in res.history]
    assert len(losses) == 12
    assert losses[-1] < 0.25 * losses[0]
    assert res.metrics["train"]["tissue"]["accuracy"] >= 0.9
    for f in (
        "model.safetensors",
        "model.json",
        "split.csv",
        "metrics.json",
        "confusion_matrix.png",
        "training_curves.png",
        "checkpoints/last/state.json",
        "checkpoints/last/optimizer.safetensors",
    ):
        assert (out / f).is_file(), f
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.pth"))
    card = json.loads((out / "model.json").read_text())
    assert card["tile_px"] == 64 and card["tissue_roles"]["TUM"] == "tumor"
    assert card["metrics"]["train"]["accuracy"] >= 0.9
    assert card["training"]["init"] == "imagenet" and card["training"]["split_by"] == "file"
    # evaluate() on the same tiles agrees with the training metrics
    ev = evaluate(folder, out, device="cpu", progress=False)
    assert ev.metrics["tissue"]["accuracy"] == pytest.approx(
        res.metrics["train"]["tissue"]["accuracy"]
    )
    assert ev.probs.shape == (9, 9)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_resume_continues_from_saved_step_and_matches_uninterrupted(tmp_path):
    data = _csv(tmp_path)
    kw = dict(
        data=data,
        arch=TINY,
        pretrained=False,
        tile_px=32,
        epochs=3,
        batch_size=4,
        lr=1e-2,
        val_fraction=0.0,
        progress=False,
        seed=3,
    )
    full = train(TrainConfig(out=tmp_path / "a", **kw))
    assert full.steps == 6  # 3 epochs x 2 batches (4 + 5: a batch of one tile is folded in)
    part = train(TrainConfig(out=tmp_path / "b", stop_after_steps=3, **kw))
    assert part.steps == 3 and not part.metrics["finished"]
    state = json.loads((tmp_path / "b/checkpoints/last/state.json").read_text())
    assert state["step"] == 3  # mid-epoch 2
    with pytest.raises(InputError, match="--resume"):
        train(TrainConfig(out=tmp_path / "b", **kw))
    with pytest.raises(InputError, match="changed settings.*'lr'"):
        train(TrainConfig(out=tmp_path / "b", resume=True, **{**kw, "lr": 0.5}))
    resumed = train(TrainConfig(out=tmp_path / "b", resume=True, **kw))
    assert resumed.steps == 6 and resumed.metrics["finished"]
    wa = _weights(tmp_path / "a/checkpoints/last/model.safetensors")
    wb = _weights(tmp_path / "b/checkpoints/last/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k  # bit-identical on the CPU
    assert [h["step"] for h in resumed.history] == [2, 4, 6]


@pytest.mark.slow
def test_linear_probe_keeps_backbone_frozen(tmp_path):
    data = _csv(tmp_path)
    from tmequant.models import ModelCard, create_model, save_model

    # a starting model folder (as a user's earlier model would be)
    card = ModelCard(
        name="start", arch=TINY, tile_px=32, tissue_classes=["x"], tissue_roles={"x": "tumor"}
    )
    torch.manual_seed(0)
    save_model(tmp_path / "start", create_model(card), card)
    res = train(
        TrainConfig(
            data=data,
            out=tmp_path / "lp",
            arch=TINY,
            init_from=str(tmp_path / "start"),
            tile_px=32,
            epochs=2,
            batch_size=9,
            val_fraction=0.0,
            linear_probe=True,
            progress=False,
        )
    )
    before, after = (
        _weights(tmp_path / "start/model.safetensors"),
        _weights(tmp_path / "lp/model.safetensors"),
    )
    bb = [k for k in before if k.startswith("backbone.")]
    assert bb and all(torch.equal(before[k], after[k]) for k in bb)
    assert not torch.equal(
        after["tissue_head.weight"][:1], torch.zeros_like(after["tissue_head.weight"][:1])
    )
    assert res.card.training["init"] == str(tmp_path / "start")


@pytest.mark.slow
def test_count_head_trained_model_matches_predict_store(tmp_path):
    slide = shared_path("slides", "CMU-1-Small-Region.svs")
    data = tmp_path / "data"
    data.mkdir()
    (data / slide.name).symlink_to(slide)
    rng = np.random.default_rng(0)
    pts = rng.uniform([1000, 1000], [1600, 1600], size=(150, 2))
    feats = [_polygon(1000, 1000, 1600, 1600, "Tumor"), _polygon(1000, 1700, 1500, 2300, "Stroma")]
    feats += [
        _point(float(x), float(y), "Lymphocyte" if i % 3 else "Other")
        for i, (x, y) in enumerate(pts)
    ]
    _write_geojson(data / "CMU-1-Small-Region.geojson", feats)
    out = tmp_path / "model"
    res = train(
        TrainConfig(
            data=data,
            out=out,
            arch=TINY,
            pretrained=False,
            tile_px=64,
            epochs=2,
            batch_size=16,
            val_fraction=0.0,
            progress=False,
        )
    )
    assert res.card.cell_classes == ["Lymphocyte", "Other"]
    assert res.card.cell_roles == {"Lymphocyte": "lymphocyte", "Other": "other"}
    ev = evaluate(data, out, device="cpu", progress=False)
    assert set(ev.metrics["counts"]) == {"Lymphocyte", "Other"}
    assert ev.metrics["counts"]["Lymphocyte"]["n_tiles"] > 0

    from tmequant.inference import predict_store
    from tmequant.tiling import SlideStore, TilingParams, tile_slide

    tr = tile_slide(
        slide,
        tmp_path / "stores",
        TilingParams(tile_px=64, target_mpp_um=0.5),
        progress=False,
        qc_png=False,
    )
    predict_store(tr.store_path, str(out), device="cpu", progress=False)
    store = SlideStore(tr.store_path)
    grp = store.predictions(res.card.name)
    probs = np.asarray(grp["tissue_probs"][...], dtype=np.float32)
    counts = np.asarray(grp["cell_counts"][...], dtype=np.float32)
    index = {tuple(c): i for i, c in enumerate(store.coords.tolist())}
    matched = 0
    for k, s in enumerate(ev.labels.samples):
        x, y, _ = s.box
        i = index.get((round(x), round(y)))
        if i is None:
            continue  # a labelled tile the tissue detector left out of the store
        matched += 1
        np.testing.assert_allclose(probs[i], ev.probs[k], atol=3e-3)
        np.testing.assert_allclose(counts[i], ev.counts[k], rtol=1e-3, atol=1e-3)
    assert matched >= 0.5 * len(ev.labels.samples)


@pytest.mark.slow
def test_cli_train_then_evaluate(tmp_path, capsys):
    from tmequant.cli import main

    data = _csv(tmp_path)
    out = tmp_path / "cli-model"
    rc = main(
        [
            "-q",
            "train",
            str(data),
            "--out",
            str(out),
            "--arch",
            TINY,
            "--no-pretrained",
            "--tile-px",
            "32",
            "--epochs",
            "1",
            "--batch-size",
            "9",
            "--val-fraction",
            "0",
        ]
    )
    assert rc == 0 and (out / "model.json").is_file()
    rc = main(
        [
            "-q",
            "evaluate",
            str(data),
            "--model",
            str(out),
            "--out",
            str(tmp_path / "ev.json"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["model"] == "cli-model" and ev["n_tiles"] == 9
    assert len(ev["tissue"]["confusion_matrix"]) == 9
    rc = main(
        [
            "-q",
            "evaluate",
            str(data),
            "--model",
            str(out),
            "--split",
            "train",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ev_train.json"),
        ]
    )
    assert rc == 0 and json.loads((tmp_path / "ev_train.json").read_text())["n_tiles"] == 9
    assert main(["-q", "evaluate", str(data), "--model", str(out), "--split", "val"]) == 2  # empty
    # labels the model does not know: one clear line, exit code 2
    other = tmp_path / "other.csv"
    first = data.read_text().splitlines()[1].split(",")[0]
    other.write_text(f"path,label\n{first},FAT\n")
    capsys.readouterr()
    rc = main(["-q", "evaluate", str(other), "--model", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "FAT" in err and "Traceback" not in err


@pytest.mark.slow
def test_early_stopping_on_a_flat_validation_metric(tmp_path):
    data = _csv(tmp_path)  # nine patients: some go to validation
    res = train(
        TrainConfig(
            data=data,
            out=tmp_path / "es",
            arch=TINY,
            pretrained=False,
            tile_px=32,
            epochs=10,
            batch_size=8,
            lr=1e-12,
            val_fraction=0.34,
            patience=2,
            progress=False,
        )
    )
    # lr ~ 0: the validation metric cannot improve after epoch 1, so training stops at 1 + 2
    assert res.stopped_early and len(res.history) == 3
    assert res.metrics["best_epoch"] == 1 and "val" in res.metrics
    split = (tmp_path / "es/split.csv").read_text().splitlines()
    assert sum(line.endswith(",val") for line in split) >= 2


def test_schedule_and_class_weights():
    from tmequant.training.labels import LabelSet, Sample
    from tmequant.training.trainer import _class_weights, lr_factor

    f = [lr_factor(s, 100, 10, 0.01) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then monotone cosine decay
    assert f[-1] == pytest.approx(0.01, abs=0.01)
    ls = LabelSet(
        [Sample(f"{i}", "a" if i < 6 else "b", f"{i}") for i in range(8)], ["a", "b", "c"]
    )
    w = _class_weights(ls, "balanced")
    assert w[1] / w[0] == pytest.approx(3.0) and w[2] == 0  # 6 a, 2 b, no c
    assert _class_weights(ls, "none") is None
