"""The per-slide QuPath GeoJSON of `tmequant run`, checked field by field against QuPath's format.

QuPath >= 0.4 reads and writes (qupath-core ``qupath/lib/io/PathObjectTypeAdapters.java``;
docs "Exporting annotations", "Units and origin"): a ``FeatureCollection`` whose ``features``
are ``{"type": "Feature", "id": <UUID string>, "geometry": <GeoJSON geometry>, "properties":
{"objectType": "annotation"|"detection"|"tile"|"cell"|..., "name": str, "classification":
{"name": str, "color": [r, g, b]}, "measurements": {name: number}}}``. Coordinates are level-0
pixels with the origin at the top-left of the full-resolution image. Measurements are read
into a map of doubles, so every value must be a number (no null, no NaN).
"""

from __future__ import annotations

import gzip
import json
import math
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import shapely
import zarr
from shapely.geometry import shape

from tmequant.biomarkers import BiomarkerParams, TileGrid, compute_biomarkers
from tmequant.pipeline import slide_features, write_slide_geojson
from tmequant.qupath import read_features
from tmequant.roles import TISSUE_ROLES
from tmequant.tiling.store import SlideStore

N = 20  # grid side, tiles
TILE = 64  # tile side, px and level-0 px (1 um/px)
TUMOR = (slice(4, 14), slice(4, 14))
TLS = (slice(15, 18), slice(7, 10))
QUPATH_OBJECT_TYPES = {"annotation", "detection", "tile", "cell", "tmaCore", "root"}


def _make_store(path: Path) -> Path:
    """A finished store (docs/store-layout.md) with a tumour block, an immune cluster below it,
    stroma elsewhere, predictions of a 6-class model and nucleus counts."""
    rr, cc = np.meshgrid(np.arange(N), np.arange(N), indexing="ij")
    grid = np.stack([rr.ravel(), cc.ravel()], 1).astype(np.int32)
    role = np.full((N, N), TISSUE_ROLES.index("stroma"))
    role[TUMOR] = TISSUE_ROLES.index("tumor")
    role[TLS] = TISSUE_ROLES.index("immune")
    k = len(TISSUE_ROLES)
    probs = np.full((N * N, k), 0.02, np.float32)
    probs[np.arange(N * N), role.ravel()] = 1 - 0.02 * (k - 1)
    lym = np.full((N, N), 2.0, np.float32)
    lym[TLS] = 60.0  # 60 per 4096 um^2 = 14,600 per mm^2
    root = zarr.open_group(str(path), mode="w", zarr_format=3)
    root.create_array("tiles/coords", data=(grid[:, ::-1] * TILE).astype(np.int64))
    root.create_array("tiles/grid", data=grid)
    tf = np.ones(N * N, np.float32)
    tf[0] = 0.5
    root.create_array("tiles/tissue_fraction", data=tf)
    card = {"name": "m", "version": "1", "tissue_classes": list(TISSUE_ROLES),
            "tissue_roles": {r: r for r in TISSUE_ROLES}, "cell_classes": [], "cell_roles": {}}
    pg = root.create_group("predictions/m")
    pg.create_array("tissue_probs", data=probs.astype(np.float16))
    pg.attrs.update({"card": card, "params_hash": "p", "complete": True})
    ng = root.create_group("nuclei")
    ng.create_array("counts", data=np.stack([lym.ravel(), np.zeros(N * N, np.float32)], 1))
    ng.attrs.update({"columns": ["lymphocyte", "other"], "params_hash": "n", "complete": True})
    root.attrs.update({
        "schema_version": 1, "slide_id": "Q1", "source_path": "/nowhere/Q1.svs",
        "source_fingerprint": "abc", "slide_mpp_um": 1.0, "target_mpp_um": 1.0, "tile_px": TILE,
        "tile_um": float(TILE), "tile_level0_px": float(TILE), "params_hash": "s",
        "level0_width_px": N * TILE, "level0_height_px": N * TILE, "n_tiles": N * N, "complete": True,
    })
    return path


