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
