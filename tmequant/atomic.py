"""Files that appear whole or not at all: the one temp-then-rename writer of the package.

Every file tmequant writes outside a zarr store (per-slide results, cohort tables, the HTML
report, pictures, GeoJSON, run records) goes through :func:`atomic_write_bytes`: the data is
written to ``.<name>.tmp-<pid>`` next to its target, flushed to disk, and renamed over the
target, so a kill never leaves a half file that looks finished. That one naming scheme is what
:func:`remove_stale_temp_files` recognises: a killed run's leftovers are removed by the next
run holding the output folder (``tmequant.pipeline.outdir.output_lock``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger("tmequant")

#: The glob of temporary names (``.<name>.tmp-<pid>``) that :func:`temp_name` gives.
TEMP_GLOB = ".*.tmp-*"


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file next to ``path``, fsync, then rename over it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(p)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk: give the partial copy's space back
        raise
    return p


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """:func:`atomic_write_bytes` of ``text`` encoded as UTF-8."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temp_files(folders: Iterable[Path]) -> None:
    """Delete ``.<name>.tmp-<pid>`` files a killed run left in ``folders`` (and below them).

    Call it only while holding the lock of the folder that holds them (no other writer can
    own them). Slide stores are left alone (zarr keeps no such files).
    """
    for base in folders:
        if not base.is_dir():
            continue
        for p in base.rglob(TEMP_GLOB):
            if p.is_file() and ".zarr" not in p.parts[-2:]:
                try:
                    p.unlink()
                    log.debug("removed stale temporary file %s", p)
                except OSError:
                    pass


def dump_json(obj: Any) -> str:
    """JSON that keeps NaN/inf (Python's json reads them back), for our own files only."""
    return json.dumps(obj, indent=1, sort_keys=False, allow_nan=True, default=_json_default)


def _json_default(o: Any) -> Any:
    import numpy as np  # here, not at the top: the CLI imports this module and starts without numpy

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, tuple):
        return list(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


__all__ = ["TEMP_GLOB", "atomic_write_bytes", "atomic_write_text", "dump_json",
           "remove_stale_temp_files", "temp_name"]
