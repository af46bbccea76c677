"""The output folder of a run: one run at a time (``output_lock``), and the checks before any
work that keep a run from silently losing or mixing slides (``check_output_folder``)."""

from __future__ import annotations

import filecmp
import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tmequant.atomic import remove_stale_temp_files
from tmequant.errors import InputError, TmequantError
from tmequant.inputs import SlideSpec
from tmequant.locks import file_lock
from tmequant.pipeline.config import RunConfig

LOCK_NAME = ".tmequant.lock"


class OutputLockedError(TmequantError):
    """Another tmequant run holds the output folder."""


def _remove_stale_temp_files(out: Path) -> None:
    """Delete ``.<name>.tmp-<pid>`` files a killed run left behind (never read, only clutter).

    Called with the output lock held, before this run writes anything: no other writer can
    own them. Slide stores are left alone (zarr keeps no such files).
    """
    remove_stale_temp_files(out / sub for sub in ("", "results", "figures", "slides"))


@contextmanager
def output_lock(out_dir: str | os.PathLike[str], wait: bool = False,
                poll_s: float = 0.5) -> Iterator[None]:
    """Hold ``<out_dir>/.tmequant.lock`` for the duration; one run per output folder.

    Without ``wait`` a held lock raises OutputLockedError naming the folder and the holder
    (pid, host, start time from ``.tmequant.lock.json``); with ``wait`` it blocks until free.
    The lock is an OS file lock (``filelock``): a killed run releases it automatically.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError("--out exists and is not a folder", out)
    out.mkdir(parents=True, exist_ok=True)

    def busy(holder: str) -> OutputLockedError:
        return OutputLockedError(
            f"output folder is in use by another tmequant run ({holder}); wait for it to "
            "finish, pass --wait to queue behind it, or choose another --out", out)

    with file_lock(out / LOCK_NAME, busy, wait=wait, poll_s=poll_s,
                   waiting=f"{out}: waiting for the run holding the folder ({{holder}})"):
        _remove_stale_temp_files(out)
        yield


def check_output_folder(out: Path, specs: Sequence[SlideSpec], cfg: RunConfig) -> None:
    """Refuse, before any work, a run that would silently lose or mix slides of ``out``.

    1. Slides with results in ``out`` that this run does not name: the cohort tables and
       report are rewritten from this run's slides, so they would drop them.
    2. A slide id whose store in ``out`` was made from another slide file (another path and
       other contents): its results would be replaced by a different slide's.
    """
    ids = {s.slide_id.lower() for s in specs}
    rdir = out / "results"
    earlier = sorted(d.name for d in rdir.iterdir()
                     if (d / "done.json").is_file() and d.name.lower() not in ids) if rdir.is_dir() else []
    if earlier:
        shown = ", ".join(earlier[:5]) + (f" and {len(earlier) - 5} more" if len(earlier) > 5 else "")
        raise InputError(
            f"the folder holds results of {len(earlier)} slide(s) this run does not name ({shown}); "
            "the cohort tables and report would leave them out: name them too (finished results "
            "are reused), delete their results/<slide_id> folders, or choose another --out", out)
    for s in specs:
        meta = cfg.stores_dir / f"{s.slide_id}.zarr" / "zarr.json"
        try:
            src = json.loads(meta.read_text()).get("attributes", {}).get("source_path")
        except (OSError, ValueError, AttributeError):
            continue  # no store yet (or unreadable: the tile stage says so)
        if not src or "://" in str(s.path) or os.path.realpath(src) == os.path.realpath(s.path):
            continue
        if not Path(src).is_file() or not Path(s.path).is_file():
            continue  # moved: the tile stage compares the file with the store's fingerprint
        try:  # a copy is the same slide; only a rare same-size pair is read through
            same = os.path.samefile(src, s.path) or (
                os.path.getsize(src) == os.path.getsize(s.path)
                and filecmp.cmp(src, s.path, shallow=False))
        except OSError:
            continue
        if not same:
            raise InputError(
                f"slide id {s.slide_id!r} in this folder belongs to {src}, not to {s.path}; "
                "give the slides unique ids (a CSV manifest slide_id,path) or choose another --out",
                out)


__all__ = ["LOCK_NAME", "OutputLockedError", "check_output_folder", "output_lock"]
