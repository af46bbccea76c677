"""QuPath GeoJSON, both ways.

QuPath (>= 0.4) imports and exports a GeoJSON ``FeatureCollection`` whose features look like::

    {"type": "Feature", "id": "<uuid>",
     "geometry": {"type": "Polygon", "coordinates": [[[x, y], ...]]},
     "properties": {"objectType": "annotation",            # or detection, tile, cell
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "measurements": {"Area um^2": 1234.5}}}

Coordinates are level-0 pixels with the origin at the top-left of the full-resolution image
(QuPath docs, "Exporting annotations": "Units and origin"). Readers here also accept the
older forms QuPath wrote: a bare list of features, ``measurements`` as a list of
``{"name", "value"}`` and ``classification.colorRGB`` as a packed int; a cell's
``nucleusGeometry`` is used as its geometry when present (nucleus centroid = cell position).

A slide's results as QuPath objects (tiles with their measurements, compartment and TLS
annotations): :mod:`tmequant.qupath.export`.
"""

from __future__ import annotations

import gzip as _gzip
import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from tmequant.atomic import atomic_write_bytes
from tmequant.errors import CellTableError
from tmequant.pixelsize import pitch_xy

OBJECT_TYPES = ("annotation", "detection", "tile", "cell")
DEFAULT_MAX_BYTES = 2 << 30  # 2 GiB: a whole-slide cell export is a few hundred MB


@dataclass
class Feature:
    """One QuPath object: geometry in level-0 px, its type, class name and measurements."""

    geometry: BaseGeometry
    object_type: str = "annotation"
    classification: str | None = None
    measurements: dict[str, float] = field(default_factory=dict)
    name: str | None = None
    id: str | None = None


# --- reading ---------------------------------------------------------------------------
def iter_text(path: Path, max_bytes: int, chunk_chars: int = 4 << 20) -> Iterator[str]:
    """The UTF-8 text of a plain or gzipped file in chunks of ``chunk_chars``.

    ``max_bytes`` bounds the file *and*, for gzip, the decompressed text (a 10 MB gzip can
    hold 10 GB). CellTableError (one line, naming the file) for a missing, empty, oversized,
    truncated or non-UTF-8 file.
    """
    if not path.is_file():
        from tmequant.inputs import missing_reason

        raise CellTableError(missing_reason(path) if not path.exists() else "not a file", path)
    size = path.stat().st_size
    if size == 0:
        raise CellTableError("file is empty", path)
    if size > max_bytes:
        raise CellTableError(
            f"file is {size / 2**20:.0f} MiB, over the {max_bytes / 2**20:.0f} MiB limit "
            "(raise max_bytes or split the export)", path)
    with open(path, "rb") as fh:
        head = fh.read(2)
    gz = head == b"\x1f\x8b"
    opener = _gzip.open if gz else open
    n = 0
    try:
        with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
            while chunk := fh.read(chunk_chars):
                n += len(chunk)
                if gz and n > max_bytes:
                    raise CellTableError(
                        f"gzip file holds more than {max_bytes / 2**20:.0f} MiB of text, over the "
                        "limit (raise max_bytes or split the export)", path)
                yield chunk
    except EOFError:  # gzip stream cut short
        raise CellTableError("gzip file is truncated (an incomplete copy or download?)",
                             path) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CellTableError(f"cannot read as UTF-8 GeoJSON: {' '.join(str(e).split())}",
                             path) from None


def _open_text(path: Path, max_bytes: int) -> str:
    return "".join(iter_text(path, max_bytes))


def _classification_name(props: dict[str, Any]) -> str | None:
    c = props.get("classification")
    if isinstance(c, dict):
        name = c.get("name")
        if name is None and isinstance(c.get("names"), list):  # derived classes "A: B"
            name = ": ".join(map(str, c["names"]))
        return None if name is None else str(name)
    if isinstance(c, str):
        return c
    return None


def _measurements(props: dict[str, Any]) -> dict[str, float]:
    m = props.get("measurements")
    out: dict[str, float] = {}
    if isinstance(m, dict):
        items: Iterable[tuple[Any, Any]] = m.items()
    elif isinstance(m, list):  # QuPath <= 0.3: [{"name": ..., "value": ...}]
        items = ((d.get("name"), d.get("value")) for d in m if isinstance(d, dict))
    else:
        return out
    for k, v in items:
        if k is None:
            continue
        try:
            out[str(k)] = float(v)
        except (TypeError, ValueError, OverflowError):  # OverflowError: an int beyond float
            out[str(k)] = math.nan
    return out


