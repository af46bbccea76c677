"""A cache of written phantoms, so that a phantom is drawn, rendered and encoded once per machine.

Entries live in ``<cache>/phantoms/<generator_key>/`` (``<name>.svs`` and ``<name>.truth/``),
where the key (:func:`tmequant.phantom.generator_key`) hashes the spec, the truth grid and
parameters, the package version, the source of ``tmequant.phantom`` and the library versions:
an entry is used only for the very same inputs, and only when its slide's sha256 still
matches the one its ``truth.json`` recorded. ``<cache>`` is ``$TMEQUANT_CACHE_DIR``, else
``$XDG_CACHE_HOME/tmequant``, else ``~/.cache/tmequant``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tmequant.domain import truth_dir_for

log = logging.getLogger("tmequant")


def default_cache_dir() -> Path:
    """``$TMEQUANT_CACHE_DIR``, else ``$XDG_CACHE_HOME/tmequant``, else ``~/.cache/tmequant``."""
    env = os.environ.get("TMEQUANT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "tmequant"


def verified_truth(slide: Path, key: str) -> dict[str, Any] | None:
    """``truth.json`` of ``slide`` when it was made under generator ``key`` and the slide's
    content still has the recorded fingerprint (sha256 of the whole file), else None."""
    from tmequant.provenance import file_fingerprint

    try:
        truth = json.loads((truth_dir_for(slide) / "truth.json").read_text())
        ok = (truth.get("generator") == key
              and truth.get("slide_fingerprint") == file_fingerprint(slide))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return truth if ok else None


def _copy_phantom(src_dir: Path, name: str, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    slide = dst_dir / f"{name}.svs"
    tdir = truth_dir_for(slide)
    if tdir.exists():
        shutil.rmtree(tdir)
    shutil.copytree(truth_dir_for(src_dir / f"{name}.svs"), tdir)
    tmp = slide.with_name(slide.name + ".part")
    shutil.copy2(src_dir / f"{name}.svs", tmp)
    os.replace(tmp, slide)  # the slide appears whole or not at all


def fetch(cache_dir: Path, key: str, name: str, out_dir: Path) -> dict[str, Any] | None:
    """Copy the cached phantom ``name`` made under ``key`` into ``out_dir``; its truth, or None
    when the cache has no valid entry (a damaged entry is ignored, and replaced later)."""
    entry = Path(cache_dir) / "phantoms" / key
    if verified_truth(entry / f"{name}.svs", key) is None:
        return None
    try:
        _copy_phantom(entry, name, out_dir)
    except OSError as e:
        log.warning("phantom cache: could not copy %s from %s (%s); writing it anew", name, entry, e)
        return None
    return verified_truth(out_dir / f"{name}.svs", key)


def store(cache_dir: Path, key: str, name: str, src_dir: Path) -> Path | None:
    """Put the phantom ``name`` written in ``src_dir`` into the cache under ``key`` (built in a
    temporary folder and renamed, so readers never see half an entry). Returns the entry, or
    None when the cache cannot be written (a read-only home is no error: the demo goes on)."""
    root = Path(cache_dir) / "phantoms"
    entry = root / key
    if verified_truth(entry / f"{name}.svs", key) is not None:
        return entry
    tmp: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
        _copy_phantom(src_dir, name, tmp)
        if entry.exists():  # a damaged entry
            shutil.rmtree(entry, ignore_errors=True)
        os.replace(tmp, entry)
    except OSError as e:
        log.warning("phantom cache: could not store %s in %s (%s)", name, root, e)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        return None
    return entry
