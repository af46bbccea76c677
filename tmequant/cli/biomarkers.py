"""`tmequant biomarkers STORES... --model NAME --out DIR`: one row of biomarkers per slide."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from tmequant.cli._app import app, fail, finish_batch

log = logging.getLogger("tmequant")

_CELL_SUFFIXES = (".geojson", ".geojson.gz", ".json", ".csv", ".parquet", ".geoparquet")
COMPARTMENT_COLORS = {"bulk": (200, 0, 0), "epithelium": (150, 0, 100), "tumor_stroma": (60, 160, 60),
                      "margin": (240, 160, 0), "core": (120, 0, 0)}
TLS_COLOR = (40, 40, 220)


def cells_for_slide(cells: Path | None, slide_id: str, n_stores: int) -> Path | None:
    """The cell table of one slide: ``cells`` itself (one store) or ``<cells>/<slide_id>.<ext>``."""
    from tmequant.errors import InputError

    if cells is None:
        return None
    if cells.is_dir():
        for suf in _CELL_SUFFIXES:
            p = cells / f"{slide_id}{suf}"
            if p.is_file():
                return p
        raise InputError(f"no cell table for slide {slide_id!r} (expected {slide_id}.geojson/.csv/.parquet)", cells)
    if n_stores > 1:
        raise InputError("--cells names one file but several stores were given; pass a folder of "
                         "<slide_id>.geojson/.csv/.parquet files", cells)
    return cells


def write_slide_geojson(out_dir: Path, slide_id: str, result: Any, tile_level0_px: float) -> list[Path]:
    """``<slide_id>.compartments.geojson`` and ``<slide_id>.tls.geojson`` (QuPath annotations)."""
    from shapely import union_all

    from tmequant.qupath import annotation_feature, grid_mask_to_polygons, write_feature_collection

    comp = result.compartments
    um2_per_px2 = (result.row["slide_mpp_um"] or 1.0) ** 2
    feats = []
    for name, color in COMPARTMENT_COLORS.items():
        for g in grid_mask_to_polygons(getattr(comp, name), comp.origin, tile_level0_px):
            feats.append(annotation_feature(g, name, color, {"Area um^2": g.area * um2_per_px2}))
    p1 = write_feature_collection(out_dir / f"{slide_id}.compartments.geojson", feats)
    tls_feats = []
    labels_r = comp.dense.paint(result.tls_labels, 0)
    for rec in result.tls.to_dict("records"):
        polys = grid_mask_to_polygons(labels_r == rec["tls_id"], comp.origin, tile_level0_px)
        if not polys:
            continue
        g = union_all(polys)
        tls_feats.append(annotation_feature(
            g, f"TLS {rec['tls_id']}", TLS_COLOR,
            {"Area um^2": rec["area_um2"], "Lymphocytes": rec["n_lymphocytes"],
             "Mean density per mm^2": rec["mean_density_per_mm2"],
             "Distance to bulk um": rec["distance_to_bulk_um"],
             "Intratumoral": float(rec["location"] == "intratumoral")},
            classification="TLS"))
    p2 = write_feature_collection(out_dir / f"{slide_id}.tls.geojson", tls_feats)
    return [p1, p2]


@app.command("biomarkers")
def biomarkers_cmd(
    stores: list[str] = typer.Argument(..., help="Slide stores (*.zarr), folders of stores or globs."),
    model: str = typer.Option(..., "--model", "-m", help="Name of the predictions in the store (predictions/<NAME>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for tables and GeoJSON."),
    cells: Path | None = typer.Option(
        None, "--cells", help="Cell table (QuPath GeoJSON, CSV x,y,class or (Geo)Parquet; level-0 px) for one "
        "store, or a folder of <slide_id>.<ext> tables. Takes precedence for counts."),
    params: Path | None = typer.Option(None, "--params", help="TOML/YAML parameters file ([biomarkers] section)."),
    margin_um: float | None = typer.Option(None, help="Invasive-margin half-width, um [default 500]."),
    bulk_close_um: float | None = typer.Option(None, help="Tumour-bulk closing/opening disk diameter, um [default 1000; 500 for biopsies]."),
    bulk_min_area_mm2: float | None = typer.Option(None, help="Smallest tumour-bulk object, mm^2 [default 1.5]."),
    til_positive_per_mm2: float | None = typer.Option(None, help="TIL-positive tile density, cells/mm^2 [default 800]."),
    mh_cell_um: float | None = typer.Option(None, help="Morisita-Horn square side, um [default 100]."),
    inflamed_it_per_mm2: float | None = typer.Option(None, help="Inflamed region: intratumoural TILs/mm^2 [default 130]."),
    excluded_st_per_mm2: float | None = typer.Option(None, help="Excluded region: stromal TILs/mm^2 [default 260]."),
    tls_min_density_per_mm2: float | None = typer.Option(None, help="TLS tile lymphocyte density, cells/mm^2 [default 3000]."),
    tls_max_distance_um: float | None = typer.Option(None, help="Largest TLS gap to the tumour bulk, um [default 1000]."),
    area_estimate_per_mm2: float | None = typer.Option(None, help="Lymphocytes/mm^2 of immune tissue when no counts exist [default 6000]."),
    geojson: bool = typer.Option(True, "--geojson/--no-geojson", help="Write compartments and TLS as QuPath GeoJSON."),
) -> None:
    """Compute TIL density, immune exclusion and phenotype, TLS and composition per slide.

    Writes biomarkers.csv and biomarkers.parquet (one row per slide, units in column names,
    parameters and params_hash), tls.csv, and per slide <slide_id>.compartments.geojson and
    <slide_id>.tls.geojson for QuPath.
    """
    import pandas as pd

    from tmequant.batch import run_per_slide
    from tmequant.biomarkers import TLS_COLUMNS, biomarkers_for_store
    from tmequant.cli.predict import expand_stores, store_id
    from tmequant.params import biomarker_params_from_file
    from tmequant.provenance import params_hash, to_jsonable
    from tmequant.tiling.store import SlideStore

    flags = {"margin_um": margin_um, "bulk_close_um": bulk_close_um, "bulk_min_area_mm2": bulk_min_area_mm2,
             "til_positive_per_mm2": til_positive_per_mm2, "mh_cell_um": mh_cell_um,
             "inflamed_it_per_mm2": inflamed_it_per_mm2, "excluded_st_per_mm2": excluded_st_per_mm2,
             "tls_min_density_per_mm2": tls_min_density_per_mm2, "tls_max_distance_um": tls_max_distance_um,
             "area_estimate_per_mm2": area_estimate_per_mm2}
    bp = biomarker_params_from_file(params, flags)  # ParamsError (exit 2) before any work
    paths = expand_stores(stores)
    if not paths:
        fail("no slide stores given", 2)
    if cells is not None and not cells.exists():
        fail(f"{cells}: no such cell table or folder", 2)
    out.mkdir(parents=True, exist_ok=True)

    def one(path: str) -> Any:
        from tmequant.inputs import validate_slide_id

        store = SlideStore(path)
        # The id names output files: a store from elsewhere must not write outside --out.
        sid = validate_slide_id(store.slide_id, store.path)
        cpath = cells_for_slide(cells, sid, len(paths))
        res = biomarkers_for_store(store, model, cells=cpath, params=bp)
        if geojson:
            write_slide_geojson(out, sid, res, store.tile_level0_px)
        log.info("%s: %s, sTIL %.1f%%, %d TLS (counts: %s)", sid, res.row["immune_phenotype"],
                 res.row["stil_score_pct"], res.row["tls_count"], res.row["count_source"])
        return res

    batch = run_per_slide(paths, one, store_id, "biomarkers")
    results = [batch.results[k] for k in batch.results]
    if results:
        rows = pd.DataFrame([r.row for r in results])
        rows.to_csv(out / "biomarkers.csv", index=False)
        rows.to_parquet(out / "biomarkers.parquet", index=False)
        tls = [r.tls for r in results if len(r.tls)]
        tls_df = pd.concat(tls, ignore_index=True) if tls else pd.DataFrame(columns=["slide_id", *TLS_COLUMNS])
        tls_df.to_csv(out / "tls.csv", index=False)
        (out / "biomarker_params.json").write_text(json.dumps(
            {"params": to_jsonable(bp), "params_hash": params_hash(bp)}, indent=2))
        typer.echo(f"wrote {len(rows)} slide rows to {out / 'biomarkers.csv'}", err=True)
    finish_batch(batch, "biomarkers", out)
