"""Expand the SLIDES arguments of the CLI into a validated list of slides.

SLIDES may be slide files, folders (scanned, not recursively), glob patterns and CSV
manifests with the header ``slide_id,path[,mpp]`` (paths relative to the manifest).
``expand_stores`` does the same for the STORES arguments (``*.zarr`` slide stores).
"""

from __future__ import annotations

import csv
import errno
import glob
import hashlib
import io
import logging
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from tmequant.defaults import MPP_MAX_UM, MPP_MIN_UM, mpp_in_range
from tmequant.errors import InputError

log = logging.getLogger("tmequant")

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
    """`a/b/TCGA-X.svs` -> `TCGA-X`; `x.ome.tiff` -> `x`; a DICOM file -> its folder's name.

    Names that are not safe ids are made safe (:func:`safe_slide_id`: `my slide.svs` ->
    `my_slide`); the original name stays in the provenance (``source_path``).
    """
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return safe_slide_id(p.parent.name)
    name = p.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return safe_slide_id(name[: -len(suffix)])
    return safe_slide_id(p.stem if p.suffix.lower() in SLIDE_SUFFIXES else name)


def safe_slide_id(name: str) -> str:
    """A valid slide id from a file name: accents dropped (`é` -> `e`), every run of other
    characters -> `_`, no leading `-`/`.`/`_` (a leading dash reads as an option), at most
    200 characters. A name with no ASCII letter or digit at all (`切片`) -> `slide-<8 hex>`
    of its sha256, so different names stay different. Safe names are returned unchanged."""
    if _SAFE_ID.fullmatch(name) and ".." not in name:
        return name
    s = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    s = re.sub(r"[^A-Za-z0-9._+\-]+", "_", s)
    s = re.sub(r"\.{2,}", ".", s).lstrip("._+-")[:200].rstrip(".")
    if not re.search(r"[A-Za-z0-9]", s):
        s = "slide-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return s


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
    slides += [f for f in files if f.is_file() and f.suffix.lower() == ".dcm"]
    for sub in files:  # DICOM slides are often one folder each
        if sub.is_dir() and not _is_slide_file(sub):
            slides += sorted(sub.glob("*.dcm"))
    return slides


def missing_reason(path: str | os.PathLike[str]) -> str:
    """Why ``path`` cannot be used although named: no such file, a symbolic link loop, a
    link to nothing, or a permission problem on the way (one phrase for an error message)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop (the link points back to itself)"
        if e.errno == errno.ENOENT and os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)!r} does not exist)"
        if e.errno == errno.EACCES:
            return "permission denied on the way to it"
        if e.errno == errno.ENOENT:
            return "no such file or folder"
        return f"cannot be reached: {e.strerror or e}"
    return "no such file or folder"


@dataclass(frozen=True)
class DicomFile:
    """What grouping needs of one DICOM file's header."""

    path: Path
    study_uid: str
    series_uid: str
    image_type: tuple[str, ...]
    transfer_syntax: str


def read_dicom_header(path: Path) -> DicomFile | None:
    """Study/series UIDs, image type and transfer syntax of a DICOM file (None: unreadable,
    or pydicom is not installed)."""
    try:
        import pydicom
    except ImportError:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID", "SeriesInstanceUID", "ImageType"])
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        itype = tuple(str(v).upper() for v in (getattr(ds, "ImageType", None) or ()))
        return DicomFile(path, str(getattr(ds, "StudyInstanceUID", "") or ""),
                         str(getattr(ds, "SeriesInstanceUID", "") or ""), itype, ts)
    except Exception:  # noqa: BLE001 - not DICOM, truncated...: the slide fails later with a reason
        return None


_ANCILLARY = {"LABEL", "OVERVIEW", "THUMBNAIL"}


def group_dicom_files(files: list[Path]) -> list[tuple[Path, list[Path]]]:
    """DICOM files -> one (main file, all files) per slide.

    A slide is one series (folder + StudyInstanceUID + SeriesInstanceUID): two slides in one
    folder stay two. The main file is the series' largest file (its level-0 image), so the
    recorded path is an image of the slide, not its 89 KB overview. A series of only label /
    overview / thumbnail images is no slide and is left out (logged). Without pydicom every
    folder is one series (a warning says so when it holds several files).
    """
    by_key: dict[tuple[str, ...], list[DicomFile | Path]] = {}
    no_pydicom = False
    for f in files:
        h = read_dicom_header(f)
        if h is None:
            try:
                import pydicom  # noqa: F401
            except ImportError:
                no_pydicom = True
            key: tuple[str, ...] = (str(f.parent), "?", "")  # unreadable: fails later, named
            by_key.setdefault(key, []).append(f)
        else:
            by_key.setdefault((str(f.parent), h.study_uid, h.series_uid), []).append(h)
    out: list[tuple[Path, list[Path]]] = []
    for key, members in by_key.items():
        paths = [m.path if isinstance(m, DicomFile) else m for m in members]
        heads = [m for m in members if isinstance(m, DicomFile)]
        if heads and all(_ANCILLARY & set(h.image_type) for h in heads):
            log.info("%s: DICOM series %s holds only label/overview images; not a slide",
                     key[0], key[2])
            continue
        if no_pydicom and len(paths) > 1:
            log.warning("%s: %d DICOM files read as one slide; install pydicom to split "
                        "several slides in one folder", key[0], len(paths))
        main = max(paths, key=lambda q: (q.stat().st_size if q.exists() else -1, q.name))
        out.append((main, sorted(paths)))
    return out


