"""`tmequant predict STORES... --model NAME_OR_PATH`: per-tile predictions into each store."""

from __future__ import annotations

from pathlib import Path

import typer

from tmequant.cli._app import RUNTIME_HELP, app, fail, finish_batch
from tmequant.domain import DEFAULT_MODEL
from tmequant.inputs import expand_stores, store_id


def _is_phantom_store(path: str) -> bool:
    """Whether the store was tiled from a tmequant phantom (no warning for a synthetic model)."""
    from tmequant.domain import is_phantom_slide
    from tmequant.tiling.store import SlideStore

    try:
        return is_phantom_slide(SlideStore(path).attrs.get("source_path"))
    except Exception:  # noqa: BLE001 - a store that cannot be read fails later with its reason
        return False


@app.command("predict")
def predict_cmd(
    stores: list[str] = typer.Argument(..., help="Slide stores (*.zarr), folders of stores or globs."),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m",
                              help="Model folder, registered name (`tmequant models list`) or "
                              "hf-hub:org/name (default: the bundled real-tissue cell detector, "
                              f"{DEFAULT_MODEL}).", show_default=False),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda or cuda:N.", show_default=True),
    batch_size: int | None = typer.Option(
        None, "--batch-size", "-b", help="Tiles per batch (default 32 tiles of 224 px on CPU, 256 on CUDA, fewer for larger "
        "tiles; halved on OOM)."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", help="DataLoader reader processes (default: 1 on CPU, up to 8 on CUDA; 0 reads in this process)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the network (faster on GPU after warm-up; --runtime torch)."),
    runtime: str = typer.Option("auto", "--runtime", help=RUNTIME_HELP, show_default=True),
    allow_mismatch: bool = typer.Option(
        False, "--allow-mismatch", help="Run even when the store's MPP or tile size differs from the model card."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Redo predictions made with other parameters (or finished ones)."),
    counter: str = typer.Option(
        "on", "--counter", help="Weight-free nucleus counter (lymphocyte counts per tile): on or off."),
    params_file: Path | None = typer.Option(
        None, "--params", help="TOML/YAML parameters file; its [nucleus_counter] section is used "
        "(default: the counter's documented defaults)."),
) -> None:
    """Predict tissue classes (and cell counts) for every tile of each store.

    Writes predictions/<model_name> into each store and, unless --counter off, the nucleus
    counter's nuclei/counts (lymphocyte and other nuclei per tile), the default count source
    when the model has no count head. Re-running skips finished work and an interrupted
    store resumes from its last finished chunk.
    """
    from tmequant.batch import run_per_slide
    from tmequant.inference import predict_store, resolve_device
    from tmequant.inference.runner import resolve_runtime
    from tmequant.models import load_model

    if batch_size is not None and batch_size < 1:
        fail("--batch-size must be >= 1", 2)
    if workers is not None and workers < 0:
        fail("--workers must be >= 0", 2)
    if counter not in ("on", "off"):
        fail("--counter must be on or off", 2)
    counter_params = None
    if counter == "on":
        from tmequant.params import nucleus_counter_params_from_file

        counter_params = nucleus_counter_params_from_file(params_file)
    dev = resolve_device(device)  # InputError (exit 2) before any work
    resolve_runtime(runtime, dev, compile)
    paths = expand_stores(stores)
    loaded = load_model(model, device="cpu")  # moved to the device once, by the engine
    warning = loaded.card.domain_warning
    if warning and not all(_is_phantom_store(p) for p in paths):
        typer.echo(f"WARNING: {warning}", err=True)
    def one(p: str):
        r = predict_store(p, loaded, device=dev, batch_size=batch_size, num_workers=workers,
                          compile=compile, allow_mismatch=allow_mismatch, overwrite=overwrite,
                          progress=None, runtime=runtime)  # None: follows --quiet
        if counter_params is not None:
            from tmequant.inference.nuclei import count_store

            count_store(p, counter_params, overwrite=overwrite, progress=None)
        return r

    batch = run_per_slide(paths, one, item_id=store_id, stage="predict")
    for sid, r in batch.results.items():
        what = "already complete" if r.skipped else (
            f"{r.tiles_per_s:.1f} tiles/s ({r.device}, {r.runtime}, {r.precision}, batch {r.batch_size}"
            f"{', resumed' if r.resumed else ''})")
        typer.echo(f"{sid}\t{r.n_tiles} tiles\t{r.model_name}\t{what}\t{r.store_path}")
    finish_batch(batch, "predict")
