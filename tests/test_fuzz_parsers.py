"""Bounded fuzzing of the parsers that read user files (a few seconds each).

Each parser may return a clean result or raise a TmequantError subclass (one line naming the
file); any other exception is a bug. Crashes found here became the regression tests at the
bottom of this file.
"""

from __future__ import annotations

import atexit
import json
import shutil
import string
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tmequant.errors import TmequantError  # noqa: E402

FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

_tmp = Path(tempfile.mkdtemp(prefix="tmequant-fuzz-"))
atexit.register(shutil.rmtree, _tmp, True)


def _write(name: str, data: bytes | str) -> Path:
    p = _tmp / name
    if isinstance(data, str):
        p.write_text(data, encoding="utf-8", errors="surrogatepass")
    else:
        p.write_bytes(data)
    return p


def _clean(fn, *args, **kw):
    """Call fn; a TmequantError is a clean refusal (its message is one line), anything else fails."""
    try:
        return fn(*args, **kw)
    except TmequantError as e:
        assert "\n" not in str(e), repr(str(e))
        return None


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=5)
                           | st.dictionaries(st.text(max_size=12), kids, max_size=5), max_leaves=25)

# --- manifests ----------------------------------------------------------------------------

cells_text = st.text(alphabet=string.printable + "\x00é/\\.\u2028", max_size=40)
rows = st.lists(st.lists(cells_text, min_size=0, max_size=4), max_size=6)
headers = st.lists(st.sampled_from(["slide_id", "path", "mpp", "SLIDE_ID", " path ", "x", ""]),
                   max_size=4)


@FUZZ
@given(header=headers, body=rows, raw=st.binary(max_size=200), use_raw=st.booleans())
def test_fuzz_manifest(header, body, raw, use_raw):
    from tmequant.inputs import SlideSpec, expand_slides, read_manifest

    if use_raw:
        data: bytes = raw
    else:
        lines = [",".join(header)] + [",".join(r) for r in body]
        data = "\n".join(lines).encode("utf-8", "surrogatepass")
    p = _write("m.csv", data)
    specs = _clean(read_manifest, p)
    if specs is not None:
        assert all(isinstance(s, SlideSpec) for s in specs)
        for s in specs:  # ids can never leave the output folder
            assert "/" not in s.slide_id and "\\" not in s.slide_id and ".." not in s.slide_id
    _clean(expand_slides, [p])


# --- GeoJSON / cell tables ------------------------------------------------------------------

coords = st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(),
                            st.text(max_size=3), st.none()), max_size=3)
geometry = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["Point", "Polygon", "LineString", "Nope", 3]),
                           "coordinates": st.one_of(coords, st.lists(coords, max_size=4),
                                                    st.lists(st.lists(coords, max_size=5), max_size=2))}),
    json_values,
)
feature = st.fixed_dictionaries(
    {"type": st.just("Feature"), "geometry": geometry},
    optional={"properties": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "classification": st.one_of(json_values, st.fixed_dictionaries({"name": json_values})),
        "measurements": json_values, "objectType": json_values,
        "nucleusGeometry": geometry}))})
collection = st.one_of(
    st.fixed_dictionaries({"type": st.just("FeatureCollection"),
                           "features": st.one_of(st.lists(feature, max_size=4), json_values)}),
    st.lists(feature, max_size=3), json_values)


@FUZZ
@given(obj=collection, raw=st.binary(max_size=120), mode=st.sampled_from(["json", "raw", "gzip"]))
def test_fuzz_geojson(obj, raw, mode):
    import gzip

    from tmequant.biomarkers import read_cell_table
    from tmequant.qupath import read_features

    text = json.dumps(obj, allow_nan=True).encode()
    data = text if mode == "json" else raw if mode == "raw" else gzip.compress(text)
    p = _write("cells.geojson", data)
    feats = _clean(read_features, p)
    df = _clean(read_cell_table, p)
    if df is not None:
        assert list(df.columns[:3]) == ["x", "y", "class"]
        assert df["x"].notna().all() and (df["x"] >= 0).all()
    del feats


@FUZZ
@given(body=st.lists(st.lists(st.one_of(cells_text, st.floats().map(str)), max_size=4), max_size=5),
       header=st.lists(st.sampled_from(["x", "y", "class", "centroid_x", "X", "label", "q"]), max_size=4))
def test_fuzz_cell_csv(body, header):
    from tmequant.biomarkers import read_cell_table

    text = "\n".join([",".join(header)] + [",".join(r) for r in body])
    p = _write("cells.csv", text)
    df = _clean(read_cell_table, p)
    if df is not None:
        assert len(df) > 0 and df["x"].map(float).notna().all()