PARAMS = BiomarkerParams(bulk_close_um=128.0, bulk_min_area_mm2=0.1, margin_um=128.0)


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    store = SlideStore(_make_store(tmp_path_factory.mktemp("qp") / "Q1.zarr"))
    res = compute_biomarkers(TileGrid.from_store(store, "m"), params=PARAMS)
    assert res.row["bulk_area_mm2"] > 0 and len(res.tls) == 1  # the fixture is what it claims
    return store, res


def _rings(geom: dict) -> list[list[list[float]]]:
    if geom["type"] == "Polygon":
        return geom["coordinates"]
    assert geom["type"] == "MultiPolygon"
    return [ring for poly in geom["coordinates"] for ring in poly]


def test_feature_collection_field_by_field(slide, tmp_path):
    store, res = slide
    # QuPath's importer (PathIO.readObjects) reads .geojson/.json and .zip archives of them
    path = write_slide_geojson(tmp_path / "Q1.geojson.zip", store, "m", res)
    with zipfile.ZipFile(path) as zf:
        assert zf.namelist() == ["Q1.geojson"]
        doc = json.loads(zf.read("Q1.geojson"))
    assert set(doc) == {"type", "features"} and doc["type"] == "FeatureCollection"
    feats = doc["features"]
    ids = set()
    width = height = N * TILE
    for f in feats:
        assert set(f) == {"type", "id", "geometry", "properties"} and f["type"] == "Feature"
        assert str(uuid.UUID(f["id"])) == f["id"]  # QuPath: UUID.fromString
        ids.add(f["id"])
        for ring in _rings(f["geometry"]):
            assert len(ring) >= 4 and ring[0] == ring[-1]  # closed linear ring
            for x, y in ring:
                assert isinstance(x, float) and isinstance(y, float)
                assert 0 <= x <= width and 0 <= y <= height  # level-0 px, origin top-left
        props = f["properties"]
        assert props["objectType"] in QUPATH_OBJECT_TYPES
        cls = props["classification"]
        assert set(cls) == {"name", "color"} and isinstance(cls["name"], str) and cls["name"]
        assert len(cls["color"]) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in cls["color"])
        m = props["measurements"]
        assert isinstance(m, dict) and m  # the map form QuPath >= 0.4 writes
        for k, v in m.items():
            assert isinstance(k, str) and isinstance(v, float) and math.isfinite(v)
        assert set(props) <= {"objectType", "name", "classification", "measurements"}
    assert len(ids) == len(feats)  # unique ids

    tiles = [f for f in feats if f["properties"]["objectType"] == "tile"]
    anns = [f for f in feats if f["properties"]["objectType"] == "annotation"]
    assert len(tiles) == store.n_tiles and len(tiles) + len(anns) == len(feats)
    probs = np.asarray(store.predictions("m")["tissue_probs"][...], np.float64)
    for i, (f, (x, y)) in enumerate(zip(tiles, store.coords)):
        g = shape(f["geometry"])
        assert g.equals(shapely.box(x, y, x + TILE, y + TILE))
        m = f["properties"]["measurements"]
        p = [m[f"P({c})"] for c in TISSUE_ROLES]
        assert p == pytest.approx(list(probs[i]), abs=1e-6)
        assert f["properties"]["classification"]["name"] == TISSUE_ROLES[int(np.argmax(probs[i]))]
        assert m["Lymphocyte count"] == pytest.approx(float(res.lymphocyte_counts[i]))
        assert m["Nuclei lymphocyte count"] == pytest.approx(float(store.nuclei_counts()[i, 0]))
        assert m["Tissue fraction"] == pytest.approx(float(store.tissue_fraction[i]))
    # tile classification names the TLS cluster's tiles immune
    r, c = 16, 8
    assert tiles[r * N + c]["properties"]["classification"]["name"] == "immune"

    by_name: dict[str, list[dict]] = {}
    for f in anns:
        assert f["properties"]["name"]
        by_name.setdefault(f["properties"]["classification"]["name"], []).append(f)
    # this grid's bulk is all tumour (no stroma inside): core and epithelium, no stroma
    assert set(by_name) == {"Tumor bulk", "Invasive margin", "Tumor core", "Tumor epithelium", "TLS"}
    bulk = shapely.union_all([shape(f["geometry"]) for f in by_name["Tumor bulk"]])
    # the bulk raster's cells, one box each, placed by the compartments' grid origin
    comp = res.compartments
    rs, cs = np.nonzero(comp.bulk)
    r0, c0 = comp.origin
    cells = shapely.union_all([shapely.box((c + c0) * TILE, (r + r0) * TILE, (c + c0 + 1) * TILE,
                                           (r + r0 + 1) * TILE) for r, c in zip(rs, cs)])
    assert bulk.equals(cells)
    assert bulk.within(shapely.box(4 * TILE, 4 * TILE, 14 * TILE, 14 * TILE))  # inside the tumour
    for f in by_name["Tumor bulk"] + by_name["Invasive margin"]:
        assert f["properties"]["measurements"]["Area um^2"] == pytest.approx(shape(f["geometry"]).area)
    assert sum(f["properties"]["measurements"]["Area um^2"] for f in by_name["Tumor bulk"]) == \
        pytest.approx(res.row["bulk_area_mm2"] * 1e6)
    (tls,) = by_name["TLS"]
    assert tls["properties"]["name"] == "TLS 1"
    assert shape(tls["geometry"]).equals(shapely.box(7 * TILE, 15 * TILE, 10 * TILE, 18 * TILE))
    tm = tls["properties"]["measurements"]
    assert tm["Area um^2"] == pytest.approx(9 * TILE * TILE)
    assert tm["Lymphocytes"] == pytest.approx(9 * 60)
    assert tm["Intratumoral"] == 0.0


