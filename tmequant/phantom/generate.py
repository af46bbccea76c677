"""Write a phantom slide (pyramidal SVS, JPEG tiles) and its truth files."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tmequant.domain import truth_dir_for  # re-exported: phantoms are where it is used
from tmequant.phantom.layout import PhantomLayout, make_layout
from tmequant.phantom.render import PhantomRenderer
from tmequant.phantom.spec import CELL_CLASSES, CLASS_NAMES, CLASS_ROLES, PhantomSpec
from tmequant.phantom.truth import (
    DEFAULT_MIN_TISSUE_FRACTION,
    DEFAULT_TILE_UM,
    construction_truth,
    realised_densities,
)

log = logging.getLogger("tmequant")

#: Colours of the label-map PNG, one per class id (for eyes only).
LABEL_COLORS = np.array([[245, 245, 245], [170, 40, 140], [240, 170, 200], [40, 40, 160],
                         [240, 220, 40], [255, 255, 190]], np.uint8)
#: 2: ``expected`` comes from the phantom's construction (``construction_truth``), no longer
#: from the biomarkers module run on the label map; ``expected_placed`` and ``generator`` added.
TRUTH_SCHEMA_VERSION = 2


def generator_key(spec: PhantomSpec, tile_um: float = DEFAULT_TILE_UM,
                  min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION, params: Any = None) -> str:
    """sha256 (hex, 16) of everything a phantom's files depend on: the spec, the truth grid and
    parameters, the truth schema, the package version, the source of ``tmequant.phantom`` and
    the versions of the libraries that draw, render and encode it. Equal keys: the same files
    (the phantom is deterministic in its spec); a phantom is reused only under an equal key."""
    import hashlib
    import importlib.metadata as md

    from tmequant.biomarkers.params import BiomarkerParams
    from tmequant.provenance import package_version, params_hash, to_jsonable

    src = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        src.update(f.name.encode() + b"\0" + f.read_bytes())
    libs: dict[str, str | None] = {}
    for lib in ("numpy", "scipy", "tifffile", "imagecodecs", "pillow"):
        try:
            libs[lib] = md.version(lib)
        except md.PackageNotFoundError:
            libs[lib] = None
    blob = json.dumps(to_jsonable({
        "spec": spec.as_dict(), "tile_um": float(tile_um), "min_tissue_fraction": float(min_tissue_fraction),
        "params_hash": params_hash(params or BiomarkerParams()),
        "schema": TRUTH_SCHEMA_VERSION, "package_version": package_version(),
        "source_sha256": src.hexdigest(), "libs": libs}), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class PhantomTruth:
    """What ``generate_phantom`` wrote and the expected biomarkers.

    ``biomarkers``: the construction truth row (``ConstructionTruth.row``: what the pipeline
    should report); ``tls``: the placed TLS; ``areas_mm2``: tissue area per class;
    ``timings_s``: layout / render+write / truth.
    """

    spec: PhantomSpec
    slide_path: Path
    truth_dir: Path
    truth_path: Path
    labels_path: Path
    cells_path: Path
    biomarkers: dict[str, Any]
    tls: pd.DataFrame
    areas_mm2: dict[str, float]
    timings_s: dict[str, float] = field(default_factory=dict)
    layout: PhantomLayout | None = field(default=None, repr=False)

    @property
    def immune_phenotype(self) -> str:
        return str(self.biomarkers["immune_phenotype"])

    @property
    def tls_count(self) -> int:
        return int(self.biomarkers["tls_count"])


def generate_phantom(spec: PhantomSpec, out_dir: str | os.PathLike[str], params: Any = None,
                     tile_um: float = DEFAULT_TILE_UM,
                     min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION,
                     quality: int = 85, keep_layout: bool = False) -> PhantomTruth:
    """Write ``<out_dir>/<spec.name>.svs`` and ``<out_dir>/<spec.name>.truth/``.

    The truth folder holds ``truth.json`` (spec, legend, areas, realised densities, the
    expected biomarkers from the construction (``expected``: what the pipeline should report,
    compartment densities at the grid's tile resolution; ``expected_placed``: at the layout's
    4 um resolution; ``expected_tls``: the placed TLS; see :func:`construction_truth`), the
    tile grid used and the ``generator`` key), ``labels.npz`` (``labels`` (h, w) uint8 class
    ids, one pixel per ``downsample`` level-0 px; ``class_names``; ``downsample``;
    ``label_um``), ``labels.png`` (the same, coloured) and ``cells.parquet`` (x, y level-0 px,
    class in lymphocyte / tumor_cell / other). ``params``: ``BiomarkerParams`` whose thresholds
    the truth uses (default: the defaults). Returns a :class:`PhantomTruth`.
    """
    from tmequant.biomarkers.params import BiomarkerParams
    from tmequant.provenance import file_fingerprint, package_version, params_hash, to_jsonable
    from tmequant.wsi.write import write_pyramid_tiff

    key = generator_key(spec, tile_um, min_tissue_fraction, params)
    params = params or BiomarkerParams()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slide_path = out / f"{spec.name}.svs"
    tdir = truth_dir_for(slide_path)
    tdir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    layout = make_layout(spec)
    t1 = time.perf_counter()
    renderer = PhantomRenderer(layout)
    write_pyramid_tiff(slide_path, renderer.read, spec.mpp_um, flavor="svs", tile_px=256,
                       compression="jpeg", quality=quality, shape=renderer.shape,
                       maxworkers=min(2, os.cpu_count() or 1))
    t2 = time.perf_counter()

    cells = layout.cells()
    cells_path = tdir / "cells.parquet"
    cells.assign(**{"class": cells["class"].astype(str)}).to_parquet(cells_path, index=False)
    labels_path = tdir / "labels.npz"
    np.savez_compressed(labels_path, labels=layout.labels, class_names=np.array(CLASS_NAMES),
                        downsample=np.int64(layout.downsample), label_um=np.float64(spec.label_um))
    _save_png(tdir / "labels.png", LABEL_COLORS[layout.labels])

    ct = construction_truth(layout, params, tile_um, min_tissue_fraction)
    row = ct.row
    areas = layout.class_areas_mm2()
    t3 = time.perf_counter()

    truth = {
        "schema_version": TRUTH_SCHEMA_VERSION,
        "kind": "tmequant-phantom-truth",
        "slide": slide_path.name,
        "slide_fingerprint": file_fingerprint(slide_path),
        "slide_id": spec.name,
        "level0_width_px": spec.width_px,
        "level0_height_px": spec.height_px,
        "slide_mpp_um": spec.mpp_um,
        "spec": spec.as_dict(),
        "legend": [{"id": i, "name": n, "role": CLASS_ROLES[n]} for i, n in enumerate(CLASS_NAMES)],
        "label_map": {"file": labels_path.name, "png": "labels.png", "downsample": layout.downsample,
                      "label_um": spec.label_um},
        "cells": {"file": cells_path.name, "columns": ["x", "y", "class"], "units": "level-0 px",
                  "counts": {c: int((cells["class"] == c).sum()) for c in CELL_CLASSES}},
        "areas_mm2": areas,
        "tissue_area_mm2": float(sum(v for k, v in areas.items() if k != "BACK")),
        "tumor_region_area_mm2": float(layout.tumor_region.sum()) * (spec.label_um * 1e-3) ** 2,
        "realised_densities_per_mm2": realised_densities(layout),
        "tls_centers_px": layout.tls_centers_px.tolist(),
        "grid": {"tile_um": tile_um, "tile_level0_px": tile_um / spec.mpp_um,
                 "min_tissue_fraction": min_tissue_fraction, "n_tiles": int(ct.tile["n_tiles"])},
        "biomarker_params": to_jsonable(params),
        "biomarker_params_hash": params_hash(params),
        "truth_source": "construction",
        "expected": to_jsonable(row),
        "expected_placed": to_jsonable(ct.placed),
        "expected_tls": to_jsonable(ct.tls.to_dict(orient="records")),
        "package_version": package_version(),
        "generator": key,
    }
    truth_path = tdir / "truth.json"
    truth_path.write_text(json.dumps(to_jsonable(truth), indent=1, sort_keys=True, allow_nan=False))
    timings = {"layout_s": t1 - t0, "render_write_s": t2 - t1, "truth_s": t3 - t2, "total_s": t3 - t0}
    log.info("phantom %s: %dx%d px at %g um/px, %s, %d TLS, written in %.1f s", spec.name,
             spec.width_px, spec.height_px, spec.mpp_um, row.get("immune_phenotype"),
             row.get("tls_count"), timings["total_s"])
    return PhantomTruth(spec=spec, slide_path=slide_path, truth_dir=tdir, truth_path=truth_path,
                        labels_path=labels_path, cells_path=cells_path, biomarkers=row, tls=ct.tls,
                        areas_mm2=areas, timings_s=timings, layout=layout if keep_layout else None)


def load_truth(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``truth.json`` of a phantom, from the slide path, its truth folder or the file itself."""
    p = Path(path)
    if p.suffix.lower() == ".svs":
        p = truth_dir_for(p)
    if p.is_dir():
        p = p / "truth.json"
    return json.loads(p.read_text())


def _save_png(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.ascontiguousarray(rgb)).save(path, optimize=False)
