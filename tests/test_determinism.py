"""Concurrency and determinism of `tmequant run` (docs/reliability.md, "Concurrency").

Two real processes on one output folder: the second stops with one line naming the holder
(or queues with --wait) while the first, hung on purpose (SIGSTOP at a checkpoint), holds
the lock. The same inputs give byte-identical outputs across runs and across --workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_reliability_helpers import (
    assert_same_outputs, cli_subprocess, reference_run, run_argv, run_inputs, stderr_lines,
    subprocess_env,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return run_inputs(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return reference_run(tmp_path_factory)


def _wait_stopped(proc: subprocess.Popen, timeout_s: float = 240) -> None:
    """Block until ``proc`` has stopped itself (SIGSTOP), without reaping it."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
        if pid and os.WIFSTOPPED(status):
            return
        if pid:  # it ended instead
            out = proc.stderr.read() if proc.stderr else ""
            pytest.fail(f"the first run ended (status {status}) before its checkpoint: {out}")
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the first run never reached its checkpoint")


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="SIGSTOP/SIGCONT are POSIX")
def test_two_runs_on_one_folder(inputs, reference, tmp_path):
    """A (hung while counting nuclei, holding the lock); B without --wait: exit 1, one line naming the
    folder and A's pid, nothing changed; C with --wait: queues; A resumes and finishes; C then
    finds everything done. A's outputs equal the reference run's (same inputs, another run)."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "tmequant", *run_argv(inputs, out)]
    a = subprocess.Popen(argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                         env=subprocess_env(TMEQUANT_FAULT="count:1", TMEQUANT_FAULT_SIGNAL="STOP"))
    try:
        _wait_stopped(a)
        before = sorted(str(p) for p in out.rglob("*"))
        b = cli_subprocess(run_argv(inputs, out))
        assert b.returncode == 1, b.stderr
        lines = stderr_lines(b.stderr)
        assert len(lines) == 1 and "Traceback" not in b.stderr, b.stderr
        assert str(out) in lines[0] and f"pid {a.pid}" in lines[0] and "--wait" in lines[0]
        assert sorted(str(p) for p in out.rglob("*")) == before  # B wrote nothing
        c = subprocess.Popen([*argv, "--wait"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             text=True, env=subprocess_env())
        time.sleep(1.0)
        assert c.poll() is None  # queued behind A
    finally:
        os.kill(a.pid, signal.SIGCONT)
    err_a = a.stderr.read() if a.stderr else ""
    assert a.wait(timeout=300) == 0, err_a
    err_c = c.stderr.read() if c.stderr else ""
    assert c.wait(timeout=300) == 0, err_c
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_workers_do_not_change_outputs(inputs, reference, tmp_path):
    """--workers 2 (reader threads for tiling and counting) vs the reference's --workers 1."""
    out = tmp_path / "out"
    argv = run_argv(inputs, out)
    argv[argv.index("--workers") + 1] = "2"
    p = cli_subprocess(argv)
    assert p.returncode == 0, p.stderr
    assert_same_outputs(out, reference)
