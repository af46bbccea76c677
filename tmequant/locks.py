"""The one file-lock mechanism: the output folder of ``run`` and every slide store a command writes.

An OS file lock (``filelock``, ``flock`` on POSIX) on ``lock_path``: a killed holder releases it
automatically, so no stale lock outlives its process. Who holds it (pid, host, start time,
command line) is recorded in ``<lock_path>.json`` for the message another process shows.
The lock file itself stays (deleting it on release would let a third process lock a new file
while a second one still waits on the old one); the ``.json`` record is removed on release.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

log = logging.getLogger("tmequant")


def _new_lock(path: Path) -> FileLock:
    # filelock >= 3.14 returns one shared object per path unless told otherwise; two holders in
    # one process (two threads writing one store) must exclude each other like two processes.
    try:
        singleton = "is_singleton" in inspect.signature(FileLock.__init__).parameters
    except (TypeError, ValueError):  # pragma: no cover
        singleton = False
    return FileLock(str(path), is_singleton=False) if singleton else FileLock(str(path))


def lock_holder(lock_path: str | os.PathLike[str]) -> str:
    """``pid N on HOST, since TIME`` from the holder record, or ``holder unknown``."""
    try:
        info = json.loads(Path(f"{lock_path}.json").read_text())
        return f"pid {info.get('pid')} on {info.get('host')}, since {info.get('started')}"
    except (OSError, ValueError):
        return "holder unknown"


class HeldLock:
    """An acquired lock; :meth:`release` (idempotent) frees it and removes the holder record."""

    def __init__(self, lock: FileLock, info_path: Path):
        self._lock, self._info, self.held = lock, info_path, True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            self._info.unlink()
        except OSError:
            pass
        self._lock.release()


def acquire_lock(
    lock_path: str | os.PathLike[str],
    busy: Callable[[str], Exception],
    *,
    wait: bool | float = False,
    poll_s: float = 0.5,
    waiting: str = "",
) -> HeldLock:
    """Take the lock on ``lock_path`` (its folder must exist).

    ``wait``: False fails at once, True waits as long as it takes, a number waits that many
    seconds. When the lock stays held, raises ``busy(holder)`` (holder: :func:`lock_holder`).
    ``waiting``: the INFO line logged before waiting, ``{holder}`` replaced (default: the
    lock file and its holder).
    """
    path = Path(lock_path)
    lock = _new_lock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = lock_holder(path)
        if wait is False:
            raise busy(holder) from None
        log.info(waiting.replace("{holder}", holder) if waiting
                 else f"{path}: waiting for the process holding it ({holder})")
        try:
            lock.acquire(timeout=-1 if wait is True else float(wait), poll_interval=poll_s)
        except Timeout:
            raise busy(lock_holder(path)) from None
    info = path.with_name(path.name + ".json")
    try:
        # A plain write: a reader that catches it half-written only says "holder unknown".
        info.write_text(json.dumps({
            "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}))
    except OSError:  # a read-only record never blocks the holder
        pass
    return HeldLock(lock, info)


@contextmanager
def file_lock(
    lock_path: str | os.PathLike[str],
    busy: Callable[[str], Exception],
    *,
    wait: bool | float = False,
    poll_s: float = 0.5,
    waiting: str = "",
) -> Iterator[None]:
    """Hold the lock on ``lock_path`` for the duration (see :func:`acquire_lock`)."""
    held = acquire_lock(lock_path, busy, wait=wait, poll_s=poll_s, waiting=waiting)
    try:
        yield
    finally:
        held.release()


__all__ = ["HeldLock", "acquire_lock", "file_lock", "lock_holder"]