# --- params files -----------------------------------------------------------------------------

param_keys = st.sampled_from(["margin_um", "bulk_close_um", "tls_prob", "seed_h_od", "tile_px",
                              "target_mpp_um", "min_tissue_fraction", "nope", "enabled", ""])
param_values = st.one_of(st.integers(-10**20, 10**20), st.floats(allow_nan=False), st.booleans(),
                         st.text(max_size=8), st.lists(st.integers(), max_size=3))
sections = st.dictionaries(st.sampled_from(["biomarkers", "nucleus_counter", "tiling", "inference", "x"]),
                           st.dictionaries(param_keys, param_values, max_size=3), max_size=3)


def _toml(sec: dict) -> str:
    out = []
    for name, kv in sec.items():
        out.append(f"[{name}]")
        for k, v in kv.items():
            out.append(f"{json.dumps(k)} = {json.dumps(v)}")
    return "\n".join(out) + "\n"


@FUZZ
@given(sec=sections, raw=st.text(max_size=120), kind=st.sampled_from(["toml", "yaml", "raw-toml", "raw-yaml"]))
def test_fuzz_params(sec, raw, kind):
    import yaml

    from tmequant.params import (biomarker_params_from_file, dataclass_from_mapping, load_params_file,
                                 nucleus_counter_params_from_file)
    from tmequant.tiling.tile import TilingParams

    if kind == "toml":
        p = _write("p.toml", _toml(sec))
    elif kind == "yaml":
        p = _write("p.yaml", yaml.safe_dump(sec))
    else:
        p = _write("p." + kind.split("-")[1], raw)
    loaded = _clean(load_params_file, p)
    _clean(biomarker_params_from_file, p)
    _clean(nucleus_counter_params_from_file, p)
    if loaded and "tiling" in loaded:
        _clean(dataclass_from_mapping, TilingParams, loaded["tiling"], p, "tiling")


# --- model cards --------------------------------------------------------------------------------

def _base_card() -> dict:
    from tmequant.roles import TISSUE_ROLES

    return {"name": "m", "arch": "resnet18", "tile_px": 224, "mpp_um": 0.5,
            "tissue_classes": list(TISSUE_ROLES), "tissue_roles": {r: r for r in TISSUE_ROLES}}


card_edits = st.dictionaries(
    st.sampled_from(["name", "arch", "tile_px", "mpp_um", "mean", "std", "tissue_classes",
                     "tissue_roles", "cell_classes", "cell_roles", "schema_version", "extra"]),
    json_values, max_size=4)


@FUZZ
@given(edits=card_edits, drop=st.lists(st.sampled_from(["name", "arch", "tissue_classes", "tissue_roles"]),
                                        max_size=2), raw=st.binary(max_size=80), use_raw=st.booleans())
def test_fuzz_model_card(edits, drop, raw, use_raw):
    from tmequant.models import ModelCard

    card = {**_base_card(), **edits}
    for k in drop:
        card.pop(k, None)
    c = _clean(ModelCard.from_dict, card, "model.json")
    if c is not None:
        assert ModelCard.from_dict(c.to_dict()).to_dict() == c.to_dict()  # round trip
    p = _write("model.json", raw if use_raw else json.dumps(card, allow_nan=True).encode())
    _clean(ModelCard.load, p)


# --- regressions found by fuzzing and by the bad-input cases -----------------------------------

def test_regression_deeply_nested_json():
    """json.loads raised RecursionError (no file named) on '[[[[...'."""
    from tmequant.models import ModelCard
    from tmequant.qupath import read_features

    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(TmequantError, match="nested too deeply"):
        read_features(_write("deep.geojson", deep))
    with pytest.raises(TmequantError, match="model.json"):
        ModelCard.load(_write("model.json", deep))


def test_regression_measurement_beyond_float():
    """A measurement of 10**400 raised OverflowError out of the GeoJSON reader."""
    from tmequant.qupath import read_features

    p = _write("big.geojson", '{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]},'
                              ' "properties": {"measurements": {"a": 1' + "0" * 400 + '}}}')
    (f,) = read_features(p)
    assert f.measurements["a"] != f.measurements["a"]  # NaN: unreadable measurement


def test_regression_manifest_nul_and_huge_field():
    """csv raised _csv.Error (NUL byte; a field over the csv module's limit)."""
    from tmequant.inputs import read_manifest

    for data in (b"slide_id,path\nA\x00,b.svs\n", b"slide_id,path\nA," + b"x" * 200_000 + b"\n"):
        try:
            read_manifest(_write("m.csv", data))
        except TmequantError as e:
            assert "m.csv" in str(e)
