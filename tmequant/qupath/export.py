"""A slide's results as QuPath objects: one GeoJSON FeatureCollection per slide.

``slide_features`` turns a slide store's predictions and its :class:`BiomarkerResult` into
QuPath features (a ``tile`` per tile with class probabilities and counts as measurements;
tumour bulk, invasive margin, core, epithelium, stroma and TLS as annotations) with the
report's colours; ``write_slide_geojson`` writes them as ``.geojson.zip`` (what QuPath's
*File > Import objects* reads), ``.geojson.gz`` or plain ``.geojson``. Feature ids are
deterministic: the same slide gives the same bytes in every run.
"""

from __future__ import annotations

import gzip as _gz
import io
import json
import math
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from shapely import union_all

from tmequant.atomic import atomic_write_bytes
from tmequant.pixelsize import pitch_xy
from tmequant.qupath import annotation_feature, grid_mask_to_polygons
from tmequant.report.figures import COMPARTMENT_STYLES, TLS_COLOR, class_colors

# Deterministic feature ids: the same slide gives the same GeoJSON in every run.
_UUID_NS = uuid.UUID("6f1c1d2e-6c1b-4b8e-9a57-2f0a4a3c7e11")


def _hex_rgb(h: str) -> tuple[int, int, int]:
    h = h.lstrip("#")
    return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def slide_features(store: Any, model_name: str, res: Any, slide_id: str | None = None) -> list[dict[str, Any]]:
    """QuPath features of one slide: a ``tile`` per tile and the compartment/TLS annotations.

    Tiles: classified by their most probable tissue class (colour of the class's role, as
    in the report), measurements ``P(<class>)`` for every class, ``Lymphocyte count`` and
    ``Lymphocyte density per mm^2`` (the counts the biomarkers used), the model's cell
    counts (``<class> count``) and the nucleus counter's (``Nuclei <column> count``) when
    present, and ``Tissue fraction``. Annotations: ``Tumor bulk``, ``Invasive margin``,
    ``Tumor core``, ``Tumor epithelium``, ``Tumor stroma`` (one per connected part, area in
    um^2) and each TLS. Coordinates: level-0 px, origin top-left.
    Measurements that are not finite are left out (QuPath reads every value as a number).
    """
    sid = slide_id or store.slide_id
    card = store.prediction_card(model_name)
    classes = list(card.get("tissue_classes") or [])
    roles = dict(card.get("tissue_roles") or {})
    probs = store.tissue_probs(model_name)
    colors = [list(_hex_rgb(c)) for c in class_colors(classes, roles)]
    # measurement name -> (N,) values, in the order QuPath lists them
    meas: dict[str, np.ndarray] = {f"P({c})": probs[:, k] for k, c in enumerate(classes)}
    meas["Lymphocyte count"] = np.asarray(res.lymphocyte_counts, float)
    meas["Lymphocyte density per mm^2"] = np.asarray(res.lymphocyte_density_per_mm2, float)
    cc = store.cell_counts(model_name) if card.get("cell_classes") else None
    if cc is not None:
        for k, name in enumerate(card["cell_classes"]):
            meas[f"Model {name} count"] = cc[:, k]
    nuc = store.nuclei_counts()
    if nuc is not None:
        for k, name in enumerate(("lymphocyte", "other")[: nuc.shape[1]]):
            meas[f"Nuclei {name} count"] = nuc[:, k]
    meas["Tissue fraction"] = store.tissue_fraction
    coords = store.coords
    size = store.tile_level0_xy_px  # (x, y): differ on non-square pixels (tmequant.pixelsize)
    feats = _tile_features(sid, coords, size, classes, colors, probs, meas)

    comp = res.compartments
    um2 = store.pixel_size.area_um2  # um^2 per level-0 px
    ann: list[dict[str, Any]] = []
    for key, label in QUPATH_COMPARTMENTS:
        color = _hex_rgb(COMPARTMENT_STYLES[key][0]) if key in COMPARTMENT_STYLES else _EXTRA_RGB[key]
        for j, g in enumerate(grid_mask_to_polygons(getattr(comp, key), comp.origin, size)):
            f = annotation_feature(g, label, color, {"Area um^2": g.area * um2})
            f["id"] = str(uuid.uuid5(_UUID_NS, f"{sid}/{key}/{j}"))
            ann.append(f)
    labels_r = comp.dense.paint(np.asarray(res.tls_labels), 0)
    for rec in res.tls.to_dict("records"):
        polys = grid_mask_to_polygons(labels_r == rec["tls_id"], comp.origin, size)
        if not polys:
            continue
        m = {"Area um^2": rec.get("area_um2"), "Lymphocytes": rec.get("n_lymphocytes"),
             "Mean lymphocyte density per mm^2": rec.get("mean_density_per_mm2"),
             "Distance to tumor bulk um": rec.get("distance_to_bulk_um"),
             "Intratumoral": float(rec.get("location") == "intratumoral")}
        m = {k: float(v) for k, v in m.items() if v is not None and math.isfinite(float(v))}
        f = annotation_feature(union_all(polys), f"TLS {rec['tls_id']}", _hex_rgb(TLS_COLOR), m,
                               classification="TLS")
        f["id"] = str(uuid.uuid5(_UUID_NS, f"{sid}/tls/{rec['tls_id']}"))
        ann.append(f)
    return ann + feats