def test_geojson_reads_back_and_is_deterministic(slide, tmp_path):
    store, res = slide
    a = write_slide_geojson(tmp_path / "a.geojson", store, "m", res)
    b = write_slide_geojson(tmp_path / "b.geojson", store, "m", res)
    assert a.read_bytes() == b.read_bytes()
    feats = read_features(a)  # our own QuPath reader (also reads QuPath's exports)
    assert [f.object_type for f in feats].count("tile") == store.n_tiles
    assert {f.classification for f in feats if f.object_type == "annotation"} == \
        {"Tumor bulk", "Invasive margin", "Tumor core", "Tumor epithelium", "TLS"}
    for suffix in (".geojson.zip", ".geojson.gz"):  # no time stamps inside: identical bytes
        z1 = write_slide_geojson(tmp_path / f"a{suffix}", store, "m", res).read_bytes()
        z2 = write_slide_geojson(tmp_path / "again" / f"a{suffix}", store, "m", res).read_bytes()
        assert z1 == z2
    assert gzip.decompress((tmp_path / "a.geojson.gz").read_bytes()) == a.read_bytes()
    with zipfile.ZipFile(tmp_path / "a.geojson.zip") as zf:
        assert zf.read("a.geojson") == a.read_bytes()


def test_non_finite_measurements_are_left_out(slide):
    store, res = slide
    dens = np.array(res.lymphocyte_density_per_mm2, dtype=float)
    dens[3] = np.nan
    from dataclasses import replace

    feats = slide_features(store, "m", replace(res, lymphocyte_density_per_mm2=dens))
    tiles = [f for f in feats if f["properties"]["objectType"] == "tile"]
    assert "Lymphocyte density per mm^2" not in tiles[3]["properties"]["measurements"]
    assert "Lymphocyte density per mm^2" in tiles[4]["properties"]["measurements"]
