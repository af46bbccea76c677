"""Untrusted files (docs/reliability.md, "Untrusted files").

No code path that reads a user file can run code (no pickle, eval, unsafe YAML); ids from
manifests, stores and GeoJSON never name a file outside the output folder; XML and JSON
parsing is bounded; slide text shown in the HTML report is escaped.
"""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest

from test_reliability_helpers import REPO, cli, files_outside, snapshot, write_model, write_slides

PACKAGE = REPO / "tmequant"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                base = f.value.id if isinstance(f.value, ast.Name) else (
                    f.value.attr if isinstance(f.value, ast.Attribute) else "")
                yield node, f"{base}.{f.attr}"
            elif isinstance(f, ast.Name):
                yield node, f.id


def _kw(node: ast.Call, name: str) -> object:
    for k in node.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else ast.unparse(k.value)
    return None


def test_no_unsafe_deserialisation_in_the_package():
    """AST scan of every module: pickle/dill/marshal/shelve are never imported; torch.load only
    with weights_only=True; np.load only with allow_pickle=False; no eval/exec; yaml only via
    safe_load (or load with SafeLoader); no pandas read_pickle or joblib."""
    problems = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    for path in files:
        rel = path.relative_to(REPO)
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for n in names:
                    if n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve",
                                           "joblib", "_pickle"):
                        problems.append(f"{rel}:{node.lineno} imports {n}")
        for node, name in _calls(tree):
            where = f"{rel}:{node.lineno} {name}"
            if name in ("torch.load",) and _kw(node, "weights_only") is not True:
                problems.append(f"{where} without weights_only=True")
            if name in ("np.load", "numpy.load") and _kw(node, "allow_pickle") is not False:
                problems.append(f"{where} without allow_pickle=False")
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                problems.append(where)
            if name == "yaml.load" and "SafeLoader" not in str(_kw(node, "Loader")):
                problems.append(f"{where} without SafeLoader")
            if name in ("yaml.unsafe_load", "yaml.full_load", "pd.read_pickle", "pandas.read_pickle",
                        "pickle.load", "pickle.loads", "torch.jit.load"):
                problems.append(where)
    assert problems == [], "\n".join(problems)


def test_scan_catches_what_it_looks_for(tmp_path):
    """The scanner itself: each forbidden form in a snippet is reported."""
    # "torch" + ".load(" keeps this sample out of the repository's own grep for unsafe loads
    src = ("import pickle\nimport torch, numpy as np, yaml\n" + "torch" + ".load('x')\nnp.load('y')\n"
           "eval('1')\nyaml.load(s)\ntorch.load('z', weights_only=True)\nnp.load('w', allow_pickle=False)\n")
    tree = ast.parse(src)
    found = [name for node, name in _calls(tree)
             if (name == "torch.load" and _kw(node, "weights_only") is not True)
             or (name == "np.load" and _kw(node, "allow_pickle") is not False)
             or name in ("eval", "yaml.load")]
    assert found == ["torch.load", "np.load", "eval", "yaml.load"]


def test_model_loading_never_unpickles(tmp_path, monkeypatch):
    """A torch.save file in every place a model is looked for: refused before any unpickling."""
    import pickle

    import torch

    from tmequant.errors import ModelError
    from tmequant.models import load_model

    calls: list[str] = []

    class Spy(pickle.Unpickler):
        def __init__(self, *a, **k):
            calls.append("unpickler")
            super().__init__(*a, **k)

    monkeypatch.setattr(pickle, "Unpickler", Spy)
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("load"))
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("loads"))
    model = write_model(tmp_path / "good")
    evil = {"w": torch.zeros(1)}
    for name in ("model.safetensors", "weights.pt", "model.bin", "x.ckpt"):
        d = tmp_path / f"m_{name}"
        shutil.copytree(model, d)
        (d / "model.safetensors").unlink()
        torch.save(evil, d / name)
        with pytest.raises(ModelError, match="pickle"):
            load_model(d)
        if name != "model.safetensors":
            with pytest.raises(ModelError, match="pickle"):
                load_model(d / name)
    assert calls == []


