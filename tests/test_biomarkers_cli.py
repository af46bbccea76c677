"""`tmequant biomarkers` end to end on hand-written slide stores (docs/store-layout.md)."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import zarr

from tmequant.biomarkers import TileGrid
from tmequant.cli import main
from tmequant.tiling.store import mark_complete

CARD = {"name": "toy", "version": "1.2.0", "arch": "resnet18",
        "tissue_classes": ["TUM", "STR", "LYM", "BACK"],
        "tissue_roles": {"TUM": "tumor", "STR": "stroma", "LYM": "immune", "BACK": "background"}}


def write_store(path, slide_id="s1", nuclei=True, cell_head=False):
    """40x40 tiles of 112 um at 0.25 um/px: a 20x20 tumour (5 mm^2) with a lymphoid blob."""
    n_side = 40
    rr, cc = [a.ravel() for a in np.mgrid[0:n_side, 0:n_side]]
    n = rr.size
    tumour = (rr >= 10) & (rr < 30) & (cc >= 10) & (cc < 30)
    blob = (rr >= 6) & (rr < 8) & (cc >= 6) & (cc < 8)
    probs = np.zeros((n, 4), np.float16)
    probs[tumour, 0] = 1
    probs[blob, 2] = 1
    probs[~tumour & ~blob, 1] = 1
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    l0 = 112.0 / 0.25
    root.attrs.update({"schema_version": 1, "slide_id": slide_id, "source_path": f"/data/{slide_id}.svs",
                       "source_fingerprint": {"size_bytes": 1, "sha256_head_tail": "abc"},
                       "slide_mpp_um": 0.25, "mpp_source": "vendor", "target_mpp_um": 0.5, "tile_px": 224,
                       "tile_um": 112.0, "tile_level0_px": l0, "n_tiles": n, "params_hash": "p"})
    root.create_array("tiles/grid", data=np.stack([rr, cc], 1).astype(np.int32))
    root.create_array("tiles/coords", data=(np.stack([cc, rr], 1) * l0).round().astype(np.int64))
    root.create_array("tiles/tissue_fraction", data=np.ones(n, np.float32))
    lymph = np.where(blob, 60.0, np.where(tumour, 1.0, 3.0)).astype(np.float32)
    if nuclei:
        g = root.create_group("nuclei")
        g.create_array("counts", data=np.stack([lymph, np.full(n, 5, np.float32)], 1))
        mark_complete(g, columns=["lymphocyte", "other"], params={}, params_hash="n")
    g = root.create_group("predictions/toy")
    g.create_array("tissue_probs", data=probs)
    card = dict(CARD)
    if cell_head:
        card.update(cell_classes=["lym", "tum"], cell_roles={"lym": "lymphocyte", "tum": "tumor_cell"})
        g.create_array("cell_counts", data=np.stack([2 * lymph, np.ones(n, np.float32)], 1))
    mark_complete(g, card=card, params_hash="q")
    mark_complete(root)
    return path


def test_from_store_count_precedence(tmp_path):
    p = write_store(tmp_path / "a.zarr")
    g = TileGrid.from_store(p, "toy")
    assert g.count_source == "nucleus_counter" and g.lymphocyte_counts.max() == 60
    assert g.metadata["model_version"] == "1.2.0" and g.tile_level0_px == 448.0
    assert set(g.role_probs) == {"tumor", "stroma", "immune", "background"}
    p2 = write_store(tmp_path / "b.zarr", cell_head=True)
    g2 = TileGrid.from_store(p2, "toy")
    assert g2.count_source == "model" and g2.lymphocyte_counts.max() == 120
    cells = pd.DataFrame({"x": [448.0 * 15.5], "y": [448.0 * 15.5], "class": ["Lymphocyte"]})
    g3 = TileGrid.from_store(p2, "toy", cells=cells)
    assert g3.count_source == "cell_table" and g3.lymphocyte_counts.sum() == 1
    assert TileGrid.from_store(write_store(tmp_path / "c.zarr", nuclei=False), "toy").count_source is None


def test_cli_writes_tables_and_geojson(tmp_path):
    s1 = write_store(tmp_path / "s1.zarr", "s1")
    s2 = write_store(tmp_path / "s2.zarr", "s2", nuclei=False)
    params = tmp_path / "p.toml"
    params.write_text("[biomarkers]\ntls_min_density_per_mm2 = 2500\n")
    out = tmp_path / "out"
    rc = main(["-q", "biomarkers", str(s1), str(s2), "--model", "toy", "--params", str(params),
               "--margin-um", "400", "--out", str(out)])
    assert rc == 0
    df = pd.read_csv(out / "biomarkers.csv")
    assert list(df["slide_id"]) == ["s1", "s2"]
    assert list(df["count_source"]) == ["nucleus_counter", "area_estimate"]
    assert (df["param_margin_um"] == 400).all() and (df["param_tls_min_density_per_mm2"] == 2500).all()
    assert df["params_hash"].nunique() == 1 and df["model_version"].iloc[0] == "1.2.0"
    assert pd.read_parquet(out / "biomarkers.parquet").shape == df.shape
    # the 5 mm^2 tumour has 1 TIL per 0.012544 mm^2 tile
    assert df["til_density_intratumoral_per_mm2"].iloc[0] == pytest.approx(1 / 0.012544)
    tls = pd.read_csv(out / "tls.csv")
    assert (tls["slide_id"] == "s1").sum() == 1
    with zipfile.ZipFile(out / "s1.geojson.zip") as zf:  # QuPath imports .zip directly
        comp = json.loads(zf.read("s1.geojson"))
    ann = [f for f in comp["features"] if f["properties"]["objectType"] == "annotation"]
    names = {f["properties"]["classification"]["name"] for f in ann}
    assert {"Tumor bulk", "Invasive margin", "Tumor core", "Tumor epithelium"} <= names
    bulk = [f for f in ann if f["properties"]["classification"]["name"] == "Tumor bulk"]
    xs = np.array(bulk[0]["geometry"]["coordinates"][0])[:, 0]
    assert xs.min() == pytest.approx(10 * 448.0) and xs.max() == pytest.approx(30 * 448.0)
    tls_geo = [f for f in ann if f["properties"]["classification"]["name"] == "TLS"]
    assert len(tls_geo) == 1
    tiles = [f for f in comp["features"] if f["properties"]["objectType"] == "tile"]
    assert len(tiles) == zarr.open_group(str(tmp_path / "s1.zarr"), mode="r")["tiles/coords"].shape[0]


def test_cli_isolates_failures_and_bad_params(tmp_path):
    s1 = write_store(tmp_path / "s1.zarr", "s1")
    out = tmp_path / "out"
    rc = main(["-q", "biomarkers", str(s1), str(tmp_path / "missing.zarr"), "--model", "toy", "--out", str(out)])
    assert rc == 1
    assert len(pd.read_csv(out / "biomarkers.csv")) == 1
    assert "missing" in (out / "failures.csv").read_text()
    rc = main(["-q", "biomarkers", str(s1), "--model", "nope", "--out", str(out)])
    assert rc == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("margn_um = 3\n")
    assert main(["-q", "biomarkers", str(s1), "--model", "toy", "--params", str(bad), "--out", str(out)]) == 2


def test_counter_switched_off_ignores_stored_nucleus_counts(tmp_path):
    from tmequant.biomarkers import biomarkers_for_store

    s1 = write_store(tmp_path / "s1.zarr", "s1")  # has nuclei/counts
    on = biomarkers_for_store(str(s1), "toy")
    off = biomarkers_for_store(str(s1), "toy", nucleus_counts=False)
    assert on.row["count_source"] == "nucleus_counter"
    assert off.row["count_source"] == "area_estimate"
