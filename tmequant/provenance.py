"""Provenance helpers: canonical parameter hashes, file fingerprints, versions.

A result is comparable with another only when its ``params_hash`` matches, so the hash
must not depend on dict order, float formatting noise or numpy scalar types.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

from tmequant._version import __version__

# Files up to this size are hashed whole (cell tables, small slides: < 1 s). Larger ones (multi-GB
# slides, re-checked on every rerun of a cohort) get size + mtime + a sampled hash; see
# file_fingerprint for what that misses.
FULL_HASH_MAX_BYTES = 256 << 20
_SAMPLE_BLOCK = 64 << 10
_SAMPLE_BLOCKS = 256  # 16 MiB read per large file, spread evenly over it
_STREAM_BLOCK = 1 << 20


def to_jsonable(obj: Any) -> Any:
    """Convert dataclasses, numpy scalars/arrays, paths and tuples to plain JSON types."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalar or array
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no inf/nan; keep them readable and hashable
    return obj


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, floats via repr."""
    return json.dumps(to_jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=False)


def params_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 hex digest of the canonical JSON of ``obj`` (a dict or dataclass)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def file_fingerprint(path: str | os.PathLike[str] | list[str | os.PathLike[str]]) -> dict[str, Any]:
    """Content fingerprint of a file, or of several files together (a ``.dcm`` file stands
    for all files of its DICOM series).

    Returns ``{"size_bytes": int, "mode": "full" | "sampled", "sha256_head_tail": str}``
    (the digest keeps its historical key name; stores compare it).

    - Files up to ``FULL_HASH_MAX_BYTES`` (256 MiB): sha256 of the whole file, streamed in
      1 MiB blocks. Any edit is noticed.
    - Larger files: sha256 of size, modification time (ns) and 256 blocks of 64 KiB spread
      evenly over the file (16 MiB read, ~0.05 s, instead of seconds per GB on every rerun).
      An edit anywhere changes the mtime, so it is noticed; a copy with a new mtime counts as
      changed (the slide is redone, never wrongly reused). What it misses: a same-size edit
      that also restores the old mtime (``touch -r``, ``rsync -t`` of an edited copy) and
      touches no sampled block.
    """
    paths = [Path(x) for x in path] if isinstance(path, (list, tuple)) else [Path(path)]
    if len(paths) == 1 and paths[0].suffix.lower() == ".dcm":
        # a DICOM slide is a series of files (levels, label, overview): cover them all
        from tmequant.inputs import dicom_series_files

        paths = dicom_series_files(paths[0])
    h = hashlib.sha256()
    total = 0
    modes = set()
    for p in paths:
        st = p.stat()
        size = st.st_size
        total += size
        h.update(f"{p.name}\0{size}\0".encode() if len(paths) > 1 else str(size).encode())
        with open(p, "rb") as f:
            if size <= FULL_HASH_MAX_BYTES:
                modes.add("full")
                while block := f.read(_STREAM_BLOCK):
                    h.update(block)
            else:
                modes.add("sampled")
                h.update(f"mtime_ns={st.st_mtime_ns}".encode())
                step = (size - _SAMPLE_BLOCK) / (_SAMPLE_BLOCKS - 1)
                for i in range(_SAMPLE_BLOCKS):  # first and last block included
                    f.seek(int(round(i * step)))
                    h.update(f.read(_SAMPLE_BLOCK))
    mode = "sampled" if "sampled" in modes else "full"
    return {"size_bytes": total, "mode": mode, "sha256_head_tail": h.hexdigest()[:32]}


def package_version() -> str:
    return __version__
