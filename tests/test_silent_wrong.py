"""Issue 16, "nothing silently wrong": each defect found by the adversarial pass, through the
CLI or the API. Every test here failed on the code before the fix (the reason is in its
docstring)."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_biomarkers_cli import write_store
from test_run_helpers import write_model, write_slides

from tmequant import provenance
from tmequant.biomarkers import TileGrid, compute_biomarkers
from tmequant.biomarkers.cells import read_cell_table
from tmequant.cli import main
from tmequant.errors import CellTableError, InputError, StoreError
from tmequant.inputs import expand_slides, parse_mpp, read_manifest

ROLES = ("tumor", "stroma", "immune", "background")


def one_line(err: str, *words: str) -> None:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if all(w in ln for w in words)]
    assert lines, f"no line with {words} in:\n{err}"


# --- 1. stale results: content fingerprints ---------------------------------------------------
def _edit_middle(p: Path, keep_mtime: bool = False) -> None:
    """Flip one byte in the middle of ``p`` (same size)."""
    st_ = p.stat()
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    if keep_mtime:
        os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))


def test_fingerprint_sees_a_same_size_edit_in_the_middle(tmp_path: Path):
    """Old fingerprint: first and last MiB only, so a 5 MiB file edited in its middle kept it."""
    p = tmp_path / "cells.csv"
    p.write_bytes(np.random.default_rng(0).integers(0, 255, 5 << 20, dtype=np.uint8).tobytes())
    before = provenance.file_fingerprint(p)
    assert before["mode"] == "full"
    _edit_middle(p, keep_mtime=True)  # whole-file hash: even a restored mtime is seen
    assert provenance.file_fingerprint(p)["sha256_head_tail"] != before["sha256_head_tail"]


def test_sampled_fingerprint_of_large_files_and_its_limit(tmp_path: Path, monkeypatch):
    """Large files: size + mtime + 256 sampled blocks. A same-size edit is seen through the mtime
    (and through a sampled block even with the mtime restored); the documented miss is an
    edit outside every sampled block with the mtime put back."""
    monkeypatch.setattr(provenance, "FULL_HASH_MAX_BYTES", 1 << 20)
    p = tmp_path / "slide.svs"
    size = 64 << 20  # 256 blocks of 64 KiB: every 4th 64 KiB block is read
    p.write_bytes(b"\0" * size)
    fp0 = provenance.file_fingerprint(p)
    assert fp0["mode"] == "sampled" and fp0["size_bytes"] == size
    _edit_middle(p)  # a plain edit: new mtime
    fp1 = provenance.file_fingerprint(p)
    assert fp1["sha256_head_tail"] != fp0["sha256_head_tail"]
    # mtime restored, edit inside a sampled block (block 128 starts at round(128 * step))
    step = (size - (64 << 10)) / 255
    with open(p, "r+b") as fh:
        st_ = p.stat()
        fh.seek(int(round(128 * step)) + 10)
        fh.write(b"\x07")
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert provenance.file_fingerprint(p)["sha256_head_tail"] != fp1["sha256_head_tail"]
    # the trade-off: outside the samples with the mtime put back, the edit is not seen
    fp2 = provenance.file_fingerprint(p)
    with open(p, "r+b") as fh:
        st_ = p.stat()
        fh.seek(int(round(128 * step)) + (64 << 10) + 100)  # between blocks 128 and 129
        fh.write(b"\x09")
    os.utime(p, ns=(st_.st_atime_ns, st_.st_mtime_ns))
    assert provenance.file_fingerprint(p) == fp2


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sw_inputs")
    paths = write_slides(d / "slides")
    paths["model"] = write_model(d / "model")
    return paths


def _run(*args: str) -> tuple[int, str]:
    """The CLI in a subprocess (its stderr as the user sees it)."""
    p = subprocess.run([sys.executable, "-m", "tmequant", *args], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONHASHSEED": "0"})
    return p.returncode, p.stderr


def test_cell_table_edited_in_the_middle_is_not_reused(run_inputs, tmp_path: Path):
    """A 3.6 MiB cell table with classes changed in its middle (same size): the rerun recomputed
    nothing ("biomarkers skipped") and kept the old lymphocyte count."""
    from tmequant.pipeline import run_batch

    cells = tmp_path / "cells"
    cells.mkdir()
    n = 160_000  # ~3.6 MiB: the edited middle third lies beyond the first and last MiB
    rng = np.random.default_rng(1)
    xs, ys = rng.uniform(64, 7 * 64, n), rng.uniform(64, 6 * 64, n)
    cls = np.where(np.arange(n) % 2 == 0, "lymphocyte", "tumor_cell")  # same length
    table = cells / "S1.csv"
    pd.DataFrame({"x": xs.round(1), "y": ys.round(1), "class": cls}).to_csv(table, index=False)
    assert table.stat().st_size > 3 << 20
    out = tmp_path / "out"
    kw = {"cells_dir": cells, "device": "cpu", "workers": 1, "progress": False}
    r1 = run_batch([run_inputs["S1"]], out, run_inputs["model"], **kw)
    assert r1.ok
    lym1 = r1.slides["S1"].result.row["lymphocytes_total"]
    # the lymphocytes of the middle third of the rows become tumour cells (same size)
    text = table.read_text().splitlines(keepends=True)
    lo, hi = len(text) // 3, 2 * len(text) // 3
    text[lo:hi] = [t.replace("lymphocyte", "tumor_cell") for t in text[lo:hi]]
    size = table.stat().st_size
    table.write_text("".join(text))
    assert table.stat().st_size == size
    r2 = run_batch([run_inputs["S1"]], out, run_inputs["model"], **kw)
    assert r2.slides["S1"].stages["biomarkers"] == "done"  # not "skipped"
    compute_like = r2.slides["S1"].result.row["lymphocytes_total"]
    assert compute_like < lym1
    # and the rerun gives what a fresh run gives
    r3 = run_batch([run_inputs["S1"]], tmp_path / "fresh", run_inputs["model"], **kw)
    assert r3.slides["S1"].result.row["lymphocytes_total"] == compute_like


# --- 2. NaN / flat predictions ----------------------------------------------------------------
def _tumour_grid(probs_fn=None, n: int = 30) -> TileGrid:
    """n x n tiles of 112 um; a 16 x 16 tumour in stroma; 2 lymphocytes per tile."""
    rr, cc = [a.ravel() for a in np.mgrid[0:n, 0:n]]
    tum = (rr >= 7) & (rr < 23) & (cc >= 7) & (cc < 23)
    df = pd.DataFrame({"row": rr, "col": cc, "tumor": tum * 0.9 + 0.05, "stroma": ~tum * 0.9 + 0.05,
                       "immune": 0.05, "background": 0.0, "lymphocyte_count": 2.0})
    if probs_fn is not None:
        probs_fn(df, tum)
    return TileGrid.from_table(df, tile_um=112.0, slide_mpp_um=0.5)


def test_nan_predictions_are_refused_not_tumour():
    """All-NaN probabilities: every tile became tumour (ties to the first role), bulk 23.8 mm^2."""
    def nan(df, tum):
        df.loc[:, list(ROLES)] = np.nan

    with pytest.raises(StoreError, match="no tissue tile has a most probable role"):
        compute_biomarkers(_tumour_grid(nan))


@pytest.mark.parametrize("kind", ["nan", "flat"])
def test_some_broken_tiles_are_roleless_and_counted(kind, caplog):
    """NaN or all-equal tiles outside the tumour became tumour and grew the bulk."""
    good = compute_biomarkers(_tumour_grid())

    def broken(df, tum):
        ring = ~tum & (df["row"] < 5)  # 150 stroma tiles far from the tumour
        df.loc[ring, list(ROLES)] = np.nan if kind == "nan" else 0.25

    res = compute_biomarkers(_tumour_grid(broken))
    assert res.row["n_tiles_without_role"] == 150
    assert res.row["bulk_area_mm2"] == pytest.approx(good.row["bulk_area_mm2"])
    assert res.row["epithelium_area_mm2"] == pytest.approx(good.row["epithelium_area_mm2"])
    assert "150 of 900 tissue tiles" in caplog.text


def test_nan_model_through_the_cli_fails_the_slide(tmp_path: Path, capsys):
    import zarr

    s = write_store(tmp_path / "nan.zarr", "nan")
    g = zarr.open_group(str(s), mode="r+")
    probs = g["predictions/toy/tissue_probs"]
    probs[...] = np.full(probs.shape, np.nan, dtype=probs.dtype)
    rc = main(["-q", "biomarkers", str(s), "--model", "toy", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1, err
    one_line(err, "nan.zarr", "no tissue tile has a most probable role")


# --- 4. two stores with one slide id -----------------------------------------------------------
def test_biomarkers_refuses_two_stores_with_one_slide_id(tmp_path: Path, capsys):
    """Two stores with slide id s1: one row dropped, one GeoJSON overwritten, exit 0."""
    a = write_store(tmp_path / "a" / "s1.zarr", "s1")
    b = write_store(tmp_path / "b" / "s1.zarr", "s1", nuclei=False)
    out = tmp_path / "out"
    rc = main(["-q", "biomarkers", str(a), str(b), "--model", "toy", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1, err
    one_line(err, str(b), "slide id 's1' is also the id of", str(a))
    rows = pd.read_csv(out / "biomarkers.csv")
    assert len(rows) == 1 and rows["store_path"][0].endswith(os.path.join("a", "s1.zarr"))


# --- 4 & 5. run: outputs of the folder's other slides, ids per folder -------------------------
def test_run_on_a_subset_refuses_to_drop_earlier_slides(run_inputs, tmp_path: Path):
    """A run of S2 alone into a folder holding S1 rewrote cohort.csv with S2 only, exit 0."""
    out = tmp_path / "out"
    common = ["--out", str(out), "--model", str(run_inputs["model"]), "--device", "cpu", "--workers", "1"]
    rc, err = _run("-q", "run", str(run_inputs["S1"]), *common)
    assert rc == 0, err
    cohort = (out / "cohort.csv").read_bytes()
    rc, err = _run("-q", "run", str(run_inputs["S2"]), *common)
    assert rc == 2, err
    one_line(err, str(out), "results of 1 slide(s) this run does not name (S1)")
    assert (out / "cohort.csv").read_bytes() == cohort  # untouched
    # another slide file under an id the folder already has: refused, naming both
    other = tmp_path / "elsewhere" / "S1.tif"
    other.parent.mkdir()
    other.write_bytes(run_inputs["S2"].read_bytes())
    rc, err = _run("-q", "run", str(other), *common)
    assert rc == 2, err
    one_line(err, "slide id 'S1' in this folder belongs to", str(run_inputs["S1"]), str(other))
    # naming both: S1 reused, S2 added, the cohort has both
    rc, err = _run("-q", "run", str(run_inputs["S1"]), str(run_inputs["S2"]), *common)
    assert rc == 0, err
    assert sorted(pd.read_csv(out / "cohort.csv")["slide_id"]) == ["S1", "S2"]


# --- 6. params sections, TOML on 3.10 ----------------------------------------------------------
@pytest.mark.parametrize("section", ["biomarker", "Biomarkers", "nucleus-counter"])
def test_misspelt_params_section_is_refused(tmp_path: Path, section: str, capsys):
    """[biomarker] was ignored: the defaults were used without a word."""
    p = tmp_path / "p.toml"
    p.write_text(f"[{section}]\nmargin_um = 750\n")
    s = write_store(tmp_path / "s1.zarr")
    rc = main(["-q", "biomarkers", str(s), "--model", "toy", "--params", str(p), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2, err
    one_line(err, str(p), f"unknown section [{section}]", "[biomarkers]", "[nucleus_counter]")
    assert not (tmp_path / "o").exists()


def test_toml_without_tomllib_uses_tomli(tmp_path: Path, monkeypatch):
    """Python 3.10 has no tomllib: every TOML params file failed with 'cannot parse'."""
    pytest.importorskip("tomli")
    from tmequant.params import biomarker_params_from_file

    monkeypatch.setitem(sys.modules, "tomllib", None)  # import tomllib -> ImportError, as on 3.10
    p = tmp_path / "p.toml"
    p.write_text("[biomarkers]\nmargin_um = 750\n")
    assert biomarker_params_from_file(p).margin_um == 750
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert "tomli>=2; python_version<'3.11'" in pyproject


# --- 7. phenotype regions: translation invariance ----------------------------------------------
def _phenotype_grid(dr: int, dc: int) -> TileGrid:
    """A 20 x 23 tumour at (dr, dc) whose left 8 columns are inflamed, the rest cold."""
    rr, cc = [a.ravel() for a in np.mgrid[0:20, 0:23]]
    lym = np.where(cc < 8, 4.0, 0.2)
    df = pd.DataFrame({"row": rr + dr + 6, "col": cc + dc + 6, "tumor": 1.0, "stroma": 0.0,
                       "immune": 0.0, "background": 0.0, "lymphocyte_count": lym})
    ring = [(r, c) for r in range(dr, dr + 32) for c in range(dc, dc + 35)
            if not (dr + 6 <= r < dr + 26 and dc + 6 <= c < dc + 29)]
    pad = pd.DataFrame({"row": [r for r, _ in ring], "col": [c for _, c in ring], "tumor": 0.0,
                        "stroma": 1.0, "immune": 0.0, "background": 0.0, "lymphocyte_count": 1.0})
    return TileGrid.from_table(pd.concat([df, pad], ignore_index=True), tile_um=112.0, slide_mpp_um=0.5)


PHENO_KEYS = ("immune_phenotype", "phenotype_regions_n", "phenotype_inflamed_fraction",
              "phenotype_excluded_fraction", "phenotype_desert_fraction")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.integers(0, 40), st.integers(0, 40))
def test_phenotype_does_not_depend_on_where_the_tumour_sits(dr: int, dc: int):
    """Regions anchored at the slide origin: moving the tumour changed the phenotype."""
    ref = compute_biomarkers(_phenotype_grid(0, 0)).row
    moved = compute_biomarkers(_phenotype_grid(dr, dc)).row
    for k in PHENO_KEYS:
        assert moved[k] == pytest.approx(ref[k]) if isinstance(ref[k], float) else moved[k] == ref[k], k


def test_phenotype_fractions_are_weighted_by_tumour_area():
    """A 20 x 23 tumour in 9-tile regions: the last column of regions holds 5 of 23 columns;
    it counts for its tumour area, not as a whole region."""
    row = compute_biomarkers(_phenotype_grid(0, 0)).row
    epi = row["epithelium_area_mm2"]
    assert epi > 0
    # inflamed: tumour columns 0-7 (lymphocytes 4 per tile) lie in the first column of
    # regions (9 columns, of which 8 inflamed-dense): by area that column is 9/23 of the bulk
    assert row["phenotype_inflamed_fraction"] == pytest.approx(9 / 23, abs=0.02)  # unweighted: 3/9


# --- 9. cell tables in micrometres -------------------------------------------------------------
def _tissue_grid(mpp: float) -> TileGrid:
    """40 x 40 tiles of 112 um; tissue (tumour) only in rows/cols 20-39."""
    rr, cc = [a.ravel() for a in np.mgrid[0:40, 0:40]]
    tissue = (rr >= 20) & (cc >= 20)
    df = pd.DataFrame({"row": rr, "col": cc, "tumor": 1.0, "stroma": 0.0, "immune": 0.0,
                       "background": 0.0, "tissue_fraction": tissue.astype(float)})
    return TileGrid.from_table(df, tile_um=112.0, slide_mpp_um=mpp)


@pytest.mark.parametrize("mpp", [0.25, 0.5, 2.0])
def test_cell_table_in_micrometres_is_refused(mpp: float):
    """Micron coordinates were binned as pixels without a word."""
    grid = _tissue_grid(mpp)
    rng = np.random.default_rng(2)
    px = rng.uniform(20 * grid.tile_level0_px, 40 * grid.tile_level0_px, (5000, 2))
    cells_px = pd.DataFrame({"x": px[:, 0], "y": px[:, 1], "class": "Lymphocyte"})
    res = compute_biomarkers(grid, cells=cells_px)  # pixels: accepted
    assert res.row["n_cells"] == 5000
    cells_um = cells_px.assign(x=px[:, 0] * mpp, y=px[:, 1] * mpp)
    cells_um.attrs["source_path"] = "cells_um.csv"
    with pytest.raises(CellTableError, match=r"cells_um.csv: x/y look like micrometres.*divide x and y"):
        compute_biomarkers(grid, cells=cells_um)


# --- 11. manifest mpp 1_0 ---------------------------------------------------------------------
@pytest.mark.parametrize("value", ["1_0", "0_25", "nan", "inf", "0x1p-2"])
def test_manifest_mpp_must_be_a_plain_number(tmp_path: Path, value: str):
    """float('1_0') == 10: the slide was tiled at 10 um/px (77,860 tiles, 2.4 GB)."""
    m = tmp_path / "m.csv"
    (tmp_path / "a.svs").write_bytes(b"x")
    m.write_text(f"slide_id,path,mpp\na,a.svs,{value}\n")
    with pytest.raises(InputError, match=f"mpp '{value}' is not a number"):
        read_manifest(m)
    assert parse_mpp("0.25", "x") == 0.25 and parse_mpp("2.5e-1", "x") == 0.25


# --- 12. bounded readers ----------------------------------------------------------------------
def test_gzip_cell_table_is_bounded_after_decompression(tmp_path: Path):
    """gzip inputs were not size-limited: 2 MiB of zeros decompress to what they like."""
    text = "x,y,class\n" + "1,2,Tumor\n" * 300_000  # 3 MB of text, ~10 kB gzipped
    p = tmp_path / "c.csv.gz"
    p.write_bytes(gzip.compress(text.encode()))
    assert len(read_cell_table(p)) == 300_000
    with pytest.raises(CellTableError, match="gzip file holds more than 1 MiB"):
        read_cell_table(p, max_bytes=1 << 20)
    g = tmp_path / "c.geojson.gz"
    feat = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}, "properties": {}}
    g.write_bytes(gzip.compress(json.dumps({"type": "FeatureCollection", "features": [feat] * 30_000}).encode()))
    with pytest.raises(CellTableError, match="gzip file holds more than 1 MiB"):
        read_cell_table(g, max_bytes=1 << 20)


@pytest.mark.parametrize("name", ["c.csv.gz", "c.geojson.gz"])
def test_truncated_gzip_is_one_line(tmp_path: Path, name: str):
    """A cut gzip raised a bare EOFError (and broke test_fuzz_geojson, by test order)."""
    rng = np.random.default_rng(3)
    if name.endswith(".csv.gz"):
        text = "x,y,class\n" + "".join(f"{x:.3f},{y:.3f},Tumor\n" for x, y in rng.uniform(0, 1e4, (20000, 2)))
    else:
        text = json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": list(xy)}, "properties": {}}
            for xy in rng.uniform(0, 1e4, (5000, 2))]})
    data = gzip.compress(text.encode())
    p = tmp_path / name
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(CellTableError, match="gzip file is truncated"):
        read_cell_table(p)


def test_geojson_memory_grows_with_cells_not_with_the_json_tree(tmp_path: Path):
    """A 1M-cell GeoJSON took 2.1 GB (11x the file). 150,000 polygon cells (~28 MB) must now
    stay under 3x the file above the interpreter's baseline (the whole-tree parse: ~11x)."""
    p = tmp_path / "cells.geojson"
    rng = np.random.default_rng(4)
    with open(p, "w") as fh:
        fh.write('{"type":"FeatureCollection","features":[')
        for i, (x, y) in enumerate(rng.uniform(100, 4e4, (150_000, 2))):
            ring = [[round(x + dx, 1), round(y + dy, 1)] for dx, dy in
                    ((0, 0), (4, 0), (6, 3), (4, 6), (0, 6), (-2, 3), (0, 0))]
            fh.write(("," if i else "") + json.dumps({
                "type": "Feature", "id": f"{i:08x}", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "detection", "classification": {"name": "Tumor"}}}))
        fh.write("]}")
    size = p.stat().st_size
    code = ("import resource, sys\n"
            "from tmequant.biomarkers.cells import read_cell_table\n"
            "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "df = read_cell_table(sys.argv[1])\n"
            "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "print(len(df), base * 1024, peak * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    n, base, peak = map(int, out.stdout.split())
    assert n == 150_000
    assert peak - base < 3 * size, (peak - base) / size


# --- 13. smaller ones -------------------------------------------------------------------------
def test_odd_file_names_get_safe_ids_and_keep_their_names(run_inputs, tmp_path: Path):
    """A space, non-ASCII letters or a leading dash in a file name stopped the whole batch."""
    d = tmp_path / "slides"
    d.mkdir()
    names = ["my slide.tif", "Résumé 2.tif", "-dash.tif", "切片.tif", "ok.tif"]
    for n in names:
        (d / n).write_bytes(run_inputs["S1"].read_bytes())
    specs = expand_slides([d])
    ids = {s.path.name: s.slide_id for s in specs}
    assert ids["my slide.tif"] == "my_slide" and ids["Résumé 2.tif"] == "Resume_2"
    assert ids["-dash.tif"] == "dash" and ids["ok.tif"] == "ok"
    assert ids["切片.tif"].startswith("slide-") and len(set(ids.values())) == 5
    # through `tile`: every slide finishes; the original name is kept as source_path
    out = tmp_path / "stores"
    rc, err = _run("-q", "tile", str(d), "--out", str(out), "--mpp", "1", "--tile-px", "64", "--workers", "1")
    assert rc == 0, err
    meta = json.loads((out / "Resume_2.zarr" / "zarr.json").read_text())["attributes"]
    assert meta["source_path"].endswith("Résumé 2.tif") and meta["slide_id"] == "Resume_2"


def test_symlink_loop_is_named(tmp_path: Path, capsys):
    """A symlink loop read "no such file or folder"."""
    loop = tmp_path / "loop.svs"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symbolic link loop"):
        expand_slides([loop])
    cl = tmp_path / "loop.csv"
    cl.symlink_to(cl)
    with pytest.raises(CellTableError, match="symbolic link loop"):
        read_cell_table(cl)
    broken = tmp_path / "gone.svs"
    broken.symlink_to(tmp_path / "nowhere.svs")
    with pytest.raises(InputError, match="broken symbolic link"):
        expand_slides([broken])


def test_absurd_tiff_resolution_is_named(tmp_path: Path):
    """X/YResolution giving 10,000 um/px read "has no pixel size (MPP)"."""
    import tifffile

    from tmequant.errors import SlideError
    from tmequant.wsi import open_slide

    p = tmp_path / "absurd.tif"
    img = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(p, img, tile=(256, 256), resolution=(1.0, 1.0), resolutionunit="CENTIMETER",
                     photometric="rgb")
    with pytest.raises(SlideError, match=r"pixel size 1e\+04 um/px \(tiff-resolution\) is outside"):
        open_slide(p)
    assert open_slide(p, mpp_override_um=0.5).info.mpp_um == 0.5  # the fix it suggests works


def test_full_disk_at_report_is_recorded_in_failures_csv(tmp_path: Path, monkeypatch):
    """On a full disk the rewrite of failures.csv failed too and it said nothing failed."""
    import errno

    from tmequant import atomic
    from tmequant.batch import Failure, write_failures_csv

    write_failures_csv(tmp_path, [])  # the first write, before the report
    real = atomic.atomic_write_bytes

    def full(path, data):
        tmp = Path(path).with_name(".x.tmp")
        tmp.write_bytes(data[: len(data) // 2])  # a partial copy, then no room
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "atomic_write_bytes", full)
    write_failures_csv(tmp_path, [Failure("(cohort)", "report", "OSError: No space left on device")])
    monkeypatch.setattr(atomic, "atomic_write_bytes", real)
    rows = list(csv.DictReader(open(tmp_path / "failures.csv", newline="")))
    assert rows == [{"slide_id": "(cohort)", "stage": "report", "reason": "OSError: No space left on device"}]


def test_atomic_write_leaves_no_partial_copy_when_it_fails(tmp_path: Path, monkeypatch):
    from tmequant import atomic

    def no_room(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", no_room)
    with pytest.raises(OSError):
        atomic.atomic_write_text(tmp_path / "a.txt", "data")
    assert list(tmp_path.iterdir()) == []


def test_reliability_doc_says_what_sigterm_does():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert "ends the process like `SIGKILL`" not in doc
    assert "SIGTERM" in doc and "130" in doc


# --- 14. DICOM --------------------------------------------------------------------------------
def _dcm(path: Path, study: str, series: str, image_type: str, size: int = 0,
         ts: str = "1.2.840.10008.1.2.1") -> Path:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.77.1.6")  # VL WSI
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = UID(ts)
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.add_new(0x7FE00010, "OB", b"\0" * size)  # pixel data: stands in for the image frames
    ds.save_as(path, enforce_file_format=True)
    return path


def test_two_dicom_slides_in_one_folder_stay_two(tmp_path: Path):
    """Only the first .dcm by name was kept: the second slide vanished without a word."""
    d = tmp_path / "case7"
    d.mkdir()
    _dcm(d / "a_overview.dcm", "1.2.3", "1.2.3.10", "OVERVIEW", 100)
    _dcm(d / "b_level0.dcm", "1.2.3", "1.2.3.10", "VOLUME", 5000)
    _dcm(d / "c_level1.dcm", "1.2.3", "1.2.3.10", "VOLUME", 1000)
    _dcm(d / "d_level0.dcm", "1.2.3", "1.2.3.20", "VOLUME", 4000)
    _dcm(d / "e_label.dcm", "1.2.3", "1.2.3.30", "LABEL", 100)  # a label-only series: no slide
    specs = expand_slides([d])
    assert sorted(s.path.name for s in specs) == ["b_level0.dcm", "d_level0.dcm"]  # level 0, not the overview
    assert len({s.slide_id for s in specs}) == 2 and all(s.slide_id.startswith("case7-") for s in specs)
    # the natural glob gives the same slides (it was refused as duplicate ids)
    assert expand_slides([str(d / "*.dcm")]) == specs
    # one slide per folder keeps the folder's name
    e = tmp_path / "case8"
    e.mkdir()
    _dcm(e / "x.dcm", "9.9", "9.9.1", "VOLUME", 10)
    _dcm(e / "y.dcm", "9.9", "9.9.1", "VOLUME", 20)
    assert [(s.slide_id, s.path.name) for s in expand_slides([str(e / "*.dcm")])] == [("case8", "y.dcm")]


def test_dicom_fingerprint_covers_every_file_of_the_series(tmp_path: Path):
    """The fingerprint was the overview's (first file by name): a changed level went unnoticed."""
    d = tmp_path / "s"
    d.mkdir()
    _dcm(d / "a_overview.dcm", "1.2", "1.2.1", "OVERVIEW", 100)
    lvl = _dcm(d / "b_level0.dcm", "1.2", "1.2.1", "VOLUME", 5000)
    _dcm(d / "c_other_series.dcm", "1.2", "1.2.2", "VOLUME", 5000)
    fp = provenance.file_fingerprint(d / "a_overview.dcm")
    assert fp["size_bytes"] == sum(p.stat().st_size for p in (d / "a_overview.dcm", lvl))
    assert provenance.file_fingerprint(lvl) == fp  # the same slide, whichever file names it
    _edit_middle(lvl)
    assert provenance.file_fingerprint(d / "a_overview.dcm") != fp
    before = provenance.file_fingerprint(lvl)
    _edit_middle(d / "c_other_series.dcm")  # another slide's file: not this one's business
    assert provenance.file_fingerprint(lvl) == before


def test_unsupported_transfer_syntax_is_named(tmp_path: Path, monkeypatch):
    """OpenSlide's error named only the UID 1.2.840.10008.1.2.4.201."""
    import openslide

    from tmequant.errors import SlideError
    from tmequant.wsi import open_slide

    p = tmp_path / "htj2k.dcm"
    p.write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)

    class Fake:
        @staticmethod
        def detect_format(path):
            return "dicom"

        def __init__(self, path):
            raise openslide.OpenSlideError("Unsupported transfer syntax 1.2.840.10008.1.2.4.201")

    monkeypatch.setattr(openslide, "OpenSlide", Fake)
    with pytest.raises(SlideError, match=r"1\.2\.840\.10008\.1\.2\.4\.201 \(High-Throughput JPEG 2000"):
        open_slide(p)


# --- 8. non-square pixels ---------------------------------------------------------------------
def test_non_square_pixels_are_carried_per_axis_not_averaged(tmp_path: Path, capsys):
    """0.25 x 0.5 um pixels were averaged to 0.375 (every area and density ~12% off), then
    refused. Now x and y are carried separately: a 128 x 256 um slide is tiled into 64 um
    tiles of 256 x 128 level-0 px, its 128 x 192 um of tissue measure 128 x 192 um (the mean
    gave 192 x 144, +12.5%), and a round blob stays round in the 1 um/px tiles."""
    import tifffile

    from tmequant.pixelsize import PixelSize
    from tmequant.store import SlideStore
    from tmequant.wsi import open_slide

    img = np.full((512, 512, 3), 240, np.uint8)  # glass below y = 192 um (row 384)
    img[:384] = (215, 140, 185)  # pink tissue above
    yy, xx = np.mgrid[0:512, 0:512]
    # a disc of 40 um radius centred at (64, 96) um: an ellipse in level-0 px
    img[((xx + 0.5) * 0.25 - 64) ** 2 + ((yy + 0.5) * 0.5 - 96) ** 2 <= 40 ** 2] = (60, 30, 110)
    p = tmp_path / "rect.tif"
    tifffile.imwrite(p, img, tile=(256, 256), resolution=(40000.0, 20000.0),
                     resolutionunit="CENTIMETER", photometric="rgb")
    with open_slide(p) as s:
        assert s.info.pixel_size == PixelSize(0.25, 0.5)
    rc = main(["-q", "tile", str(p), "--out", str(tmp_path / "o"), "--mpp", "1", "--tile-px", "64"])
    err = capsys.readouterr().err
    assert rc == 0, err
    st = SlideStore(tmp_path / "o" / "rect.zarr")
    assert st.tile_level0_xy_px == (256.0, 128.0) and st.pixel_size == PixelSize(0.25, 0.5)
    assert sorted(map(tuple, st.grid.tolist())) == [(r, c) for r in range(3) for c in range(2)]
    tissue_um2 = float(st.tissue_fraction.sum()) * st.tile_um ** 2
    assert tissue_um2 == pytest.approx(128 * 192, rel=0.01)  # the mean 0.375: 192 x 144
    # the tiles, stitched at 1 um/px: the disc is round, 80 um across both ways
    mosaic = np.zeros((192, 128, 3), np.uint8)
    for (r, c), tile in zip(st.grid, np.asarray(st.images[:])):
        mosaic[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64] = tile
    dark = mosaic.mean(axis=2) < 120
    rows, cols = np.nonzero(dark)
    assert rows.max() - rows.min() + 1 == pytest.approx(80, abs=2)
    assert cols.max() - cols.min() + 1 == pytest.approx(80, abs=2)


# --- 12. single-strip TIFF --------------------------------------------------------------------
def test_single_strip_tiff_is_read_without_decoding_it_whole(tmp_path: Path, capsys):
    """A single-strip TIFF decoded its whole strip for every region (20k x 20k: 1.4 GB). Now an
    uncompressed strip is memory-mapped (regions read straight from the file) and a compressed
    one over MAX_CHUNK_BYTES is refused naming the fix."""
    import tifffile

    from tmequant.errors import SlideError
    from tmequant.wsi import open_slide
    from tmequant.wsi import slide as slide_mod

    n = 5000  # 71.5 MiB of pixels in one strip: over the 64 MiB chunk limit
    img = np.zeros((n, n, 3), np.uint8)
    img[1000:3000, 2000:4000] = (200, 90, 160)
    raw, packed = tmp_path / "raw.tif", tmp_path / "packed.tif"
    kw = {"rowsperstrip": n, "photometric": "rgb", "resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(raw, img, **kw)
    tifffile.imwrite(packed, img, compression="zlib", **kw)
    assert n * n * 3 > slide_mod.MAX_CHUNK_BYTES
    with open_slide(raw) as s:
        assert isinstance(s._b.levels[0], np.memmap)
        assert np.array_equal(s.read_region((1990, 990), 0, (64, 64)), img[990:1054, 1990:2054])
    with pytest.raises(SlideError, match=r"packed.tif: level 0 is stored as compressed 72 MiB pieces"):
        open_slide(packed)
    rc = main(["-q", "tile", str(packed), "--out", str(tmp_path / "o"), "--mpp", "4", "--tile-px", "32"])
    err = capsys.readouterr().err
    assert rc == 1, err
    one_line(err, "packed.tif", "convert the slide to a tiled pyramid")


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "geojson", "parquet"])
def test_cell_count_limit_bounds_memory(tmp_path: Path, monkeypatch, fmt: str):
    """A 2 GiB file admits ~25 million point features: the cell limit stops reading first."""
    from tmequant.biomarkers import cells as cells_mod

    monkeypatch.setattr(cells_mod, "MAX_CELLS", 1000)
    df = pd.DataFrame({"x": np.arange(1001.0), "y": 1.0, "class": "Tumor"})
    p = tmp_path / f"c.{fmt}"
    if fmt.startswith("csv"):
        df.to_csv(p, index=False)
    elif fmt == "parquet":
        df.to_parquet(p)
    else:
        p.write_text(json.dumps({"type": "FeatureCollection", "features": [
            {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, 1.0]}, "properties": {}}
            for x in df["x"]]}))
    with pytest.raises(CellTableError, match="more than 1,000 cells"):
        read_cell_table(p)
    monkeypatch.setattr(cells_mod, "MAX_CELLS", 1001)  # at the limit: read
    assert len(read_cell_table(p)) == 1001


def test_params_sections_are_exactly_those_read():
    """[inference] was a known section that nothing read: its keys were silently ignored."""
    from tmequant.errors import ParamsError
    from tmequant.params import SECTIONS, load_params_file

    assert "inference" not in SECTIONS
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "p.toml"
        p.write_text("[inference]\nbatch_size = 8\n")
        with pytest.raises(ParamsError, match=r"unknown section \[inference\]"):
            load_params_file(p)
        p.write_text("margin_um = 750\n[tiling]\ntile_px = 224\n[qc]\n")
        assert set(load_params_file(p)) == {"biomarkers", "tiling", "qc"}
