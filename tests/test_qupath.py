"""QuPath GeoJSON reading and writing (tmequant.qupath)."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, box

from tmequant.errors import CellTableError
from tmequant.qupath import (
    annotation_feature,
    grid_mask_to_polygons,
    read_features,
    tile_features,
    write_feature_collection,
)


def test_grid_mask_to_polygons_keeps_holes_and_scale():
    m = np.zeros((6, 6), bool)
    m[1:5, 1:5] = True
    m[2:3, 2:3] = False  # one-cell hole
    polys = grid_mask_to_polygons(m, origin_rowcol=(10, 20), tile_level0_px=50.0)
    assert len(polys) == 1
    p = polys[0]
    assert p.area == pytest.approx((16 - 1) * 50 * 50)
    assert len(p.interiors) == 1
    assert p.bounds == (21 * 50, 11 * 50, 25 * 50, 15 * 50)  # x from col, y from row
    assert grid_mask_to_polygons(np.zeros((3, 3), bool)) == []


def test_diagonal_cells_are_separate_polygons():
    m = np.eye(3, dtype=bool)
    polys = grid_mask_to_polygons(m, (0, 0), 1.0)
    assert len(polys) == 3 and all(p.is_valid for p in polys)


def test_written_collection_follows_qupath_format(tmp_path):
    f = annotation_feature(box(0, 0, 10, 10), "bulk", (200, 0, 0), {"Area um^2": 25.0, "bad": float("nan")})
    tiles = tile_features(np.array([0, 224]), np.array([0, 0]), 224, ["tum", "str"],
                          np.array([[0.9, 0.1], [0.2, 0.8]]), {"Lymphocyte": np.array([3, 4])})
    p = write_feature_collection(tmp_path / "a.geojson", [f, *tiles])
    data = json.loads(p.read_text())
    assert data["type"] == "FeatureCollection" and len(data["features"]) == 3
    for feat in data["features"]:
        assert feat["type"] == "Feature"
        uuid.UUID(feat["id"])
        assert feat["geometry"]["type"] == "Polygon"
        assert feat["properties"]["objectType"] in ("annotation", "tile")
        assert isinstance(feat["properties"]["measurements"], dict)
    a = data["features"][0]["properties"]
    assert a["classification"] == {"name": "bulk", "color": [200, 0, 0]}
    assert a["measurements"]["bad"] is None  # JSON has no NaN
    t = data["features"][2]["properties"]
    assert t["classification"]["name"] == "str" and t["measurements"]["Lymphocyte count"] == 4.0
    assert t["measurements"]["P(tum)"] == pytest.approx(0.2)


def test_round_trip_and_gzip(tmp_path):
    feats = [annotation_feature(box(1, 2, 3, 4), "TLS", (0, 0, 255), {"Area um^2": 4.0})]
    for gz in (False, True):
        p = write_feature_collection(tmp_path / f"x{gz}.geojson", feats, gzip=gz)
        back = read_features(p)
        assert len(back) == 1 and back[0].classification == "TLS"
        assert back[0].object_type == "annotation"
        assert back[0].measurements == {"Area um^2": 4.0}
        assert back[0].geometry.equals(box(1, 2, 3, 4))


def test_reads_old_qupath_forms(tmp_path):
    """QuPath <= 0.3: bare feature list, measurements as name/value list; cells use nucleusGeometry."""
    data = [
        {"type": "Feature", "id": "a", "geometry": shapely.geometry.mapping(Point(5, 6)),
         "properties": {"objectType": "detection", "classification": {"name": "Lymphocyte", "colorRGB": -1},
                        "measurements": [{"name": "Area", "value": 12}]}},
        {"type": "Feature", "geometry": shapely.geometry.mapping(box(0, 0, 100, 100)),
         "properties": {"objectType": "cell", "classification": {"name": "Tumor"},
                        "nucleusGeometry": shapely.geometry.mapping(box(10, 10, 20, 20))}},
    ]
    p = tmp_path / "old.json"
    p.write_text(json.dumps(data))
    f = read_features(p)
    assert f[0].measurements == {"Area": 12.0} and f[0].classification == "Lymphocyte"
    assert f[1].object_type == "cell" and f[1].geometry.centroid.equals(Point(15, 15))


@pytest.mark.parametrize("content,match", [
    ("", "empty"), ("{not json", "not valid JSON"), ('{"type": "Point"}', "not GeoJSON"),
    ('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}', "no geometry"),
    (('{"type": "FeatureCollection", "features": [{"type": "Feature", "geometry": '
      '{"type": "Polygon", "coordinates": [[1]]}}]}'), "invalid geometry"),
])
def test_malformed_geojson_errors_name_the_file(tmp_path, content, match):
    p = tmp_path / "bad.geojson"
    p.write_text(content)
    with pytest.raises(CellTableError, match=match) as e:
        read_features(p)
    assert str(p) in str(e.value)


def test_size_limit(tmp_path):
    p = tmp_path / "big.geojson"
    p.write_bytes(b'{"type": "FeatureCollection", "features": []}')
    with pytest.raises(CellTableError, match="limit"):
        read_features(p, max_bytes=10)
