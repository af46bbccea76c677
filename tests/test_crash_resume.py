"""Crashes and interruptions of `tmequant run` (docs/reliability.md, "Crashes").

`TMEQUANT_FAULT=<checkpoint>:<n>` (tmequant/_faults.py) makes the process SIGKILL itself at
the n-th pass of a named checkpoint, so every kill lands at a known point. One chain of runs
into one output folder is interrupted at six points (Ctrl-C during tiling, then SIGKILL
during tiling, between prediction chunks, while counting nuclei, while writing a slide's
results, while writing the cohort report), each run resuming the previous one; after each
kill nothing unfinished may look finished, and the final rerun must give the same files,
byte for byte, as an uninterrupted run.
"""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest

from test_reliability_helpers import (
    assert_same_outputs, cli_subprocess, reference_run, run_argv, run_inputs, stderr_lines,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """S1, S2, the tiny model, params with 16-tile shards: S1's 51 tiles make 4 shards, so a
    kill at the second shard lands in the middle of tiling."""
    return run_inputs(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the same command."""
    return reference_run(tmp_path_factory)


def _unfinished_never_finished(out: Path) -> None:
    """Every zarr group or result folder without its marker is refused or ignored by readers."""
    import zarr

    from tmequant.errors import StoreError
    from tmequant.pipeline import load_slide_result
    from tmequant.tiling.store import SlideStore, is_complete

    for sp in sorted((out / "stores").glob("*.zarr")) if (out / "stores").exists() else []:
        root = zarr.open_group(str(sp), mode="r", zarr_format=3)
        if not is_complete(root):
            with pytest.raises(StoreError, match="unfinished"):
                SlideStore(sp)
            continue
        store = SlideStore(sp)
        preds = root.get("predictions")
        for name, g in (preds.groups() if preds is not None else []):
            if not is_complete(g):
                assert name not in store.prediction_names()
                with pytest.raises(StoreError, match="unfinished"):
                    store.predictions(name)
        nuc = root.get("nuclei")
        if nuc is not None and not is_complete(nuc):
            assert store.nuclei_counts() is None
    for rdir in sorted((out / "results").glob("*")) if (out / "results").exists() else []:
        if not (rdir / "done.json").exists():
            assert load_slide_result(rdir, "any") is None


def _left_behind(out: Path, name: str) -> None:
    """The half-done state each kill must leave (so the checks above are not vacuous)."""
    import zarr

    from tmequant.tiling.store import is_complete

    def group(path: Path):
        return zarr.open_group(str(path), mode="r", zarr_format=3)

    s1, s2 = out / "stores" / "S1.zarr", out / "stores" / "S2.zarr"
    if name == "tile_shard":
        assert s1.exists() and not is_complete(group(s1))
        assert (s1 / "tiles" / "images").exists()
    elif name == "predict_chunk":
        g = group(s1 / "predictions" / "tiny-run")
        assert not is_complete(g) and np.asarray(g["chunk_done"][...]).any()
    elif name == "count":
        assert (out / "results" / "S1" / "done.json").exists()  # S1 finished meanwhile
        assert not is_complete(group(s2 / "nuclei"))
    elif name == "slide_result":
        r2 = out / "results" / "S2"
        assert (r2 / "biomarkers.json").exists() and not (r2 / "done.json").exists()
    elif name == "report":
        assert (out / "cohort.csv").exists() and not (out / "report.html").exists()


# (checkpoint, n): S1 then S2 go through every stage in turn; each run resumes the last.
KILLS = [
    ("tile_shard", 2),      # S1 tiling, after its 2nd of 4 shards: store without its marker
    ("predict_chunk", 1),   # S1 predictions: chunk written and flagged, group not complete
    ("count", 2),           # S2 nucleus counts written, marker not yet (S1 finished meanwhile)
    ("slide_result", 1),    # S2 result files written, done.json not yet
    ("report", 1),          # cohort tables written, report pictures half drawn, no HTML
]


@pytest.mark.slow
def test_interrupted_runs_resume_to_identical_outputs(inputs, reference, tmp_path):
    out = tmp_path / "out"
    argv = run_argv(inputs, out)

    # Ctrl-C while tiling: a message, exit 130, the lock released, nothing looks finished.
    p = cli_subprocess(argv, TMEQUANT_FAULT="tile_shard:1", TMEQUANT_FAULT_SIGNAL="INT")
    assert p.returncode == 130, p.stderr
    assert "Traceback" not in p.stderr
    assert stderr_lines(p.stderr)[-1].startswith("interrupted:"), p.stderr
    assert not (out / ".tmequant.lock.json").exists()  # the holder file goes with the lock
    _unfinished_never_finished(out)
    assert not (out / "cohort.csv").exists()

    for name, n in KILLS:
        p = cli_subprocess(argv, TMEQUANT_FAULT=f"{name}:{n}")
        assert p.returncode == -signal.SIGKILL, f"{name}:{n} was not reached (rc {p.returncode}): {p.stderr}"
        _left_behind(out, name)
        _unfinished_never_finished(out)

    # what each kill left behind, as the comments above say
    p = cli_subprocess(argv)
    assert p.returncode == 0, p.stderr
    assert_same_outputs(out, reference)


@pytest.mark.slow
def test_kill_leaves_unfinished_store_that_is_rebuilt(inputs, tmp_path):
    """A store killed mid-tiling has no marker; `predict` refuses it with one line; `tile` rebuilds it."""
    out = tmp_path / "tiles"
    argv = ["-q", "tile", str(inputs["S1"]), "--out", str(out), "--mpp", "1", "--tile-px", "64",
            "--workers", "1"]
    p = cli_subprocess(argv, TMEQUANT_FAULT="tile_shard:1")
    assert p.returncode == -signal.SIGKILL, p.stderr
    from tmequant.tiling.store import SlideStore, store_is_complete

    assert (out / "S1.zarr").exists() and not store_is_complete(out / "S1.zarr")
    p = cli_subprocess(["-q", "predict", str(out / "S1.zarr"), "--model", str(inputs["model"]),
                        "--device", "cpu"])
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert any("S1.zarr" in ln and "unfinished" in ln for ln in stderr_lines(p.stderr)), p.stderr
    p = cli_subprocess(argv)
    assert p.returncode == 0, p.stderr
    s = SlideStore(out / "S1.zarr")
    assert s.n_tiles == 51 and np.asarray(s.images[...]).any()
