"""A phantom's known truth, from its construction, and its truth on the pipeline's tile grid.

:func:`construction_truth` is the truth the demo checks against: it is read off how the
phantom was built (cells drawn per compartment, compartment areas from the layout, the TLS
that were placed), with the definitions of docs/biomarkers.md applied directly to that
geometry; it never calls ``tmequant.biomarkers``, so a mistake there cannot hide in its own
truth. :func:`truth_grid` / :func:`expected_biomarkers` run the biomarkers module on the
truth (a perfect tissue classifier and counter) for tests of that module.

The truth ``TileGrid`` has the tiles the pipeline keeps (full tiles of ``tile_um`` on a grid
anchored at (0, 0), tissue fraction >= ``min_tissue_fraction``); each tile's role
probabilities are the label map's class fractions in it, and counts come from the truth
cell table (``count_source = cell_table``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from tmequant.phantom.layout import KIND_LYMPH, PhantomLayout
from tmequant.phantom.spec import ADI, BACK, CLASS_NAMES, CLASS_ROLES, LYM, NEC, STR, TUM

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


# --- truth from the construction ----------------------------------------------------------
_UM2_PER_MM2 = 1e6
#: Biomarkers of the construction row that are densities of compartments: in ``row`` they are
#: taken at the definition's tile resolution, in ``placed`` at the layout's (see ConstructionTruth).
TILE_RESOLUTION_KEYS: tuple[str, ...] = (
    "til_density_intratumoral_per_mm2", "til_density_stromal_per_mm2", "til_density_core_per_mm2",
    "til_density_margin_per_mm2", "stil_score_pct", "til_positive_tile_fraction",
    "exclusion_ratio_stroma_to_tumor", "exclusion_ratio_margin_to_core", "lymphocytes_intratumoral",
    "lymphocytes_stromal", "epithelium_area_mm2", "tumor_stroma_area_mm2", "margin_area_mm2",
    "core_area_mm2", "bulk_area_mm2")


@dataclass
class ConstructionTruth:
    """Biomarkers known from how a phantom was built (docs/biomarkers.md names and units).

    ``placed``: at the layout's resolution (4 um label pixels): compartment areas of the
    layout, lymphocytes counted in the compartment they were drawn in, the bulk = the drawn
    tumour region, the TLS that were placed. ``tile``: the same construction seen on the
    pipeline's grid, as the definitions ask (epithelium = tumour-majority tiles inside the
    bulk, densities = lymphocytes in those tiles / their tissue area): a tile straddling a
    nest border carries its stroma's lymphocytes, which no tile-level measurement can undo.
    ``row``: what the demo checks: ``placed`` with the compartment densities and areas
    (:data:`TILE_RESOLUTION_KEYS`) from ``tile``. ``tls``: one row per placed TLS.
    """

    placed: dict[str, Any]
    tile: dict[str, Any]
    tls: pd.DataFrame

    @property
    def row(self) -> dict[str, Any]:
        out = dict(self.placed)
        out.update({k: self.tile[k] for k in TILE_RESOLUTION_KEYS if k in self.tile})
        out["truth_source"] = "construction"
        return out


def _ratio(num: float, den: float) -> float:
    """num / den; inf when only den is 0, NaN when both are 0 or either is undefined
    (docs/biomarkers.md, written out here so the truth does not borrow the code it checks)."""
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if den == 0:
        return math.inf if num > 0 else math.nan
    return num / den


def _density(n: float, area_um2: float) -> float:
    return n / area_um2 * _UM2_PER_MM2 if area_um2 > 0 else math.nan


def _stil(n: float, area_um2: float, til_area_um2: float) -> float:
    return float(np.clip(100.0 * n * til_area_um2 / area_um2, 0.0, 100.0)) if area_um2 > 0 else math.nan


def _densities(n: dict[str, float], a_um2: dict[str, float], til_area_um2: float) -> dict[str, Any]:
    it = _density(n["epithelium"], a_um2["epithelium"])
    st = _density(n["tumor_stroma"], a_um2["tumor_stroma"])
    co = _density(n["core"], a_um2["core"])
    ma = _density(n["margin"], a_um2["margin"])
    out: dict[str, Any] = {f"{k}_area_mm2": a_um2[k] / _UM2_PER_MM2
                           for k in ("bulk", "epithelium", "tumor_stroma", "margin", "core")}
    out.update({
        "lymphocytes_intratumoral": float(n["epithelium"]), "lymphocytes_stromal": float(n["tumor_stroma"]),
        "til_density_intratumoral_per_mm2": it, "til_density_stromal_per_mm2": st,
        "til_density_core_per_mm2": co, "til_density_margin_per_mm2": ma,
        "stil_score_pct": _stil(n["tumor_stroma"], a_um2["tumor_stroma"], til_area_um2),
        "exclusion_ratio_stroma_to_tumor": _ratio(st, it),
        "exclusion_ratio_margin_to_core": _ratio(ma, co),
    })
    return out


def construction_truth(layout: PhantomLayout, params: Any = None, tile_um: float = DEFAULT_TILE_UM,
                       min_tissue_fraction: float = DEFAULT_MIN_TISSUE_FRACTION) -> ConstructionTruth:
    """The phantom's biomarkers from its construction (see :class:`ConstructionTruth`).

    ``params``: a ``BiomarkerParams`` (default: the defaults); only its thresholds are read
    (margin half-width, phenotype densities, TLS rules, TIL-positive density, sTIL cell area).
    The phenotype follows from the drawn densities: every part of a phantom's tumour region is
    drawn alike, so each region of the bulk gets the label the slide gets. ``tile_um`` and
    ``min_tissue_fraction``: the pipeline's grid (full tiles anchored at (0, 0)).
    """
    from tmequant.biomarkers.params import BiomarkerParams  # parameters only, no biomarker code

    p = params or BiomarkerParams()
    spec = layout.spec
    lab, region = layout.labels, layout.tumor_region
    lu, ds = spec.label_um, layout.downsample
    px_um2 = lu * lu
    tissue = lab != BACK
    bulk = region & tissue
    # signed distance (um) of each label pixel to the drawn border; the border runs between
    # pixels, so half a pixel less than the distance transform's centre-to-centre value
    d_in = ndi.distance_transform_edt(bulk) * lu
    d_out = ndi.distance_transform_edt(~bulk) * lu if bulk.any() else np.full(lab.shape, np.inf)
    to_border = np.where(bulk, d_in, d_out) - lu / 2.0
    margin = tissue & (to_border <= p.margin_um + 1e-9)
    masks = {
        "bulk": bulk,
        "epithelium": (lab == TUM) & bulk,
        "tumor_stroma": ((lab == STR) | (lab == LYM)) & bulk,
        "margin": margin,
        "core": bulk & ~margin,
    }
    # each lymphocyte was drawn inside one label pixel (layout._poisson_in_labels): that
    # pixel's compartment is the one it was placed in
    lym = layout.nuclei_xy[layout.nuclei_kind == KIND_LYMPH]
    ly = np.clip((lym[:, 1] // ds).astype(np.intp), 0, lab.shape[0] - 1)
    lx = np.clip((lym[:, 0] // ds).astype(np.intp), 0, lab.shape[1] - 1)
    n_placed = {k: float(m[ly, lx].sum()) for k, m in masks.items()}
    a_placed = {k: float(m.sum()) * px_um2 for k, m in masks.items()}

    area_mm2 = {c: float((lab == c).sum()) * px_um2 / _UM2_PER_MM2 for c in range(len(CLASS_NAMES))}
    str_in_bulk = float(((lab == STR) & bulk).sum())
    tum_in_bulk = float(((lab == TUM) & bulk).sum())
    placed: dict[str, Any] = {
        "slide_id": spec.name,
        "tumor_area_mm2": area_mm2[TUM], "stroma_area_mm2": area_mm2[STR],
        "immune_area_mm2": area_mm2[LYM], "necrosis_area_mm2": area_mm2[NEC],
        "other_tissue_area_mm2": area_mm2[ADI],
        "tissue_area_mm2": float(tissue.sum()) * px_um2 / _UM2_PER_MM2,
        "tumor_stroma_ratio": _ratio(str_in_bulk, str_in_bulk + tum_in_bulk),
        "lymphocytes_total": float(len(lym)),
    }
    placed.update(_densities(n_placed, a_placed, p.til_area_um2))

    it, st = placed["til_density_intratumoral_per_mm2"], placed["til_density_stromal_per_mm2"]
    if not a_placed["epithelium"] > 0:
        label = "not_evaluable"
    elif it >= p.inflamed_it_per_mm2:
        label = "inflamed"
    elif st >= p.excluded_st_per_mm2:
        label = "excluded"
    else:
        label = "desert"
    placed["immune_phenotype"] = label
    for k in ("inflamed", "excluded", "desert"):
        placed[f"phenotype_{k}_fraction"] = float(label == k) if label != "not_evaluable" else math.nan

    tls = _placed_tls(layout, lym, ly, lx, bulk, d_out, p)
    ok = tls[tls["is_tls"]] if len(tls) else tls
    placed["tls_count"] = len(ok)
    placed["tls_intratumoral_count"] = int((ok["location"] == "intratumoral").sum()) if len(ok) else 0
    placed["tls_peritumoral_count"] = int((ok["location"] == "peritumoral").sum()) if len(ok) else 0
    placed["tls_total_area_mm2"] = float(ok["area_um2"].sum()) / _UM2_PER_MM2 if len(ok) else 0.0

    tile = _tile_truth(layout, lym, bulk, to_border, p, tile_um, min_tissue_fraction)
    return ConstructionTruth(placed=placed, tile=tile, tls=tls)


def _placed_tls(layout: PhantomLayout, lym: np.ndarray, ly: np.ndarray, lx: np.ndarray, bulk: np.ndarray,
                d_out: np.ndarray, p: Any) -> pd.DataFrame:
    """One row per placed TLS: its lymphoid pixels (nearest placed centre), lymphocytes drawn
    in them, gap to the bulk, and whether it meets the TLS rules of ``p``."""
    spec = layout.spec
    lu = spec.label_um
    centres_um = layout.tls_centers_px * spec.mpp_um
    cols = ["tls_id", "centroid_x_um", "centroid_y_um", "area_um2", "n_lymphocytes",
            "mean_density_per_mm2", "distance_to_bulk_um", "bulk_overlap_fraction", "location", "is_tls"]
    if len(centres_um) == 0:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in cols})
    ys, xs = np.nonzero(layout.labels == LYM)
    pix_um = np.stack([(xs + 0.5) * lu, (ys + 0.5) * lu], axis=1)
    owner = np.argmin(((pix_um[:, None, :] - centres_um[None, :, :]) ** 2).sum(-1), axis=1)
    own_map = np.full(layout.labels.shape, -1, np.int64)
    own_map[ys, xs] = owner
    lym_owner = own_map[ly, lx]
    rows = []
    for i, (cx, cy) in enumerate(centres_um):
        sel = owner == i
        a_um2 = float(sel.sum()) * lu * lu
        n = float((lym_owner == i).sum())
        dens = _density(n, a_um2)
        # gap between the aggregate's edge and the bulk border: its nearest pixel's distance
        gap = float(max(d_out[ys[sel], xs[sel]].min() - lu / 2.0, 0.0)) if sel.any() else math.inf
        overlap = float(bulk[ys[sel], xs[sel]].mean()) if sel.any() else 0.0
        is_tls = (a_um2 >= p.tls_min_area_um2 and dens >= p.tls_min_density_per_mm2
                  and gap <= p.tls_max_distance_um)
        rows.append({"tls_id": i + 1, "centroid_x_um": float(cx), "centroid_y_um": float(cy),
                     "area_um2": a_um2, "n_lymphocytes": n, "mean_density_per_mm2": dens,
                     "distance_to_bulk_um": gap, "bulk_overlap_fraction": overlap,
                     "location": "intratumoral" if overlap >= 0.5 else "peritumoral", "is_tls": bool(is_tls)})
    return pd.DataFrame(rows, columns=cols)


def _tile_truth(layout: PhantomLayout, lym: np.ndarray, bulk: np.ndarray, to_border: np.ndarray, p: Any,
                tile_um: float, min_tissue_fraction: float) -> dict[str, Any]:
    """The construction on the pipeline's grid: each kept tile is its majority class, in the
    bulk / margin when its centre is; lymphocytes binned per tile; areas are tissue areas."""
    spec = layout.spec
    lu = spec.label_um
    frac = class_fractions(layout, tile_um)  # (R, C, classes): the layout's geometry per tile
    n_rows, n_cols = frac.shape[:2]
    tissue_frac = 1.0 - frac[..., BACK]
    keep = tissue_frac >= min_tissue_fraction - 1e-7
    area_um2 = np.where(keep, tissue_frac, 0.0) * tile_um * tile_um
    major = frac.argmax(-1)
    # tile centres -> the label pixel under them
    cy = np.clip(((np.arange(n_rows) + 0.5) * tile_um / lu).astype(np.intp), 0, bulk.shape[0] - 1)
    cx = np.clip(((np.arange(n_cols) + 0.5) * tile_um / lu).astype(np.intp), 0, bulk.shape[1] - 1)
    in_bulk = keep & bulk[np.ix_(cy, cx)]
    in_margin = keep & (to_border[np.ix_(cy, cx)] <= p.margin_um + 1e-9)
    masks = {
        "bulk": in_bulk,
        "epithelium": in_bulk & (major == TUM),
        "tumor_stroma": in_bulk & ((major == STR) | (major == LYM)),
        "margin": in_margin,
        "core": in_bulk & ~in_margin,
    }
    t0 = tile_um / spec.mpp_um
    r = np.floor(lym[:, 1] / t0).astype(np.int64)
    c = np.floor(lym[:, 0] / t0).astype(np.int64)
    ok = (r >= 0) & (r < n_rows) & (c >= 0) & (c < n_cols)
    counts = np.zeros((n_rows, n_cols))
    np.add.at(counts, (r[ok], c[ok]), 1.0)
    n = {k: float(counts[m].sum()) for k, m in masks.items()}
    a = {k: float(area_um2[m].sum()) for k, m in masks.items()}
    out = _densities(n, a, p.til_area_um2)
    out["tumor_area_mm2"] = float((frac[..., TUM] * keep).sum()) * tile_um * tile_um / _UM2_PER_MM2
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = np.where(area_um2 > 0, counts / area_um2 * _UM2_PER_MM2, 0.0)
    out["til_positive_tile_fraction"] = (float((dens[in_bulk] >= p.til_positive_per_mm2).mean())
                                         if in_bulk.any() else math.nan)
    out["n_tiles"] = int(keep.sum())
    return out
