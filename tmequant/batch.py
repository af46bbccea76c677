"""Per-slide isolation for batch commands: one bad slide never stops the others.

``run_per_slide`` calls ``fn(spec)`` for each item, turns any failure into a one-line
reason, and returns what succeeded and what failed; the CLI exits non-zero when any failed.
``write_failures_csv`` is the one writer of ``failures.csv`` (``tmequant run``, ``tile``,
``biomarkers``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generic, Iterable, TypeVar

from tmequant.atomic import atomic_write_text
from tmequant.errors import TmequantError

log = logging.getLogger("tmequant")

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Failure:
    """One failed item: its id, the stage it failed in, and the one-line reason."""

    item_id: str
    stage: str
    reason: str


@dataclass
class BatchResult(Generic[R]):
    """What a batch gave: item id -> result of each item that succeeded, and the failures."""

    results: dict[str, R] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


def one_line_reason(exc: BaseException) -> str:
    """The user-facing reason: our own message, or the exception type and first line."""
    if isinstance(exc, TmequantError):
        text = str(exc)
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return " ".join(text.split())[:500]


def run_per_slide(
    items: Iterable[T],
    fn: Callable[[T], R],
    item_id: Callable[[T], str],
    stage: str,
) -> BatchResult[R]:
    """Run ``fn`` on each item, isolating failures (KeyboardInterrupt still stops the batch)."""
    out: BatchResult[R] = BatchResult()
    for item in items:
        iid = item_id(item)
        try:
            out.results[iid] = fn(item)
        except Exception as exc:  # noqa: BLE001 - isolation is the point
            reason = one_line_reason(exc)
            log.error("%s failed (%s): %s", iid, stage, reason)
            log.debug("traceback for %s", iid, exc_info=True)
            out.failures.append(Failure(iid, stage, reason))
    return out


def write_failures_csv(out_dir: str | os.PathLike[str], failures: Sequence[Failure]) -> Path:
    """Write ``<out_dir>/failures.csv`` (``slide_id,stage,reason``, one row per failure, in
    the order given; a header only when none failed) atomically; returns its path.

    On a full disk the atomic write (which needs room for a second copy) fails; an existing
    file is then rewritten in place, reusing its blocks, so the failure is still recorded.
    """
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide_id", "stage", "reason"])
    for f in failures:
        w.writerow([f.item_id, f.stage, f.reason])
    path = Path(out_dir) / "failures.csv"
    try:
        return atomic_write_text(path, buf.getvalue())
    except OSError:
        if not path.is_file():
            raise
        with open(path, "r+", encoding="utf-8") as fh:
            fh.write(buf.getvalue())
            fh.truncate()
        return path
