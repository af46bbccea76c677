"""Progress reporting that a caller can switch off and that degrades to log lines.

On a terminal it draws a rich progress bar; otherwise (CI, nohup, a file) it writes a
plain ``logging`` line at most every ``log_every_s`` seconds and one at the end. Library
code never prints: it takes ``progress=False`` or a ``ProgressBar`` from the caller.
``ProgressBar`` counts units (tiles, slides) of one step; ``BatchProgress`` is the display
of ``tmequant run``: slides done, the current slide and stage.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any, Protocol

log = logging.getLogger("tmequant")

_enabled_default = True


def set_progress_enabled(enabled: bool) -> None:
    """Switch progress bars on or off for the whole process (the CLI's --quiet)."""
    global _enabled_default
    _enabled_default = enabled


class ProgressBar:
    """A context manager counting ``total`` units (tiles, slides) with a rate in units/s.

    >>> with ProgressBar(10, "tiles", enabled=False) as bar:
    ...     bar.update(10)
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "tiles",
        enabled: bool | None = None,
        log_every_s: float = 10.0,
    ):
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = _enabled_default if enabled is None else enabled
        self.log_every_s = log_every_s
        self.n = 0
        self._t0 = self._last_log = time.perf_counter()
        self._rich: Any = None  # rich.progress.Progress on a terminal (imported only then)
        self._task: Any = None

    def __enter__(self) -> "ProgressBar":
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._rich = Progress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), transient=False,
            )
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total, rate="")
        return self

    @property
    def rate(self) -> float:
        dt = time.perf_counter() - self._t0
        return self.n / dt if dt > 0 else 0.0

    def update(self, n: int = 1, stage: str | None = None) -> None:
        self.n += n
        if not self.enabled:
            return
        if self._rich is not None:
            desc = f"{self.desc} [{stage}]" if stage else self.desc
            self._rich.update(self._task, advance=n, description=desc,
                              rate=f"{self.rate:.1f} {self.unit}/s")
            return
        now = time.perf_counter()
        if now - self._last_log >= self.log_every_s:
            self._last_log = now
            self._log_line(stage)

    def _log_line(self, stage: str | None = None) -> None:
        total = f"/{self.total}" if self.total is not None else ""
        extra = f" [{stage}]" if stage else ""
        log.info("%s%s: %d%s %s (%.1f %s/s)", self.desc, extra, self.n, total, self.unit,
                 self.rate, self.unit)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._rich is not None:
            self._rich.stop()
        elif self.enabled:
            self._log_line()


class SlideStatus(Protocol):
    """What :class:`BatchProgress` shows of one slide (``tmequant.pipeline.SlideRun`` has it)."""

    n_tiles: int | None
    stages: dict[str, str]
    seconds: dict[str, float]
    tiles_per_s: dict[str, float]
    why: dict[str, str]
    failure: Any  # tmequant.batch.Failure (stage, reason) or None

    @property
    def slide_id(self) -> str: ...


class BatchProgress:
    """One display for the batch: slides done, current slide and stage, last tiles/s.

    On a terminal: one rich progress bar. Otherwise: one log line per finished stage and
    per finished slide (no carriage-return noise in CI logs or files).
    """

    def __init__(self, n_slides: int, enabled: bool | None = None):
        self.n = n_slides
        self.done = 0
        self.enabled = _enabled_default if enabled is None else enabled  # the CLI's --quiet
        self._rich: Any = None
        self._task: Any = None
        self._t0 = time.perf_counter()

    def __enter__(self) -> BatchProgress:
        if self.enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self._rich = Progress(TextColumn("slides"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.description}"), TimeElapsedColumn())
            self._rich.start()
            self._task = self._rich.add_task("", total=self.n)
            # Log lines go through rich's stderr proxy, so they print above the bar.
            self._swapped = []
            for h in log.handlers:
                if isinstance(h, logging.StreamHandler) and h.stream is sys.__stderr__:
                    self._swapped.append((h, h.setStream(sys.stderr)))
        return self

    def _show(self, msg: str, advance: int = 0) -> None:
        from rich.markup import escape

        self._rich.update(self._task, advance=advance, description=escape(msg))

    def stage(self, slide_id: str, stage: str) -> None:
        """A stage starts."""
        if self._rich is not None:
            self._show(f"{slide_id}: {stage}...")

    def stage_done(self, run: SlideStatus, stage: str) -> None:
        what = run.stages.get(stage, "?")
        rate = run.tiles_per_s.get(stage)
        rate_s = f", {rate:.1f} tiles/s" if rate and what == "done" else ""
        tiles = f", {run.n_tiles} tiles" if run.n_tiles is not None else ""
        if what == "skipped" and run.why.get(stage):  # say why, not just "skipped"
            msg = f"{run.slide_id}: {stage}: {run.why[stage]}{tiles} ({run.seconds.get(stage, 0.0):.1f} s)"
        else:
            msg = f"{run.slide_id}: {stage} {what}{tiles}{rate_s} ({run.seconds.get(stage, 0.0):.1f} s)"
        if self._rich is not None:
            self._show(msg)
        elif self.enabled:
            log.info("[%d/%d] %s", self.done, self.n, msg)

    def slide_done(self, run: SlideStatus) -> None:
        self.done += 1
        if run.failure is not None:
            msg = f"{run.slide_id}: FAILED [{run.failure.stage}] {run.failure.reason}"
        else:
            msg = f"{run.slide_id}: finished ({sum(run.seconds.values()):.1f} s)"
        if self._rich is not None:
            self._show(msg, advance=1)
        elif self.enabled:
            log.info("[%d/%d] %s", self.done, self.n, msg)

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.stop()
            for h, old in self._swapped:
                h.setStream(old)
