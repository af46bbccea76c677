"""docs/output-schema.md against what the code writes, both ways.

Every column, array and attribute the code writes is documented, and everything documented
is written, with the documented type.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from test_api import TILING, make_slide, tiny_model

import tmequant as tq

DOC = Path(__file__).resolve().parents[1] / "docs" / "output-schema.md"
MODEL = "api-schema"


# --- reading the document ------------------------------------------------------------------------

def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(heading + "\n")
    nxt = re.compile(rf"^#{{1,{level}}} ", re.MULTILINE).search(text, start + len(heading) + 1)
    return text[start: nxt.start() if nxt else len(text)]


def _rows(section: str) -> list[list[str]]:
    """Cells of every table row whose first cell is `code` (header and rule lines skipped)."""
    out = []
    for line in section.splitlines():
        if line.startswith("| `"):
            out.append([c.strip() for c in line.strip().strip("|").split("|")])
    return out


def _name(cell: str) -> str:
    m = re.fullmatch(r"`([^`]+)`", cell)
    assert m, f"not a `name` cell: {cell!r}"
    return m.group(1)


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def _doc_columns(text: str, heading: str) -> dict[str, str]:
    cols: dict[str, str] = {}
    for cells in _rows(_section(text, heading)):
        name = _name(cells[0])
        assert name not in cols, f"{name} documented twice"
        cols[name] = cells[1]
    return cols


# --- what the code writes ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    """A real store: tiles, predictions of a model with a count head, nuclei counts."""
    tmp = tmp_path_factory.mktemp("schema")
    slide = make_slide(tmp / "schema-slide.svs")
    tiled = tq.tile_slide(slide, tmp / "out", tq.TilingParams(**TILING), progress=False, qc_png=False)
    tq.predict_store(tiled.store_path, tiny_model(MODEL, count_head=True), device="cpu",
                     num_workers=0, progress=False)
    tq.count_nuclei(tiled.store_path, progress=False)
    return tiled.store_path


@pytest.fixture(scope="module")
def store_with_cells(store_path, tmp_path_factory) -> str:
    """A copy of the store whose predictions also hold cells, as a cell detector writes them."""
    import shutil

    from tmequant.store import SlideStore

    path = str(tmp_path_factory.mktemp("schema-cells") / "cells.zarr")
    shutil.copytree(store_path, path)
    with SlideStore.open(path, "r+") as st:
        n_chunks = st.prediction_state(MODEL).n_chunks
        st.create_cells(MODEL, ["lymphocyte", "tumor"], n_chunks)
        for c in range(n_chunks):
            st.write_cells(MODEL, c, x=[1.0], y=[2.0], cls=[1], score=[0.5], tile=[0])
    return path


def _tls_grid() -> tq.TileGrid:
    """A 4 x 4 mm tumour with a dense lymphoid aggregate 300 um off its edge: one TLS."""
    rows, cols = np.divmod(np.arange(40 * 40), 40)
    tumor = (rows >= 5) & (rows < 25) & (cols >= 5) & (cols < 25)
    blob = (rows >= 28) & (rows < 31) & (cols >= 10) & (cols < 13)
    df = pd.DataFrame({
        "row": rows, "col": cols,
        "tumor": np.where(tumor, 0.9, 0.0), "stroma": np.where(tumor | blob, 0.1, 1.0),
        "immune": np.where(blob, 0.9, 0.0), "lymphocyte_count": np.where(blob, 50.0, 1.0)})
    return tq.TileGrid.from_table(df, tile_um=100.0, slide_mpp_um=0.5, metadata={"slide_id": "tls"})


def _param_columns() -> dict[str, type]:
    p = tq.BiomarkerParams()
    return {f"param_{f.name}": type(getattr(p, f.name)) for f in dataclasses.fields(p)}


_PY_TYPES = {"float": float, "int": int, "str": str, "bool": bool, "dict": dict, "list": list}


def _check_value(where: str, value: object, documented: str) -> None:
    nullable = documented.endswith("?")
    kind = documented.rstrip("?")
    if value is None:
        assert nullable, f"{where} is None but documented as {documented!r}"
        return
    want = _PY_TYPES[kind]
    ok = isinstance(value, want) and not (want in (int, float) and isinstance(value, bool))
    assert ok, f"{where} = {value!r} ({type(value).__name__}), documented {documented!r}"


# --- the biomarker table -------------------------------------------------------------------------

def _biomarker_doc(doc: str) -> dict[str, str]:
    cols = _doc_columns(doc, "## Biomarker table")
    assert "param_<name>" in cols
    del cols["param_<name>"]
    return cols


def _check_row(row: dict, documented: dict[str, str], label: str) -> None:
    params = _param_columns()
    written = {k for k in row if k not in params}
    assert written - set(documented) == set(), f"{label}: undocumented columns"
    assert set(documented) - written == set(), f"{label}: documented columns not written"
    assert {k for k in row if k.startswith("param_")} == set(params)
    for k, v in row.items():
        if k in params:
            assert isinstance(v, params[k]), f"{label}: {k} = {v!r}"
        else:
            _check_value(f"{label}: {k}", v, documented[k])


def test_biomarker_row_of_a_store_matches_the_docs(doc, store_path):
    cells = pd.DataFrame({"x": [5.0, 300.0, 400.0], "y": [5.0, 300.0, 420.0],
                          "class": ["lymphocyte", "tumor", "fibroblast"]})
    res = tq.biomarkers_for_store(store_path, MODEL, cells=cells)
    assert res.row["count_source"] == "cell_table"
    _check_row(res.row, _biomarker_doc(doc), "biomarkers_for_store")
    plain = tq.biomarkers_for_store(store_path, MODEL)  # counts from the model's count head
    assert plain.row["count_source"] == "model" and plain.row["n_cells"] is None
    _check_row(plain.row, _biomarker_doc(doc), "biomarkers_for_store, no cells")


def test_biomarker_row_of_a_callers_grid_matches_the_docs(doc):
    documented = _biomarker_doc(doc)
    # compute_biomarkers has no file to name: only biomarkers_for_store adds cell_table_path
    documented.pop("cell_table_path")
    res = tq.compute_biomarkers(_tls_grid())
    assert res.row["tls_count"] == 1
    _check_row(res.row, documented, "compute_biomarkers")


def test_tls_table_matches_the_docs(doc):
    documented = _doc_columns(doc, "## TLS table")
    tls = tq.compute_biomarkers(_tls_grid()).tls
    assert len(tls) == 1
    assert list(tls.columns) == list(documented)  # the documented order is the written order
    for col, kind in documented.items():
        dtype = tls[col].dtype
        kind = kind.rstrip("?")
        if kind == "int":
            assert pd.api.types.is_integer_dtype(dtype), (col, dtype)
        elif kind == "float":
            assert pd.api.types.is_float_dtype(dtype), (col, dtype)
        else:
            assert all(isinstance(v, str) for v in tls[col]), (col, list(tls[col]))
    empty = tq.compute_biomarkers(tq.TileGrid.from_table(
        pd.DataFrame({"row": [0], "col": [0], "stroma": [1.0]}), tile_um=100.0, slide_mpp_um=0.5)).tls
    assert len(empty) == 0 and list(empty.columns) == list(documented)


# --- the store -----------------------------------------------------------------------------------

def _norm(path: str) -> str:
    path = re.sub(r"/cells/c\d{6}(/|$)", r"/cells/c<chunk>\1", path)
    return path.replace(f"predictions/{MODEL}", "predictions/<model_name>")


def _walk(group: zarr.Group, prefix: str = ""):
    yield prefix, group
    for name, child in group.members():
        yield from _walk(child, f"{prefix}{name}/") if isinstance(child, zarr.Group) else \
            [(f"{prefix}{name}", child)]


def test_store_version_matches_the_docs(doc):
    from tmequant.tiling.store import STORE_SCHEMA_VERSION

    m = re.match(r"# Output schema, version (\d+)", doc)
    assert m and int(m.group(1)) == STORE_SCHEMA_VERSION


def test_store_layout_matches_the_docs(doc, store_with_cells):
    root = zarr.open_group(store_with_cells, mode="r")
    arrays = {_norm(p): a for p, a in _walk(root) if isinstance(a, zarr.Array)}
    groups = {_norm(p.rstrip("/")): g for p, g in _walk(root) if isinstance(g, zarr.Group)}

    # root attributes, and their types
    documented = {_name(c[0]): c[1] for c in _rows(_section(doc, "### Root attributes"))}
    assert set(root.attrs) == set(documented), (set(root.attrs) ^ set(documented))
    for key, kind in documented.items():
        _check_value(f"root attribute {key}", root.attrs[key], kind)
    assert root.attrs["schema_version"] == 1

    # arrays: paths, dtypes, number of dimensions, attribute keys
    doc_arrays = {_name(c[0]): c for c in _rows(_section(doc, "### Arrays"))}
    assert set(arrays) == set(doc_arrays), set(arrays) ^ set(doc_arrays)
    for path, cells in doc_arrays.items():
        arr = arrays[path]
        shape, dtype, attrs = cells[1], cells[2], cells[3]
        assert str(arr.dtype) == dtype, (path, arr.dtype, dtype)
        assert arr.ndim == shape.count(",") + 1 - shape.endswith(",)"), (path, arr.shape, shape)
        assert set(arr.attrs) == set(re.findall(r"`([^`]+)`", attrs)), (path, dict(arr.attrs))

    # group attributes (the root's are above); groups without a row carry none
    doc_groups: dict[str, dict[str, str]] = {}
    for cells in _rows(_section(doc, "### Group attributes")):
        doc_groups.setdefault(_name(cells[0]), {})[_name(cells[1])] = cells[2]
    for path, group in groups.items():
        if path == "":
            continue
        want = doc_groups.get(path, {})
        assert set(group.attrs) == set(want), (path, set(group.attrs) ^ set(want))
        for key, kind in want.items():
            _check_value(f"{path} attribute {key}", group.attrs[key], kind)
    assert set(doc_groups) <= set(groups), set(doc_groups) - set(groups)


@pytest.mark.slow
def test_written_tables_of_a_run_match_the_docs(doc, tmp_path):
    """``tmequant run``'s cohort.csv and tls.csv headers are the documented columns."""
    slide = make_slide(tmp_path / "run-slide.svs", size_px=1024)
    run = tq.run_batch([slide], tmp_path / "run", "random-efficientnet_lite0", device="cpu",
                       progress=False)
    assert not run.failures, run.failures
    cohort = pd.read_csv(run.cohort_csv)
    cohort_only = _doc_columns(doc, "## Cohort table")
    assert set(cohort.columns) == set(_biomarker_doc(doc)) | set(cohort_only) | set(_param_columns())
    assert cohort.columns[0] == "slide_id"
    tls = pd.read_csv(run.tls_csv)
    assert list(tls.columns) == list(_doc_columns(doc, "## TLS table"))
