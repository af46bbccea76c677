"""Cohort table: column order, stable formatting, round trips, order-independence."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tmequant.report.tables import cohort_frame, column_kind, read_cohort_table, write_cohort_table


def _rows():
    # keys deliberately in mixed order: parameters, provenance and biomarkers interleaved
    return [
        {"param_margin_um": 500.0, "slide_id": "s2", "til_density_stromal_per_mm2": 0.1 + 0.2,
         "source_path": "/d/s2.svs", "immune_phenotype": "inflamed", "tls_count": np.int64(3),
         "exclusion_ratio_stroma_to_tumor": math.inf, "params_hash": "abc"},
        {"slide_id": "s10", "params": {"tls_prob": 0.5, "margin_um": 250.0},
         "til_density_stromal_per_mm2": np.float32(12.5), "source_path": "/d/s10.svs",
         "immune_phenotype": None, "tls_count": 0, "exclusion_ratio_stroma_to_tumor": math.nan,
         "params_hash": "def", "tumor_area_mm2": 1234567.891234},
        {"slide_id": "a1", "til_density_stromal_per_mm2": 7.0, "immune_phenotype": "desert",
         "tls_count": 1, "exclusion_ratio_stroma_to_tumor": 2.0, "package_version": "0.1.0"},
    ]


def test_columns_id_then_biomarkers_then_provenance_then_parameters():
    df = cohort_frame(_rows())
    kinds = [column_kind(c) for c in df.columns]
    assert df.columns[0] == "slide_id"
    order = {"id": 0, "biomarker": 1, "provenance": 2, "parameter": 3}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds)
    # biomarkers keep the order the rows list them in
    bio = [c for c, k in zip(df.columns, kinds) if k == "biomarker"]
    assert bio.index("til_density_stromal_per_mm2") < bio.index("immune_phenotype") < bio.index("tls_count")
    assert {"param_margin_um", "param_tls_prob"} <= set(df.columns)  # nested params flattened
    assert list(df["slide_id"]) == sorted(df["slide_id"])


def test_missing_id_is_an_error():
    with pytest.raises(ValueError, match="slide_id"):
        cohort_frame([{"til": 1.0}])


def test_csv_and_parquet_round_trip(tmp_path):
    csv_path, pq_path = write_cohort_table(_rows(), tmp_path)
    assert csv_path.name == "cohort.csv" and pq_path.name == "cohort.parquet"
    text = csv_path.read_text()
    assert "0.30000000000000004" not in text and ",0.3," in text  # stable float text
    assert "1234567.891" in text  # large values keep their digits
    s2 = next(line for line in text.splitlines() if line.startswith("s2,"))
    assert ",inf," in s2
    s10 = next(line for line in text.splitlines() if line.startswith("s10,"))
    assert ",," in s10  # NaN and None are empty cells

    back_csv, back_pq = read_cohort_table(csv_path), read_cohort_table(pq_path)
    df = cohort_frame(_rows())
    assert list(back_pq.columns) == list(df.columns) == list(back_csv.columns)
    x = back_pq["til_density_stromal_per_mm2"].to_numpy()
    assert x[list(back_pq["slide_id"]).index("s2")] == 0.1 + 0.2  # parquet keeps exact floats
    r = back_csv.set_index("slide_id")["exclusion_ratio_stroma_to_tumor"]
    assert r["s2"] == math.inf and math.isnan(r["s10"]) and r["a1"] == 2.0
    assert back_csv.set_index("slide_id")["tls_count"]["s2"] == 3


def test_row_order_does_not_change_the_files(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_cohort_table(_rows(), a)
    write_cohort_table(list(reversed(_rows())), b)
    assert (a / "cohort.csv").read_bytes() == (b / "cohort.csv").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(a / "cohort.parquet"),
                                  pd.read_parquet(b / "cohort.parquet"))
    assert not list(a.glob(".*tmp"))  # no temporary files left behind


def test_mixed_type_column_still_writes_parquet(tmp_path):
    rows = [{"slide_id": "a", "note": 1.5}, {"slide_id": "b", "note": "n/a"},
            {"slide_id": "c", "vec": [1, 2]}]
    _, pq = write_cohort_table(rows, tmp_path, stem="odd")
    back = pd.read_parquet(pq)
    assert list(back["note"].iloc[:2]) == ["1.5", "n/a"]
    assert back["vec"].iloc[2] == "[1,2]"
