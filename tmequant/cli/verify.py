"""`tmequant verify STORES...`: check slide stores against their chunk checksums."""

from __future__ import annotations

import typer

from tmequant.cli._app import app


@app.command("verify")
def verify_cmd(
    stores: list[str] = typer.Argument(..., help="Slide stores (*.zarr), folders of stores or globs."),
) -> None:
    """Check slide stores: finished, every array and chunk present, every chunk decodable with
    its checksum. Prints one line per problem (store, array, chunk); exit 0 when all are sound,
    1 when any is broken, 2 for bad usage.
    """
    from tmequant.inputs import expand_stores
    from tmequant.store import verify_store

    paths = expand_stores(stores)
    n_bad = 0
    for path in paths:
        problems = verify_store(path)
        n_bad += bool(problems)
        for line in problems:
            typer.echo(line)
    typer.echo(f"verify: {len(paths)} store(s) checked, {n_bad} broken", err=True)
    if n_bad:
        raise typer.Exit(1)
