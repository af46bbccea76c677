"""Per-slide isolation for batch commands: one bad slide never stops the others.

``run_per_slide`` calls ``fn(spec)`` for each item, turns any failure into a one-line
reason, and returns what succeeded and what failed; the CLI exits non-zero when any failed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Generic, Iterable, TypeVar

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