def parse_features(obj: Any, source: str | Path = "<geojson>") -> list[Feature]:
    """Features from parsed GeoJSON (FeatureCollection, a list of features, or one feature)."""
    if isinstance(obj, dict) and obj.get("type") == "FeatureCollection":
        raw = obj.get("features")
    elif isinstance(obj, dict) and obj.get("type") == "Feature":
        raw = [obj]
    elif isinstance(obj, list):
        raw = obj
    else:
        raise CellTableError("not GeoJSON: expected a FeatureCollection or a list of features", source)
    if not isinstance(raw, list):
        raise CellTableError("FeatureCollection has no 'features' list", source)
    out: list[Feature] = []
    for i, f in enumerate(raw):
        gj, props = feature_parts(f, i, source)
        try:
            geom = shape(gj)
        except Exception as e:  # noqa: BLE001 - shapely raises several types for bad coordinates
            raise CellTableError(f"feature {i}: invalid geometry ({type(e).__name__}: {e})", source) from None
        otype = str(props.get("objectType", props.get("object_type", "annotation"))).lower()
        out.append(Feature(
            geometry=geom, object_type=otype, classification=_classification_name(props),
            measurements=_measurements(props), name=props.get("name"), id=f.get("id"),
        ))
    return out


def feature_parts(f: Any, i: int, source: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(geometry to use, properties) of feature ``i``: the nucleus geometry of a QuPath cell
    where there is one, else the feature's own; CellTableError naming ``source`` otherwise."""
    if not isinstance(f, dict) or not isinstance(f.get("geometry"), dict):
        raise CellTableError(f"feature {i} has no geometry object", source)
    props = f.get("properties") or {}
    if not isinstance(props, dict):
        raise CellTableError(f"feature {i}: 'properties' is not an object", source)
    nucleus = props.get("nucleusGeometry")
    return (nucleus if isinstance(nucleus, dict) else f["geometry"]), props


def read_features(path: str | os.PathLike[str], max_bytes: int = DEFAULT_MAX_BYTES) -> list[Feature]:
    """Read a QuPath GeoJSON export (plain or gzipped) -> list of :class:`Feature`.

    Raises CellTableError (naming the file) when it is missing, empty, over ``max_bytes``,
    not JSON, or not GeoJSON features.
    """
    p = Path(path)
    text = _open_text(p, max_bytes)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CellTableError(f"not valid JSON (line {e.lineno}: {e.msg})", p) from None
    except RecursionError:  # e.g. "[[[[...": json recurses once per level
        raise CellTableError("JSON is nested too deeply to be GeoJSON", p) from None
    try:
        return parse_features(obj, p)
    except RecursionError:  # absurdly nested coordinates
        raise CellTableError("GeoJSON geometry is nested too deeply", p) from None


# --- writing ---------------------------------------------------------------------------
def grid_mask_to_polygons(
    mask: np.ndarray, origin_rowcol: tuple[int, int] = (0, 0),
    tile_level0_px: float | tuple[float, float] = 1.0,
) -> list[BaseGeometry]:
    """Boolean grid (rows, cols) -> polygons in level-0 px, one per edge-connected part.

    Cell (r, c) of ``mask`` covers level-0 x in [(c + c0) * s, (c + c0 + 1) * s) and y likewise
    with ``s = tile_level0_px`` and ``(r0, c0) = origin_rowcol`` (the store's grid anchoring);
    ``tile_level0_px`` may be (x, y), the pitch along each axis (non-square pixels).
    Pixel squares are unioned, so holes are kept; parts touching only at a corner come out
    as separate polygons (a valid GeoJSON polygon cannot touch itself at a point).
    """
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return []
    r0, c0 = origin_rowcol
    sx, sy = pitch_xy(tile_level0_px)
    # Union runs of consecutive True cells per row first: far fewer boxes than cells.
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)
    rs, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)
    boxes = shapely.box((starts + c0) * sx, (rs + r0) * sy, (ends + c0) * sx, (rs + r0 + 1) * sy)
    merged = shapely.union_all(boxes)
    geoms = list(getattr(merged, "geoms", [merged]))
    return [shapely.simplify(g, 0.0) for g in geoms if g.geom_type == "Polygon" and not g.is_empty]


