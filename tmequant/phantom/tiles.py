"""Labelled training tiles cut from phantoms (for the demo model), without writing a slide."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmequant.phantom.layout import KIND_LYMPH, make_layout
from tmequant.phantom.render import PhantomRenderer
from tmequant.phantom.spec import CLASS_NAMES, CLASS_ROLES, PhantomSpec, scenario_spec
from tmequant.phantom.truth import DEFAULT_TILE_UM, class_fractions


@dataclass(frozen=True)
class PhantomTile:
    """One tile: ``image`` (tile_px, tile_px, 3) uint8 at ``tile_um / tile_px`` um/px, its
    majority ``tissue_class`` (CLASS_NAMES) and ``role``, ``purity`` (share of that class),
    ``lymphocyte_count`` (truth lymphocyte centres inside the tile), ``slide`` (spec name),
    ``row``, ``col`` on the grid of pitch ``tile_um``."""

    image: np.ndarray
    tissue_class: str
    role: str
    purity: float
    lymphocyte_count: int
    slide: str
    row: int
    col: int


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape[0] == size:
        return img
    f = img.shape[0] // size
    if f * size == img.shape[0]:  # integer factor: box mean, exact and fast
        return img.reshape(size, f, size, f, 3).mean(axis=(1, 3)).round().astype(np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR))


def training_specs(seed: int = 0, mpp_um: float = 0.5) -> list[PhantomSpec]:
    """Three phantoms rich in every class, for training a tissue classifier: the densities of
    the inflamed, excluded and desert presets, with more and larger lymphoid aggregates
    (5 of radius 200 um) and more necrosis, so that pure LYM and NEC tiles are plentiful."""
    return [scenario_spec(s, seed=seed + i, mpp_um=mpp_um, n_tls=5, tls_radius_um=200.0,
                          tls_distance_um=(300.0, 800.0), necrosis_fraction=0.08, fat_area_mm2=1.5)
            .replace(scenario="custom", name=f"phantom-train-{s}-s{seed + i}")
            for i, s in enumerate(("inflamed", "excluded", "desert"))]


def phantom_tiles(specs: Iterable[PhantomSpec] | None = None, tile_px: int = 224,
                  tile_um: float = DEFAULT_TILE_UM, min_purity: float = 0.9,
                  max_per_class: int | None = None, seed: int = 0) -> Iterator[PhantomTile]:
    """Yield labelled tiles from phantoms (default: ``training_specs(seed)``).

    Tiles lie on the pipeline's grid (pitch ``tile_um``), resized to ``tile_px``; a tile is
    kept when one class covers >= ``min_purity`` of it. ``max_per_class`` caps tiles per
    class and phantom (a random subset, reproducible from ``seed``). Pixels are rendered
    in memory, band by band, in raster order.
    """
    if specs is None:
        specs = training_specs(seed)
    rng = np.random.default_rng(seed)
    for spec in specs:
        layout = make_layout(spec)
        frac = class_fractions(layout, tile_um)
        cls = frac.argmax(-1)
        pur = frac.max(-1)
        keep = pur >= min_purity
        if max_per_class is not None:
            for c in range(len(CLASS_NAMES)):
                idx = np.flatnonzero((keep & (cls == c)).ravel())
                if idx.size > max_per_class:
                    drop = rng.choice(idx, idx.size - max_per_class, replace=False)
                    keep.ravel()[drop] = False
        rows, cols = np.nonzero(keep)  # raster order: each band is rendered once
        t0 = tile_um / spec.mpp_um
        lym = layout.nuclei_xy[layout.nuclei_kind == KIND_LYMPH]
        lr = np.floor(lym[:, 1] / t0).astype(np.int64)
        lc = np.floor(lym[:, 0] / t0).astype(np.int64)
        counts = np.zeros((frac.shape[0], frac.shape[1]), np.int64)
        ok = (lr >= 0) & (lr < counts.shape[0]) & (lc >= 0) & (lc < counts.shape[1])
        np.add.at(counts, (lr[ok], lc[ok]), 1)
        renderer = PhantomRenderer(layout)
        side = round(t0)
        for r, c in zip(rows.tolist(), cols.tolist()):
            img = renderer.read(round(r * t0), round(c * t0), side, side)
            name = CLASS_NAMES[int(cls[r, c])]
            yield PhantomTile(image=_resize(img, tile_px), tissue_class=name, role=CLASS_ROLES[name],
                              purity=float(pur[r, c]), lymphocyte_count=int(counts[r, c]),
                              slide=spec.name, row=r, col=c)


def write_phantom_tiles(out_dir: str | os.PathLike[str], tiles: Iterable[PhantomTile]) -> Path:
    """Write tiles as ``<out_dir>/<CLASS>/<slide>_r<row>_c<col>.png`` (one folder per class,
    the NCT-CRC-HE-100K layout) plus ``tiles.csv`` (path, tissue_class, role, purity,
    lymphocyte_count). Returns the CSV path."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "tiles.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "tissue_class", "role", "purity", "lymphocyte_count"])
        for t in tiles:
            rel = Path(t.tissue_class) / f"{t.slide}_r{t.row}_c{t.col}.png"
            (out / t.tissue_class).mkdir(exist_ok=True)
            Image.fromarray(t.image).save(out / rel)
            w.writerow([rel.as_posix(), t.tissue_class, t.role, f"{t.purity:.3f}", t.lymphocyte_count])
    return csv_path
