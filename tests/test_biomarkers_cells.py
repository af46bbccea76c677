"""Cell tables: readers for QuPath GeoJSON, CSV and (Geo)Parquet; class-to-role mapping."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import Point, box

from tmequant.biomarkers import cell_role, cell_roles, read_cell_table
from tmequant.errors import CellTableError
from tmequant.qupath import qupath_feature, write_feature_collection


@pytest.mark.parametrize("name,role", [
    ("Lymphocyte", "lymphocyte"), ("Plasma cell", "lymphocyte"), ("inflammatory", "lymphocyte"),
    ("Tumor", "tumor_cell"), ("neoplastic", "tumor_cell"), ("Tumour: Positive", "tumor_cell"),
    ("Non-tumor", "other"), ("Epithelial", "other"), ("macrophage_cell", "other"),
    ("connective", "other"), ("", "other"), (None, "other"),
])
def test_default_cell_roles(name, role):
    assert cell_role(name) == role


def test_role_map_overrides_and_is_checked():
    assert list(cell_roles(np.array(["Immune cells", "X"]), {"x": "tumor_cell"})) == ["lymphocyte", "tumor_cell"]
    with pytest.raises(CellTableError, match="unknown roles"):
        cell_roles(np.array(["a"]), {"a": "macrophage"})


def test_geojson_points_polygons_detections_and_annotations(tmp_path):
    feats = [qupath_feature(Point(10, 20), "detection", classification="Lymphocyte"),
             qupath_feature(box(0, 0, 4, 2), "annotation", classification="Tumor"),
             qupath_feature(box(100, 100, 110, 110), "cell", classification="Stroma")]
    p = write_feature_collection(tmp_path / "c.geojson", feats)
    df = read_cell_table(p)
    assert list(df.columns) == ["x", "y", "class"]
    assert df[["x", "y"]].to_numpy().tolist() == [[10, 20], [2, 1], [105, 105]]
    assert df["class"].tolist() == ["Lymphocyte", "Tumor", "Stroma"]


def test_csv_and_parquet(tmp_path):
    df = pd.DataFrame({"X": [1.5, 2.5], "Y": [3.0, 4.0], "class_name": ["lymphocyte", "tumor"]})
    df.to_csv(tmp_path / "c.csv", index=False)
    got = read_cell_table(tmp_path / "c.csv")
    assert got["x"].tolist() == [1.5, 2.5] and got["class"].tolist() == ["lymphocyte", "tumor"]
    df.to_parquet(tmp_path / "c.parquet")
    assert read_cell_table(tmp_path / "c.parquet")["y"].tolist() == [3.0, 4.0]
    # GeoParquet-like: WKB polygons -> centroids
    wkb = shapely.to_wkb(np.array([box(0, 0, 2, 2), box(10, 10, 14, 12)], dtype=object))
    t = pa.table({"geometry": pa.array(list(wkb), pa.binary()), "class_name": ["inflammatory", "neoplastic"]})
    pq.write_table(t, tmp_path / "g.parquet")
    got = read_cell_table(tmp_path / "g.parquet")
    assert got[["x", "y"]].to_numpy().tolist() == [[1, 1], [12, 11]]


@pytest.mark.parametrize("content,match", [
    ("", "empty"), ("a,b\n1,2\n", "x and y"), ("x,y\n1,2\n", "class column"),
    ("x,y,class\n", "no cells"), ("x,y,class\n1,,a\n", "non-finite"), ("x,y,class\n-5,2,a\n", "negative"),
    ("x,y,class\nfoo,2,a\n", "not numeric"), ("Centroid X µm,Centroid Y µm,Class\n1,2,a\n", "micron"),
])
def test_csv_errors(tmp_path, content, match):
    p = tmp_path / "bad.csv"
    p.write_text(content)
    with pytest.raises(CellTableError, match=match) as e:
        read_cell_table(p)
    assert str(p) in str(e.value)


def test_other_errors(tmp_path):
    with pytest.raises(CellTableError, match="no such"):
        read_cell_table(tmp_path / "missing.csv")
    (tmp_path / "x.xlsx").write_text("x")
    with pytest.raises(CellTableError, match="unknown cell-table format"):
        read_cell_table(tmp_path / "x.xlsx")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(CellTableError, match="Parquet"):
        read_cell_table(tmp_path / "bad.parquet")
    (tmp_path / "big.csv").write_text("x,y,class\n1,2,a\n")
    with pytest.raises(CellTableError, match="limit"):
        read_cell_table(tmp_path / "big.csv", max_bytes=5)
    write_feature_collection(tmp_path / "empty.geojson", [])
    with pytest.raises(CellTableError, match="no features"):
        read_cell_table(tmp_path / "empty.geojson")
