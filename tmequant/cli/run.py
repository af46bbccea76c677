"""`tmequant run SLIDES... --out DIR --model NAME_OR_PATH`: the whole pipeline, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tmequant.cli._app import (
    MPP_OVERRIDE_ALL_HELP,
    MPP_OVERRIDE_HELP,
    PIXELS_HELP,
    RUNTIME_HELP,
    app,
    apply_mpp_override,
    fail,
)
from tmequant.defaults import check_runtime
from tmequant.domain import DEFAULT_MODEL

# The arguments and options of `tmequant run`, one type each (typer's Annotated style); the
# defaults stand in the verb's signature.
_Slides = Annotated[list[str], typer.Argument(
    help="Slide files, folders, glob patterns or a CSV manifest (slide_id,path[,mpp]).")]
_Out = Annotated[Path, typer.Option(
    "--out", "-o", help="Output folder (cohort tables, report, stores, per-slide results).")]
_Model = Annotated[str, typer.Option(
    "--model", "-m",
    help="Model folder, registered name (`tmequant models list`) or "
    "hf-hub:org/name (default: the bundled real-tissue cell detector, "
    f"{DEFAULT_MODEL}).", show_default=False)]
_CellsDir = Annotated[Path | None, typer.Option(
    "--cells-dir", help="Folder of cell tables <slide_id>.geojson|.geojson.gz|.csv|.parquet "
    "(x, y in level-0 px, class); they replace model/counter counts for their slide "
    "(default: none; counts from the model's count head or the nucleus counter).")]
_Params = Annotated[Path | None, typer.Option(
    "--params", help="TOML/YAML parameters file with [biomarkers], [nucleus_counter], "
    "[tiling] and [qc] sections (default: the documented defaults, docs/biomarkers.md).")]
_Mpp = Annotated[float | None, typer.Option(
    "--mpp", help="Target pixel size of the tiles, um/px (default: the model card's; 0.5 for the built-ins).")]
_TilePx = Annotated[int | None, typer.Option(
    "--tile-px", help="Tile side in pixels at --mpp (default: the model card's; 224 for the built-ins).")]
_Pixels = Annotated[str | None, typer.Option(
    "--pixels", help=PIXELS_HELP + " [default: the [tiling] section's compression, else lossless]")]
_MppOverride = Annotated[float | None, typer.Option("--mpp-override", help=MPP_OVERRIDE_HELP)]
_MppOverrideAll = Annotated[bool, typer.Option("--mpp-override-all", help=MPP_OVERRIDE_ALL_HELP)]
_Counter = Annotated[str, typer.Option(
    "--counter", help="Nucleus counter (lymphocyte counts per tile) when the model has no count "
    "head and no cell table is given: on or off.", show_default=True)]
_Device = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.", show_default=True)]
_BatchSize = Annotated[int | None, typer.Option(
    "--batch-size", "-b", help="Tiles per inference batch (default: 32 tiles of 224 px on CPU, "
    "256 on CUDA, fewer for larger tiles; halved on out-of-memory).")]
_Runtime = Annotated[str, typer.Option("--runtime", help=RUNTIME_HELP, show_default=True)]
_Workers = Annotated[int | None, typer.Option(
    "--workers", "-j", help="Reader threads per slide for tiling and counting (default: min(4, CPUs)).")]
_Scheduler = Annotated[str | None, typer.Option(
    "--scheduler", help="Dask scheduler address (tcp://host:8786): slides run on its workers; "
    "inference on workers started with --resources GPU=1 when there are any (default: none, "
    "everything runs in this process).")]
_LocalWorkers = Annotated[int | None, typer.Option(
    "--local-workers", help="Start a local Dask cluster of N worker processes for the slides "
    "(default: none).")]
_Wait = Annotated[bool, typer.Option(
    "--wait", help="If another run holds --out, wait for it instead of stopping.")]
_Overwrite = Annotated[bool, typer.Option(
    "--overwrite", help="Redo every stage of every slide from scratch (needed when --out holds stores made with other parameters).")]
_Title = Annotated[str | None, typer.Option(
    "--title", help="Title of the HTML report "
    "(default: 'tmequant cohort report (<model name>)').")]


@app.command("run")
def run_cmd(
    slides: _Slides,
    out: _Out,
    model: _Model = DEFAULT_MODEL,
    cells_dir: _CellsDir = None,
    params: _Params = None,
    mpp: _Mpp = None,
    tile_px: _TilePx = None,
    pixels: _Pixels = None,
    mpp_override: _MppOverride = None,
    mpp_override_all: _MppOverrideAll = False,
    counter: _Counter = "on",
    device: _Device = "auto",
    batch_size: _BatchSize = None,
    runtime: _Runtime = "auto",
    workers: _Workers = None,
    scheduler: _Scheduler = None,
    local_workers: _LocalWorkers = None,
    wait: _Wait = False,
    overwrite: _Overwrite = False,
    title: _Title = None,
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
    try:
        check_runtime(runtime)
    except ValueError as e:
        fail(str(e), 2)
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
                    device=device, batch_size=batch_size, runtime=runtime, workers=workers,
                    scheduler=scheduler,
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
