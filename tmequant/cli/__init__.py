"""The ``tmequant`` command: a thin layer over the library's public functions.

Exit codes: 0 success; 1 one or more slides failed (the others finished) or a runtime
error; 2 bad usage or input (options, manifest, params file); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import sys
from typing import Any

from tmequant.cli import biomarkers as _biomarkers  # noqa: F401,E402
from tmequant.cli import demo as _demo  # noqa: F401,E402
from tmequant.cli import models as _models  # noqa: F401,E402
from tmequant.cli import predict as _predict  # noqa: F401,E402
from tmequant.cli import run as _run  # noqa: F401,E402

# Each verb registers itself on `app` when imported.
from tmequant.cli import tile as _tile  # noqa: F401,E402
from tmequant.cli import train as _train  # noqa: F401,E402
from tmequant.cli import verify as _verify  # noqa: F401,E402
from tmequant.cli._app import app
from tmequant.errors import TmequantError

__all__ = ["app", "main"]


def _click_exception_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """Click's usage-error and abort classes: typer vendors its own click, so take both."""
    mods = []
    try:
        import typer._click as vendored  # typer >= 0.22 ships click inside

        mods.append(vendored)
    except ImportError:  # pragma: no cover
        pass
    try:
        import click

        mods.append(click)
    except ImportError:  # pragma: no cover
        pass
    usage = tuple(c for m in mods if (c := getattr(m.exceptions, "ClickException", None)))
    abort = tuple(c for m in mods if (c := getattr(m.exceptions, "Abort", None)))
    import typer

    if hasattr(typer, "Abort"):
        abort += (typer.Abort,)
    return usage, abort


_INTERRUPTED = "interrupted: finished work is kept; rerun the same command to resume"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    import signal
    import threading

    import typer

    # SIGTERM (kill, a batch scheduler's time limit) stops like Ctrl-C: finished work is kept,
    # the output lock is released, and a message says how to resume.
    restore = None
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        restore = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return _main(argv, typer)
    finally:
        if restore is not None:
            signal.signal(signal.SIGTERM, restore)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _main(argv: list[str] | None, typer: Any) -> int:
    try:
        rc = app(args=argv, standalone_mode=False)
        if isinstance(rc, int):  # click returns typer.Exit's code instead of raising it
            if rc == 130:  # typer turns Ctrl-C into a silent Exit(130): say what happened
                print(_INTERRUPTED, file=sys.stderr)
            return rc
    except typer.Exit as e:
        if e.exit_code == 130:
            print(_INTERRUPTED, file=sys.stderr)
        return int(e.exit_code or 0)
    except TmequantError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(_INTERRUPTED, file=sys.stderr)
        return 130
    except Exception as e:  # usage errors, and anything unexpected: one line, never a traceback
        click_exc, abort_exc = _click_exception_types()
        if isinstance(e, click_exc):
            e.show()  # type: ignore[attr-defined]  # a ClickException of either click
            return int(getattr(e, "exit_code", 2))
        if isinstance(e, abort_exc):
            print("aborted", file=sys.stderr)
            return 130
        import logging

        from tmequant.batch import one_line_reason

        logging.getLogger("tmequant").debug("unexpected error", exc_info=True)
        print(f"error: {one_line_reason(e)} (run with --verbose for the traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
