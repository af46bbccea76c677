"""Guard rails (issue 15): a model card says what it was trained on; synthetic or untrained
models warn on real slides, put a banner on the report and a `model_domain` column in the
cohort table; an untrained count head never replaces the nucleus counter; a wrong model name
is a usage error (exit 2); a slide listed twice is processed once; skipped stages say why."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from test_run_helpers import write_model, write_slides

from tmequant.cli import main
from tmequant.domain import card_domain, count_head_trusted, domain_warning
from tmequant.models import ModelCard, get_card, list_models, random_card

PHANTOM_CARD = Path(__file__).resolve().parents[1] / "tmequant" / "data" / "models" / "phantom-demo"


def _set_domain(model: Path, domain: object) -> Path:
    p = model / "model.json"
    card = json.loads(p.read_text())
    card["domain"] = domain
    p.write_text(json.dumps(card))
    return model


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("guard")
    paths = write_slides(d / "slides")
    paths["untrained"] = _set_domain(write_model(d / "untrained", count_head=True), "untrained")
    return paths


# --- the card ------------------------------------------------------------------------------------

def test_card_domain_defaults_and_shipped_cards():
    old = ModelCard(name="m", arch="resnet18", tissue_classes=["t"], tissue_roles={"t": "tumor"})
    assert old.domain == "unknown" and old.domain_warning is None
    assert "domain" not in old.to_dict()  # old cards keep their predictions params hash
    assert ModelCard.load(PHANTOM_CARD).domain == "synthetic"
    assert random_card("efficientnet_lite0").domain == "untrained"
    organs = old.model_copy(update={"domain": ["breast carcinoma H&E", "colon"]})
    assert organs.domain_label == "breast carcinoma H&E; colon" and organs.domain_warning is None
    # a stored card of an old random model (no domain field) still counts as untrained
    assert card_domain({"name": "random-x", "training": {"untrained": True}}) == "untrained"
    assert not count_head_trusted({"domain": "untrained"}) and count_head_trusted({"domain": "unknown"})
    assert "synthetic phantoms" in domain_warning("x", "synthetic")
    with pytest.raises(Exception, match="domain"):
        ModelCard(name="m", arch="resnet18", tissue_classes=["t"], tissue_roles={"t": "tumor"}, domain=[])


def test_no_build_machine_path_in_the_shipped_card():
    text = (PHANTOM_CARD / "model.json").read_text()
    assert "/tmp/" not in text and "/home/" not in text and "/root/" not in text


def test_models_list_and_show_say_the_domain(capsys):
    assert main(["models", "list"]) == 0
    lines = {ln.split("\t")[0]: ln.split("\t") for ln in capsys.readouterr().out.splitlines()}
    assert lines["phantom-demo"][1] == "synthetic"
    assert lines["random-efficientnet_lite0"][1] == "untrained"
    assert {m.name: m.domain for m in list_models()}["phantom-demo"] == "synthetic"
    assert main(["models", "show", "phantom-demo"]) == 0
    assert json.loads(capsys.readouterr().out)["domain"] == "synthetic"
    assert get_card("random-resnet18")[0].domain == "untrained"


# --- a run with an untrained model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def untrained_run(inputs, tmp_path_factory):
    """S1 listed twice (a file and a glob), an untrained model with a count head."""
    import io
    import sys

    out = tmp_path_factory.mktemp("guard_run") / "out"
    err, old = io.StringIO(), sys.stderr
    sys.stderr = err
    try:
        rc = main(["run", str(inputs["S1"]), str(inputs["S1"].parent / "S1*.tif"), "--out", str(out),
                   "--model", str(inputs["untrained"]), "--workers", "1", "--device", "cpu"])
    finally:
        sys.stderr = old
    return out, rc, err.getvalue()


def test_untrained_model_warns_once_and_the_report_shows_a_banner(untrained_run):
    out, rc, err = untrained_run
    assert rc == 0, err[-2000:]
    warnings = [ln for ln in err.splitlines() if "UNTRAINED" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("WARNING: model 'tiny-run'")
    html = (out / "report.html").read_text()
    assert 'class="banner"' in html and "UNTRAINED" in html


def test_untrained_count_head_does_not_replace_the_counter(untrained_run):
    out, _, _ = untrained_run
    cohort = pd.read_csv(out / "cohort.csv")
    assert list(cohort["count_source"]) == ["nucleus_counter"]  # not "model"
    assert list(cohort["model_domain"]) == ["untrained"]
    assert "model_domain: untrained model" in cohort["qc_flags"][0]


def test_a_slide_listed_twice_is_processed_once(untrained_run):
    out, _, _ = untrained_run
    assert list(pd.read_csv(out / "cohort.csv")["slide_id"]) == ["S1"]
    assert json.loads((out / "run.json").read_text())["slides"] == ["S1"]


def test_skipped_stages_say_why(untrained_run):
    _, _, err = untrained_run
    assert "S1: cells: no cell table given (--cells-dir)" in err
    assert "cells skipped" not in err


def test_a_model_trained_on_tissue_gets_no_warning(inputs, tmp_path):
    model = _set_domain(write_model(tmp_path / "m"), ["colorectal carcinoma H&E"])
    out = tmp_path / "out"
    rc = main(["-q", "run", str(inputs["S2"]), "--out", str(out), "--model", str(model),
               "--workers", "1", "--device", "cpu"])
    assert rc == 0
    assert 'class="banner"' not in (out / "report.html").read_text()
    cohort = pd.read_csv(out / "cohort.csv")
    assert list(cohort["model_domain"]) == ["colorectal carcinoma H&E"]


# --- usage errors ----------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["no-such-model", "random-not_an_arch", "./no/such/folder"])
def test_a_wrong_model_name_is_a_usage_error(inputs, tmp_path, model, capsys):
    rc = main(["run", str(inputs["S1"]), "--out", str(tmp_path / "o"), "--model", model])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing was started


def test_predict_with_an_untrained_model_warns(inputs, tmp_path, capsys):
    assert main(["-q", "tile", str(inputs["S1"]), "--out", str(tmp_path), "--mpp", "1", "--tile-px", "64"]) == 0
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "S1.zarr"), "--model", str(inputs["untrained"]),
                 "--device", "cpu", "--counter", "off"]) == 0
    err = capsys.readouterr().err
    assert sum("WARNING: model 'tiny-run' is UNTRAINED" in ln for ln in err.splitlines()) == 1
