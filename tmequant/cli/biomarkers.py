"""`tmequant biomarkers STORES... --model NAME --out DIR`: one row of biomarkers per slide."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import typer

from tmequant.cli._app import app, fail, finish_batch

log = logging.getLogger("tmequant")


def cells_for_slide(cells: Path | None, slide_id: str, n_stores: int) -> Path | None:
    """The cell table of one slide: ``cells`` itself (one store) or ``<cells>/<slide_id>.<ext>``."""
    from tmequant.errors import InputError
    from tmequant.pipeline import find_cell_table

    if cells is None:
        return None
    if cells.is_dir():
        return find_cell_table(cells, slide_id)
    if n_stores > 1:
        raise InputError("--cells names one file but several stores were given; pass a folder of "
                         "<slide_id>.geojson/.csv/.parquet files", cells)
    return cells


@app.command("biomarkers")
def biomarkers_cmd(
    stores: list[str] = typer.Argument(..., help="Slide stores (*.zarr), folders of stores or globs."),
    model: str = typer.Option(..., "--model", "-m", help="Name of the predictions in the store (predictions/<NAME>)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder for tables and GeoJSON."),
    cells: Path | None = typer.Option(
        None, "--cells", help="Cell table (QuPath GeoJSON, CSV x,y,class or (Geo)Parquet; level-0 px) for one "
        "store, or a folder of <slide_id>.<ext> tables. Takes precedence for counts (default: none; "
        "counts from the model's count head or the nucleus counter)."),
    params: Path | None = typer.Option(None, "--params", help="TOML/YAML parameters file ([biomarkers] section; "
                                         "default: the defaults of docs/biomarkers.md)."),
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
    parameters and params_hash), tls.csv, and per slide <slide_id>.geojson.zip for QuPath
    (File > Import objects): tiles with class probabilities and counts as measurements, and
    the tumour bulk, margin, core, epithelium, stroma and TLS as annotations.
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
    claimed: dict[str, str] = {}  # slide id (lower case) -> the store that has it

    def one(path: str) -> Any:
        from tmequant.errors import InputError
        from tmequant.inputs import validate_slide_id

        store = SlideStore(path)
        # The id names output files: a store from elsewhere must not write outside --out.
        sid = validate_slide_id(store.slide_id, store.path)
        # ... and one row and one GeoJSON per id: a second store with the same id would
        # overwrite the first's GeoJSON and drop a row (ids differing only in case collide
        # on case-insensitive disks)
        other = claimed.setdefault(sid.lower(), store.path)
        if other != store.path:
            raise InputError(f"slide id {sid!r} is also the id of {other}; outputs are named by "
                             "slide id, so run the two stores into different --out folders", store.path)
        cpath = cells_for_slide(cells, sid, len(paths))
        res = biomarkers_for_store(store, model, cells=cpath, params=bp)
        if geojson:
            from tmequant.pipeline import write_slide_geojson

            write_slide_geojson(out / f"{sid}.geojson.zip", store, model, res)
        log.info("%s: %s, sTIL %.1f%%, %d TLS (counts: %s)", sid, res.row["immune_phenotype"],
                 res.row["stil_score_pct"], res.row["tls_count"], res.row["count_source"])
        return res

    # batch keys: the store's name, or its whole path where two names are the same
    names = [store_id(q) for q in paths]
    key = {q: (n if names.count(n) == 1 else q) for q, n in zip(paths, names)}
    batch = run_per_slide(paths, one, key.__getitem__, "biomarkers")
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
