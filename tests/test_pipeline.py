"""Small pieces of tmequant.pipeline: atomic files, the lock, reader processes, cell tables."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from tmequant import pipeline
from tmequant.errors import InputError


def test_atomic_write_replaces_whole_files_only(tmp_path: Path):
    p = pipeline.atomic_write_text(tmp_path / "sub" / "a.txt", "one")
    assert p.read_text() == "one"
    pipeline.atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]  # no temporary left


def test_lock_names_the_holder_and_is_released(tmp_path: Path):
    with pipeline.output_lock(tmp_path):
        info = (tmp_path / ".tmequant.lock.json").read_text()
        assert f'"pid": {os.getpid()}' in info
        with pytest.raises(pipeline.OutputLockedError) as e, pipeline.output_lock(tmp_path):
            pass
        msg = str(e.value)
        assert str(tmp_path) in msg and f"pid {os.getpid()}" in msg and "\n" not in msg
    assert not (tmp_path / ".tmequant.lock.json").exists()
    with pipeline.output_lock(tmp_path):  # free again
        pass


def test_reader_processes(monkeypatch):
    assert pipeline._reader_processes(10) == 0  # small store: no reader process
    assert pipeline._reader_processes(10_000) is None  # the engine's default
    monkeypatch.setattr(multiprocessing.current_process(), "daemon", True)
    assert pipeline._reader_processes(10_000) == 0  # a daemonic Dask worker may not fork readers


def test_find_cell_table(tmp_path: Path):
    (tmp_path / "A.csv").write_text("x,y,class\n")
    (tmp_path / "B.geojson.gz").write_bytes(b"")
    assert pipeline.find_cell_table(tmp_path, "A") == tmp_path / "A.csv"
    assert pipeline.find_cell_table(tmp_path, "B") == tmp_path / "B.geojson.gz"
    with pytest.raises(InputError, match="no cell table for slide 'C'"):
        pipeline.find_cell_table(tmp_path, "C")


def test_saved_result_is_ignored_when_its_inputs_changed(tmp_path: Path):
    assert pipeline.load_slide_result(tmp_path, "abc") is None  # nothing saved
    (tmp_path / "done.json").write_text('{"inputs_hash": "other", "complete": true}')
    assert pipeline.load_slide_result(tmp_path, "abc") is None  # other inputs


def test_lock_removes_temporaries_a_killed_run_left(tmp_path: Path):
    stale = tmp_path / "results" / "S1" / ".biomarkers.json.tmp-4242"
    stale.parent.mkdir(parents=True)
    stale.write_text("{half")
    kept = tmp_path / "results" / "S1" / "biomarkers.json"
    kept.write_text("{}")
    with pipeline.output_lock(tmp_path):
        assert not stale.exists()
    assert kept.read_text() == "{}"


@pytest.mark.slow
def test_sigterm_stops_like_ctrl_c(tmp_path: Path):
    """SIGTERM mid-run: exit 130, the resume message, the lock released."""
    import signal
    import subprocess
    import sys
    import time

    from tmequant.wsi.write import write_pyramid_tiff

    import numpy as np

    img = np.full((3000, 3000, 3), 200, np.uint8)
    img[200:2800, 200:2800] = (170, 90, 160)  # tissue everywhere: many tiles to write
    slide = write_pyramid_tiff(tmp_path / "big.svs", img, 0.25, flavor="svs")
    env = dict(os.environ, TMEQUANT_FAULT="tile_shard:1", TMEQUANT_FAULT_SIGNAL="STOP")
    p = subprocess.Popen([sys.executable, "-m", "tmequant", "tile", str(slide), "--out",
                          str(tmp_path / "out"), "--tile-px", "32"], env=env,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and p.poll() is None:  # wait until it parks at the checkpoint
        if (tmp_path / "out" / "big.zarr").exists():
            break
        time.sleep(0.2)
    time.sleep(1.0)
    p.send_signal(signal.SIGTERM)
    p.send_signal(signal.SIGCONT)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
