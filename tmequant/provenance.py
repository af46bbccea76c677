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

_FINGERPRINT_BLOCK = 1 << 20  # 1 MiB from each end: cheap on multi-GB slides, still unique.


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


def file_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Size and sha256 of the first and last MiB of a file.

    Returns ``{"size_bytes": int, "sha256_head_tail": str}``. Detects a slide replaced
    or truncated under the same name without reading gigabytes.
    """
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256()
    h.update(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(_FINGERPRINT_BLOCK))
        if size > 2 * _FINGERPRINT_BLOCK:
            f.seek(size - _FINGERPRINT_BLOCK)
            h.update(f.read(_FINGERPRINT_BLOCK))
        elif size > _FINGERPRINT_BLOCK:
            h.update(f.read())
    return {"size_bytes": size, "sha256_head_tail": h.hexdigest()[:32]}


def package_version() -> str:
    return __version__
