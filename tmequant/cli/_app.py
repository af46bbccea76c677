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

from tmequant.batch import BatchResult, write_failures_csv
from tmequant.defaults import MPP_MAX_UM, MPP_MIN_UM
from tmequant.progress import set_progress_enabled

app = typer.Typer(
    name="tmequant",
    help="H&E whole-slide images -> tumour-microenvironment biomarkers (TIL, immune exclusion, TLS).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain click help: rich markup would swallow "[biomarkers]" or "[default 500]" in help
    # texts and label every flag "<bool>"; every default with a value is shown.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "show_default": True},
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
    """Print the batch summary, name each failure, and exit 1 if any slide failed.

    ``out_dir``: also write ``<out_dir>/failures.csv`` when any failed.
    """
    n_ok, n_bad = len(batch.results), len(batch.failures)
    typer.echo(f"{what}: {n_ok} succeeded, {n_bad} failed", err=True)
    for f in batch.failures:
        typer.echo(f"  FAILED {f.item_id} [{f.stage}]: {f.reason}", err=True)
    if out_dir is not None and batch.failures:
        write_failures_csv(out_dir, batch.failures)
    if n_bad:
        raise typer.Exit(1)


PIXELS_HELP = ("How tile pixels are stored: lossless (blosc-lz4, the default), a lossy image codec "
               "with its quality (jpeg-95, jpegxl-95, avif-95: 1/3 to 1/5 of the bytes, measured "
               "in the README), or none (coordinates only: predict reads the slide, which must stay "
               "where it is, unchanged).")
MPP_OVERRIDE_HELP = (f"Level-0 pixel size, um/px ({MPP_MIN_UM}-{MPP_MAX_UM:g}), for slides whose "
                     "file has no usable MPP; slides with one keep theirs (see --mpp-override-all). A manifest "
                     "`mpp` column wins per slide. Default: none (every file's own MPP).")
RUNTIME_HELP = ("Inference runtime: auto (ONNX Runtime on the CPU, torch on GPUs), torch, or onnx "
                "(CPU only; the network is exported once per process).")
MPP_OVERRIDE_ALL_HELP = "Apply --mpp-override to every slide, replacing the MPP their files record."


def apply_mpp_override(specs: list, override_um: float | None, all_slides: bool = False) -> list:
    """Give ``override_um`` to the slides that need it: by default only those whose file has
    no usable pixel size (a batch mixing slides with and without one keeps each file's MPP
    where it has one); ``all_slides`` forces it on every slide. A manifest ``mpp`` (already in
    a spec) always wins. Returns new SlideSpecs; each file is opened once for its metadata.
    """
    from dataclasses import replace

    from tmequant.inputs import parse_mpp
    from tmequant.report.qc import file_mpp_um

    if override_um is None:
        if all_slides:
            fail("--mpp-override-all needs --mpp-override X", 2)
        return list(specs)
    parse_mpp(str(override_um), "--mpp-override")
    out = []
    for s in specs:
        if s.mpp_override_um is not None:  # the manifest's value for this slide
            out.append(s)
        elif all_slides or file_mpp_um(s.path) is None:
            out.append(replace(s, mpp_override_um=float(override_um)))
        else:
            log.info("%s: keeps the MPP its file records; --mpp-override applies only to slides "
                     "without one (--mpp-override-all forces it)", s.slide_id)
            out.append(s)
    return out

