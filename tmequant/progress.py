"""Progress reporting that a caller can switch off and that degrades to log lines.

On a terminal it draws a rich progress bar; otherwise (CI, nohup, a file) it writes a
plain ``logging`` line at most every ``log_every_s`` seconds and one at the end. Library
code never prints: it takes ``progress=False`` or a ``ProgressBar`` from the caller.
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import Any

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
                BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn,
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