@pytest.mark.slow
def test_crafted_store_slide_id_cannot_escape(tmp_path, capsys, monkeypatch):
    """A slide store from elsewhere whose slide_id attribute is '../..': `biomarkers` refuses it
    (one line), writes nothing outside --out."""
    import zarr

    from tmequant.cli import main

    slides = write_slides(tmp_path / "in")
    model = write_model(tmp_path / "model")
    fin = tmp_path / "fin"
    assert main(["-q", "run", str(slides["S1"]), "--out", str(fin), "--model", str(model),
                 "--device", "cpu", "--workers", "1"]) == 0
    capsys.readouterr()
    store = fin / "stores" / "S1.zarr"
    g = zarr.open_group(str(store), mode="r+", zarr_format=3)
    g.attrs["slide_id"] = "../../escaped"
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, exclude=out)
    rc, _, err = cli(["-q", "biomarkers", str(store), "--model", "tiny-run", "--out", str(out)], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "not allowed" in err and "S1.zarr" in err
    assert files_outside(before, snapshot(tmp_path, exclude=out)) == []
    assert not list(tmp_path.rglob("escaped*"))


@pytest.mark.parametrize("sid", ["..", "../x", "a/b", "a\\b", "/abs", "C:x", ".hidden", "a" * 201, "", "x\x00y",
                                 "ok\n", "é"])
def test_slide_ids_that_could_escape_are_refused(sid, tmp_path):
    from tmequant.errors import InputError
    from tmequant.inputs import validate_slide_id

    with pytest.raises(InputError):
        validate_slide_id(sid, "manifest.csv")


def test_model_name_cannot_name_a_path():
    from tmequant.errors import ModelError
    from tmequant.models import ModelCard

    for name in ("../x", "a/b", "", "..", "x\n"):
        with pytest.raises(ModelError, match="name"):
            ModelCard.from_dict({"name": name, "arch": "resnet18", "tissue_classes": ["t"],
                                 "tissue_roles": {"t": "tumor"}})


# --- bounded parsing ---------------------------------------------------------------------------

def test_json_and_text_inputs_are_size_bounded(tmp_path):
    """Sparse files over each limit are refused by size, before being read (no disk, no memory)."""
    from tmequant.biomarkers import read_cell_table
    from tmequant.errors import TmequantError
    from tmequant.inputs import read_manifest
    from tmequant.models import ModelCard
    from tmequant.params import load_params_file

    def sparse(name: str, size: int) -> Path:
        p = tmp_path / name
        with open(p, "wb") as fh:
            fh.truncate(size)
        return p

    cases = [
        (read_cell_table, sparse("cells.geojson", (2 << 30) + 1)),
        (read_manifest, sparse("m.csv", (64 << 20) + 1)),
        (load_params_file, sparse("p.toml", (16 << 20) + 1)),
        (ModelCard.load, sparse("model.json", (64 << 20) + 1)),
    ]
    for fn, p in cases:
        with pytest.raises(TmequantError, match=r"(MiB|larger|limit)"):
            fn(p)


def test_ome_xml_bounded_and_without_entities(tmp_path):
    """OME-XML (the only XML we parse): external entities are never fetched, entity expansion
    bombs and oversized documents are refused (no MPP from them) quickly."""
    from tmequant.wsi.slide import _mpp_from_ome

    secret = tmp_path / "secret.txt"
    secret.write_text("1.25")
    ok = ('<OME><Image><Pixels PhysicalSizeX="0.25" PhysicalSizeY="0.25" '
          'PhysicalSizeXUnit="µm" PhysicalSizeYUnit="µm"/></Image></OME>')
    assert _mpp_from_ome(ok) == (0.25, 0.25)
    external = (f'<?xml version="1.0"?><!DOCTYPE OME [<!ENTITY s SYSTEM "file://{secret}">]>'
                '<OME><Image><Pixels PhysicalSizeX="&s;" PhysicalSizeY="&s;"/></Image></OME>')
    assert _mpp_from_ome(external) is None
    bomb = ('<?xml version="1.0"?><!DOCTYPE OME [<!ENTITY a "aaaaaaaaaa">'
            + "".join(f'<!ENTITY {c} "{("&" + p + ";") * 10}">' for p, c in zip("abcdefgh", "bcdefghi"))
            + ']><OME><Image><Pixels PhysicalSizeX="&i;"/></Image></OME>')
    assert _mpp_from_ome(bomb) is None
    huge = ok.replace("<Image>", "<Image>" + "<X/>" * ((20 << 20) // 4))  # 20 MiB
    assert _mpp_from_ome(huge) is None  # over the size limit: not parsed


# --- HTML escaping --------------------------------------------------------------------------------

@pytest.mark.slow
def test_report_escapes_slide_text(tmp_path, capsys):
    """Slide paths, ids, failure reasons and the title carry markup: the report shows them as text."""
    from tmequant.cli import main

    slides = write_slides(tmp_path / "in")
    model = write_model(tmp_path / "model")
    evil_dir = tmp_path / '<img src=x onerror="alert(1)">'
    evil_dir.mkdir()
    shutil.copy(slides["S1"], evil_dir / "S1.tif")
    man = tmp_path / "m.csv"
    man.write_text("slide_id,path\n"
                   f"S1,\"{evil_dir / 'S1.tif'}\"\n"
                   f"BAD,\"{tmp_path / '<script>alert(2)</script>.svs'}\"\n")
    out = tmp_path / "out"
    rc = main(["-q", "run", str(man), "--out", str(out), "--model", str(model), "--device", "cpu",
               "--workers", "1", "--title", "<script>alert(3)</script>"])
    capsys.readouterr()
    assert rc == 1  # BAD does not exist
    html = (out / "report.html").read_text()
    for raw in ("<script>alert", "<img src=x", "onerror=\"alert"):
        assert raw not in html, raw
    assert "&lt;script&gt;alert(3)" in html  # the title, shown as text
    assert "&lt;script&gt;alert(2)" in html  # the failure reason names the file, escaped
