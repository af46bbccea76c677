"""`tmequant biomarkers STORES... --model NAME --out DIR`: one row of biomarkers per slide."""

from __future__ import annotations

from pathlib import Path

import typer

from tmequant.cli._app import app, finish_batch


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
    from tmequant.params import biomarker_params_from_file
    from tmequant.pipeline import write_biomarker_tables

    flags = {"margin_um": margin_um, "bulk_close_um": bulk_close_um, "bulk_min_area_mm2": bulk_min_area_mm2,
             "til_positive_per_mm2": til_positive_per_mm2, "mh_cell_um": mh_cell_um,
             "inflamed_it_per_mm2": inflamed_it_per_mm2, "excluded_st_per_mm2": excluded_st_per_mm2,
             "tls_min_density_per_mm2": tls_min_density_per_mm2, "tls_max_distance_um": tls_max_distance_um,
             "area_estimate_per_mm2": area_estimate_per_mm2}
    bp = biomarker_params_from_file(params, flags)  # ParamsError (exit 2) before any work
    batch = write_biomarker_tables(stores, out, model, cells=cells, params=bp, geojson=geojson)
    if batch.results:
        typer.echo(f"wrote {len(batch.results)} slide rows to {out / 'biomarkers.csv'}", err=True)
    finish_batch(batch, "biomarkers")
