"""`tmequant run SLIDES... --out DIR --model NAME_OR_PATH`: the whole pipeline, resumable."""

from __future__ import annotations

from pathlib import Path

import typer

from tmequant.cli._app import (
    MPP_OVERRIDE_ALL_HELP,
    MPP_OVERRIDE_HELP,
    PIXELS_HELP,
    app,
    apply_mpp_override,
    fail,
)
from tmequant.domain import DEFAULT_MODEL


@app.command("run")
def run_cmd(
    slides: list[str] = typer.Argument(
        ..., help="Slide files, folders, glob patterns or a CSV manifest (slide_id,path[,mpp])."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (cohort tables, report, stores, per-slide results)."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model folder, registered name (`tmequant models list`) or "
                              "hf-hub:org/name (default: the bundled real-tissue cell detector, "
                              f"{DEFAULT_MODEL}).", show_default=False),
    cells_dir: Path | None = typer.Option(
        None, "--cells-dir", help="Folder of cell tables <slide_id>.geojson|.geojson.gz|.csv|.parquet "
        "(x, y in level-0 px, class); they replace model/counter counts for their slide "
        "(default: none; counts from the model's count head or the nucleus counter)."),
    params: Path | None = typer.Option(
        None, "--params", help="TOML/YAML parameters file with [biomarkers], [nucleus_counter], "
        "[tiling] and [qc] sections (default: the documented defaults, docs/biomarkers.md)."),
    mpp: float | None = typer.Option(
        None, "--mpp", help="Target pixel size of the tiles, um/px (default: the model card's; 0.5 for the built-ins)."),
    tile_px: int | None = typer.Option(
        None, "--tile-px", help="Tile side in pixels at --mpp (default: the model card's; 224 for the built-ins)."),
    pixels: str | None = typer.Option(
        None, "--pixels", help=PIXELS_HELP + " [default: the [tiling] section's compression, else lossless]"),
    mpp_override: float | None = typer.Option(None, "--mpp-override", help=MPP_OVERRIDE_HELP),
    mpp_override_all: bool = typer.Option(False, "--mpp-override-all", help=MPP_OVERRIDE_ALL_HELP),
    counter: str = typer.Option(
        "on", "--counter", help="Nucleus counter (lymphocyte counts per tile) when the model has no count "
        "head and no cell table is given: on or off.", show_default=True),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", show_default=True),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", help="Tiles per inference batch (default: 32 tiles of 224 px on CPU, "
        "256 on CUDA, fewer for larger tiles; halved on out-of-memory)."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="Reader threads per slide for tiling and counting (default: min(4, CPUs))."),
    scheduler: str | None = typer.Option(
        None, "--scheduler", help="Dask scheduler address (tcp://host:8786): slides run on its workers; "
        "inference on workers started with --resources GPU=1 when there are any (default: none, "
        "everything runs in this process)."),
    local_workers: int | None = typer.Option(
        None, "--local-workers", help="Start a local Dask cluster of N worker processes for the slides "
        "(default: none)."),
    wait: bool = typer.Option(
        False, "--wait", help="If another run holds --out, wait for it instead of stopping."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo every stage of every slide from scratch (needed when --out holds stores made with other parameters)."),
    title: str | None = typer.Option(None, "--title", help="Title of the HTML report "
                                     "(default: 'tmequant cohort report (<model name>)')."),
) -> None:
    """Tile, predict, count and compute biomarkers for every slide, then the cohort report.

    Resumable: a rerun with the same settings skips the finished stages of every slide.

    One failing slide never stops the others: failures.csv names each with its stage and reason, and the exit code is 1 when any slide failed.

    Writes cohort.csv/.parquet, tls.csv/.parquet, report.html and figures/ in --out, the slide stores in stores/ and per-slide results with QuPath GeoJSON in results/.

    A model trained on synthetic phantoms or untrained gives numbers that mean nothing on real tissue: run warns, and the report says so. Each slide's qc_flags column says what to check (thresholds: [qc] section).
    """
    from tmequant.errors import InputError
    from tmequant.inputs import expand_slides
    from tmequant.params import biomarker_params_from_file, nucleus_counter_params_from_file
    from tmequant.pipeline import get_model, resolve_tiling_params, run_batch
    from tmequant.report.qc import qc_params_from_file
    from tmequant.tiling.tile import pixels_compression

    if counter not in ("on", "off"):
        fail(f"--counter {counter!r}: use on or off", 2)
    for name, v, lo in (("--batch-size", batch_size, 1), ("--workers", workers, 1),
                        ("--local-workers", local_workers, 1)):
        if v is not None and v < lo:
            fail(f"{name} must be >= {lo}", 2)
    if scheduler and local_workers:
        fail("give --scheduler or --local-workers, not both", 2)
    if cells_dir is not None and not cells_dir.is_dir():
        fail(f"{cells_dir}: --cells-dir is not a folder", 2)
    # Every usage problem (params file, slides, model) stops here, before any work.
    bp = biomarker_params_from_file(params)
    ncp = nucleus_counter_params_from_file(params) if counter == "on" else False
    qc = qc_params_from_file(params)
    if mpp_override is None and mpp_override_all:
        fail("--mpp-override-all needs --mpp-override X", 2)
    card = get_model(model).card
    specs = apply_mpp_override(expand_slides(slides), mpp_override, mpp_override_all)
    try:
        compression = None if pixels is None else pixels_compression(pixels)
    except ValueError as e:
        raise InputError(str(e)) from None
    tiling = resolve_tiling_params(card, params, {"target_mpp_um": mpp, "tile_px": tile_px,
                                                  "compression": compression})

    res = run_batch(specs, out, model, tiling=tiling, params=bp, counter=ncp, cells_dir=cells_dir,
                    device=device, batch_size=batch_size, workers=workers, scheduler=scheduler,
                    local_workers=local_workers, overwrite=overwrite, wait=wait, progress=None,
                    title=title, qc=qc)
    n_ok, n_bad = len(res.outcomes), len(res.failures)
    typer.echo(f"run: {n_ok} slides finished, {n_bad} failed in {res.seconds:.1f} s", err=True)
    for f in res.failures:
        typer.echo(f"  FAILED {f.item_id} [{f.stage}]: {f.reason}", err=True)
    if res.cohort_csv is not None:
        typer.echo(f"cohort table: {res.cohort_csv}", err=True)
    if res.report_html is not None:
        typer.echo(f"report: {res.report_html}", err=True)
    if n_bad:
        typer.echo(f"failures: {res.failures_csv}", err=True)
        raise typer.Exit(1)
