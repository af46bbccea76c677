"""Label sources for training and evaluation, all parsed into one ``LabelSet``.

Three sources (docs: issue #6):

1. a folder of tiles with one sub-folder per class (the NCT-CRC-HE-100K layout);
2. a CSV manifest ``path,label[,slide_id][,patient_id][,split]`` (paths relative to the CSV);
3. slides plus QuPath GeoJSON: classified polygons give tissue tiles on the model's tile
   grid inside each polygon; classified points/detections give per-tile cell counts.

A ``Sample`` is one tile: an image file, a tile of a slide (level-0 box, read through
``tmequant.wsi`` at the model's MPP like inference does) or a crop of a plain image.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely

from tmequant.defaults import MPP_UM, TILE_PX
from tmequant.errors import InputError, SlideError
from tmequant.inputs import SLIDE_SUFFIXES, parse_mpp, slide_id_from_path
from tmequant.qupath import read_features
from tmequant.roles import CELL_ROLES, TISSUE_ROLES, cell_role
from tmequant.wsi import Slide, open_slide

log = logging.getLogger("tmequant")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
ANNOTATION_SUFFIXES = (".geojson", ".json")
_MAX_CSV_BYTES = 256 << 20
_MAX_GEOJSON_BYTES = 512 << 20

# NCT-CRC-HE-100K (Kather et al. 2019) class -> tissue role (tmequant.roles.TISSUE_ROLES).
NCT_CRC_ROLES: dict[str, str] = {
    "ADI": "other_tissue",  # adipose tissue: neither tumour, stroma nor immune; excluded from TSR
    "BACK": "background",  # slide background / glass: never tissue
    "DEB": "necrosis",  # debris and necrosis: counted as necrosis, excluded from tumour area
    "LYM": "immune",  # lymphocyte aggregates: the immune role drives TLS and immune areas
    "MUC": "other_tissue",  # extracellular mucus: acellular, neither tumour nor stroma
    "MUS": "stroma",  # smooth muscle: stromal compartment in TSR scoring (Kather/TSR practice)
    "NORM": "other_tissue",  # normal colonic mucosa: epithelium that is NOT tumour
    "STR": "stroma",  # cancer-associated stroma
    "TUM": "tumor",  # colorectal adenocarcinoma epithelium
}

# Name fragments -> role, for class names of user data sets (checked in this order).
_TISSUE_ROLE_HINTS: tuple[tuple[str, str], ...] = (
    ("necro", "necrosis"),
    ("debris", "necrosis"),
    ("background", "background"),
    ("glass", "background"),
    ("ignore", "background"),
    ("tumo", "tumor"),
    ("carcinoma", "tumor"),
    ("cancer", "tumor"),
    ("neoplas", "tumor"),
    ("lymph", "immune"),
    ("immune", "immune"),
    ("inflam", "immune"),
    ("tls", "immune"),
    ("strom", "stroma"),
    ("muscle", "stroma"),
    ("fibro", "stroma"),
)

def guess_tissue_role(name: str) -> str:
    """Role of a tissue class name: the NCT map first, then name fragments, else other_tissue."""
    if name.upper() in NCT_CRC_ROLES:
        return NCT_CRC_ROLES[name.upper()]
    low = name.lower()
    if low in TISSUE_ROLES:
        return low
    for frag, role in _TISSUE_ROLE_HINTS:
        if frag in low:
            return role
    return "other_tissue"


@dataclass(frozen=True)
class Sample:
    """One labelled tile.

    ``kind``: ``file`` (a tile image file), ``slide`` (a level-0 box of a slide, read at the
    model's MPP) or ``image`` (a box of a plain image, in that image's pixels).
    ``box`` is (x0, y0, side) in level-0 / image pixels for ``slide`` and ``image``.
    ``counts`` are cells per tile per cell class (NaN where unknown), or None.
    """

    path: str
    label: str | None
    slide_id: str
    patient_id: str | None = None
    kind: str = "file"
    box: tuple[float, float, float] | None = None
    counts: tuple[float, ...] | None = None
    mpp_override_um: float | None = None
    split: str | None = None  # a split given by the user (train/val/test), else None

    @property
    def key(self) -> str:
        """A stable id of the sample (for split.csv and per-tile outputs)."""
        if self.box is None:
            return self.path
        x, y, s = self.box
        return f"{self.path}@{x:.0f},{y:.0f},{s:.1f}"


@dataclass
class LabelSet:
    """Samples plus their class vocabularies and role maps."""

    samples: list[Sample]
    tissue_classes: list[str] = field(default_factory=list)
    cell_classes: list[str] = field(default_factory=list)
    tissue_roles: dict[str, str] = field(default_factory=dict)
    cell_roles: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def has_tissue(self) -> bool:
        return any(s.label is not None for s in self.samples)

    @property
    def has_counts(self) -> bool:
        return any(s.counts is not None for s in self.samples)

    def subset(self, idx: Iterable[int]) -> LabelSet:
        return replace(self, samples=[self.samples[i] for i in idx])

    def label_counts(self) -> dict[str, int]:
        out = {c: 0 for c in self.tissue_classes}
        for s in self.samples:
            if s.label is not None:
                out[s.label] = out.get(s.label, 0) + 1
        return out

    def with_classes(
        self, tissue_classes: Sequence[str], cell_classes: Sequence[str] = (), what: str = "model"
    ) -> LabelSet:
        """Re-express the labels in another class vocabulary (a model's), by name.

        Raises InputError naming the labels the vocabulary does not know. Count columns
        are reordered to ``cell_classes``; ones the data lacks become NaN.
        """
        unknown = sorted(
            {s.label for s in self.samples if s.label is not None} - set(tissue_classes)
        )
        if unknown:
            raise InputError(
                f"labels {unknown} are not classes of the {what} ({list(tissue_classes)}); "
                "rename them or train a model with these classes",
                self.source or None,
            )
        samples = self.samples
        if self.has_counts and list(cell_classes) != list(self.cell_classes):
            missing = [c for c in self.cell_classes if c not in cell_classes]
            if missing and cell_classes:
                log.warning("cell classes %s of the data are not in the %s; ignored", missing, what)
            pos = {c: i for i, c in enumerate(self.cell_classes)}
            samples = [
                s
                if s.counts is None
                else replace(
                    s,
                    counts=tuple(s.counts[pos[c]] if c in pos else math.nan for c in cell_classes),
                )
                for s in self.samples
            ]
        return replace(
            self,
            samples=samples,
            tissue_classes=list(tissue_classes),
            cell_classes=list(cell_classes),
        )


# --------------------------------------------------------------------------------------
# shared helpers


def _roles_for(
    classes: Sequence[str], given: dict[str, str] | None, guess, vocab, what: str, source: str
) -> dict[str, str]:
    given = dict(given or {})
    roles = {}
    for c in classes:
        role = given.get(c) or guess(c)
        if role not in vocab:
            raise InputError(
                f"{what} role {role!r} of class {c!r} is not one of {list(vocab)}", source
            )
        roles[c] = role
    return roles


def _check_classes(found: Sequence[str], classes: Sequence[str] | None, source: str) -> list[str]:
    """The class list: ``classes`` if given (unknown labels are an error), else sorted found."""
    if classes is None:
        return sorted(set(found))
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise InputError(f"unknown classes {unknown}; expected one of {list(classes)}", source)
    return list(classes)


def _check_nonempty(
    samples: Sequence[Sample], classes: Sequence[str], source: str, allow_empty: bool
) -> None:
    if not samples:
        raise InputError("no labelled tiles found", source)
    present = {s.label for s in samples if s.label is not None}
    empty = [c for c in classes if c not in present]
    if empty and not allow_empty:
        raise InputError(
            f"classes {empty} have no tiles; add examples or leave them out of the class list",
            source,
        )


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+\-]", "_", text)[:200] or "x"


def is_image_file(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


# --------------------------------------------------------------------------------------
# 1. class folders


def read_class_folders(
    folder: str | Path,
    classes: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    allow_empty_classes: bool = False,
    patient_pattern: str | None = None,
) -> LabelSet:
    """One sub-folder per class of tile images (NCT-CRC-HE-100K layout).

    Each file is its own group for splitting unless ``patient_pattern`` (a regex with one
    group, matched on the file name) extracts a patient id. NCT-CRC-HE-100K's nine
    classes get the built-in role map :data:`NCT_CRC_ROLES`.
    """
    root = Path(folder)
    if not root.is_dir():
        raise InputError("not a folder of class sub-folders", root)
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not subdirs:
        raise InputError(
            "no class sub-folders (expected one folder per class of tile images)", root
        )
    names = [d.name for d in subdirs]
    cls = _check_classes(names, classes, str(root))
    pat = re.compile(patient_pattern) if patient_pattern else None
    samples: list[Sample] = []
    for d in subdirs:
        files = sorted(f for f in d.iterdir() if is_image_file(f))
        if not files and not allow_empty_classes:
            raise InputError(
                f"class folder {d.name!r} has no images ({', '.join(IMAGE_SUFFIXES)})", d
            )
        for f in files:
            pid = None
            if pat is not None:
                m = pat.search(f.name)
                pid = m.group(1) if m else None
            samples.append(
                Sample(path=str(f.resolve()), label=d.name, slide_id=f.stem, patient_id=pid)
            )
    _check_nonempty(samples, cls, str(root), allow_empty_classes)
    return LabelSet(
        samples=samples,
        tissue_classes=cls,
        tissue_roles=_roles_for(cls, roles, guess_tissue_role, TISSUE_ROLES, "tissue", str(root)),
        source=str(root),
    )


# --------------------------------------------------------------------------------------
# 2. CSV manifest


def read_csv_manifest(
    path: str | Path,
    classes: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    allow_empty_classes: bool = False,
) -> LabelSet:
    """``path,label[,slide_id][,patient_id][,split]``; paths relative to the CSV's folder."""
    p = Path(path)
    if not p.is_file():
        raise InputError("no such manifest", p)
    if p.stat().st_size > _MAX_CSV_BYTES:
        raise InputError(f"manifest larger than {_MAX_CSV_BYTES >> 20} MiB", p)
    text = _read_text(p)
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "path" not in header or "label" not in header:
        raise InputError(
            f"manifest header {header} lacks 'path' and 'label' "
            "(expected path,label[,slide_id][,patient_id][,split])",
            p,
        )
    samples: list[Sample] = []
    for i, row in enumerate(reader, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        if not row.get("path"):
            continue
        f = Path(row["path"])
        if not f.is_absolute():
            f = p.parent / f
        if not f.is_file():
            raise InputError(f"line {i}: image {row['path']!r} not found", p)
        label = row.get("label") or ""
        if not label:
            raise InputError(f"line {i}: empty label", p)
        split = row.get("split") or None
        if split is not None and split not in ("train", "val", "test"):
            raise InputError(f"line {i}: split {split!r} is not train, val or test", p)
        samples.append(
            Sample(
                path=str(f.resolve()),
                label=label,
                slide_id=row.get("slide_id") or f.stem,
                patient_id=row.get("patient_id") or None,
                split=split,
            )
        )
    cls = _check_classes([s.label for s in samples if s.label], classes, str(p))
    _check_nonempty(samples, cls, str(p), allow_empty_classes)
    return LabelSet(
        samples=samples,
        tissue_classes=cls,
        tissue_roles=_roles_for(cls, roles, guess_tissue_role, TISSUE_ROLES, "tissue", str(p)),
        source=str(p),
    )


# --------------------------------------------------------------------------------------
# 3. slides + QuPath GeoJSON


@dataclass(frozen=True)
class AnnotatedSlide:
    """A slide and its QuPath GeoJSON export."""

    slide_path: str
    annotations_path: str
    slide_id: str
    patient_id: str | None = None
    mpp_override_um: float | None = None


def tile_boxes_in_region(
    region, side_px: float, width_px: float, height_px: float, min_cover: float
) -> tuple[np.ndarray, np.ndarray]:
    """Grid tiles (anchored at (0, 0), pitch ``side_px``) covered by ``region``.

    Returns ``xy`` (M, 2) float level-0 top-left corners ``(col * side_px, row * side_px)``
    (the store's ``tiles/coords`` are these rounded) and ``cover`` (M,) the share of each
    tile inside the region, keeping tiles with ``cover >= min_cover`` that lie fully
    inside the image (the rule of ``tmequant.tiling.plan_grid``).
    """
    if region.is_empty:
        return np.zeros((0, 2)), np.zeros(0)
    n_cols = int(math.floor(width_px / side_px + 1e-6))
    n_rows = int(math.floor(height_px / side_px + 1e-6))
    x0, y0, x1, y1 = region.bounds
    c0, r0 = max(int(math.floor(x0 / side_px)), 0), max(int(math.floor(y0 / side_px)), 0)
    c1, r1 = min(int(math.ceil(x1 / side_px)), n_cols), min(int(math.ceil(y1 / side_px)), n_rows)
    if c1 <= c0 or r1 <= r0:
        return np.zeros((0, 2)), np.zeros(0)
    cols, rows = np.meshgrid(np.arange(c0, c1), np.arange(r0, r1))
    xs = cols.ravel() * float(side_px)
    ys = rows.ravel() * float(side_px)
    boxes = shapely.box(xs, ys, xs + side_px, ys + side_px)
    cover = shapely.area(shapely.intersection(boxes, region)) / (side_px * side_px)
    keep = cover >= min_cover - 1e-9
    return np.stack([xs[keep], ys[keep]], axis=1), cover[keep]


def count_points_in_boxes(
    xy: np.ndarray, side_px: float, points_xy: np.ndarray, point_class: np.ndarray, n_classes: int
) -> np.ndarray:
    """(M, C) float32 number of points of each class with ``x0 <= x < x0 + side`` (and y)."""
    out = np.zeros((len(xy), n_classes), dtype=np.float32)
    if len(xy) == 0 or len(points_xy) == 0:
        return out
    order = np.argsort(points_xy[:, 0], kind="stable")
    px, py, pc = points_xy[order, 0], points_xy[order, 1], point_class[order]
    for i, (x0, y0) in enumerate(xy):
        lo, hi = np.searchsorted(px, [x0, x0 + side_px], side="left")
        sel = (py[lo:hi] >= y0) & (py[lo:hi] < y0 + side_px)
        if sel.any():
            out[i] = np.bincount(pc[lo:hi][sel], minlength=n_classes)[:n_classes]
    return out


def open_training_slide(path: str | os.PathLike[str], mpp_override_um: float | None = None) -> Slide:
    """:func:`tmequant.wsi.open_slide` for training, which reads square level-0 regions:
    a slide with non-square pixels (tiled and measured per axis elsewhere) is refused here
    with SlideError rather than giving stretched training tiles."""
    slide = open_slide(path, mpp_override_um=mpp_override_um)
    px = slide.info.pixel_size
    if not px.is_square:
        slide.close()
        raise SlideError(f"pixels are not square ({px.describe()}): training reads square regions; "
                         "resample the slide to square pixels to train on it", path)
    return slide


def _slide_geometry(path: str, mpp_override_um: float | None) -> tuple[float, float, float]:
    """(width_px, height_px, mpp_um) of level 0, through tmequant.wsi like inference."""
    with open_training_slide(path, mpp_override_um) as slide:
        w, h = slide.info.dimensions
        assert slide.info.mpp_um is not None  # open_slide requires an MPP by default
        return float(w), float(h), float(slide.info.mpp_um)


def _split_features(features, source: str):
    """(regions [(geom, class|None)], points_xy (P,2), point_names [str])."""
    regions, pts, names = [], [], []
    n_unclassified_pts = 0
    for f in features:
        g = f.geometry
        if g is None or g.is_empty:
            continue
        is_area = g.geom_type in ("Polygon", "MultiPolygon")
        if is_area and f.object_type in ("annotation", "tile"):
            if not g.is_valid:
                g = g.buffer(0)  # self-intersections from hand drawing
            regions.append((g, f.classification))
            continue
        if g.geom_type in ("Point", "MultiPoint") or f.object_type in ("detection", "cell"):
            geoms = getattr(g, "geoms", [g]) if g.geom_type == "MultiPoint" else [g]
            if f.classification is None:
                n_unclassified_pts += len(geoms)  # points, not features (a MultiPoint holds many)
                continue
            for p in geoms:
                c = p.centroid
                pts.append((c.x, c.y))
                names.append(f.classification)
    if n_unclassified_pts:
        log.warning("%s: %d points/detections without a classification ignored", source,
                    n_unclassified_pts)
    return regions, np.asarray(pts, dtype=np.float64).reshape(-1, 2), names


def read_slide_annotations(
    slides: Sequence[AnnotatedSlide],
    tile_px: int,
    mpp_um: float,
    classes: Sequence[str] | None = None,
    cell_classes: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    cell_roles: dict[str, str] | None = None,
    min_cover: float = 0.5,
    count_min_cover: float = 0.99,
    allow_empty_classes: bool = False,
) -> LabelSet:
    """Slides + QuPath GeoJSON -> tiles of ``tile_px`` at ``mpp_um`` with labels and counts.

    - Classified annotation polygons: every grid tile (the store's grid: pitch
      ``tile_px * mpp_um`` um anchored at (0, 0)) with at least ``min_cover`` of its area
      inside gets the polygon's class (the largest cover wins where polygons overlap).
    - Classified points, detections and cells (centroids): per-tile counts per class, on
      tiles at least ``count_min_cover`` inside the annotated area (every annotation
      polygon, classified or not; the points' convex hull when there are none), since a
      tile reaching outside it may hold cells nobody annotated.
    """
    per_slide = []
    all_labels: list[str] = []
    all_cells: list[str] = []
    for spec in slides:
        feats = read_features(spec.annotations_path, _MAX_GEOJSON_BYTES)
        regions, pts, names = _split_features(feats, spec.annotations_path)
        if not any(c is not None for _, c in regions) and not len(pts):
            raise InputError(
                "no classified polygons or classified points/detections "
                "(set a classification in QuPath)",
                spec.annotations_path,
            )
        all_labels += [c for _, c in regions if c is not None]
        all_cells += names
        per_slide.append((spec, regions, pts, names))
    src = ", ".join(s.annotations_path for s in slides[:3]) + (" ..." if len(slides) > 3 else "")
    cls = _check_classes(all_labels, classes, src) if all_labels or classes else []
    ccls = _check_classes(all_cells, cell_classes, src) if all_cells or cell_classes else []
    cpos = {c: i for i, c in enumerate(ccls)}

    samples: list[Sample] = []
    for spec, regions, pts, names in per_slide:
        width, height, slide_mpp = _slide_geometry(spec.slide_path, spec.mpp_override_um)
        side = tile_px * mpp_um / slide_mpp
        best = _tile_labels(regions, side, width, height, min_cover, spec.annotations_path)
        counts = _tile_counts(regions, pts, names, cpos, len(ccls), side, width, height,
                              count_min_cover, spec.annotations_path)
        for x, y in sorted(set(best) | set(counts), key=lambda t: (t[1], t[0])):
            label = best[(x, y)][1] if (x, y) in best else None
            cvec = counts.get((x, y))
            samples.append(
                Sample(
                    path=str(Path(spec.slide_path).resolve()),
                    label=label,
                    slide_id=spec.slide_id,
                    patient_id=spec.patient_id,
                    kind="slide",
                    box=(float(x), float(y), float(side)),
                    counts=None if cvec is None else tuple(float(v) for v in cvec),
                    mpp_override_um=spec.mpp_override_um,
                )
            )
    if cls:
        _check_nonempty(samples, cls, src, allow_empty_classes)
    elif not samples:
        raise InputError("no labelled tiles found inside the annotations", src)
    return LabelSet(
        samples=samples,
        tissue_classes=cls,
        cell_classes=ccls,
        tissue_roles=_roles_for(cls, roles, guess_tissue_role, TISSUE_ROLES, "tissue", src),
        cell_roles=_roles_for(ccls, cell_roles, cell_role, CELL_ROLES, "cell", src),
        source=src,
    )


def _tile_labels(
    regions: list[tuple[Any, str | None]], side: float, width: float, height: float,
    min_cover: float, source: str,
) -> dict[tuple[float, float], tuple[float, str]]:
    """Tissue labels: the best-covering classified polygon per tile, as (cover, class) by
    tile corner (level-0 px)."""
    best: dict[tuple[float, float], tuple[float, str]] = {}
    for geom, c in regions:
        if c is None:
            continue
        xy, cover = tile_boxes_in_region(geom, side, width, height, min_cover)
        if len(xy) == 0:
            log.warning(
                "%s: a %r polygon holds no tile of %.0f level-0 px (>= %.0f%% cover)",
                source,
                c,
                side,
                100 * min_cover,
            )
        for (x, y), cv in zip(map(tuple, xy), cover):
            if (x, y) not in best or cv > best[(x, y)][0]:
                best[(x, y)] = (float(cv), c)
    return best


def _tile_counts(
    regions: list[tuple[Any, str | None]], pts: np.ndarray, names: list[str], cpos: dict[str, int],
    n_classes: int, side: float, width: float, height: float, count_min_cover: float, source: str,
) -> dict[tuple[float, float], np.ndarray]:
    """Per-tile point counts per cell class by tile corner, on the tiles inside the annotated
    area (every polygon; the points' convex hull when there are none)."""
    counts: dict[tuple[float, float], np.ndarray] = {}
    if len(pts):
        areas = [g for g, _ in regions]
        area = shapely.union_all(areas) if areas else shapely.MultiPoint(pts).convex_hull
        xy, _ = tile_boxes_in_region(area, side, width, height, count_min_cover)
        pc = np.array([cpos[n] for n in names], dtype=np.int64)
        cnt = count_points_in_boxes(xy, side, pts, pc, n_classes)
        counts = {tuple(k): v for k, v in zip(map(tuple, xy), cnt)}
        if not counts:
            log.warning(
                "%s: no tile lies inside the annotated area; points unused",
                source,
            )
    return counts


def _annotation_for(slide: Path) -> Path | None:
    for suf in (".geojson", ".json", ".geojson.gz"):
        cand = slide.parent / (slide.stem + suf)
        if cand.is_file():
            return cand
    return None


def find_annotated_slides(data: str | Path) -> list[AnnotatedSlide]:
    """A folder of slides each with ``<stem>.geojson`` beside it, or a CSV
    ``slide,annotations[,slide_id][,patient_id][,mpp]`` (paths relative to the CSV)."""
    p = Path(data)
    out: list[AnnotatedSlide] = []
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.is_file() and f.suffix.lower() in SLIDE_SUFFIXES:
                ann = _annotation_for(f)
                if ann is not None:
                    out.append(AnnotatedSlide(str(f), str(ann), slide_id_from_path(f)))
        if not out:
            raise InputError("no slide with a <name>.geojson beside it", p)
        return out
    text = _read_text(p)
    reader = csv.DictReader(io.StringIO(text))
    for i, row in enumerate(reader, start=2):
        row = {str(k).strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}
        sp, ap = Path(row.get("slide", "")), Path(row.get("annotations", ""))
        sp = sp if sp.is_absolute() else p.parent / sp
        ap = ap if ap.is_absolute() else p.parent / ap
        for what, q in (("slide", sp), ("annotations", ap)):
            if not q.is_file():
                raise InputError(f"line {i}: {what} file {str(q)!r} not found", p)
        mpp = row.get("mpp") or None
        out.append(
            AnnotatedSlide(
                str(sp),
                str(ap),
                row.get("slide_id") or slide_id_from_path(sp),
                row.get("patient_id") or None,
                _manifest_mpp(mpp, p, i) if mpp else None,
            )
        )
    if not out:
        raise InputError("manifest lists no slides", p)
    return out


# --------------------------------------------------------------------------------------
# dispatch


def _manifest_mpp(value: str, p: Path, line: int) -> float:
    """The ``mpp`` column of a slide manifest row, checked (0.05-20 um/px)."""
    mpp = parse_mpp(value, f"{p} line {line}")
    assert mpp is not None
    return mpp


def _read_text(p: Path) -> str:
    """A manifest's text; InputError naming the file when it is not UTF-8."""
    try:
        return p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"manifest is not UTF-8 text (byte {e.start})", p) from None


def _csv_header(p: Path) -> list[str]:
    try:
        with open(p, encoding="utf-8-sig") as fh:
            first = fh.readline()
    except UnicodeDecodeError as e:
        raise InputError(f"manifest is not UTF-8 text (byte {e.start})", p) from None
    return [h.strip().lower() for h in next(csv.reader([first]), [])]


def load_labels(
    data: str | Path | LabelSet,
    tile_px: int = TILE_PX,
    mpp_um: float = MPP_UM,
    classes: Sequence[str] | None = None,
    cell_classes: Sequence[str] | None = None,
    roles: dict[str, str] | None = None,
    cell_roles: dict[str, str] | None = None,
    allow_empty_classes: bool = False,
) -> LabelSet:
    """Any label source -> LabelSet: a class-folder tree, a ``path,label`` CSV, a folder of
    slides with GeoJSON beside them, a ``slide,annotations`` CSV, or one GeoJSON file whose
    slide has the same name beside it. ``tile_px``/``mpp_um`` matter only for slides."""
    if isinstance(data, LabelSet):
        return data
    p = Path(data)
    if not p.exists():
        raise InputError("no such file or folder", p)
    slide_kw: dict[str, Any] = dict(
        tile_px=tile_px,
        mpp_um=mpp_um,
        classes=classes,
        cell_classes=cell_classes,
        roles=roles,
        cell_roles=cell_roles,
        allow_empty_classes=allow_empty_classes,
    )
    if p.is_dir():
        if any(d.is_dir() and not d.name.startswith(".") for d in p.iterdir()):
            return read_class_folders(p, classes, roles, allow_empty_classes)
        return read_slide_annotations(find_annotated_slides(p), **slide_kw)
    if p.suffix.lower() == ".csv":
        header = _csv_header(p)
        if "slide" in header and "annotations" in header:
            return read_slide_annotations(find_annotated_slides(p), **slide_kw)
        return read_csv_manifest(p, classes, roles, allow_empty_classes)
    if p.suffix.lower() in ANNOTATION_SUFFIXES:
        for suf in SLIDE_SUFFIXES:
            s = p.with_suffix(suf)
            if s.is_file():
                return read_slide_annotations(
                    [AnnotatedSlide(str(s), str(p), slide_id_from_path(s))], **slide_kw
                )
        raise InputError("no slide with the same name beside this GeoJSON", p)
    raise InputError(
        "not a label source: expected a folder of class folders, a CSV manifest, "
        "or slides with QuPath GeoJSON",
        p,
    )
