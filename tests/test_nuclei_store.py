"""count_store on a hand-built slide store (docs/store-layout.md): marker, resume, params."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import zarr
from test_nuclei import render, scene

from tmequant.errors import StoreError
from tmequant.inference.nuclei import NucleusCounterParams, count_store, count_tiles
from tmequant.tiling.store import SlideStore, mark_complete

TARGET_MPP = 0.5
SLIDE_MPP = 0.25  # level 0 is twice as fine as the stored tiles
TILE_PX = 224


def build_store(path, n_tiles: int = 5) -> np.ndarray:
    """A finished store whose tiles are synthetic scenes; returns the images."""
    images = np.stack([render(scene(i)[0], TARGET_MPP, i) for i in range(n_tiles)])
    tile_um = TILE_PX * TARGET_MPP
    tile_l0 = tile_um / SLIDE_MPP
    grid = np.array([(i // 3, i % 3) for i in range(n_tiles)], np.int32)
    coords = np.rint(grid[:, ::-1] * tile_l0).astype(np.int64)
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("tiles/coords", data=coords)
    root.create_array("tiles/grid", data=grid)
    root.create_array("tiles/tissue_fraction", data=np.ones(n_tiles, np.float32))
    root.create_array("tiles/images", data=images, chunks=(2, TILE_PX, TILE_PX, 3))
    mark_complete(
        root, schema_version=1, slide_id="synthetic", source_path="/nowhere/synthetic.tif",
        level0_width_px=int(3 * tile_l0), level0_height_px=int(2 * tile_l0),
        slide_mpp_um=SLIDE_MPP, mpp_source="override", target_mpp_um=TARGET_MPP,
        tile_px=TILE_PX, tile_um=tile_um, tile_level0_px=tile_l0, read_level=0,
        n_tiles=n_tiles,
    )
    return images


def test_count_store_writes_group_resumes_and_recomputes(tmp_path):
    path = tmp_path / "synthetic.zarr"
    images = build_store(path)
    cells = tmp_path / "cells.parquet"
    res = count_store(path, progress=False, cells_out=cells, chunk_tiles=2, workers=2)
    assert res.computed and res.n_tiles == 5

    # the group, its attributes and the marker; the reader sees the counts
    grp = zarr.open_group(str(path), mode="r")["nuclei"]
    assert grp.attrs["complete"] is True
    assert grp.attrs["columns"] == ["lymphocyte", "other"]
    assert grp.attrs["params_hash"] == NucleusCounterParams().params_hash
    assert grp.attrs["params"]["lymphocyte_min_h_od"] == NucleusCounterParams().lymphocyte_min_h_od
    counts = SlideStore(path).nuclei_counts()
    assert counts is not None and counts.shape == (5, 2) and counts.dtype == np.float32
    np.testing.assert_array_equal(counts, count_tiles(images, TARGET_MPP))
    truth = np.array([scene(i)[1] for i in range(5)], np.float32)
    assert np.abs(counts - truth).max() <= 1

    # cell table: one row per detection, level-0 coordinates inside the detection's tile
    df = pd.read_parquet(cells)
    assert {"x", "y", "class"} <= set(df.columns)
    assert (df.groupby("class").size().reindex(["lymphocyte", "other"]).to_numpy()
            == counts.sum(0)).all()
    store = SlideStore(path)
    x0 = store.coords[df["tile_index"], 0]
    y0 = store.coords[df["tile_index"], 1]
    assert ((df["x"] >= x0) & (df["x"] < x0 + store.tile_level0_px)).all()
    assert ((df["y"] >= y0) & (df["y"] < y0 + store.tile_level0_px)).all()
    # detections of tile 0 land where the scene put its nuclei (level-0 px -> um)
    lym_um = np.array([(x, y) for x, y, *_ in scene(0)[0]])
    t0 = df[df["tile_index"] == 0][["x", "y"]].to_numpy() * SLIDE_MPP  # level-0 px -> um
    nearest = np.sqrt(((t0[:, None] - lym_um[None]) ** 2).sum(-1)).min(1)
    assert np.median(nearest) < 1.5

    # a rerun with the same params does nothing
    again = count_store(path, progress=False, cells_out=cells)
    assert not again.computed
    np.testing.assert_array_equal(again.counts, counts)

    # changed params recompute and rewrite the hash
    p2 = NucleusCounterParams(lymphocyte_min_h_od=2.5)  # nothing is that dark
    third = count_store(path, p2, progress=False)
    assert third.computed
    grp = zarr.open_group(str(path), mode="r")["nuclei"]
    assert grp.attrs["params_hash"] == p2.params_hash != res.params_hash
    assert grp.attrs["complete"] is True
    new = SlideStore(path).nuclei_counts()
    assert new[:, 0].sum() == 0 and new.sum() == counts.sum()  # all moved to "other"

    # overwrite forces a recompute with the same params
    assert count_store(path, p2, progress=False, overwrite=True).computed


def test_unfinished_group_is_recomputed(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path, n_tiles=2)
    root = zarr.open_group(str(path), mode="r+")
    g = root.create_group("nuclei")
    g.create_array("counts", data=np.full((2, 2), -1, np.float32))
    g.attrs["params_hash"] = NucleusCounterParams().params_hash  # but no marker
    assert SlideStore(path).nuclei_counts() is None
    res = count_store(path, progress=False)
    assert res.computed and (SlideStore(path).nuclei_counts() >= 0).all()


def test_disabled_counter_writes_nothing(tmp_path):
    path = tmp_path / "s.zarr"
    build_store(path, n_tiles=1)
    res = count_store(path, NucleusCounterParams(enabled=False), progress=False)
    assert not res.computed and res.skipped_reason and res.counts is None
    assert "nuclei" not in zarr.open_group(str(path), mode="r")


def test_missing_or_unfinished_store_is_a_store_error(tmp_path):
    with pytest.raises(StoreError, match="no such slide store"):
        count_store(tmp_path / "absent.zarr", progress=False)
    root = zarr.open_group(str(tmp_path / "half.zarr"), mode="w", zarr_format=3)
    root.attrs["n_tiles"] = 0
    with pytest.raises(StoreError, match="unfinished"):
        count_store(tmp_path / "half.zarr", progress=False)
