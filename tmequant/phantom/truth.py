"""A phantom's truth on the pipeline's tile grid, and its expected biomarkers.

The truth ``TileGrid`` has the tiles the pipeline keeps (full tiles of ``tile_um`` on a grid
anchored at (0, 0), tissue fraction >= ``min_tissue_fraction``); each tile's role
probabilities are the label map's class fractions in it (a perfect tissue classifier), and
counts come from the truth cell table (``count_source = cell_table``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tmequant.phantom.layout import KIND_LYMPH, PhantomLayout
from tmequant.phantom.spec import BACK, CLASS_NAMES, CLASS_ROLES, LYM, STR, TUM

DEFAULT_TILE_UM = 112.0  # 224 px at 0.5 um/px, the pipeline's default grid
DEFAULT_MIN_TISSUE_FRACTION = 0.25  # tmequant.tiling default


def class_fractions(layout: PhantomLayout, tile_um: float = DEFAULT_TILE_UM) -> np.ndarray:
    """(n_rows, n_cols, n_classes) float32 share of each class in every full tile of the grid."""
    k = tile_um / layout.spec.label_um
    if abs(k - round(k)) > 1e-9:
        raise ValueError(f"tile_um={tile_um} is not a multiple of label_um={layout.spec.label_um}")
    k = round(k)
    t0 = tile_um / layout.spec.mpp_um
    n_rows = math.floor(layout.spec.height_px / t0 + 1e-6)
    n_cols = math.floor(layout.spec.width_px / t0 + 1e-6)
    lab = layout.labels[: n_rows * k, : n_cols * k]
    if lab.shape != (n_rows * k, n_cols * k):  # label map short by rounding: pad with background
        pad = np.full((n_rows * k, n_cols * k), BACK, np.uint8)
        pad[: lab.shape[0], : lab.shape[1]] = lab
        lab = pad
    out = np.empty((n_rows, n_cols, len(CLASS_NAMES)), np.float32)
    blocks = lab.reshape(n_rows, k, n_cols, k)
    for c in range(len(CLASS_NAMES)):  # six classes
        out[..., c] = (blocks == c).mean(axis=(1, 3))
    return out


def truth_grid(layout: PhantomLayout, tile_um: float = DEFAULT_TILE_UM,
               min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION) -> Any:
    """``tmequant.biomarkers.TileGrid`` of the truth (no counts; pass the cells to compute)."""
    from tmequant.biomarkers import TileGrid

    frac = class_fractions(layout, tile_um)
    tissue = 1.0 - frac[..., BACK]
    rows, cols = np.nonzero(tissue >= min_tissue_fraction - 1e-7)
    f = frac[rows, cols]
    role_probs: dict[str, np.ndarray] = {}
    for c, name in enumerate(CLASS_NAMES):
        role = CLASS_ROLES[name]
        role_probs[role] = role_probs.get(role, 0.0) + f[:, c]
    return TileGrid(rows=rows, cols=cols, tile_um=tile_um, slide_mpp_um=layout.spec.mpp_um,
                    role_probs=role_probs, tissue_fraction=tissue[rows, cols],
                    metadata={"slide_id": layout.spec.name, "mpp_source": "phantom",
                              "model_name": "truth", "model_version": "label-map"})


def realised_densities(layout: PhantomLayout) -> dict[str, float]:
    """Lymphocytes per mm^2 actually drawn in each compartment (label-map areas)."""
    ds = layout.downsample
    lym = layout.nuclei_xy[layout.nuclei_kind == KIND_LYMPH]
    py = np.clip((lym[:, 1] // ds).astype(np.intp), 0, layout.labels.shape[0] - 1)
    px = np.clip((lym[:, 0] // ds).astype(np.intp), 0, layout.labels.shape[1] - 1)
    lab = layout.labels[py, px]
    reg = layout.tumor_region[py, px]
    px_mm2 = (layout.spec.label_um * 1e-3) ** 2
    out = {}
    for key, cell_mask, area_mask in (
        ("nest", lab == TUM, layout.labels == TUM),
        ("tumor_stroma", (lab == STR) & reg, (layout.labels == STR) & layout.tumor_region),
        ("outer_stroma", (lab == STR) & ~reg, (layout.labels == STR) & ~layout.tumor_region),
        ("tls", lab == LYM, layout.labels == LYM),
    ):
        a = float(area_mask.sum()) * px_mm2
        out[f"lymph_{key}_per_mm2"] = float(cell_mask.sum()) / a if a > 0 else math.nan
    return out


def expected_biomarkers(layout: PhantomLayout, params: Any = None, tile_um: float = DEFAULT_TILE_UM,
                        min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION) -> Any:
    """``BiomarkerResult`` of the truth: truth grid + truth cell table (cell-table path).

    Compartments stay at tile resolution by default (``cell_compartments=False``): the
    pipeline this truth is compared against has no cell table, so its compartments are the
    tile grid's; a sub-tile split here would compare unlike with like.
    """
    from tmequant.biomarkers import BiomarkerParams, compute_biomarkers

    grid = truth_grid(layout, tile_um, min_tissue_fraction)
    params = params or BiomarkerParams(cell_compartments=False)
    return compute_biomarkers(grid, cells=layout.cells(), params=params)
