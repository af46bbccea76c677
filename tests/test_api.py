"""The public API (``import tmequant as tq``): surface, laziness, in-memory biomarkers, fsspec stores.

The helpers at the top (a tiny synthetic slide, a tiny untrained model) are shared with
tests/test_schema.py.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import subprocess
import sys
import types
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import tmequant as tq

ERRORS = ("TmequantError", "InputError", "SlideError", "StoreError", "ModelError", "ParamsError",
          "CellTableError")
TILING = {"target_mpp_um": 1.0, "tile_px": 64}  # 64 um tiles: a dozen on the tiny slide


# --- shared helpers ------------------------------------------------------------------------------

def make_slide(path: Path, size_px: int = 768, mpp_um: float = 0.5, seed: int = 0) -> Path:
    """A pyramidal SVS: white glass, a pink tissue square with dark round 'nuclei' in it."""
    from tmequant.wsi.write import write_pyramid_tiff

    rng = np.random.default_rng(seed)
    img = np.full((size_px, size_px, 3), 240, np.uint8)
    a, b = size_px // 6, size_px - size_px // 6
    tissue = np.array([215, 140, 185], np.int16) + rng.integers(-12, 12, (b - a, b - a, 3))
    img[a:b, a:b] = np.clip(tissue, 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[-5:6, -5:6]
    disk = yy**2 + xx**2 <= 16  # ~4 px = 2 um radius at 0.5 um/px: lymphocyte-sized
    for y, x in rng.integers(a + 8, b - 8, (150, 2)):
        img[y - 5:y + 6, x - 5:x + 6][disk] = (60, 30, 110)
    return write_pyramid_tiff(path, img, mpp_um=mpp_um)


def tiny_model(name: str = "api-tiny", count_head: bool = False) -> tq.LoadedModel:
    """An untrained efficientnet_lite0 for 64 px tiles at 1 um/px, one tissue class per role."""
    from tmequant.models import create_model
    from tmequant.roles import CELL_ROLES, TISSUE_ROLES

    cells = list(CELL_ROLES) if count_head else []
    card = tq.ModelCard(name=name, arch="efficientnet_lite0", tile_px=64, mpp_um=1.0,
                        tissue_classes=list(TISSUE_ROLES), tissue_roles={r: r for r in TISSUE_ROLES},
                        cell_classes=cells, cell_roles={c: c for c in cells})
    return tq.LoadedModel(model=create_model(card, pretrained=False).eval(), card=card, source="in-memory")


def run_py(code: str) -> str:
    """Run ``code`` in a fresh interpreter; return its stdout (fails on a non-zero exit)."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# --- the surface ---------------------------------------------------------------------------------

def test_all_names_resolve_to_documented_objects():
    assert len(set(tq.__all__)) == len(tq.__all__), "duplicate names in __all__"
    for name in tq.__all__:
        obj = getattr(tq, name)
        if name == "__version__":
            assert isinstance(obj, str) and obj
            continue
        assert inspect.isclass(obj) or callable(obj), name
        assert (obj.__doc__ or "").strip(), f"tmequant.{name} has no docstring"
    for name in ERRORS:
        assert issubclass(getattr(tq, name), tq.TmequantError)
    assert tq.count_nuclei.__name__ == "count_store"  # the counter's store-level entry point


def test_dir_is_exactly_all_plus_dunders():
    public = [n for n in dir(tq) if not (n.startswith("__") and n.endswith("__"))]
    assert sorted(public) == sorted(n for n in tq.__all__ if n != "__version__")
    # nothing else public in the namespace: only the API and the package's own submodules
    for name, value in vars(tq).items():
        if name.startswith("_"):
            continue
        assert name in tq.__all__ or (isinstance(value, types.ModuleType)
                                      and value.__name__ == f"tmequant.{name}"), name


def test_star_import_and_unknown_names():
    ns: dict[str, object] = {}
    exec("from tmequant import *", ns)  # noqa: S102 - the star import under test
    assert set(ns) - {"__builtins__"} == set(tq.__all__)
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        tq.not_a_name  # noqa: B018
    with pytest.raises(ImportError):
        exec("from tmequant import _LAZY_NOT_THERE", {})  # noqa: S102


def test_long_calls_take_a_progress_switch():
    for fn in (tq.tile_slide, tq.predict_store, tq.count_nuclei, tq.run_batch, tq.evaluate):
        assert "progress" in inspect.signature(fn).parameters, fn.__name__
    assert "progress" in {f.name for f in dataclasses.fields(tq.TrainConfig)}