def dicom_series_files(path: str | os.PathLike[str]) -> list[Path]:
    """All files of the DICOM series ``path`` belongs to (in its folder), sorted; fingerprints
    cover them all, so a changed image file is noticed whichever file names the slide."""
    p = Path(path)
    h = read_dicom_header(p)
    siblings = sorted(q for q in p.parent.glob("*.dcm") if q.is_file())
    if h is None:
        return [p]
    same = []
    for q in siblings:
        hq = read_dicom_header(q)
        if hq is not None and (hq.study_uid, hq.series_uid) == (h.study_uid, h.series_uid):
            same.append(q)
    return same or [p]


def _group_paths(paths: list[Path]) -> list[tuple[Path, str | None]]:
    """Slide paths in order, DICOM files grouped into slides: [(path, id or None)].

    A DICOM slide's id is its folder's name, plus ``-<series UID tail>`` when the folder
    holds several slides."""
    dcm = [q for q in paths if q.suffix.lower() == ".dcm" and q.is_file()]
    groups = group_dicom_files(dcm) if dcm else []
    per_folder: dict[Path, int] = {}
    for main, _ in groups:
        per_folder[main.parent] = per_folder.get(main.parent, 0) + 1
    out: list[tuple[Path, str | None]] = [(q, None) for q in paths if q not in set(dcm)]
    for main, _ in groups:
        sid = None
        if per_folder[main.parent] > 1:
            h = read_dicom_header(main)
            tail = re.sub(r"[^0-9A-Za-z]", "", h.series_uid)[-8:] if h is not None else main.stem
            sid = safe_slide_id(f"{main.parent.name}-{tail}")
        out.append((main, sid))
    return out


def parse_mpp(value: str, source: str) -> float | None:
    value = value.strip()
    if not value:
        return None
    # A plain decimal number only: float() also takes "1_0" (= 10), "nan", "infinity".
    if not re.fullmatch(r"[+]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?", value):
        raise InputError(f"mpp {value!r} is not a number (write it like 0.25)", source)
    try:
        mpp = float(value)
    except ValueError:
        raise InputError(f"mpp {value!r} is not a number", source) from None
    if not mpp_in_range(mpp):
        raise InputError(f"mpp {value!r} is outside {MPP_MIN_UM}-{MPP_MAX_UM:g} um/px", source)
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a == b or Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def expand_slides(
    items: Iterable[str | os.PathLike[str]], mpp_override_um: float | None = None
) -> list[SlideSpec]:
    """Expand files, folders, globs and CSV manifests into unique, validated SlideSpecs.

    ``mpp_override_um`` applies to every slide without a manifest ``mpp``. Raises
    InputError for a pattern that matches nothing, a duplicate slide id, or a bad manifest.
    """
    specs: list[SlideSpec] = []
    derived: set[int] = set()  # indices of ids made from file names (not given in a manifest)
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
            raise InputError(missing_reason(s), s)
        for sp, sid in _group_paths(paths):
            sid = validate_slide_id(sid or slide_id_from_path(sp), str(sp))
            if sid != sp.stem and sid != sp.parent.name:
                log.info("%s: slide id %r (the file name is not a valid id)", sp, sid)
            derived.add(len(specs))
            specs.append(SlideSpec(sid, sp, None))
    # A DICOM series named twice (folder and glob, or two of its files) is one slide.
    uniq: list[SlideSpec] = []
    seen_paths: set[Path] = set()
    for i, spec in enumerate(specs):
        key_path = Path(os.path.abspath(spec.path))
        if i in derived and key_path in seen_paths:
            continue
        seen_paths.add(key_path)
        uniq.append(spec)
    specs = uniq
    seen: dict[str, Path] = {}
    out: list[SlideSpec] = []
    for spec in specs:
        key = spec.slide_id.lower()
        if key in seen and _same_file(seen[key], spec.path) and spec.mpp_override_um is None:
            # The same file listed twice (a file and its folder, a glob and a name): once is enough.
            import logging

            logging.getLogger("tmequant").info("%s: listed more than once; processed once", spec.path)
            continue
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


def expand_stores(args: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Store paths from arguments: ``x.zarr`` stores, folders of ``*.zarr``, glob patterns
    (and fsspec URLs, kept as given), in order, each once.

    A path that does not exist is kept (it fails on its own, the others still run);
    a folder or glob that holds no store is a usage error (InputError).
    """
    out: list[str] = []
    for a in map(str, args):
        p = Path(a)
        if "://" in a or a.rstrip("/").endswith(".zarr") or (p / "zarr.json").exists():
            out.append(a.rstrip("/") if "://" not in a else a)
        elif p.is_dir():
            found = sorted(str(q) for q in p.glob("*.zarr") if (q / "zarr.json").exists())
            if not found:
                raise InputError("folder holds no slide stores (*.zarr)", p)
            out.extend(found)
        elif any(ch in a for ch in "*?["):
            found = sorted(glob.glob(a))
            if not found:
                raise InputError(f"pattern {a!r} matches no slide store")
            out.extend(found)
        else:
            out.append(a)
    seen: set[str] = set()
    return [s for s in out if not (s in seen or seen.add(s))]  # type: ignore[func-returns-value]


def store_id(path: str) -> str:
    """A store's id from its path: the folder name without ``.zarr``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return name.removesuffix(".zarr")
