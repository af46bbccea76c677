"""Expand the SLIDES arguments of the CLI into a validated list of slides.

SLIDES may be slide files, folders (scanned, not recursively), glob patterns and CSV
manifests with the header ``slide_id,path[,mpp]`` (paths relative to the manifest).
"""

from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tmequant.errors import InputError

# Extensions OpenSlide or tifffile open. A DICOM slide is a folder of .dcm files.
SLIDE_SUFFIXES: tuple[str, ...] = (
    ".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide",
    ".bif", ".dcm", ".qptiff",
)
MANIFEST_SUFFIXES = (".csv",)
_MAX_MANIFEST_BYTES = 64 << 20
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,199}$")


@dataclass(frozen=True)
class SlideSpec:
    """One slide to process: its id (names its outputs), its path, an optional MPP override."""

    slide_id: str
    path: Path
    mpp_override_um: float | None = None


def slide_id_from_path(path: str | os.PathLike[str]) -> str:
    """`a/b/TCGA-X.svs` -> `TCGA-X`; `x.ome.tiff` -> `x`; a DICOM file -> its folder's name."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return p.parent.name
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return p.stem if p.suffix.lower() in SLIDE_SUFFIXES else name


def validate_slide_id(slide_id: str, source: str) -> str:
    """Refuse ids that could escape the output folder or collide on case-insensitive disks."""
    if not _SAFE_ID.fullmatch(slide_id) or ".." in slide_id:  # fullmatch: "$" allows a final \n
        raise InputError(
            f"slide id {slide_id!r} is not allowed: use letters, digits, '.', '_', '-', '+' "
            "(no path separators, no '..', at most 200 characters)",
            source,
        )
    return slide_id


def _is_slide_file(p: Path) -> bool:
    name = p.name.lower()
    return p.suffix.lower() in SLIDE_SUFFIXES or name.endswith((".ome.tif", ".ome.tiff"))


def _scan_folder(folder: Path) -> list[Path]:
    files = sorted(f for f in folder.iterdir() if not f.name.startswith("."))
    slides = [f for f in files if _is_slide_file(f) and f.suffix.lower() != ".dcm"]
    dicoms = [f for f in files if f.is_file() and f.suffix.lower() == ".dcm"]
    if dicoms:  # one DICOM series = one slide; OpenSlide opens it from any of its files
        slides.append(dicoms[0])
    for sub in files:  # DICOM slides are often one folder each
        if sub.is_dir() and not _is_slide_file(sub):
            sub_dcm = sorted(sub.glob("*.dcm"))
            if sub_dcm:
                slides.append(sub_dcm[0])
    return slides


def parse_mpp(value: str, source: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise InputError(f"mpp {value!r} is not a number", source) from None
    if not math.isfinite(mpp) or not 0.05 <= mpp <= 20:
        raise InputError(f"mpp {value!r} is outside 0.05-20 um/px", source)
    return mpp


def read_manifest(path: str | os.PathLike[str]) -> list[SlideSpec]:
    """Read a CSV manifest ``slide_id,path[,mpp]``; relative paths are relative to it."""
    p = Path(path)
    if p.stat().st_size > _MAX_MANIFEST_BYTES:
        raise InputError(f"manifest is larger than {_MAX_MANIFEST_BYTES >> 20} MiB", p)
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"manifest is not UTF-8 text (byte {e.start})", p) from None
    try:
        return _manifest_rows(p, text)
    except csv.Error as e:  # NUL bytes, a field over the csv module's size limit...
        raise InputError(f"manifest is not a readable CSV file ({e})", p) from None


def _manifest_rows(p: Path, text: str) -> list[SlideSpec]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    fields = [f.strip().lower() for f in (reader.fieldnames or [])]
    missing = [c for c in ("slide_id", "path") if c not in fields]
    if missing:
        raise InputError(
            f"manifest lacks column(s) {', '.join(missing)}; the header must be slide_id,path[,mpp]",
            p,
        )
    reader.fieldnames = fields
    specs: list[SlideSpec] = []
    first_line: dict[str, int] = {}
    for row in reader:
        i = reader.line_num  # the file's line (a quoted field may span several)
        where = f"{p} line {i}"
        sid = (row.get("slide_id") or "").strip()
        spath = (row.get("path") or "").strip()
        if not sid or not spath:
            raise InputError("empty slide_id or path", where)
        validate_slide_id(sid, where)
        if sid.lower() in first_line:  # outputs are named by id: two rows would overwrite each other
            raise InputError(f"duplicate slide id {sid!r} (also on line {first_line[sid.lower()]}); "
                             "slide ids must be unique (ignoring case)", where)
        first_line[sid.lower()] = i
        target = Path(spath)
        if not target.is_absolute():
            target = p.parent / target
        mpp = parse_mpp(row.get("mpp") or "", where) if "mpp" in fields else None
        specs.append(SlideSpec(sid, target, mpp))
    if not specs:
        raise InputError("manifest has no rows", p)
    return specs


def expand_slides(
    items: Iterable[str | os.PathLike[str]], mpp_override_um: float | None = None
) -> list[SlideSpec]:
    """Expand files, folders, globs and CSV manifests into unique, validated SlideSpecs.

    ``mpp_override_um`` applies to every slide without a manifest ``mpp``. Raises
    InputError for a pattern that matches nothing, a duplicate slide id, or a bad manifest.
    """
    specs: list[SlideSpec] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES:
            specs.extend(read_manifest(p))
            continue
        if p.is_dir() and not _is_slide_file(p):
            found = _scan_folder(p)
            if not found:
                raise InputError("folder contains no slide files", p)
            paths = found
        elif p.exists():
            # A file (or a folder named like a slide: it fails later, per slide, with a reason).
            paths = [p]
        elif any(ch in s for ch in "*?["):
            paths = [Path(m) for m in sorted(glob.glob(s, recursive=True))]
            paths = [m for m in paths if _is_slide_file(m) or m.is_file()]
            if not paths:
                raise InputError("pattern matches no files", s)
        else:
            raise InputError("no such file or folder", s)
        for sp in paths:
            sid = validate_slide_id(slide_id_from_path(sp), str(sp))
            specs.append(SlideSpec(sid, sp, None))
    seen: dict[str, Path] = {}
    out: list[SlideSpec] = []
    for spec in specs:
        key = spec.slide_id.lower()
        if key in seen:
            raise InputError(
                f"duplicate slide id {spec.slide_id!r} (also {seen[key]}); "
                "give unique ids in a CSV manifest",
                spec.path,
            )
        seen[key] = spec.path
        mpp = spec.mpp_override_um if spec.mpp_override_um is not None else mpp_override_um
        out.append(SlideSpec(spec.slide_id, spec.path, mpp))
    return out