# Annotation name per compartment, as a QuPath user reads them (outer regions first).
QUPATH_COMPARTMENTS = (("bulk", "Tumor bulk"), ("margin", "Invasive margin"), ("core", "Tumor core"),
                       ("epithelium", "Tumor epithelium"), ("tumor_stroma", "Tumor stroma"))
_EXTRA_RGB = {"epithelium": (150, 0, 100), "tumor_stroma": (60, 160, 60)}


def _tile_features(sid: str, coords: np.ndarray, size: float | tuple[float, float], classes: list[str],
                   colors: list[list[int]], probs: np.ndarray,
                   meas: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """QuPath ``tile`` features, built from arrays directly (a 70,000-tile slide in about a
    second; one shapely polygon per tile takes several). The square's ring runs like
    ``shapely.box``'s: (x1, y0), (x1, y1), (x0, y1), (x0, y0), (x1, y0). ``size``: the tile
    side in level-0 px, or (x, y) for non-square pixels."""
    n = len(coords)
    if n == 0:
        return []
    sx, sy = pitch_xy(size)
    x0 = coords[:, 0].astype(float).tolist()
    y0 = coords[:, 1].astype(float).tolist()
    x1 = (coords[:, 0] + sx).astype(float).tolist()
    y1 = (coords[:, 1] + sy).astype(float).tolist()
    top: list[Any] = probs.argmax(axis=1).tolist() if classes and probs.size else [None] * n
    cols = [(k, np.asarray(v, dtype=np.float64).tolist()) for k, v in meas.items()]
    isfinite = math.isfinite
    out = []
    for i in range(n):
        props: dict[str, Any] = {"objectType": "tile"}
        if top[i] is not None:
            props["classification"] = {"name": classes[top[i]], "color": colors[top[i]]}
        props["measurements"] = {k: v[i] for k, v in cols if isfinite(v[i])}
        ring = [[x1[i], y0[i]], [x1[i], y1[i]], [x0[i], y1[i]], [x0[i], y0[i]], [x1[i], y0[i]]]
        out.append({"type": "Feature", "id": str(uuid.uuid5(_UUID_NS, f"{sid}/tile/{i}")),
                    "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props})
    return out


def write_slide_geojson(path: str | os.PathLike[str], store: Any, model_name: str, res: Any) -> Path:
    """Write :func:`slide_features` as a QuPath GeoJSON FeatureCollection (atomically).

    The name's ending picks the container: ``.zip`` holds one ``<stem>.geojson`` entry (what
    QuPath's own compressed export writes and its importer reads), ``.gz`` is gzip (smaller
    to move around, but QuPath does not read it: gunzip first), anything else plain JSON.
    Compressed output is deterministic (fixed time stamps), so reruns give identical bytes.
    """
    p = Path(path)
    feats = slide_features(store, model_name, res)
    data = json.dumps({"type": "FeatureCollection", "features": feats}, allow_nan=False,
                      separators=(",", ":")).encode("utf-8")
    name = p.name.lower()
    if name.endswith(".zip"):
        inner = p.name[: -len(".zip")]
        inner = inner if inner.lower().endswith((".geojson", ".json")) else inner + ".geojson"
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
            info = zipfile.ZipInfo(inner, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
        data = buf.getvalue()
    elif name.endswith(".gz"):
        data = _gz.compress(data, compresslevel=6, mtime=0)
    return atomic_write_bytes(p, data)


__all__ = ["QUPATH_COMPARTMENTS", "slide_features", "write_slide_geojson"]