def test_cli_verbs_call_the_public_functions():
    """Each verb is a thin wrapper: its body calls the matching public function."""
    from tmequant.cli import app

    expected = {"tile": "tile_slide", "predict": "predict_store", "biomarkers": "write_biomarker_tables",
                "run": "run_batch", "train": "train", "evaluate": "evaluate", "demo": "run_demo",
                "models list": "list_models", "models show": "get_card",
                "models import": "import_state_dict"}
    verbs = {c.name: c.callback for c in app.registered_commands}
    for group in app.registered_groups:
        verbs.update({f"{group.name} {c.name}": c.callback
                      for c in group.typer_instance.registered_commands})
    assert {"tile", "predict", "biomarkers", "models list"} <= set(verbs)
    for verb, fn in expected.items():
        if verb not in verbs:  # a verb still being written is checked once it is registered
            continue
        src = inspect.getsource(verbs[verb])
        assert f"{fn}(" in src, f"`tmequant {verb}` does not call tmequant.{fn}"


# --- no side effects on import -------------------------------------------------------------------

def test_import_is_lazy_and_changes_no_global_state():
    out = run_py("""
import json, logging, sys, warnings
filters, handlers = list(warnings.filters), list(logging.getLogger().handlers)
import tmequant
heavy = sorted(m for m in ("torch", "timm", "zarr", "pandas", "scipy", "matplotlib", "dask")
               if m in sys.modules)
print(json.dumps({"heavy": heavy, "filters": warnings.filters == filters,
                  "handlers": logging.getLogger().handlers == handlers,
                  "tq_handlers": len(logging.getLogger("tmequant").handlers)}))
""")
    got = json.loads(out.strip().splitlines()[-1])
    assert got == {"heavy": [], "filters": True, "handlers": True, "tq_handlers": 0}


def test_loading_every_name_changes_no_global_state():
    """Resolve the whole API (importing every module behind it): nothing global changes.

    Third-party dependencies that add warning filters of their own on import (scipy, numcodecs)
    are imported before the snapshot, so only tmequant's own effects are seen.
    """
    out = run_py("""
import json, logging, sys, warnings
import numpy as np, torch
import scipy.special, scipy.ndimage, zarr, numcodecs, pandas, skimage, timm, torchvision, PIL.Image
import matplotlib
def state():
    root = logging.getLogger()
    return {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
            "filters": repr(warnings.filters), "root_handlers": repr(root.handlers),
            "root_level": root.level, "tq_handlers": repr(logging.getLogger("tmequant").handlers),
            "np_err": repr(np.geterr()), "dtype": repr(torch.get_default_dtype()),
            "grad": torch.is_grad_enabled(), "backend": matplotlib.get_backend(),
            "np_print": repr(np.get_printoptions())}
before = state()
import tmequant
for name in tmequant.__all__:
    getattr(tmequant, name)
after = state()
print(json.dumps({k: [before[k], after[k]] for k in before if before[k] != after[k]}))
""")
    assert json.loads(out.strip().splitlines()[-1]) == {}


# --- biomarkers on a caller's own predictions: no store, no model --------------------------------

def _square_table(n: int = 30, lo: int = 5, hi: int = 25) -> tuple[pd.DataFrame, np.ndarray]:
    rows, cols = np.divmod(np.arange(n * n), n)
    inside = (rows >= lo) & (rows < hi) & (cols >= lo) & (cols < hi)
    df = pd.DataFrame({"row": rows, "col": cols,
                       "tumor": np.where(inside, 0.9, 0.05), "stroma": np.where(inside, 0.1, 0.95),
                       "lymphocyte_count": np.where(inside, 1.0, 4.0)})
    return df, inside


