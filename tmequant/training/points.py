"""Point annotations (one dot per cell) for training and evaluating cell detectors.

Sources, parsed into one :class:`PointSet`:

1. a CSV ``image,x,y,class[,split][,patient_id][,mpp]`` with one row per cell (``x, y`` in
   pixels of the image, paths relative to the CSV); an image with no cells is listed with
   empty ``x, y, class``;
2. a folder of images (PNG, JPEG, TIFF, ...) each with ``<stem>.geojson`` beside it: a
   QuPath export whose Point/MultiPoint features (classification name = cell class) are
   the cells and whose Polygon features classified ``Region`` (or ``Annotated``, ``ROI``)
   mark the annotated area;
3. a folder of whole-slide images each with ``<stem>.geojson`` beside it (points in level-0
   pixels): every ``Region`` polygon is one training image, read from the slide at the
   model's MPP (``read_point_slides``; regions are required, since a slide is never
   annotated whole).

**How points become targets.** Every cell is a Gaussian peak in its class's heatmap
(:func:`heatmap_targets`). Pixels outside the annotated area are *ignored* by the loss,
not taught as "no cell": an image annotated only in part must say so with a region (or a
``region`` polygon in its GeoJSON), otherwise its unlabelled cells teach the detector to
miss cells. Without any region the whole image counts as annotated (the BRCA-M2C
convention); :func:`load_points` logs how much of each image is ignored.

Patients: ``patient_id`` where given, else the TCGA patient barcode (first 12 characters,
``TCGA-XX-XXXX``) where the image name has one, else the image name.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import tifffile

from tmequant.errors import InputError
from tmequant.training.labels import IMAGE_SUFFIXES

log = logging.getLogger("tmequant")

_MAX_CSV_BYTES = 256 << 20
_MAX_GEOJSON_BYTES = 256 << 20
_TCGA_RE = re.compile(r"^(TCGA-[A-Z0-9]{2}-[A-Z0-9]{4})", re.IGNORECASE)
REGION_NAMES = ("region", "annotated", "roi", "annotation region")


@dataclass
class PointImage:
    """One annotated image: cell centres in its pixels, their classes, and where it was
    annotated. ``region_polygons``: list of (K, 2) x, y vertex arrays, or empty for the
    whole image. ``mpp_um``: the image's pixel size if given, else None (the model's)."""

    path: str
    xy: np.ndarray  # (n, 2) float64 x, y in image pixels
    classes: list[str]
    patient_id: str
    split: str | None = None
    mpp_um: float | None = None
    region_polygons: list[np.ndarray] = field(default_factory=list)
    # a region of a whole-slide image: (x0, y0, x1, y1) level-0 px; xy and polygons are then
    # relative to (x0, y0), in level-0 px
    slide_box: tuple[float, float, float, float] | None = None
    mpp_override_um: float | None = None

    @property
    def name(self) -> str:
        if self.slide_box is not None:
            x0, y0 = self.slide_box[:2]
            return f"{Path(self.path).name}@{x0:.0f},{y0:.0f}"
        return Path(self.path).name


@dataclass
class PointSet:
    """Annotated images plus the cell-class vocabulary (in first-seen order unless given)."""

    images: list[PointImage]
    classes: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: list[int]) -> PointSet:
        return replace(self, images=[self.images[i] for i in idx])

    def class_counts(self) -> dict[str, int]:
        c = Counter(k for im in self.images for k in im.classes)
        return {k: int(c.get(k, 0)) for k in self.classes}


def patient_of(name: str) -> str:
    """TCGA patient barcode (first 12 characters) of a file name, else its stem."""
    stem = Path(name).stem
    m = _TCGA_RE.match(stem)
    return m.group(1).upper() if m else stem


def _read_text(p: Path, limit: int) -> str:
    try:
        if p.stat().st_size > limit:
            raise InputError(f"file is larger than {limit >> 20} MiB", p)
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError("file not found", p) from None
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text", p) from None


def _float(v: str, p: Path, line: int, col: str) -> float:
    try:
        if "_" in v:
            raise ValueError
        x = float(v)
    except ValueError:
        raise InputError(f"line {line}: {col} {v!r} is not a number", p) from None
    if not math.isfinite(x):
        raise InputError(f"line {line}: {col} {v!r} is not finite", p)
    return x


def read_point_csv(path: str | Path) -> PointSet:
    """CSV ``image,x,y,class[,split][,patient_id][,mpp]`` -> PointSet (see module doc)."""
    p = Path(path)
    rows = list(csv.DictReader(io.StringIO(_read_text(p, _MAX_CSV_BYTES))))
    if not rows:
        raise InputError("no rows", p)
    need = {"image", "x", "y", "class"}
    missing = need - set(rows[0])
    if missing:
        raise InputError(f"missing columns {sorted(missing)}; expected image,x,y,class"
                         "[,split][,patient_id][,mpp]", p)
    by_img: dict[str, dict] = {}
    classes: list[str] = []
    for i, r in enumerate(rows, start=2):
        img = (r.get("image") or "").strip()
        if not img:
            raise InputError(f"line {i}: empty image", p)
        d = by_img.setdefault(img, {"xy": [], "cls": [], "split": None, "patient": None, "mpp": None})
        for key, col in (("split", "split"), ("patient", "patient_id")):
            v = (r.get(col) or "").strip()
            if v:
                d[key] = v
        if (r.get("mpp") or "").strip():
            d["mpp"] = _float(r["mpp"].strip(), p, i, "mpp")
        x, y, c = (r.get("x") or "").strip(), (r.get("y") or "").strip(), (r.get("class") or "").strip()
        if not x and not y and not c:
            continue  # an image with no cells
        if not c:
            raise InputError(f"line {i}: a point without a class", p)
        d["xy"].append((_float(x, p, i, "x"), _float(y, p, i, "y")))
        d["cls"].append(c)
        if c not in classes:
            classes.append(c)
    images = []
    for img, d in by_img.items():
        ip = (p.parent / img).resolve()
        if not ip.is_file():
            raise InputError(f"image {img!r} not found (paths are relative to the CSV)", p)
        images.append(PointImage(str(ip), np.asarray(d["xy"], dtype=np.float64).reshape(-1, 2),
                                 d["cls"], d["patient"] or patient_of(img), d["split"], d["mpp"]))
    return PointSet(images, classes, str(p))


def _classification(feat: dict) -> str | None:
    props = feat.get("properties") or {}
    cl = props.get("classification") or props.get("class") or props.get("name")
    if isinstance(cl, dict):
        cl = cl.get("name")
    return str(cl).strip() if cl else None


def read_point_geojson(image: str | Path, geojson: str | Path) -> tuple[PointImage, list[str]]:
    """An image's QuPath GeoJSON -> (PointImage, classes in first-seen order).

    Points without a classification are skipped with one warning counting the points.
    """
    gp = Path(geojson)
    try:
        data = json.loads(_read_text(gp, _MAX_GEOJSON_BYTES))
    except json.JSONDecodeError as e:
        raise InputError(f"not valid JSON: {e}", gp) from None
    feats = data.get("features", []) if isinstance(data, dict) else data
    if not isinstance(feats, list):
        raise InputError("expected a GeoJSON FeatureCollection or a list of features", gp)
    xy: list[tuple[float, float]] = []
    cls: list[str] = []
    regions: list[np.ndarray] = []
    unclassified = 0
    for f in feats:
        if not isinstance(f, dict):
            continue
        geom = f.get("geometry") or {}
        gtype = geom.get("type")
        coords: Any = geom.get("coordinates")
        name = _classification(f)
        if gtype in ("Point", "MultiPoint"):
            pts = [coords] if gtype == "Point" else list(coords or [])
            if not name:
                unclassified += len(pts)
                continue
            for pt in pts:
                xy.append((float(pt[0]), float(pt[1])))
                cls.append(name)
        elif gtype in ("Polygon", "MultiPolygon") and name and name.lower() in REGION_NAMES:
            polys = [coords] if gtype == "Polygon" else list(coords or [])
            regions.extend(np.asarray(poly[0], dtype=np.float64) for poly in polys)
    if unclassified:
        log.warning("%s: %d point(s) without a classification ignored", gp, unclassified)
    classes = list(dict.fromkeys(cls))
    ip = Path(image)
    return PointImage(str(ip.resolve()), np.asarray(xy, dtype=np.float64).reshape(-1, 2), cls,
                      patient_of(ip.name), region_polygons=regions), classes


def read_point_folder(folder: str | Path) -> PointSet:
    """Images with ``<stem>.geojson`` beside them -> PointSet (images without one skipped)."""
    d = Path(folder)
    images: list[PointImage] = []
    classes: list[str] = []
    skipped = 0
    for ip in sorted(d.iterdir()):
        if not _is_plain_image(ip):
            continue
        gj = ip.with_suffix(".geojson")
        if not gj.exists():
            skipped += 1
            continue
        im, cl = read_point_geojson(ip, gj)
        images.append(im)
        classes.extend(c for c in cl if c not in classes)
    if skipped:
        log.warning("%s: %d image(s) without <name>.geojson beside them skipped", d, skipped)
    if not images:
        raise InputError("no images with point annotations (<image>.geojson) found", d)
    return PointSet(images, classes, str(d))


def _is_plain_image(f: Path) -> bool:
    """An image file, not a whole-slide image (pyramidal TIFFs are slides)."""
    suf = f.suffix.lower()
    if suf not in IMAGE_SUFFIXES:
        return False
    if suf not in (".tif", ".tiff"):
        return True
    try:
        with tifffile.TiffFile(f) as tf:
            return len(tf.series[0].levels) == 1 and not tf.is_svs
    except Exception:  # noqa: BLE001 - unreadable: let the reader say why
        return True


def read_point_slides(folder: str | Path, mpp_override_um: float | None = None) -> PointSet:
    """Whole-slide images with ``<stem>.geojson`` beside them -> one PointImage per Region.

    Points and polygons are in level-0 pixels. A slide whose GeoJSON has points but no
    ``Region`` polygon is refused: its unannotated tissue would teach "no cell".
    """
    d = Path(folder)
    images: list[PointImage] = []
    classes: list[str] = []
    for sp in sorted(d.iterdir()):
        gj = sp.with_suffix(".geojson")
        if not gj.exists() or sp.suffix.lower() in (".geojson", ".json", ".csv", ".txt"):
            continue
        whole, cl = read_point_geojson(sp, gj)
        if not whole.region_polygons:
            raise InputError("slide point annotations need 'Region' polygons marking where every "
                             "cell was annotated (the rest of a slide is not)", gj)
        pts = shapely.points(whole.xy) if len(whole.xy) else None
        for poly in whole.region_polygons:
            x0, y0 = poly.min(axis=0)
            x1, y1 = poly.max(axis=0)
            inside = shapely.contains_xy(shapely.Polygon(poly), whole.xy[:, 0], whole.xy[:, 1]) \
                if pts is not None else np.zeros(0, bool)
            images.append(PointImage(
                str(sp.resolve()), whole.xy[inside] - (x0, y0),
                [c for c, k in zip(whole.classes, inside) if k], whole.patient_id,
                region_polygons=[poly - (x0, y0)], slide_box=(float(x0), float(y0), float(x1), float(y1)),
                mpp_override_um=mpp_override_um))
        classes.extend(c for c in cl if c not in classes)
    if not images:
        raise InputError("no slides with point annotations (<slide>.geojson) found", d)
    return PointSet(images, classes, str(d))


def is_point_source(data: str | Path) -> bool:
    """True when ``data`` is a point CSV (has x and y columns) or a folder of images with
    GeoJSON beside them (rather than slides or class folders)."""
    p = Path(data)
    if p.is_file() and p.suffix.lower() == ".csv":
        try:
            with open(p, encoding="utf-8-sig") as fh:
                head = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError):
            return False
        cols = {h.strip().lower() for h in head}
        return {"image", "x", "y", "class"} <= cols
    if p.is_dir():
        # images (not slides) with GeoJSON beside them holding points: a point source
        for f in sorted(p.iterdir()):
            gj = f.with_suffix(".geojson")
            if _is_plain_image(f) and gj.exists():
                try:
                    with open(gj, encoding="utf-8", errors="replace") as fh:
                        text = fh.read(1 << 20)
                except OSError:
                    return False
                return '"Point"' in text or '"MultiPoint"' in text
    return False


def load_points(data: str | Path, classes: list[str] | None = None, *, slides: bool = False,
                mpp_override_um: float | None = None) -> PointSet:
    """Read a point source; ``classes`` fixes the vocabulary (unknown labels are refused).
    ``slides``: the folder holds whole-slide images (read_point_slides)."""
    p = Path(data)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_file():
        ps = read_point_csv(p)
    elif slides:
        ps = read_point_slides(p, mpp_override_um)
    else:
        ps = read_point_folder(p)
    if classes is not None:
        unknown = sorted(set(ps.classes) - set(classes))
        if unknown:
            raise InputError(f"cell classes {unknown} are not among {classes}", p)
        ps = replace(ps, classes=list(classes))
    n_part = sum(1 for im in ps.images if im.region_polygons)
    if n_part:
        log.info("%s: %d of %d images annotated in regions only; the rest of those images is "
                 "ignored by the loss", p, n_part, len(ps.images))
    return ps


# --- targets ----------------------------------------------------------------------------------

def region_mask(shape: tuple[int, int], polygons: list[np.ndarray], scale: float = 1.0) -> np.ndarray:
    """(H, W) bool: True inside any polygon (vertices in image px times ``scale``); all True
    when there is none."""
    if not polygons:
        return np.ones(shape, dtype=bool)
    from skimage.draw import polygon as fill_polygon  # lazy: scikit-image import is slow

    m = np.zeros(shape, dtype=bool)
    for poly in polygons:
        rr, cc = fill_polygon(poly[:, 1] * scale, poly[:, 0] * scale, shape)
        m[rr, cc] = True
    return m


def heatmap_targets(xy: np.ndarray, cls: np.ndarray, n_classes: int, shape: tuple[int, int],
                    stride: int, sigma_px: float) -> np.ndarray:
    """(C, H/stride, W/stride) float32 target heatmaps: a Gaussian of ``sigma_px`` (heatmap
    px) at each point, max-combined, exactly 1 at the heatmap pixel holding the point.

    ``xy``: (n, 2) input-pixel coordinates; ``cls``: (n,) class indices.
    """
    h, w = shape[0] // stride, shape[1] // stride
    out = np.zeros((n_classes, h, w), dtype=np.float32)
    r = max(1, math.ceil(3 * sigma_px))
    g1 = np.arange(-r, r + 1, dtype=np.float32)
    for (x, y), c in zip(xy, cls):
        cx, cy = int(x // stride), int(y // stride)
        if not (0 <= cx < w and 0 <= cy < h):
            continue
        x0, x1, y0, y1 = max(cx - r, 0), min(cx + r + 1, w), max(cy - r, 0), min(cy + r + 1, h)
        gy = np.exp(-(g1[y0 - cy + r:y1 - cy + r] ** 2) / (2 * sigma_px ** 2))
        gx = np.exp(-(g1[x0 - cx + r:x1 - cx + r] ** 2) / (2 * sigma_px ** 2))
        np.maximum(out[c, y0:y1, x0:x1], gy[:, None] * gx[None, :], out=out[c, y0:y1, x0:x1])
    return out
