"""`tmequant tile SLIDES... --out DIR`: tile slides at a target MPP into zarr slide stores."""

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
    finish_batch,
)


@app.command("tile")
def tile_cmd(
    slides: list[str] = typer.Argument(
        ..., help="Slide files, folders, glob patterns or a CSV manifest (slide_id,path[,mpp])."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: <out>/<slide_id>.zarr and .qc.png."),
    mpp: float = typer.Option(0.5, "--mpp", help="Target pixel size of the tiles, um/px.", show_default=True),
    tile_px: int = typer.Option(224, "--tile-px", help="Tile side in pixels at --mpp.", show_default=True),
    mpp_override: float | None = typer.Option(None, "--mpp-override", help=MPP_OVERRIDE_HELP),
    mpp_override_all: bool = typer.Option(False, "--mpp-override-all", help=MPP_OVERRIDE_ALL_HELP),
    min_tissue: float = typer.Option(
        0.25, "--min-tissue", help="Keep tiles whose tissue fraction is >= this (0-1).", show_default=True),
    mask_mpp: float = typer.Option(
        8.0, "--mask-mpp", help="Resolution of the tissue mask, um/px.", show_default=True),
    compression: str = typer.Option(
        "blosc-lz4", "--compression", help="Lossless codec of tiles/images (with --pixels lossless): "
        "blosc-lz4, zstd-1, zstd (level 3), zstd-9, none.", show_default=True),
    pixels: str = typer.Option("lossless", "--pixels", help=PIXELS_HELP, show_default=True),
    fast_decode: bool = typer.Option(
        False, "--fast-decode/--full-decode", help="Decode JPEG slide tiles at 1/2 or 1/4 scale in "
        "the DCT domain when the target MPP is exactly 2x or 4x the read level's: 1.3-1.8x faster "
        "tiling, pixels within ~1 grey level of the full decode + box average, but the bundled "
        "cell detector's counts moved by up to 11% (README, \"Stored pixels\"), so it is off "
        "by default.", show_default=True),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="Reader threads per slide (default: min(4, number of CPUs))."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Rebuild stores made with other parameters (or from a changed slide)."),
) -> None:
    """Tile slides at a target MPP (um/px) into one zarr store per slide, tissue only.

    Re-running with the same parameters skips finished slides; an interrupted slide is rebuilt.
    """
    from dataclasses import replace

    from tmequant.batch import run_per_slide
    from tmequant.errors import InputError
    from tmequant.inputs import expand_slides
    from tmequant.tiling.tile import TilingParams, pixels_compression, tile_slide
    from tmequant.wsi.tissue import TissueParams

    try:
        params = TilingParams(target_mpp_um=mpp, tile_px=tile_px, min_tissue_fraction=min_tissue,
                              tissue=replace(TissueParams(), mask_mpp_um=mask_mpp),
                              compression=pixels_compression(pixels, compression),
                              jpeg_dct_scaling=fast_decode)
    except ValueError as e:
        raise InputError(str(e)) from None
    if workers is not None and workers < 1:
        fail("--workers must be >= 1", 2)
    specs = apply_mpp_override(expand_slides(slides), mpp_override, mpp_override_all)
    batch = run_per_slide(
        specs, lambda s: tile_slide(s, out, params, overwrite=overwrite, workers=workers),
        item_id=lambda s: s.slide_id, stage="tile")
    for sid, r in batch.results.items():
        what = "reused" if r.reused else f"{r.tiles_per_s:.1f} tiles/s"
        typer.echo(f"{sid}\t{r.n_tiles} tiles\t{r.slide_mpp_um:.4g} um/px ({r.mpp_source})\t{what}"
                   f"\t{r.store_path}")
    finish_batch(batch, "tile", out)