def test_own_predictions_give_biomarkers_without_store_or_model():
    df, inside = _square_table()
    grid = tq.TileGrid.from_table(df, tile_um=100.0, slide_mpp_um=0.5, metadata={"slide_id": "mine"})
    res = tq.compute_biomarkers(grid)
    row = res.row
    assert isinstance(res, tq.BiomarkerResult)
    assert row["slide_id"] == "mine" and row["store_path"] is None and row["model_name"] is None
    assert row["count_source"] == "model" and row["n_tiles"] == 900
    # every tumour tile holds 1 lymphocyte on 0.01 mm^2: 100 / mm^2 whatever the bulk's shape
    assert row["til_density_intratumoral_per_mm2"] == pytest.approx(100.0)
    assert row["tumor_area_mm2"] == pytest.approx(0.9 * 4.0 + 0.05 * 5.0)  # expected areas
    assert row["lymphocytes_total"] == pytest.approx(inside.sum() * 1 + (~inside).sum() * 4)
    assert res.lymphocyte_density_per_mm2.shape == (900,)
    assert list(res.tls.columns[:2]) == ["slide_id", "tls_id"]

    # the same tiles given as x, y corners (level-0 px) and named classes
    alt = df.rename(columns={"tumor": "TUM", "stroma": "STR"})
    alt["x"], alt["y"] = alt.pop("col") * 200, alt.pop("row") * 200
    g2 = tq.TileGrid.from_table(alt, tile_um=100.0, slide_mpp_um=0.5,
                                class_roles={"TUM": "tumor", "STR": "stroma"})
    r2 = tq.compute_biomarkers(g2).row
    for key in ("til_density_intratumoral_per_mm2", "bulk_area_mm2", "stil_score_pct"):
        assert r2[key] == pytest.approx(row[key], nan_ok=True)


def test_own_cell_table_overrides_counts():
    df, inside = _square_table()
    grid = tq.TileGrid.from_table(df.drop(columns="lymphocyte_count"), tile_um=100.0, slide_mpp_um=0.5)
    assert tq.compute_biomarkers(grid).row["count_source"] == "area_estimate"
    rows, cols = np.divmod(np.arange(900), 30)
    # 3 lymphocytes at the centre of every tumour tile, 1 tumour cell elsewhere
    xy = np.column_stack([cols * 200 + 100, rows * 200 + 100]).astype(float)
    cells = pd.DataFrame({"x": np.repeat(xy[inside, 0], 3), "y": np.repeat(xy[inside, 1], 3),
                          "class": "lymphocyte"})
    cells = pd.concat([cells, pd.DataFrame({"x": xy[~inside, 0], "y": xy[~inside, 1],
                                            "class": "Tumor"})], ignore_index=True)
    res = tq.compute_biomarkers(grid, cells=cells, params=tq.BiomarkerParams(cell_compartments=False))
    assert res.row["count_source"] == "cell_table"
    assert res.row["n_cells"] == len(cells) and res.row["n_cells_outside_tiles"] == 0
    assert res.row["til_density_intratumoral_per_mm2"] == pytest.approx(300.0)


def test_in_memory_biomarkers_never_import_torch():
    out = run_py("""
import sys, numpy as np, pandas as pd, tmequant as tq
df = pd.DataFrame({"row": [0, 0, 1, 1], "col": [0, 1, 0, 1], "tumor": [1.0, 1, 0, 0],
                   "stroma": [0.0, 0, 1, 1], "lymphocyte_count": [1.0, 2, 3, 4]})
res = tq.compute_biomarkers(tq.TileGrid.from_table(df, tile_um=100.0, slide_mpp_um=0.5))
print(res.row["lymphocytes_total"], "torch" in sys.modules)
""")
    assert out.split() == ["10.0", "False"]


# --- a store on an fsspec path: tile -> predict -> count -> biomarkers in memory ----------------

@pytest.fixture()
def memory_root():
    import fsspec

    root = f"memory://tmequant-api-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


