"""`tmequant run`: serial batch with a bad slide, resume stage by stage, the output lock."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_run_helpers import tissue_cells, write_model, write_slides

from tmequant.pipeline import OutputLockedError, output_lock, run_batch
from tmequant.tiling.store import SlideStore

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("run_inputs")
    paths = write_slides(d / "slides")
    paths["model"] = write_model(d / "model")
    return paths


@pytest.fixture(scope="module")
def serial(inputs, tmp_path_factory) -> tuple[Path, int]:
    """The CLI on S1, S2 and BAD (not a slide) into a fresh folder: (out, exit code)."""
    from tmequant.cli import main

    out = tmp_path_factory.mktemp("run_serial") / "out"
    rc = main(["run", str(inputs["S1"]), str(inputs["S2"]), str(inputs["BAD"]), "--out", str(out),
               "--model", str(inputs["model"]), "--workers", "1", "--device", "cpu"])
    return out, rc


def _read_failures(out: Path) -> list[dict[str, str]]:
    with open(out / "failures.csv", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_serial_run_outputs_and_bad_slide(serial, inputs):
    out, rc = serial
    assert rc == 1  # BAD failed; the others finished
    fails = _read_failures(out)
    assert [(f["slide_id"], f["stage"]) for f in fails] == [("BAD", "tile")]
    assert "BAD.tif" in fails[0]["reason"]
    cohort = pd.read_csv(out / "cohort.csv")
    assert list(cohort["slide_id"]) == ["S1", "S2"]
    assert list(cohort.columns[:1]) == ["slide_id"]
    # the tiles are exactly the tissue cells of each slide
    for sid in ("S1", "S2"):
        store = SlideStore(out / "stores" / f"{sid}.zarr")
        assert {tuple(rc_) for rc_ in store.grid.tolist()} == tissue_cells(sid)
        row = cohort.set_index("slide_id").loc[sid]
        assert row["n_tiles"] == len(tissue_cells(sid))
        assert row["store_path"] == f"stores/{sid}.zarr"  # relative to the output folder
        assert row["count_source"] == "nucleus_counter"  # the model has no count head
        assert row["model_name"] == "tiny-run"
        assert store.nuclei_counts() is not None and store.nuclei_counts().sum() > 0
        rdir = out / "results" / sid
        for name in ("biomarkers.json", "tls.csv", "arrays.npz", "done.json", f"{sid}.geojson.zip"):
            assert (rdir / name).is_file(), name
        for fig in ("thumbnail", "tissue_classes", "lymphocyte_density", "compartments"):
            assert (out / "figures" / sid / f"{fig}.png").stat().st_size > 1000
        assert json.loads((rdir / "biomarkers.json").read_text())["slide_id"] == sid
    assert not (out / "results" / "BAD").exists()
    html = (out / "report.html").read_text()
    assert "S1" in html and "S2" in html and "BAD" in html
    assert json.loads((out / "run.json").read_text())["slides"] == ["S1", "S2", "BAD"]
    # no temporary file left behind anywhere
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]
    # the lock is released and its holder file removed
    assert not (out / ".tmequant.lock.json").exists()


@pytest.mark.slow
def test_rerun_skips_finished_stages(serial, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(serial[0], out)  # the shared folder stays as the first run left it
    before = (out / "cohort.csv").read_bytes()
    geo = (out / "results" / "S1" / "S1.geojson.zip").read_bytes()
    pngs = sorted((out / "figures").rglob("*.png"))
    assert len(pngs) == 8
    stamps = [p.stat().st_mtime_ns for p in pngs]
    res = run_batch([inputs["S1"], inputs["S2"]], out, inputs["model"], device="cpu", workers=1,
                    progress=False)
    assert res.ok and sorted(res.slides) == ["S1", "S2"]
    for run in res.slides.values():
        assert {k: run.stages[k] for k in ("tile", "predict", "count", "biomarkers")} == dict.fromkeys(
            ("tile", "predict", "count", "biomarkers"), "skipped"), run.slide_id
        assert run.tiles_per_s == {}  # nothing was computed
    assert (out / "cohort.csv").read_bytes() == before  # the cached results give the same table
    assert (out / "results" / "S1" / "S1.geojson.zip").read_bytes() == geo
    assert [p.stat().st_mtime_ns for p in pngs] == stamps  # pictures reused, not redrawn
    assert _read_failures(out) == []  # rewritten: the bad slide is no longer in this batch


@pytest.mark.slow
def test_resume_redoes_only_unfinished_stages(serial, inputs, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(serial[0], out)  # the shared folder stays as the first run left it
    import zarr

    before = pd.read_csv(out / "cohort.csv")
    # S1: the nucleus counts as if killed mid-write (no completion marker); S2: its
    # biomarker marker gone as if killed before it was written.
    g = zarr.open_group(str(out / "stores" / "S1.zarr" / "nuclei"), mode="r+", zarr_format=3)
    del g.attrs["complete"]
    (out / "results" / "S2" / "done.json").unlink()
    res = run_batch([inputs["S1"], inputs["S2"]], out, inputs["model"], device="cpu", workers=1,
                    progress=False)
    s1, s2 = res.slides["S1"], res.slides["S2"]
    assert (s1.stages["tile"], s1.stages["predict"], s1.stages["count"]) == ("skipped", "skipped", "done")
    assert s1.stages["biomarkers"] == "done"  # its input (the counts) changed marker
    assert (s2.stages["tile"], s2.stages["predict"], s2.stages["count"]) == ("skipped",) * 3
    assert s2.stages["biomarkers"] == "done"
    pd.testing.assert_frame_equal(pd.read_csv(out / "cohort.csv"), before)


@pytest.mark.slow
def test_cells_dir_replaces_counts_and_a_missing_table_fails_its_slide(serial, inputs, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(serial[0], out)  # finished stores: only the biomarkers change
    cells = tmp_path / "cells"
    cells.mkdir()
    # 3 lymphocytes and 1 tumour cell in the centre of every tissue tile of S1 (1 px = 1 um)
    rows = ["x,y,class"]
    for r, c in sorted(tissue_cells("S1")):
        cx, cy = c * 64 + 32, r * 64 + 32
        rows += [f"{cx},{cy},Lymphocyte", f"{cx + 5},{cy},Lymphocyte", f"{cx},{cy + 5},lymphocyte",
                 f"{cx - 5},{cy},Tumor"]
    (cells / "S1.csv").write_text("\n".join(rows) + "\n")
    res = run_batch([inputs["S1"], inputs["S2"]], out, inputs["model"], cells_dir=cells,
                    device="cpu", workers=1, progress=False)
    assert [(f.item_id, f.stage) for f in res.failures] == [("S2", "cells")]
    assert "S2" in res.failures[0].reason and str(cells) in res.failures[0].reason
    s1 = res.slides["S1"]
    assert s1.stages["count"] == "skipped" and s1.stages["biomarkers"] == "done"
    row = pd.read_csv(out / "cohort.csv").set_index("slide_id").loc["S1"]
    assert row["count_source"] == "cell_table"
    assert row["lymphocytes_total"] == 3 * len(tissue_cells("S1"))
    assert row["cell_table_path"] == str(cells / "S1.csv")
    assert list(pd.read_csv(out / "cohort.csv")["slide_id"]) == ["S1"]


def test_model_tiling_mismatch_stops_before_work(inputs, tmp_path):
    from tmequant.errors import InputError
    from tmequant.tiling import TilingParams

    with pytest.raises(InputError, match="does not fit"):
        run_batch([inputs["S1"]], tmp_path / "o", inputs["model"],
                  tiling=TilingParams(target_mpp_um=0.5, tile_px=64), progress=False)
    assert not (tmp_path / "o").exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tmequant", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_lock_second_run_stops_then_waits(inputs, tmp_path):
    out = tmp_path / "out"
    argv = _cli("run", str(inputs["S1"]), "--out", str(out), "--model", str(inputs["model"]),
                "--device", "cpu", "--workers", "1")
    with output_lock(out):  # this process holds the folder, as a running batch would
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"), output_lock(out):
            pass
        p = subprocess.run(argv, capture_output=True, text=True, env=_env(), timeout=300, check=False)
        assert p.returncode == 1
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1, p.stderr  # one clear line, no traceback
        assert str(out) in lines[0] and f"pid {os.getpid()}" in lines[0] and "--wait" in lines[0]
        assert not (out / "stores").exists()  # nothing was written
        # --wait queues behind the holder and runs once it lets go
        proc = subprocess.Popen([*argv, "--wait"], stderr=subprocess.PIPE, text=True, env=_env())
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if "waiting for the run holding the folder" in line:
                break
        else:
            pytest.fail("the --wait run did not report waiting: " + "".join(seen))
        assert proc.poll() is None and not (out / "stores").exists()
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, rest
    assert (out / "cohort.csv").is_file()


@pytest.mark.slow
def test_dask_local_cluster_matches_serial(serial, inputs, tmp_path):
    """A real LocalCluster of two worker processes, one declaring a GPU: the same cohort table,
    byte for byte, and every predict task on the GPU worker."""
    distributed = pytest.importorskip("distributed")
    from test_run_helpers import declare_gpu

    out_serial, _ = serial
    out = tmp_path / "dask"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        gpu_worker = min(client.scheduler_info()["workers"])
        client.run(declare_gpu, workers=[gpu_worker])
        res = run_batch([inputs["S1"], inputs["S2"], inputs["BAD"]], out, inputs["model"],
                        device="cpu", workers=1, scheduler=client, progress=False)
        assert client.status == "running"  # a caller's client is left open
    assert [(f.item_id, f.stage) for f in res.failures] == [("BAD", "tile")]
    assert sorted(r.slide_id for r in res.outcomes) == ["S1", "S2"]
    for run in res.outcomes:
        assert run.stages["tile"] == run.stages["predict"] == run.stages["biomarkers"] == "done"
        assert run.workers["predict"] == gpu_worker
    assert (out / "cohort.csv").read_bytes() == (out_serial / "cohort.csv").read_bytes()
    assert (out / "tls.csv").read_bytes() == (out_serial / "tls.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cohort.parquet"),
                                  pd.read_parquet(out_serial / "cohort.parquet"))
    for sid in ("S1", "S2"):  # the QuPath files too (deterministic ids and zip time stamps)
        name = f"results/{sid}/{sid}.geojson.zip"
        assert (out / name).read_bytes() == (out_serial / name).read_bytes()
        # pictures drawn on the workers, on the same cohort colour scale
        for fig in ("thumbnail", "tissue_classes", "lymphocyte_density", "compartments"):
            name = f"figures/{sid}/{fig}.png"
            assert (out / name).read_bytes() == (out_serial / name).read_bytes(), name
        assert (out / "figures" / sid / "figures.json").is_file()
    assert [(f["slide_id"], f["stage"]) for f in _read_failures(out)] == [("BAD", "tile")]


def test_help_shows_units_and_defaults(capsys, monkeypatch):
    from tmequant.cli import main

    monkeypatch.setenv("COLUMNS", "200")  # no wrapping inside the words looked for

    assert main(["run", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--out", "--model", "--cells-dir", "--params", "um/px", "--counter", "default: on",
                   "--scheduler", "--local-workers", "--wait", "--mpp-override", "--batch-size"):
        assert needle in text, needle
