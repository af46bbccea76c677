"""One lock for every command that writes a slide store (tile, predict, count, run)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from test_reliability_helpers import stderr_lines, subprocess_env, write_svs
from test_store_api import make_store

import tmequant as tq
from tmequant.store import SlideStore, StoreLockedError, lock_path, store_is_complete, verify_store

PARAMS = tq.TilingParams(target_mpp_um=1.0, tile_px=64, tiles_per_shard=16)


def test_two_writers_exclude_each_other_readers_never_wait(tmp_path):
    p = tmp_path / "s.zarr"
    make_store(p)
    with SlideStore.open(p, "r+") as st:
        with pytest.raises(StoreLockedError) as e:
            SlideStore.open(p, "r+")
        msg = str(e.value)
        assert msg.startswith(str(p)) and f"pid {os.getpid()}" in msg and "\n" not in msg
        with pytest.raises(StoreLockedError):
            SlideStore.open(p, "w")  # a rebuild would delete what the holder is writing
        assert SlideStore(p).n_tiles == 10  # reading needs no lock
        st.write_nuclei_counts(np.zeros((10, 2)))
        st.mark_nuclei_complete(columns=["lymphocyte", "other"])
    assert not Path(f"{lock_path(p)}.json").exists()  # released: the holder record is gone
    with SlideStore.open(p, "r+"):  # free again
        assert Path(f"{lock_path(p)}.json").exists()
    assert SlideStore(p).nuclei_counts().shape == (10, 2)


def test_wait_queues_behind_the_holder(tmp_path, caplog):
    p = tmp_path / "s.zarr"
    make_store(p)
    held = SlideStore.open(p, "r+")
    timer = threading.Timer(0.5, held.close)
    timer.start()
    t0 = time.perf_counter()
    with caplog.at_level("INFO", logger="tmequant"), SlideStore.open(p, "r+", wait=30):
        assert time.perf_counter() - t0 >= 0.4
    timer.join()
    assert f"{p}: waiting for the process writing it (pid {os.getpid()}" in caplog.text
    with SlideStore.open(p, "r+"):
        with pytest.raises(StoreLockedError):
            SlideStore.open(p, "r+", wait=0.2)  # gives up after the timeout


def test_tile_into_a_store_being_written_fails_cleanly(tmp_path):
    slide = write_svs(tmp_path / "S.svs")
    out = tmp_path / "out"
    store = out / "S.zarr"
    writer = SlideStore.open(store, "w")  # another process half-way through tiling it
    try:
        with pytest.raises(StoreLockedError, match="being written by another"):
            tq.tile_slide(slide, out, PARAMS, progress=False, qc_png=False)
    finally:
        writer.close()
    res = tq.tile_slide(slide, out, PARAMS, progress=False, qc_png=False)
    assert not res.reused and store_is_complete(store) and verify_store(store) == []
    # a finished store with the same parameters is reused even while another writer holds it
    with SlideStore.open(store, "r+"):
        assert tq.tile_slide(slide, out, PARAMS, progress=False, qc_png=False).reused
        with pytest.raises(StoreLockedError):
            tq.count_nuclei(store, progress=False)


def test_racing_tilers_leave_a_sound_store(tmp_path):
    """Two writers rebuilding one store at once: whoever wins, the store ends finished and
    whole, and the loser fails with StoreLockedError (never a store marked complete with
    arrays deleted)."""
    slide = write_svs(tmp_path / "S.svs")
    out = tmp_path / "out"
    for _ in range(3):
        errors: list[BaseException] = []

        def tile(errors: list[BaseException] = errors) -> None:
            try:
                tq.tile_slide(slide, out, PARAMS, overwrite=True, progress=False, qc_png=False)
            except BaseException as e:  # noqa: BLE001 - collected and checked below
                errors.append(e)

        threads = [threading.Thread(target=tile) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(e, StoreLockedError) for e in errors), errors
        assert len(errors) < 2
        assert store_is_complete(out / "S.zarr") and verify_store(out / "S.zarr") == []


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGCONT are POSIX")
def test_cli_tile_into_a_store_another_tile_is_writing(tmp_path):
    """Issue 16 #3 through the CLI: A is stopped half-way through a store; B into the same
    folder exits 1 with one line naming the store and A's pid (no KeyError, no traceback)
    and leaves it alone; A resumes and finishes a sound store."""
    slide = write_svs(tmp_path / "S.svs")
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "tmequant", "-q", "tile", str(slide), "--out", str(out),
            "--mpp", "1", "--tile-px", "64"]
    a = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=subprocess_env(TMEQUANT_FAULT="tile_shard:1",
                                            TMEQUANT_FAULT_SIGNAL="STOP"))
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            pid, status = os.waitpid(a.pid, os.WUNTRACED | os.WNOHANG)
            if pid and os.WIFSTOPPED(status):
                break
            assert not pid, "A ended before its checkpoint"
            time.sleep(0.1)
        else:
            pytest.fail("A never reached its checkpoint")
        b = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=300,
                           check=False)
        assert b.returncode == 1, b.stderr
        assert "Traceback" not in b.stderr and "KeyError" not in b.stderr, b.stderr
        failed = [ln for ln in stderr_lines(b.stderr) if "FAILED" in ln]
        assert len(failed) == 1 and str(out / "S.zarr") in failed[0], b.stderr
        assert f"being written by another tmequant process (pid {a.pid}" in failed[0]
        assert not store_is_complete(out / "S.zarr")
    finally:
        os.kill(a.pid, signal.SIGCONT)
    assert a.wait(timeout=300) == 0, a.stderr.read() if a.stderr else ""
    assert store_is_complete(out / "S.zarr") and verify_store(out / "S.zarr") == []


@pytest.mark.slow
def test_a_killed_writer_releases_the_lock(tmp_path):
    slide = write_svs(tmp_path / "S.svs")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "tmequant", "-q", "tile", str(slide), "--out",
                        str(out), "--mpp", "1", "--tile-px", "64"], capture_output=True, text=True,
                       env=subprocess_env(TMEQUANT_FAULT="tile_shard:1"), timeout=300, check=False)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not store_is_complete(out / "S.zarr")
    res = tq.tile_slide(slide, out, PARAMS, progress=False, qc_png=False)  # not locked out
    assert res.n_tiles > 0 and verify_store(res.store_path) == []


def test_output_lock_shares_the_mechanism_and_its_messages(tmp_path, caplog):
    """``run``'s folder lock is the same mechanism: its busy and waiting lines are unchanged."""
    from tmequant.pipeline import OutputLockedError, output_lock

    out = tmp_path / "out"
    with output_lock(out):
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}.*--wait"):
            with output_lock(out):
                pass
        done = threading.Event()

        def queued() -> None:
            with output_lock(out, wait=True, poll_s=0.05):
                done.set()

        with caplog.at_level("INFO", logger="tmequant"):
            t = threading.Thread(target=queued)
            t.start()
            time.sleep(0.5)
            assert not done.is_set()
    t.join(timeout=30)
    assert done.is_set()
    assert f"{out}: waiting for the run holding the folder (pid {os.getpid()}" in caplog.text
