"""Parameter files: TOML/YAML sections -> validated dataclasses with clear errors."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tmequant.biomarkers import BiomarkerParams
from tmequant.errors import ParamsError
from tmequant.params import (
    biomarker_params_from_file,
    dataclass_from_mapping,
    load_params_file,
    nucleus_counter_params_from_file,
)


def test_toml_top_level_and_sections(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text("margin_um = 750\n[biomarkers]\ntls_prob = 0.6\n[nucleus_counter]\nseed_h_od = 0.6\n")
    s = load_params_file(p)
    assert s["biomarkers"] == {"margin_um": 750, "tls_prob": 0.6}
    bp = biomarker_params_from_file(p, {"til_positive_per_mm2": 900, "margin_um": None})
    assert (bp.margin_um, bp.tls_prob, bp.til_positive_per_mm2) == (750.0, 0.6, 900.0)
    assert isinstance(bp.margin_um, float)
    nc = nucleus_counter_params_from_file(p)
    if nc is not None:  # the counter module is another engineer's; optional here
        assert nc.seed_h_od == 0.6


def test_yaml(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("biomarkers:\n  bulk_close_um: 500\n")
    assert biomarker_params_from_file(p).bulk_close_um == 500.0


@pytest.mark.parametrize("text,match", [
    ("margn_um = 1\n", "unknown key 'margn_um'"),
    ("margin_um = -5\n", "margin_um"),
    ("tls_prob = 2\n", "tls_prob"),
    ("margin_um = 'wide'\n", "expected a number"),
    ("margin_um = true\n", "expected a number"),
    ("margin_um = \n", "cannot parse"),
])
def test_errors_name_file_and_key(tmp_path, text, match):
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(ParamsError, match=match) as e:
        biomarker_params_from_file(p)
    assert str(p) in str(e.value)


def test_missing_and_unknown_format(tmp_path):
    with pytest.raises(ParamsError, match="no such"):
        load_params_file(tmp_path / "none.toml")
    (tmp_path / "p.ini").write_text("a=1")
    with pytest.raises(ParamsError, match="toml or .yaml"):
        load_params_file(tmp_path / "p.ini")


def test_generic_dataclass_from_mapping():
    @dataclass
    class Cfg:
        n: int = 3
        name: str = "a"
        on: bool = False

    assert dataclass_from_mapping(Cfg, {"n": 5.0, "on": True}) == Cfg(5, "a", True)
    with pytest.raises(ParamsError, match="expected an integer"):
        dataclass_from_mapping(Cfg, {"n": 2.5}, "f.toml")
    with pytest.raises(ParamsError, match="expected true or false"):
        dataclass_from_mapping(Cfg, {"on": 1}, "f.toml")
    with pytest.raises(ParamsError, match="unknown key"):
        dataclass_from_mapping(BiomarkerParams, {"x": 1}, "f.toml")
