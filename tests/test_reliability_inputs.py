"""Bad inputs through the command line, as a user runs it (docs/reliability.md, "Bad inputs").

Every case checks: the documented exit code; one clear line on stderr that names the file
and the problem (repeated at most in the end-of-batch summary), never a traceback; the
other slides of the batch finish; nothing is written outside the output folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from test_reliability_helpers import (
    REPO, cli, corrupt_tiles, files_outside, snapshot, stderr_lines, subprocess_env,
    write_model, write_slides, write_svs,
)

TILE = ["--mpp", "1", "--tile-px", "64", "--workers", "1"]


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, Path]:
    """Good slides S1, S2 (64 px tiles at 1 um/px), the tiny model, and a finished run of S1."""
    root = tmp_path_factory.mktemp("rel_shared")
    paths = write_slides(root / "slides")
    paths["model"] = write_model(root / "model")
    paths["root"] = root
    from tmequant.cli import main

    paths["finished"] = root / "finished"
    rc = main(["-q", "run", str(paths["S1"]), "--out", str(paths["finished"]), "--model",
               str(paths["model"]), "--device", "cpu", "--workers", "1"])
    assert rc == 0
    return paths


class Ws:
    """One test's workspace: its own inputs in ``inp``, outputs in ``out``; the shared
    inputs and the workspace are watched for writes outside ``out``."""

    def __init__(self, tmp: Path, shared: dict[str, Path], capsys: pytest.CaptureFixture[str]):
        self.root, self.shared, self.capsys = tmp, shared, capsys
        self.inp = tmp / "inp"
        self.inp.mkdir()
        self.out = tmp / "out"

    def run(self, argv: list[str]) -> tuple[int, str]:
        watch = [(self.root, self.out), (self.shared["root"], None)]
        before = [snapshot(w, exclude=ex) for w, ex in watch]
        rc, out, err = cli(argv, self.capsys)
        after = [snapshot(w, exclude=ex) for w, ex in watch]
        for (w, _), b, a in zip(watch, before, after):
            assert files_outside(b, a) == [], f"written outside the output folder under {w}"
        assert "Traceback" not in err and "Traceback" not in out, err
        return rc, err


@pytest.fixture
def ws(tmp_path, shared, capsys, monkeypatch) -> Ws:
    monkeypatch.chdir(tmp_path)  # a stray relative write would land in the watched folder
    return Ws(tmp_path, shared, capsys)


def one_reason(err: str, name: str, *words: str) -> str:
    """The single distinct problem line about ``name`` (it may repeat in the batch summary)."""
    lines = [ln for ln in stderr_lines(err) if name in ln]
    assert lines, f"no line names {name!r}:\n{err}"
    reasons = {ln[ln.index(name):] for ln in lines}
    assert len(reasons) == 1, f"more than one distinct line about {name!r}:\n{err}"
    line = lines[0]
    for w in words:
        assert w.lower() in line.lower(), f"{w!r} not in {line!r}"
    return line


def failures(out: Path) -> dict[str, tuple[str, str]]:
    with open(out / "failures.csv", newline="") as fh:
        return {r["slide_id"]: (r["stage"], r["reason"]) for r in csv.DictReader(fh)}


def store_done(out: Path, sid: str) -> bool:
    from tmequant.tiling.store import store_is_complete

    return store_is_complete(out / f"{sid}.zarr")


# --- slides -----------------------------------------------------------------------------

def _truncated(d: Path) -> Path:
    p = write_svs(d / "trunc.svs")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _random(d: Path) -> Path:
    p = d / "random.svs"
    p.write_bytes(np.random.default_rng(0).bytes(20000))
    return p


def _empty(d: Path) -> Path:
    p = d / "empty.svs"
    p.write_bytes(b"")
    return p


def _text(d: Path) -> Path:
    p = d / "notes.tif"
    p.write_text("slide scanned on Monday\n")
    return p


def _folder(d: Path) -> Path:
    p = d / "folder.svs"
    p.mkdir()
    (p / "x.txt").write_text("not a slide")
    return p


def _corrupt(d: Path) -> Path:
    p = write_svs(d / "corrupt.svs")
    assert corrupt_tiles(p, level=0, start_fraction=0.5) > 0
    return p


def _nompp(d: Path) -> Path:
    return write_svs(d / "nompp.svs", mpp_um=None)


def _absurd(d: Path) -> Path:
    return write_svs(d / "absurd.svs", mpp_um=500.0)


SLIDE_CASES = {
    # name: (maker, words the one line must hold)
    "truncated": (_truncated, ("trunc.svs", "truncated")),
    "random_bytes": (_random, ("random.svs", "not a readable slide")),
    "empty_file": (_empty, ("empty.svs", "empty")),
    "text_file": (_text, ("notes.tif", "not a readable slide")),
    "folder_named_like_slide": (_folder, ("folder.svs", "folder")),
    "tiles_fail_to_decode": (_corrupt, ("corrupt.svs", "cannot read region")),
    "missing_mpp": (_nompp, ("nompp.svs", "no pixel size", "--mpp-override")),
    "absurd_mpp": (_absurd, ("absurd.svs", "outside 0.05-20")),
}


@pytest.mark.parametrize("case", list(SLIDE_CASES))
def test_bad_slide_fails_alone(case, ws):
    """`tmequant tile GOOD BAD`: exit 1, one line naming BAD and why, GOOD finished, BAD's
    store (if any) never marked finished, failures.csv names it."""
    maker, words = SLIDE_CASES[case]
    bad = maker(ws.inp)
    sid = bad.stem
    rc, err = ws.run(["-q", "tile", str(ws.shared["S1"]), str(bad), "--out", str(ws.out), *TILE])
    assert rc == 1, err
    one_reason(err, str(bad), *words)
    assert store_done(ws.out, "S1")
    assert not store_done(ws.out, sid)
    assert set(failures(ws.out)) == {sid}


def test_missing_mpp_fixed_by_override(ws):
    """The fix the message names works: --mpp-override (or a manifest mpp column)."""
    bad = _nompp(ws.inp)
    rc, err = ws.run(["-q", "tile", str(bad), "--out", str(ws.out), "--mpp-override", "1", *TILE])
    assert rc == 0, err
    assert store_done(ws.out, "nompp")
    man = ws.inp / "m.csv"
    man.write_text(f"slide_id,path,mpp\nN1,{bad.name},1.0\n")
    rc, err = ws.run(["-q", "tile", str(man), "--out", str(ws.out), *TILE])
    assert rc == 0, err
    assert store_done(ws.out, "N1")


def test_unreadable_permissions(tmp_path):
    """chmod 000: as root permissions do not block reads, so the command runs without the
    DAC capabilities (capsh), as an ordinary user would."""
    root_user = os.geteuid() == 0
    drop = ["capsh", "--drop=cap_dac_override,cap_dac_read_search", "--", "-c"]
    if root_user and (shutil.which("capsh") is None or subprocess.run(
            [*drop, "true"], capture_output=True).returncode != 0):
        pytest.skip("running as root and cannot drop the DAC capabilities (capsh): "
                    "chmod 000 does not block reads here")
    tmp_path.chmod(0o777)
    locked = tmp_path / "locked.svs"
    write_svs(locked)
    good = write_svs(tmp_path / "good.svs")
    locked.chmod(0o000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "tmequant", "-q", "tile", str(locked), str(good), "--out", str(out), *TILE]
    if root_user:
        import shlex

        cmd = [*drop, shlex.join(cmd)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    finally:
        locked.chmod(0o644)
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr
    one_reason(p.stderr, str(locked), "permission denied")
    assert store_done(out, "good") and not store_done(out, "locked")


@pytest.mark.slow
def test_zero_tissue_and_tissue_everywhere(ws):
    """A blank slide finishes with 0 tiles and a warning naming it; a slide covered in tissue
    keeps every tile of the grid. Both are clean results (exit 0), in `tile` and `run`."""
    blank = write_svs(ws.inp / "blank.svs", color=None)
    full = write_svs(ws.inp / "full.svs", full=True)
    rc, err = ws.run(["tile", str(blank), str(full), "--out", str(ws.out), *TILE])
    assert rc == 0, err
    one_reason(err, "blank: no tissue", "no tissue found")
    from tmequant.tiling.store import SlideStore

    assert SlideStore(ws.out / "blank.zarr").n_tiles == 0
    assert SlideStore(ws.out / "full.zarr").n_tiles == (768 // 64) ** 2
    rc, err = ws.run(["-q", "run", str(blank), str(full), "--out", str(ws.out / "run"), "--model",
                      str(ws.shared["model"]), "--device", "cpu", "--workers", "1"])
    assert rc == 0, err
    import pandas as pd

    cohort = pd.read_csv(ws.out / "run" / "cohort.csv").set_index("slide_id")
    assert cohort.loc["blank", "n_tiles"] == 0
    assert cohort.loc["full", "n_tiles"] == 144


@pytest.mark.slow
def test_huge_single_level_slide_memory_bounded(tmp_path):
    """A 20,000 x 20,000 px single-level TIFF (1.2 GB of pixels, written as identical
    pre-compressed tiles) is tiled with bounded memory: peak RSS well under the image size."""
    if not Path("/proc/self/status").exists():
        pytest.skip("peak memory is read from /proc/self/status (Linux only)")
    import zlib

    import tifffile

    n_px, t = 20000, 512
    bg = zlib.compress(np.full((t, t, 3), (240, 238, 242), np.uint8).tobytes(), 6)
    tissue = zlib.compress(np.full((t, t, 3), (200, 90, 160), np.uint8).tobytes(), 6)
    nt = -(-n_px // t)
    path = tmp_path / "huge.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write((tissue if 16 <= r < 20 and 16 <= c < 20 else bg for r in range(nt) for c in range(nt)),
                 shape=(n_px, n_px, 3), dtype=np.uint8, tile=(t, t), photometric="rgb",
                 compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    out = tmp_path / "out"
    # VmHWM: this process's own peak (ru_maxrss would include pytest's, inherited over fork+exec)
    code = ("import re, sys; from tmequant.cli import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('maxrss_kb', hwm, file=sys.stderr); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code, "-q", "tile", str(path), "--out", str(out),
                        "--mpp", "4", "--tile-px", "32", "--workers", "1"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr
    rss_mb = int(p.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    image_mb = n_px * n_px * 3 / 2**20
    assert rss_mb < image_mb / 2, f"peak RSS {rss_mb:.0f} MB for a {image_mb:.0f} MB image"
    from tmequant.tiling.store import SlideStore

    s = SlideStore(out / "huge.zarr")
    assert s.n_tiles == (2048 // 256) ** 2  # the 2048 px tissue square in 256 level-0 px tiles


@pytest.mark.slow
def test_batch_of_bad_slides_through_run(ws):
    """`tmequant run` on good slides mixed with every kind of bad slide: exit 1, each bad one in
    failures.csv with its one-line reason naming its file, the good ones in the cohort."""
    bads = [m(ws.inp) for m in (_random, _empty, _text, _folder, _corrupt, _nompp, _absurd)]
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), *map(str, bads), str(ws.shared["S2"]),
                      "--out", str(ws.out), "--model", str(ws.shared["model"]), "--device", "cpu",
                      "--workers", "1"])
    assert rc == 1, err
    fails = failures(ws.out)
    assert set(fails) == {b.stem for b in bads}
    for b in bads:
        stage, reason = fails[b.stem]
        assert stage == "tile" and str(b) in reason and "\n" not in reason
        one_reason(err, str(b))
    import pandas as pd

    assert list(pd.read_csv(ws.out / "cohort.csv")["slide_id"]) == ["S1", "S2"]
    assert "corrupt" in (ws.out / "report.html").read_text()  # failures are in the report too


# --- manifests --------------------------------------------------------------------------

MANIFESTS = {
    "missing_columns": (b"slide,file\nA,{S1}\n", ("lacks column", "slide_id")),
    "duplicate_ids": (b"slide_id,path\nA,{S1}\na,{S2}\n", ("line 3", "duplicate slide id")),
    "id_with_separator": (b"slide_id,path\nsub/A,{S1}\n", ("line 2", "not allowed")),
    "id_with_dotdot": (b"slide_id,path\n..,{S1}\n", ("line 2", "not allowed")),
    "id_escaping": (b"slide_id,path\n../../etc,{S1}\n", ("line 2", "not allowed")),
    "non_utf8": (b"slide_id,path\n\xff\xfeA,{S1}\n", ("not UTF-8",)),
    "bad_mpp": (b"slide_id,path,mpp\nA,{S1},0.00001\n", ("line 2", "outside 0.05-20")),
    "no_rows": (b"slide_id,path\n", ("no rows",)),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
@pytest.mark.parametrize("verb", ["tile", "run"])
def test_bad_manifest_stops_before_any_work(case, verb, ws):
    """Exit 2, one line naming the manifest, and nothing written at all (no output folder)."""
    text, words = MANIFESTS[case]
    man = ws.inp / "slides.csv"
    man.write_bytes(text.replace(b"{S1}", str(ws.shared["S1"]).encode())
                    .replace(b"{S2}", str(ws.shared["S2"]).encode()))
    extra = TILE if verb == "tile" else ["--model", str(ws.shared["model"]), "--device", "cpu"]
    rc, err = ws.run(["-q", verb, str(man), "--out", str(ws.out), *extra])
    assert rc == 2, err
    assert len(stderr_lines(err)) == 1, err
    one_reason(err, str(man), *words)
    assert not ws.out.exists()


# --- cell tables (GeoJSON) --------------------------------------------------------------

def _store(ws: Ws) -> Path:
    return ws.shared["finished"] / "stores" / "S1.zarr"


def _biomarkers(ws: Ws, cells: Path) -> tuple[int, str]:
    return ws.run(["-q", "biomarkers", str(_store(ws)), "--model", "tiny-run", "--cells", str(cells),
                   "--out", str(ws.out)])


def _feature(x: float, y: float, cls: str = "Lymphocyte") -> dict:
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]},
            "properties": {"objectType": "detection", "classification": {"name": cls}}}


GEOJSON = {
    "malformed": ('{"type": "FeatureCollection", "features": [{"type": ', ("not valid JSON",)),
    "not_geojson": ('{"hello": 1}', ("not GeoJSON",)),
    "no_geometry": ('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}', ("no geometry",)),
    "bad_coordinates": (json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]}), ("invalid geometry",)),
    "deeply_nested": ("[" * 200_000 + "]" * 200_000, ("nested too deeply",)),
    "all_cells_outside_slide": (json.dumps({"type": "FeatureCollection", "features": [
        _feature(1e7, 1e7), _feature(5e6, 20)]}), ("outside the slide",)),
    "negative_coordinates": (json.dumps({"type": "FeatureCollection", "features": [
        _feature(-5, 10)]}), ("negative",)),
}


@pytest.mark.parametrize("case", list(GEOJSON))
def test_bad_geojson(case, ws):
    text, words = GEOJSON[case]
    cells = ws.inp / "S1.geojson"
    cells.write_text(text)
    rc, err = _biomarkers(ws, cells)
    assert rc == 1, err
    one_reason(err, str(cells), *words)


def test_huge_geojson_refused_without_reading(ws):
    """A cell table over the size limit (a sparse 2 GiB file: no disk used) is refused by size."""
    cells = ws.inp / "S1.geojson"
    with open(cells, "wb") as fh:
        fh.truncate((2 << 30) + 1)
    rc, err = _biomarkers(ws, cells)
    assert rc == 1, err
    one_reason(err, str(cells), "MiB limit")


def test_some_cells_outside_slide_warn_and_count(ws):
    """Cells partly off the slide: a warning naming the file; the rest are used."""
    cells = ws.inp / "S1.geojson"
    feats = [_feature(200 + i, 200 + i) for i in range(20)] + [_feature(1e7, 1e7)]
    cells.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    rc, err = _biomarkers(ws, cells)
    assert rc == 0, err
    one_reason(err, str(cells), "1 of 21 cells lie outside the slide")
    import pandas as pd

    row = pd.read_csv(ws.out / "biomarkers.csv").iloc[0]
    assert row["count_source"] == "cell_table" and row["n_cells"] == 21


@pytest.mark.slow
def test_bad_cell_table_in_run_fails_only_its_slide(ws):
    cdir = ws.inp / "cells"
    cdir.mkdir()
    (cdir / "S1.geojson").write_text("{oops")
    (cdir / "S2.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        _feature(300, 300), _feature(320, 330, "Tumor")]}))
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), str(ws.shared["S2"]), "--out", str(ws.out),
                      "--model", str(ws.shared["model"]), "--cells-dir", str(cdir), "--device", "cpu",
                      "--workers", "1"])
    assert rc == 1, err
    assert failures(ws.out) == {"S1": ("biomarkers", failures(ws.out)["S1"][1])}
    one_reason(err, str(cdir / "S1.geojson"), "not valid JSON")
    import pandas as pd

    assert list(pd.read_csv(ws.out / "cohort.csv")["slide_id"]) == ["S2"]


# --- models -------------------------------------------------------------------------------

def _model_copy(ws: Ws, name: str, card_edit=None) -> Path:
    d = ws.inp / name
    shutil.copytree(ws.shared["model"], d)
    if card_edit is not None:
        card = json.loads((d / "model.json").read_text())
        card_edit(card)
        (d / "model.json").write_text(json.dumps(card))
    return d


def _missing_fields(ws: Ws) -> Path:
    return _model_copy(ws, "m_missing", lambda c: (c.pop("arch"), c.pop("tissue_roles")))


def _unknown_role(ws: Ws) -> Path:
    return _model_copy(ws, "m_role", lambda c: c["tissue_roles"].update({c["tissue_classes"][0]: "banana"}))


def _wrong_shapes(ws: Ws) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    d = _model_copy(ws, "m_shapes")
    t = load_file(str(d / "model.safetensors"))
    k = sorted(t)[-1]
    t[k] = torch.zeros(3, 3)
    save_file(t, str(d / "model.safetensors"))
    return d


def _pickle_beside_card(ws: Ws) -> Path:
    import torch

    d = _model_copy(ws, "m_pickle")
    (d / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(2)}, d / "model.pt")
    return d


def _pickle_named_safetensors(ws: Ws) -> Path:
    import torch

    d = _model_copy(ws, "m_disguised")
    torch.save({"w": torch.zeros(2)}, d / "model.safetensors")
    return d


def _pickle_file(ws: Ws) -> Path:
    import torch

    p = ws.inp / "checkpoint.pth"
    torch.save({"w": torch.zeros(2)}, p)
    return p


def _card_not_json(ws: Ws) -> Path:
    d = _model_copy(ws, "m_json")
    (d / "model.json").write_text("{name: tiny")
    return d


MODELS = {
    "card_missing_fields": (_missing_fields, "model.json", ("arch: missing", "tissue_roles: missing")),
    "card_unknown_role": (_unknown_role, "model.json", ("unknown roles", "banana")),
    "card_not_json": (_card_not_json, "model.json", ("not valid JSON",)),
    "safetensors_wrong_shapes": (_wrong_shapes, "model.safetensors", ("has shape (3, 3)",)),
    "pickle_beside_card": (_pickle_beside_card, "model.pt", ("pickle checkpoints are never loaded",)),
    "pickle_named_safetensors": (_pickle_named_safetensors, "model.safetensors",
                                 ("pickle checkpoints are never loaded",)),
    "pickle_file": (_pickle_file, "checkpoint.pth", ("pickle checkpoints are never loaded",)),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_bad_model_stops_before_any_work(case, ws, monkeypatch):
    """Exit 1 (ModelError), one line naming the model file and the field/tensor; no output."""
    import pickle

    maker, fname, words = MODELS[case]
    model = maker(ws)
    loads: list[str] = []
    real = pickle.Unpickler

    class Spy(real):  # any unpickling of the user's file would show up here
        def __init__(self, *a, **k):
            loads.append("unpickle")
            super().__init__(*a, **k)

    monkeypatch.setattr(pickle, "Unpickler", Spy)
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), "--out", str(ws.out), "--model", str(model),
                      "--device", "cpu"])
    assert rc == 1, err
    assert len(stderr_lines(err)) == 1, err
    one_reason(err, fname, *words)
    assert str(model.parent if model.is_file() else model) in err
    assert not ws.out.exists()
    assert loads == []


def test_predict_refuses_unfinished_store(ws):
    """`predict` on a store whose tiling died midway (tiles failed to decode): one line, exit 1."""
    bad = _corrupt(ws.inp)
    rc, _ = ws.run(["-q", "tile", str(bad), "--out", str(ws.out), *TILE])
    assert rc == 1
    rc, err = ws.run(["-q", "predict", str(ws.out / "corrupt.zarr"), "--model", str(ws.shared["model"]),
                      "--device", "cpu"])
    assert rc == 1, err
    one_reason(err, "corrupt.zarr", "unfinished")


# --- parameters files and options ---------------------------------------------------------

PARAMS = {
    "unknown_key.toml": ("margn_um = 500\n", ("unknown key 'margn_um'",)),
    "unknown_section_key.yaml": ("nucleus_counter:\n  seed_hod: 0.5\n", ("unknown key 'seed_hod'",)),
    "out_of_range.toml": ("margin_um = -5\n", ("margin_um", ">= 0")),
    "wrong_type.toml": ("margin_um = \"wide\"\n", ("margin_um", "expected a number")),
    "infinite.toml": ("[nucleus_counter]\nseed_h_od = 1e400\n", ("seed_h_od", "finite")),
    "tiling_range.yaml": ("tiling:\n  tile_px: 99999\n", ("tile_px",)),
    "unsafe_yaml.yaml": ("!!python/object/apply:os.system ['touch pwned']\n", ("cannot parse",)),
    "not_toml.toml": ("margin_um = = 3\n", ("cannot parse",)),
}


@pytest.mark.parametrize("case", list(PARAMS))
def test_bad_params_file(case, ws):
    text, words = PARAMS[case]
    p = ws.inp / case
    p.write_text(text)
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), "--out", str(ws.out), "--model",
                      str(ws.shared["model"]), "--params", str(p), "--device", "cpu"])
    assert rc == 2, err
    assert len(stderr_lines(err)) == 1, err
    one_reason(err, str(p), *words)
    assert not ws.out.exists() and not (ws.root / "pwned").exists()


@pytest.mark.parametrize("argv, words", [
    (["--mpp-override", "1000"], ("--mpp-override", "outside 0.05-20")),
    (["--mpp-override", "nan"], ("--mpp-override",)),
    (["--batch-size", "0"], ("--batch-size",)),
    (["--counter", "maybe"], ("--counter",)),
    (["--mpp", "0.25"], ("does not fit",)),
])
def test_bad_run_options(argv, words, ws):
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), "--out", str(ws.out), "--model",
                      str(ws.shared["model"]), "--device", "cpu", *argv])
    assert rc == 2, err
    assert len(stderr_lines(err)) == 1, err
    for w in words:
        assert w in err
    assert not ws.out.exists()


def test_out_is_a_file(ws):
    (ws.root / "afile").write_text("keep me")
    rc, err = ws.run(["-q", "run", str(ws.shared["S1"]), "--out", str(ws.root / "afile"), "--model",
                      str(ws.shared["model"]), "--device", "cpu"])
    assert rc == 2 and len(stderr_lines(err)) == 1, err
    one_reason(err, "afile", "not a folder")
    assert (ws.root / "afile").read_text() == "keep me"


def test_missing_slide_is_usage_error(ws):
    rc, err = ws.run(["-q", "run", str(ws.inp / "nope.svs"), "--out", str(ws.out), "--model",
                      str(ws.shared["model"])])
    assert rc == 2 and len(stderr_lines(err)) == 1
    one_reason(err, "nope.svs", "no such file")


# --- training -----------------------------------------------------------------------------

def test_train_bad_labels(ws):
    """`train` on a non-UTF-8 labels CSV and on a slide with a malformed GeoJSON beside it."""
    csvp = ws.inp / "labels.csv"
    csvp.write_bytes(b"path,label\n\xff\xfe.png,tumor\n")
    rc, err = ws.run(["-q", "train", str(csvp), "--out", str(ws.out), "--epochs", "1",
                      "--no-pretrained", "--device", "cpu"])
    assert rc == 2, err
    assert len(stderr_lines(err)) == 1, err
    one_reason(err, str(csvp), "not UTF-8")
    sdir = ws.inp / "annotated"
    sdir.mkdir()
    shutil.copy(ws.shared["S1"], sdir / "S1.tif")
    (sdir / "S1.geojson").write_text('{"type": "FeatureCollection", "features": [{')
    rc, err = ws.run(["-q", "train", str(sdir), "--out", str(ws.out), "--epochs", "1",
                      "--no-pretrained", "--device", "cpu"])
    assert rc in (1, 2), err
    one_reason(err, str(sdir / "S1.geojson"), "not valid JSON")
