"""The shared Typer application and the helpers every verb uses.

Verbs live one per module in this package and register themselves on ``app``; each is a
thin wrapper over a public function of the library.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import NoReturn

import typer

from tmequant.batch import BatchResult
from tmequant.progress import set_progress_enabled

app = typer.Typer(
    name="tmequant",
    help="H&E whole-slide images -> tumour-microenvironment biomarkers (TIL, immune exclusion, TLS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

log = logging.getLogger("tmequant")


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is at emit time (it may be swapped, e.g. by tests)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Log to stderr: INFO by default, DEBUG with --verbose, warnings only with --quiet.

    Only the ``tmequant`` logger is configured (one handler, replaced on each call), and it
    still propagates, so an embedding application's own handlers keep seeing the records.
    """
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s" if verbose else "%(message)s"))
    logger = logging.getLogger("tmequant")
    logger.handlers[:] = [h for h in logger.handlers if not isinstance(h, _StderrHandler)] + [handler]
    logger.setLevel(level)
    set_progress_enabled(not quiet)


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging (tracebacks of failures)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings and errors only; no progress bars."),
) -> None:
    setup_logging(verbose, quiet)


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one line to stderr and exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def finish_batch(batch: BatchResult, what: str, out_dir: Path | None = None) -> None:
    """Print the batch summary, name each failure, and exit 1 if any slide failed."""
    n_ok, n_bad = len(batch.results), len(batch.failures)
    typer.echo(f"{what}: {n_ok} succeeded, {n_bad} failed", err=True)
    for f in batch.failures:
        typer.echo(f"  FAILED {f.item_id} [{f.stage}]: {f.reason}", err=True)
    if out_dir is not None and batch.failures:
        import csv

        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / "failures.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["slide_id", "stage", "reason"])
            for f in batch.failures:
                w.writerow([f.item_id, f.stage, f.reason])
    if n_bad:
        raise typer.Exit(1)