def test_memory_store_chain(tmp_path, monkeypatch, memory_root, capfd):
    import fsspec

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    slide = make_slide(tmp_path / "s1.svs")
    # Log records are not prints: a CLI test (or, with no handler anywhere, Python's
    # last-resort handler) would write them to stderr, depending on what ran before. Only a
    # NullHandler here (conftest restores the logger after the test): this test is about prints.
    import logging

    tq_log = logging.getLogger("tmequant")
    tq_log.handlers[:] = [logging.NullHandler()]
    tq_log.propagate = False
    capfd.readouterr()
    tiled = tq.tile_slide(slide, f"{memory_root}/out", tq.TilingParams(**TILING), progress=False)
    assert tiled.store_path == f"{memory_root}/out/s1.zarr" and tiled.n_tiles > 4
    model = tiny_model()
    pred = tq.predict_store(tiled.store_path, model, device="cpu", progress=False)
    assert pred.n_computed == tiled.n_tiles
    counted = tq.count_nuclei(tiled.store_path, progress=False,
                              cells_out=f"{memory_root}/out/s1.cells.parquet")
    assert counted.computed and counted.counts is not None
    assert counted.counts.shape == (tiled.n_tiles, 2) and counted.counts.sum() > 0
    res = tq.biomarkers_for_store(tiled.store_path)  # the store's only predictions
    row = res.row
    assert row["store_path"] == tiled.store_path and row["model_name"] == "api-tiny"
    assert row["count_source"] == "nucleus_counter"  # no count head: the counter's counts
    assert row["lymphocytes_total"] == pytest.approx(float(counted.counts[:, 0].sum()), rel=1e-5)
    assert row["cell_table_path"] is None and row["n_tiles"] == tiled.n_tiles

    fs = fsspec.filesystem("memory")
    root = memory_root.removeprefix("memory://")
    assert fs.exists(f"{root}/out/s1.zarr/zarr.json") and fs.exists(f"{root}/out/s1.qc.png")
    cells = pd.read_parquet(f"{memory_root}/out/s1.cells.parquet")
    assert len(cells) == counted.n_cells
    # a cell table read back from the in-memory file drives the same store's biomarkers
    via_cells = tq.biomarkers_for_store(tq.SlideStore(tiled.store_path), "api-tiny",
                                        cells=cells[["x", "y", "class"]])
    assert via_cells.row["count_source"] == "cell_table"
    assert via_cells.row["lymphocytes_total"] == pytest.approx(row["lymphocytes_total"], abs=1.0)
    # reruns reuse the finished groups
    assert tq.tile_slide(slide, f"{memory_root}/out", tq.TilingParams(**TILING), progress=False).reused
    assert tq.predict_store(tiled.store_path, model, device="cpu", progress=False).skipped
    assert not tq.count_nuclei(tiled.store_path, progress=False,
                               cells_out=f"{memory_root}/out/s1.cells.parquet").computed
    # nothing on the local disk but the slide; nothing printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s1.svs"]
    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == "", captured


def test_biomarkers_for_store_names_the_choice(tmp_path):
    slide = make_slide(tmp_path / "s2.svs")
    tiled = tq.tile_slide(slide, tmp_path / "out", tq.TilingParams(**TILING), progress=False,
                          qc_png=False)
    with pytest.raises(tq.StoreError, match="finished predictions: none"):
        tq.biomarkers_for_store(tiled.store_path)
    for name in ("api-a", "api-b"):
        tq.predict_store(tiled.store_path, tiny_model(name), device="cpu", num_workers=0,
                         progress=False)
    with pytest.raises(tq.StoreError, match="api-a, api-b"):
        tq.biomarkers_for_store(tiled.store_path)
    cells = tmp_path / "cells.csv"
    pd.DataFrame({"x": [10.0, 200.0], "y": [10.0, 200.0], "class": ["lymphocyte", "tumor"]}).to_csv(cells, index=False)
    res = tq.biomarkers_for_store(tiled.store_path, "api-b", cells=cells)
    assert res.row["model_name"] == "api-b" and res.row["cell_table_path"] == str(cells)
    assert res.row["count_source"] == "cell_table" and res.row["n_cells"] == 2


def test_progress_is_switchable(tmp_path, caplog):
    """Off a terminal, progress is log lines on the 'tmequant' logger; progress=False: none."""
    import logging
    import re

    slide = make_slide(tmp_path / "s3.svs")
    bar_line = re.compile(r": \d+/\d+ tiles \(")
    caplog.set_level(logging.INFO, logger="tmequant")
    for enabled, out in ((False, "off"), (True, "on")):
        caplog.clear()
        tq.tile_slide(slide, tmp_path / out, tq.TilingParams(**TILING), progress=enabled, qc_png=False)
        lines = [r.getMessage() for r in caplog.records if bar_line.search(r.getMessage())]
        assert bool(lines) is enabled, lines
        assert all(r.name == "tmequant" for r in caplog.records)


def test_a_bad_tile_table_is_a_one_line_input_error():
    with pytest.raises(tq.InputError, match="row/col or x/y"):
        tq.TileGrid.from_table(pd.DataFrame({"tumor": [1.0]}), tile_um=100.0, slide_mpp_um=0.5)
    with pytest.raises(tq.InputError, match="no role columns"):
        tq.TileGrid.from_table(pd.DataFrame({"row": [0], "col": [0], "TUM": [1.0]}),
                               tile_um=100.0, slide_mpp_um=0.5)
    with pytest.raises(tq.InputError, match="duplicate"):
        tq.TileGrid.from_table(pd.DataFrame({"row": [0, 0], "col": [1, 1], "tumor": [1.0, 1.0]}),
                               tile_um=100.0, slide_mpp_um=0.5)
    with pytest.raises(tq.InputError) as info:
        tq.TileGrid.from_table(pd.DataFrame({"row": [0], "col": [0], "tumor": [1.0]}),
                               tile_um=-1.0, slide_mpp_um=0.5)
    assert "\n" not in str(info.value)