def _color(color: Sequence[int] | None) -> list[int]:
    if color is None:
        return [128, 128, 128]
    c = [int(v) for v in color][:3]
    if len(c) != 3 or not all(0 <= v <= 255 for v in c):
        raise ValueError(f"color must be three ints in 0-255, got {color!r}")
    return c


def _num(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None  # JSON has no NaN/inf; QuPath reads null as missing


def qupath_feature(
    geom: BaseGeometry,
    object_type: str,
    name: str | None = None,
    classification: str | None = None,
    color: Sequence[int] | None = None,
    measurements: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One QuPath GeoJSON feature (dict) for ``geom`` in level-0 px."""
    if object_type not in OBJECT_TYPES:
        raise ValueError(f"object_type must be one of {OBJECT_TYPES}, got {object_type!r}")
    props: dict[str, Any] = {"objectType": object_type}
    if name is not None:
        props["name"] = str(name)
    if classification is not None:
        props["classification"] = {"name": str(classification), "color": _color(color)}
    if measurements:
        props["measurements"] = {str(k): _num(v) for k, v in measurements.items()}
    return {
        "type": "Feature",
        "id": str(uuid.uuid4()),
        "geometry": shapely.geometry.mapping(geom),
        "properties": props,
    }


def annotation_feature(
    geom: BaseGeometry,
    name: str,
    color: Sequence[int] | None = None,
    measurements: dict[str, Any] | None = None,
    classification: str | None = None,
) -> dict[str, Any]:
    """A QuPath annotation named ``name``, classified as ``classification`` (default: name)."""
    return qupath_feature(geom, "annotation", name=name, classification=classification or name,
                          color=color, measurements=measurements)


def tile_features(
    x_px: np.ndarray,
    y_px: np.ndarray,
    size_px: float,
    class_names: Sequence[str] | None = None,
    probs: np.ndarray | None = None,
    counts: dict[str, np.ndarray] | None = None,
    colors: dict[str, Sequence[int]] | None = None,
) -> list[dict[str, Any]]:
    """QuPath ``tile`` objects for tiles with top-left ``(x_px, y_px)`` (level-0 px) and side ``size_px``.

    Each tile is classified by its argmax class; measurements are ``"P(<class>)"`` for each
    class probability in ``probs`` (N, K) and ``"<name> count"`` for each (N,) array in ``counts``.
    """
    x = np.asarray(x_px, dtype=float).ravel()
    y = np.asarray(y_px, dtype=float).ravel()
    boxes = shapely.box(x, y, x + size_px, y + size_px)
    out = []
    top = None if probs is None else np.asarray(probs).argmax(axis=1)
    for i, g in enumerate(boxes):
        m: dict[str, Any] = {}
        cls = None
        if probs is not None and class_names is not None:
            m.update({f"P({c})": float(probs[i, k]) for k, c in enumerate(class_names)})
            cls = class_names[int(top[i])]  # type: ignore[index]
        for k, arr in (counts or {}).items():
            m[f"{k} count"] = float(arr[i])
        col = (colors or {}).get(cls) if cls else None
        out.append(qupath_feature(g, "tile", classification=cls, color=col, measurements=m))
    return out


def write_feature_collection(
    path: str | os.PathLike[str], features: Iterable[dict[str, Any] | Feature], gzip: bool = False
) -> Path:
    """Write features as a GeoJSON FeatureCollection QuPath can import; returns the path."""
    feats = []
    for f in features:
        if isinstance(f, Feature):
            f = qupath_feature(f.geometry, f.object_type if f.object_type in OBJECT_TYPES else "annotation",
                               name=f.name, classification=f.classification, measurements=f.measurements)
        feats.append(f)
    data = json.dumps({"type": "FeatureCollection", "features": feats}, allow_nan=False)
    raw = data.encode("utf-8")
    return atomic_write_bytes(path, _gzip.compress(raw) if gzip else raw)
