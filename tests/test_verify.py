"""`tmequant verify STORE...`: chunk checksums written at creation name what is broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_api import TILING, make_slide
from test_store_api import make_store

import tmequant as tq
from tmequant.cli import main
from tmequant.errors import StoreError
from tmequant.store import SlideStore, verify_store


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    rc = main(["verify", *args])
    cap = capsys.readouterr()
    return rc, [ln for ln in cap.out.splitlines() if ln.strip()], cap.err


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def test_sound_store_exits_0(tmp_path, capsys):
    make_store(tmp_path / "s.zarr")
    rc, out, err = run(capsys, str(tmp_path / "s.zarr"))
    assert rc == 0 and out == [] and "1 store(s) checked, 0 broken" in err


def test_a_store_written_by_tile_slide_verifies(tmp_path, capsys):
    slide = make_slide(tmp_path / "v.svs")
    res = tq.tile_slide(slide, tmp_path / "out", tq.TilingParams(**TILING), progress=False,
                        qc_png=False)
    assert res.n_tiles > 0 and verify_store(res.store_path) == []
    rc, out, _ = run(capsys, str(tmp_path / "out"))  # a folder of stores
    assert rc == 0 and out == []


def test_corrupt_tile_chunk_is_named(tmp_path, capsys):
    good, bad = tmp_path / "good.zarr", tmp_path / "bad.zarr"
    make_store(good)
    make_store(bad)
    flip_byte(bad / "tiles" / "images" / "c" / "1" / "0" / "0" / "0", 20)  # tiles 4-7's shard
    rc, out, err = run(capsys, str(good), str(bad))
    assert rc == 1 and len(out) == 1, out
    assert out[0].startswith(f"{bad}: tiles/images: shard c/1/0/0/0")
    assert "tiles 4-5" in out[0] and "checksum mismatch" in out[0]
    assert "2 store(s) checked, 1 broken" in err
    # and a reader of the damaged tiles gets a StoreError naming the store, not a raw error
    with pytest.raises(StoreError, match="bad.zarr.*tiles/images.*checksum"):
        SlideStore(bad).images[4:6]


def test_missing_chunk_and_missing_array_are_named(tmp_path, capsys):
    p = tmp_path / "s.zarr"
    make_store(p)
    (p / "tiles" / "grid" / "c" / "0" / "0").unlink()
    shutil.rmtree(p / "tissue_mask")
    rc, out, _ = run(capsys, str(p))
    assert rc == 1
    assert f"{p}: tiles/grid: chunk c/0/0 is missing" in out
    assert f"{p}: tissue_mask is missing" in out
    assert len(out) == 2, out


def test_corrupt_metadata_and_unfinished_store(tmp_path, capsys):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    make_store(a)
    make_store(b)
    (a / "zarr.json").write_text("{not json")
    g = zarr.open_group(str(b), mode="r+")
    del g.attrs["complete"]
    rc, out, _ = run(capsys, str(a), str(b))
    assert rc == 1 and len(out) == 2, out
    assert out[0].startswith(f"{a}: cannot open slide store")
    assert out[1].startswith(f"{b}: slide store is unfinished")


def test_finished_predictions_are_checked_unfinished_ones_are_not(tmp_path, capsys):
    p = tmp_path / "s.zarr"
    make_store(p)
    with SlideStore.open(p, "r+") as st:
        for name in ("done", "half"):
            st.create_predictions(name, 10, chunk_rows=4, params_hash="x", attrs={}, n_tissue=2,
                                  cell_classes=["a"])
        for c, (lo, hi) in enumerate(((0, 4), (4, 8), (8, 10))):
            st.write_prediction_chunk("done", c, tissue_probs=np.full((hi - lo, 2), 0.5),
                                      cells={"x": [1.0], "y": [2.0], "cls": [0], "score": [0.9],
                                             "tile": [lo]})
        st.mark_predictions_complete("done")
        st.write_prediction_chunk("half", 0, tissue_probs=np.zeros((4, 2)))  # resumable
    assert verify_store(p) == []
    shutil.rmtree(p / "predictions" / "done" / "cells" / "c000001")
    flip_byte(p / "predictions" / "done" / "tissue_probs" / "c" / "2" / "0", 3)
    rc, out, _ = run(capsys, str(p))
    assert rc == 1
    assert any("predictions/done/tissue_probs: chunk c/2/0 is corrupt (checksum mismatch)" in ln
               for ln in out), out
    assert any("predictions/done/cells/c000001/x is missing" in ln for ln in out), out
    assert not any("half" in ln for ln in out), out


def test_stores_without_checksums_are_decoded(tmp_path, capsys):
    """A store written before checksums (plain zarr): still verified by decoding."""
    p = tmp_path / "old.zarr"
    root = zarr.open_group(str(p), mode="w", zarr_format=3)
    root.attrs.update({"schema_version": 1, "n_tiles": 2})
    for key, data in (("tissue_mask", np.ones((2, 2), bool)),
                      ("thumbnail", np.zeros((2, 2, 3), np.uint8)),
                      ("tiles/coords", np.zeros((2, 2), np.int64)),
                      ("tiles/grid", np.zeros((2, 2), np.int32)),
                      ("tiles/tissue_fraction", np.ones(2, np.float32)),
                      ("tiles/images", np.ones((2, 4, 4, 3), np.uint8))):
        root.create_array(key, data=data)
    root.attrs["complete"] = True
    assert verify_store(p) == []
    chunk = p / "tiles" / "images" / "c" / "0" / "0" / "0" / "0"
    chunk.write_bytes(b"garbage")
    problems = verify_store(p)
    assert len(problems) == 1 and "tiles/images" in problems[0] and str(p) in problems[0]


def test_usage_errors_exit_2(tmp_path, capsys):
    assert main(["verify"]) == 2
    (tmp_path / "empty").mkdir()
    rc, _, err = run(capsys, str(tmp_path / "empty"))
    assert rc == 2 and "no slide stores" in err


def test_verify_reports_are_one_line_each(tmp_path, capsys):
    p = tmp_path / "s.zarr"
    make_store(p)
    meta = p / "tiles" / "images" / "zarr.json"
    m = json.loads(meta.read_text())
    m["shape"][0] = 99  # more rows than n_tiles
    meta.write_text(json.dumps(m))
    rc, out, _ = run(capsys, str(p))
    assert rc == 1 and f"{p}: tiles/images has 99 rows, n_tiles is 10" in out
    assert all("\n" not in ln and ln.startswith(str(p)) for ln in out)


def test_an_empty_store_with_finished_predictions_is_sound(tmp_path):
    """No tissue: zero tiles, predictions complete with no chunk done: nothing is broken."""
    p = tmp_path / "empty.zarr"
    make_store(p, n=0)
    with SlideStore.open(p, "r+") as st:
        st.create_predictions("m", 0, chunk_rows=4, params_hash="x", attrs={}, n_tissue=2)
        st.mark_predictions_complete("m")
    assert SlideStore(p).tissue_probs("m").shape == (0, 2)
    assert verify_store(p) == []
