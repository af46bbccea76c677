"""The CLI verbs are thin: each writes exactly the files its library function writes.

Each verb runs through the CLI entry point (``tmequant.cli.main``), and the library call a
Python user would make runs on the same inputs; the two output folders must hold the same
files, byte for byte. The one field that may differ is ``run.json``'s ``started`` (the time
the run began); it is compared with that field removed.

- ``tmequant biomarkers``  <-> ``tmequant.write_biomarker_tables``
- ``tmequant predict``     <-> ``tmequant.expand_stores`` + ``predict_store`` + ``count_nuclei``
- ``tmequant run``         <-> ``tmequant.resolve_tiling_params`` + ``run_batch``
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from test_biomarkers_cli import write_store
from test_inference import make_store, tiny_card
from test_run_helpers import write_model, write_slides

import tmequant as tq
from tmequant.cli import main
from tmequant.params import biomarker_params_from_file, nucleus_counter_params_from_file

TIMED_FIELDS = {"run.json": ("started",)}  # file -> fields that carry the time of the run


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            rel = p.relative_to(root).as_posix()
            data = p.read_bytes()
            if rel in TIMED_FIELDS:
                obj = json.loads(data)
                for key in TIMED_FIELDS[rel]:
                    assert key in obj, (rel, key)
                    obj.pop(key)
                data = json.dumps(obj, sort_keys=True).encode()
            out[rel] = data
    return out


def assert_same_files(cli: Path, lib: Path) -> dict[str, bytes]:
    a, b = _files(cli), _files(lib)
    assert sorted(a) == sorted(b), "the CLI and the library wrote different files"
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, f"files differ between the CLI and the library: {differ}"
    return a


def test_biomarkers_verb_writes_what_write_biomarker_tables_writes(tmp_path: Path):
    s1 = write_store(tmp_path / "stores" / "s1.zarr", "s1")
    write_store(tmp_path / "stores" / "s2.zarr", "s2", nuclei=False)
    cells = tmp_path / "cells"
    cells.mkdir()  # a table for s1 only: s2 fails (failures.csv), s1 counts from its cells
    pd.DataFrame({"x": [448.0 * 15.5, 448.0 * 12.5], "y": [448.0 * 15.5, 448.0 * 20.5],
                  "class": ["Lymphocyte", "Tumor"]}).to_csv(cells / "s1.csv", index=False)
    params = tmp_path / "p.toml"
    params.write_text("[biomarkers]\ntls_min_density_per_mm2 = 2500\n")
    missing = tmp_path / "stores" / "missing.zarr"

    rc = main(["-q", "biomarkers", str(tmp_path / "stores"), str(missing), "--model", "toy",
               "--cells", str(cells), "--params", str(params), "--margin-um", "400",
               "--out", str(tmp_path / "cli")])
    bp = biomarker_params_from_file(params, {"margin_um": 400})
    batch = tq.write_biomarker_tables([tmp_path / "stores", missing], tmp_path / "lib", "toy",
                                      cells=cells, params=bp)

    assert rc == 1 and len(batch.results) == 1 and len(batch.failures) == 2
    files = assert_same_files(tmp_path / "cli", tmp_path / "lib")
    assert {"biomarkers.csv", "biomarkers.parquet", "tls.csv", "biomarker_params.json",
            "failures.csv", "s1.geojson.zip"} == set(files)
    assert b"no cell table for slide 's2'" in files["failures.csv"]
    s2 = tmp_path / "stores" / "s2.zarr"
    assert tq.expand_stores([tmp_path / "stores"]) == [str(s1), str(s2)]


def test_predict_verb_writes_what_the_library_writes(tmp_path: Path):
    import torch

    from tmequant.models import create_model, save_model

    torch.manual_seed(0)
    card = tiny_card()
    model = save_model(tmp_path / "model", create_model(card), card)
    for name, n in (("a", 20), ("b", 9)):
        make_store(tmp_path / "cli" / f"{name}.zarr", n, seed=n)
    shutil.copytree(tmp_path / "cli", tmp_path / "lib")

    rc = main(["-q", "predict", str(tmp_path / "cli"), "--model", str(model), "--device", "cpu",
               "--workers", "0"])
    loaded = tq.load_model(model, device="cpu")
    for store in tq.expand_stores([tmp_path / "lib"]):
        tq.predict_store(store, loaded, device="cpu", num_workers=0, progress=False)
        tq.count_nuclei(store, nucleus_counter_params_from_file(None), progress=False)

    assert rc == 0
    files = assert_same_files(tmp_path / "cli", tmp_path / "lib")
    assert any("/predictions/tiny/" in k for k in files) and any("/nuclei/" in k for k in files)


@pytest.mark.slow
def test_run_verb_writes_what_run_batch_writes(tmp_path: Path):
    from tmequant.report.qc import qc_params_from_file

    slides = write_slides(tmp_path / "slides")
    model = write_model(tmp_path / "model")
    params = tmp_path / "p.toml"
    params.write_text("[tiling]\nmin_tissue_fraction = 0.3\n\n[biomarkers]\nmargin_um = 300\n")
    todo = [slides["S1"], slides["BAD"]]

    rc = main(["-q", "run", *map(str, todo), "--out", str(tmp_path / "cli"), "--model", str(model),
               "--params", str(params), "--tile-px", "64", "--workers", "1", "--device", "cpu"])
    card = tq.load_model(model, device="cpu").card
    tiling = tq.resolve_tiling_params(card, params, {"target_mpp_um": None, "tile_px": 64})
    res = tq.run_batch(todo, tmp_path / "lib", model, tiling=tiling,
                       params=biomarker_params_from_file(params),
                       counter=nucleus_counter_params_from_file(params), workers=1, device="cpu",
                       progress=False, qc=qc_params_from_file(params))

    assert rc == 1 and [f.item_id for f in res.failures] == ["BAD"]
    assert tiling.min_tissue_fraction == 0.3 and tiling.tile_px == 64
    files = assert_same_files(tmp_path / "cli", tmp_path / "lib")
    assert {"cohort.csv", "report.html", "failures.csv", "results/S1/done.json"} <= set(files)
