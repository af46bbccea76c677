"""Pure aggregators over a :class:`TileGrid` (and an optional cell table).

Definitions, units and defaults: docs/biomarkers.md. Sources:

- Tumour bulk, stromal TIL score (each TIL counted as 8 x 8 um): TIGER challenge,
  "Tumor InfiltratinG lymphocytes in breast cancER" (tiger.grand-challenge.org, 2022);
  Amgad et al., npj Breast Cancer 2020 (TILs-WG guidelines for computational sTIL scoring).
- Invasive margin as a 1 mm band centred on the border: Galon et al., Science 2006 /
  Pages et al., Lancet 2018 (Immunoscore).
- TIL-positive tiles (>= 2 lymphocytes per 50 x 50 um): Saltz et al., Cell Rep 2018 (TIL maps).
- Morisita-Horn co-localisation of cancer and immune cells: Maley et al., Sci Rep 2015.
- Inflamed / excluded / desert phenotypes on H&E: Hammerman / Park et al., Ann Oncol 2022 (NSCLC).
- TLS as dense lymphoid aggregates near tumour: Sautes-Fridman et al., Nat Rev Cancer 2019.

Conventions. Areas are tissue areas: tile area x tissue fraction, in um^2 inside functions
and mm^2 in outputs. Compartments are built on the grid from each tile's *most probable*
role (morphology needs a binary mask); composition areas use the *probabilities* (expected
area), so mixed tiles at a boundary count fractionally. Densities are counts over the
compartment's tissue area (a ratio of sums, not a mean of tile densities), NaN where the
compartment has no tissue.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from tmequant.biomarkers.cells import cell_roles, check_cell_units
from tmequant.biomarkers.cellular import CellCompartments, cell_compartments, stil_score_pct
from tmequant.biomarkers.grid import DenseGrid, TileGrid
from tmequant.biomarkers.params import BiomarkerParams
from tmequant.errors import StoreError
from tmequant.provenance import package_version, params_hash, to_jsonable
from tmequant.roles import TISSUE_ROLES

log = logging.getLogger("tmequant")

UM2_PER_MM2 = 1e6
_REL_EPS = 1e-9  # thresholds are inclusive; forgive float round-off of sums and ratios


def at_least(values: np.ndarray | float, threshold: float) -> np.ndarray:
    """values >= threshold, inclusive up to float round-off; NaN is never at least anything."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return v >= threshold - _REL_EPS * max(abs(threshold), 1.0)
_EIGHT = np.ones((3, 3), dtype=bool)
COMPARTMENT_NAMES = ("tumor", "bulk", "epithelium", "tumor_stroma", "margin", "core")


def disk_footprint(radius_cells: float) -> np.ndarray:
    """Boolean disk of cells whose centres lie within ``radius_cells`` of the centre cell."""
    k = math.floor(radius_cells + 1e-9)
    yy, xx = np.mgrid[-k:k + 1, -k:k + 1]
    return (yy * yy + xx * xx) <= radius_cells * radius_cells + 1e-9


# --- compartments ----------------------------------------------------------------------
def tumor_bulk(tumor: np.ndarray, tile_um: float, close_um: float = 1000.0,
               min_area_mm2: float = 1.5) -> np.ndarray:
    """Tumour bulk of a (R, C) tumour-tile raster (TIGER): close then open with a disk of
    diameter ``close_um``, drop 8-connected objects under ``min_area_mm2`` (grid area),
    fill holes. Returns (R, C) bool. The raster should be padded by the disk radius.
    """
    fp = disk_footprint(close_um / 2.0 / tile_um)
    t = np.asarray(tumor, dtype=bool)
    if fp.size > 1 and t.any():
        pad = fp.shape[0]
        tp = np.pad(t, pad)
        tp = ndi.binary_closing(tp, structure=fp)
        tp = ndi.binary_opening(tp, structure=fp)
        t = tp[pad:-pad, pad:-pad]
    if not t.any():
        return t
    lab, n = ndi.label(t, structure=_EIGHT)
    area_mm2 = np.bincount(lab.ravel(), minlength=n + 1) * (tile_um * tile_um / UM2_PER_MM2)
    keep = area_mm2 >= min_area_mm2 - 1e-12
    keep[0] = False
    t = keep[lab]
    return ndi.binary_fill_holes(t)


@dataclass
class Compartments:
    """Grid-shaped compartment maps (all (R, C) bool) and per-tile distances.

    origin: slide-grid (row, col) of raster cell (0, 0). ``bulk``, ``margin`` and ``core`` are
    regions (they may cover cells without a tissue tile); ``tumor``, ``epithelium`` and
    ``tumor_stroma`` are tiles. dist_to_bulk_um: (N,) centre distance of each tile to the
    nearest bulk cell (0 inside; inf without a bulk).
    """

    origin: tuple[int, int]
    tumor: np.ndarray
    bulk: np.ndarray
    epithelium: np.ndarray
    tumor_stroma: np.ndarray
    margin: np.ndarray
    core: np.ndarray
    dense: DenseGrid
    dist_to_bulk_um: np.ndarray

    def maps(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in COMPARTMENT_NAMES}

    def tiles(self, name: str) -> np.ndarray:
        """(N,) bool: tiles in compartment ``name``."""
        return self.dense.sample(getattr(self, name))


def compartments(grid: TileGrid, params: BiomarkerParams | None = None) -> Compartments:
    """Tumour bulk, epithelium, tumour-associated stroma, invasive margin and core.

    The margin is the band of cells whose centre lies within ``margin_um`` of the bulk
    border on either side; the border runs between cells, so a cell's distance to it is its
    Euclidean distance transform (in um) minus half a pitch.
    """
    params = params or BiomarkerParams()
    t = grid.tile_um
    pad = math.ceil(max(params.bulk_close_um / 2.0, params.margin_um) / t) + 2
    dense = DenseGrid.of(grid.rows, grid.cols, pad)
    roles = grid.hard_roles()
    ti = TISSUE_ROLES.index
    tumor = dense.paint(roles == ti("tumor"), False)
    bulk = tumor_bulk(tumor, t, params.bulk_close_um, params.bulk_min_area_mm2)
    epithelium = tumor & bulk
    strom = dense.paint((roles == ti("stroma")) | (roles == ti("immune")), False) & bulk
    if bulk.any():
        d_in = ndi.distance_transform_edt(bulk) * t
        d_out = ndi.distance_transform_edt(~bulk) * t
        to_border = np.where(bulk, d_in, d_out) - t / 2.0
        margin = to_border <= params.margin_um + 1e-9
        dist = dense.sample(d_out)
    else:
        margin = np.zeros(dense.shape, dtype=bool)
        dist = np.full(grid.n_tiles, np.inf)
    return Compartments(origin=dense.origin, tumor=tumor, bulk=bulk, epithelium=epithelium,
                        tumor_stroma=strom, margin=margin, core=bulk & ~margin, dense=dense,
                        dist_to_bulk_um=dist)


# --- counts ----------------------------------------------------------------------------
def lymphocyte_counts(grid: TileGrid, params: BiomarkerParams | None = None) -> tuple[np.ndarray, str]:
    """(N,) lymphocytes per tile and their source; without counts, immune-role area x
    ``area_estimate_per_mm2`` (source ``area_estimate``)."""
    params = params or BiomarkerParams()
    if grid.lymphocyte_counts is not None:
        return grid.lymphocyte_counts, grid.count_source or "model"
    est = grid.prob("immune") * grid.tissue_area_um2 * params.area_estimate_per_mm2 / UM2_PER_MM2
    return est, "area_estimate"


def tile_density_per_mm2(counts: np.ndarray, area_um2: np.ndarray) -> np.ndarray:
    """(N,) cells per mm^2 of tissue; NaN where a tile has no tissue."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(area_um2 > 0, counts / area_um2 * UM2_PER_MM2, np.nan)


def til_density(counts: np.ndarray, area_um2: np.ndarray, mask: np.ndarray) -> float:
    """Lymphocytes per mm^2 of tissue over the tiles in ``mask`` (NaN with no tissue)."""
    a = float(area_um2[mask].sum())
    return float(counts[mask].sum()) / a * UM2_PER_MM2 if a > 0 else math.nan


def til_positive_fraction(tile_density: np.ndarray, mask: np.ndarray, threshold_per_mm2: float) -> float:
    """Share of tiles in ``mask`` whose density is >= threshold (NaN when ``mask`` is empty).
    Tiles without tissue (NaN density) count as negative."""
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return math.nan
    return float(np.mean(at_least(tile_density[m], threshold_per_mm2)))


def exclusion_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator; inf when only the denominator is 0, NaN when both are 0
    or either is undefined (never a crash, never a silent 0)."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)):
        return math.nan
    if denominator == 0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def morisita_horn(a: np.ndarray, b: np.ndarray) -> float:
    """Morisita-Horn overlap of two count vectors over the same squares (Maley 2015).

    MH = 2 sum(p_i q_i) / (sum p_i^2 + sum q_i^2), p = a / sum a, q = b / sum b;
    1 = same distribution, 0 = disjoint; NaN when either population is empty.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    sa, sb = a.sum(), b.sum()
    if not (sa > 0 and sb > 0):
        return math.nan
    p, q = a / sa, b / sb
    return float(np.clip(2.0 * np.dot(p, q) / (np.dot(p, p) + np.dot(q, q)), 0.0, 1.0))


def square_counts(x_um: np.ndarray, y_um: np.ndarray, side_um: float,
                  groups: list[np.ndarray]) -> list[np.ndarray]:
    """Count points per ``side_um`` square; ``groups`` are boolean masks over the points.
    Returns one (S,) vector per group over the same occupied squares."""
    sx = np.floor(x_um / side_um).astype(np.int64)
    sy = np.floor(y_um / side_um).astype(np.int64)
    key = (sy - sy.min(initial=0)) * (int(sx.max(initial=0) - sx.min(initial=0)) + 1) + (sx - sx.min(initial=0))
    _, inv = np.unique(key, return_inverse=True)
    m = int(inv.max(initial=-1)) + 1
    return [np.bincount(inv[g], minlength=m).astype(np.float64) for g in groups]


def block_sums(rows: np.ndarray, cols: np.ndarray, block: int, values: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Sum per-tile values over ``block`` x ``block`` tile squares anchored at (row, col) (0, 0)
    (subtract an anchor from rows/cols to tile from elsewhere).
    Returns ((N,) block id per tile, [(B,) sums per value])."""
    br, bc = np.floor_divide(rows, block), np.floor_divide(cols, block)
    key = (br - br.min(initial=0)) * (int(bc.max(initial=0) - bc.min(initial=0)) + 1) + (bc - bc.min(initial=0))
    _, inv = np.unique(key, return_inverse=True)
    m = int(inv.max(initial=-1)) + 1
    return inv, [np.bincount(inv, weights=v, minlength=m) for v in values]


# --- phenotype -------------------------------------------------------------------------
def immune_phenotype(grid: TileGrid, comp: Compartments, counts: np.ndarray,
                     params: BiomarkerParams | None = None,
                     split: CellCompartments | None = None) -> dict[str, Any]:
    """Inflamed / excluded / desert over bulk regions of ``phenotype_region_mm2``.

    Regions are squares of round(sqrt(region area) / tile_um) tiles (at least 1) tiling the
    bulk from the top-left corner of its bounding box (not the slide origin: moving the same
    tumour on the slide by whole tiles gives the same regions), restricted to bulk tiles. A
    region is scored when its epithelium area is >= ``phenotype_min_tumor_fraction`` of its
    bulk tissue area; thresholds are inclusive. The class fractions weight each scored region
    by its epithelium area, so a sliver of bulk cut off at a region border counts for the
    tumour it holds, not as a whole region. With no scored region the label is
    ``not_evaluable`` (the spec would say desert, which would call a tumour-free slide
    immune-cold). With ``split`` (cell-resolution compartments) the regions' epithelium /
    stroma areas and lymphocytes come from it.
    """
    params = params or BiomarkerParams()
    side = max(1, round(math.sqrt(params.phenotype_region_mm2 * UM2_PER_MM2) / grid.tile_um))
    area = grid.tissue_area_um2
    in_bulk = comp.tiles("bulk")
    epi = comp.tiles("epithelium")
    strom = comp.tiles("tumor_stroma")
    out: dict[str, Any] = {"phenotype_region_um": side * grid.tile_um}
    nan_out = {"immune_phenotype": "not_evaluable", "phenotype_regions_n": 0,
               "phenotype_inflamed_fraction": math.nan, "phenotype_excluded_fraction": math.nan,
               "phenotype_desert_fraction": math.nan}
    if not in_bulk.any():
        return {**out, **nan_out}
    b = in_bulk
    _, (a_bulk, a_epi, a_str, l_epi, l_str) = block_sums(
        grid.rows[b] - grid.rows[b].min(), grid.cols[b] - grid.cols[b].min(), side,
        [area[b], area[b] * epi[b], area[b] * strom[b], counts[b] * epi[b], counts[b] * strom[b]]
        if split is None else
        [area[b], split.epithelium_area_um2[b], split.stroma_area_um2[b],
         split.epithelium_lymphocytes[b], split.stroma_lymphocytes[b]])
    with np.errstate(divide="ignore", invalid="ignore"):
        frac = np.where(a_bulk > 0, a_epi / a_bulk, 0.0)
        it = np.where(a_epi > 0, l_epi / a_epi * UM2_PER_MM2, np.nan)
        st = np.where(a_str > 0, l_str / a_str * UM2_PER_MM2, np.nan)
    scored = (a_bulk > 0) & (a_epi > 0) & at_least(frac, params.phenotype_min_tumor_fraction)
    n = int(scored.sum())
    if n == 0:
        return {**out, **nan_out}
    inflamed = scored & at_least(it, params.inflamed_it_per_mm2)
    excluded = scored & ~inflamed & at_least(st, params.excluded_st_per_mm2)
    desert = scored & ~inflamed & ~excluded
    w = np.where(scored, a_epi, 0.0)  # scored regions have a_epi > 0
    w_sum = float(w.sum())
    f_inf, f_exc, f_des = (float(w[m].sum()) / w_sum for m in (inflamed, excluded, desert))
    thr = params.phenotype_fraction
    label = ("inflamed" if at_least(f_inf, thr) else "excluded" if at_least(f_exc, thr) else "desert")
    return {**out, "immune_phenotype": label, "phenotype_regions_n": n,
            "phenotype_inflamed_fraction": float(f_inf), "phenotype_excluded_fraction": float(f_exc),
            "phenotype_desert_fraction": float(f_des)}


# --- TLS -------------------------------------------------------------------------------
TLS_COLUMNS = ["tls_id", "area_um2", "n_lymphocytes", "mean_density_per_mm2", "centroid_x_px",
               "centroid_y_px", "centroid_x_um", "centroid_y_um", "distance_to_bulk_um",
               "bulk_overlap_fraction", "location", "n_tiles"]


def find_tls(grid: TileGrid, comp: Compartments, counts: np.ndarray,
             params: BiomarkerParams | None = None) -> tuple[np.ndarray, pd.DataFrame]:
    """Tertiary lymphoid structures: 8-connected immune-role tiles (P >= ``tls_prob``) with
    lymphocyte density >= ``tls_min_density_per_mm2``, area >= ``tls_min_area_um2``, whose gap
    to the bulk (centre distance minus one pitch, so an adjacent tile has gap 0) is at most
    ``tls_max_distance_um``. Intratumoural when >= half its area lies in the bulk.

    Returns ((N,) int TLS id per tile, 0 = none; ids 1..k in raster order) and the TLS table.
    No bulk means no TLS: aggregates far from tumour (lymph node) are not TLS.
    """
    params = params or BiomarkerParams()
    n = grid.n_tiles
    labels = np.zeros(n, dtype=np.int64)
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in TLS_COLUMNS})
    if n == 0 or not comp.bulk.any():
        return labels, empty
    area = grid.tissue_area_um2
    dens = tile_density_per_mm2(counts, area)
    cand = at_least(grid.prob("immune"), params.tls_prob) & at_least(dens, params.tls_min_density_per_mm2)
    if not cand.any():
        return labels, empty
    lab_r, k = ndi.label(comp.dense.paint(cand, False), structure=_EIGHT)
    comp_id = comp.dense.sample(lab_r) * cand
    gap = np.maximum(comp.dist_to_bulk_um - grid.tile_um, 0.0)
    in_bulk = comp.tiles("bulk")
    idx = comp_id[cand]
    m = k + 1
    a = np.bincount(idx, weights=area[cand], minlength=m)
    nl = np.bincount(idx, weights=counts[cand], minlength=m)
    nt = np.bincount(idx, minlength=m)
    sx, sy = grid.pitch_xy
    cx = (grid.cols[cand] + 0.5) * sx
    cy = (grid.rows[cand] + 0.5) * sy
    w = area[cand]
    with np.errstate(divide="ignore", invalid="ignore"):
        mx = np.bincount(idx, weights=cx * w, minlength=m) / a
        my = np.bincount(idx, weights=cy * w, minlength=m) / a
        overlap = np.bincount(idx, weights=w * in_bulk[cand], minlength=m) / a
    mingap = np.full(m, np.inf)
    np.minimum.at(mingap, idx, gap[cand])
    keep = at_least(a, params.tls_min_area_um2) & at_least(-mingap, -params.tls_max_distance_um) & (a > 0)
    keep[0] = False
    ids = np.flatnonzero(keep)
    new = np.zeros(m, dtype=np.int64)
    new[ids] = np.arange(1, len(ids) + 1)
    labels = new[comp_id]
    cx_um, cy_um = grid.level0_to_um(mx[ids], my[ids])
    table = pd.DataFrame({
        "tls_id": np.arange(1, len(ids) + 1), "area_um2": a[ids], "n_lymphocytes": nl[ids],
        "mean_density_per_mm2": nl[ids] / a[ids] * UM2_PER_MM2,
        "centroid_x_px": mx[ids], "centroid_y_px": my[ids],
        "centroid_x_um": cx_um, "centroid_y_um": cy_um,
        "distance_to_bulk_um": mingap[ids], "bulk_overlap_fraction": overlap[ids],
        "location": np.where(overlap[ids] >= 0.5, "intratumoral", "peritumoral"),
        "n_tiles": nt[ids],
    })
    return labels, table


# --- composition -----------------------------------------------------------------------
def composition(grid: TileGrid, in_bulk: np.ndarray) -> dict[str, Any]:
    """Expected tissue area per role (probabilities x tissue area, probabilities renormalised
    to sum to 1 per tile), fractions of non-background tissue, and the tumour-stroma ratio
    stroma / (stroma + tumour) inside the bulk (stroma-high when > 0.5)."""
    area = grid.tissue_area_um2
    stack = np.stack([grid.prob(r) for r in TISSUE_ROLES], axis=0)
    tot = stack.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(tot > 0, stack / tot, 0.0)
    role_area = {r: float((p[i] * area).sum()) for i, r in enumerate(TISSUE_ROLES)}
    tissue = sum(v for r, v in role_area.items() if r != "background")
    out: dict[str, Any] = {"tissue_area_mm2": tissue / UM2_PER_MM2}
    for r in TISSUE_ROLES:
        if r == "background":
            continue
        out[f"{r}_area_mm2"] = role_area[r] / UM2_PER_MM2
    for r in TISSUE_ROLES:
        if r == "background":
            continue
        out[f"{r}_fraction"] = role_area[r] / tissue if tissue > 0 else math.nan
    ti = TISSUE_ROLES.index
    t_b = float((p[ti("tumor")] * area * in_bulk).sum())
    s_b = float((p[ti("stroma")] * area * in_bulk).sum())
    tsr = s_b / (s_b + t_b) if (s_b + t_b) > 0 else math.nan
    out["tumor_stroma_ratio"] = tsr
    out["stroma_high"] = bool(tsr > 0.5) if math.isfinite(tsr) else None
    return out


# --- everything ------------------------------------------------------------------------
@dataclass
class BiomarkerResult:
    """One slide's biomarkers.

    row: one output row (units in column names, parameters as ``param_<name>``, provenance);
    tls: per-TLS table; compartments: grid maps; lymphocyte_density_per_mm2 and tls_labels: (N,);
    cell_compartments: the cell-resolution epithelium / stroma split, or None (tile resolution).
    """

    row: dict[str, Any]
    tls: pd.DataFrame
    compartments: Compartments
    lymphocyte_density_per_mm2: np.ndarray
    tls_labels: np.ndarray
    lymphocyte_counts: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))
    cell_compartments: CellCompartments | None = field(repr=False, default=None)


PROVENANCE_KEYS = ("slide_id", "source_path", "source_fingerprint", "slide_mpp_um", "mpp_source",
                   "target_mpp_um", "tile_px", "model_name", "model_version", "store_path")


def compute_biomarkers(grid: TileGrid, cells: pd.DataFrame | None = None,
                       params: BiomarkerParams | None = None,
                       cell_role_map: Mapping[str, str] | None = None,
                       cells_source: str = "cell_table") -> BiomarkerResult:
    """All biomarkers of docs/biomarkers.md for one slide.

    ``cells`` (x, y level-0 px, class), when given, replaces the grid's counts
    (count_source ``cell_table``) and gives Morisita-Horn at cell resolution; when it has
    tumour cells in the bulk, epithelium and tumour-associated stroma are split by the cells
    (``compartment_resolution`` ``cell``, see cellular.py; ``tile`` otherwise).
    """
    params = params or BiomarkerParams()
    if cells is not None:
        check_cell_units(grid, cells)
        if "role" not in cells:
            cells = cells.assign(role=cell_roles(cells["class"], cell_role_map))
        grid = grid.with_cells(cells, source=cells_source)
    n_roleless = _check_roles(grid)
    comp = compartments(grid, params)
    counts, source = lymphocyte_counts(grid, params)
    area = grid.tissue_area_um2
    dens = tile_density_per_mm2(counts, area)
    t = {k: comp.tiles(k) for k in ("bulk", "epithelium", "tumor_stroma", "margin", "core")}
    split = cell_compartments(grid, comp, cells, params)  # None: tile resolution

    row: dict[str, Any] = {}
    meta = grid.metadata
    for k in PROVENANCE_KEYS:
        row[k] = meta.get(k)
    if isinstance(row.get("source_fingerprint"), dict):
        row["source_fingerprint"] = row["source_fingerprint"].get("sha256_head_tail")
    row["slide_mpp_um"] = grid.slide_mpp_um
    row["tile_um"] = grid.tile_um
    row["tile_level0_px"] = grid.tile_level0_px
    row["n_tiles"] = grid.n_tiles
    row["count_source"] = source
    row["n_tiles_without_role"] = n_roleless
    row["compartment_resolution"] = "tile" if split is None else "cell"
    row.update(composition(grid, t["bulk"]))
    for k in ("bulk", "epithelium", "tumor_stroma", "margin", "core"):
        row[f"{k}_area_mm2"] = float(area[t[k]].sum()) / UM2_PER_MM2

    row["lymphocytes_total"] = float(counts.sum())
    row["lymphocytes_intratumoral"] = float(counts[t["epithelium"]].sum())
    row["lymphocytes_stromal"] = float(counts[t["tumor_stroma"]].sum())
    row["til_density_intratumoral_per_mm2"] = it = til_density(counts, area, t["epithelium"])
    row["til_density_stromal_per_mm2"] = st = til_density(counts, area, t["tumor_stroma"])
    row["til_density_core_per_mm2"] = co = til_density(counts, area, t["core"])
    row["til_density_margin_per_mm2"] = ma = til_density(counts, area, t["margin"])
    row["stil_score_pct"] = stil_score_pct(row["lymphocytes_stromal"], float(area[t["tumor_stroma"]].sum()),
                                           params.til_area_um2)
    row["til_positive_tile_fraction"] = til_positive_fraction(dens, t["bulk"], params.til_positive_per_mm2)
    if split is not None:  # epithelium / stroma split by the cells (cellular.py)
        row.update(split.row(params.til_area_um2))
        it, st = row["til_density_intratumoral_per_mm2"], row["til_density_stromal_per_mm2"]
    row["exclusion_ratio_stroma_to_tumor"] = exclusion_ratio(st, it)
    row["exclusion_ratio_margin_to_core"] = exclusion_ratio(ma, co)
    row.update(_morisita_horn(grid, cells, counts, params))
    row.update(immune_phenotype(grid, comp, counts, params, split))

    labels, tls = find_tls(grid, comp, counts, params)
    peri_area = float(area[t["bulk"] | t["margin"]].sum())
    row["tls_count"] = len(tls)
    row["tls_per_mm2"] = len(tls) / peri_area * UM2_PER_MM2 if peri_area > 0 else math.nan
    row["tls_intratumoral_count"] = int((tls["location"] == "intratumoral").sum()) if len(tls) else 0
    row["tls_peritumoral_count"] = int((tls["location"] == "peritumoral").sum()) if len(tls) else 0
    row["tls_total_area_mm2"] = float(tls["area_um2"].sum()) / UM2_PER_MM2 if len(tls) else 0.0

    # always present (None without a cell table), so every slide's row has the same columns
    row["n_cells"] = meta.get("n_cells")
    row["n_cells_outside_tiles"] = meta.get("n_cells_outside_tiles")
    row["params_hash"] = params_hash(params)
    row["package_version"] = package_version()
    for k, v in to_jsonable(params).items():
        row[f"param_{k}"] = v
    tls.insert(0, "slide_id", meta.get("slide_id"))  # also on an empty table: same columns
    return BiomarkerResult(row=row, tls=tls, compartments=comp, lymphocyte_density_per_mm2=dens,
                           tls_labels=labels, lymphocyte_counts=counts, cell_compartments=split)


def _check_roles(grid: TileGrid) -> int:
    """Number of tissue tiles without a most probable role (NaN, all-zero or tied
    probabilities: see TileGrid.hard_roles). They are in no compartment and the count goes
    into the row; a warning names them. When no tissue tile has a role the model's output
    is unusable and the slide is refused (it used to become all tumour)."""
    roles = grid.hard_roles()
    tissue = grid.tissue_fraction > 0
    n_bad = int(((roles < 0) & tissue).sum())
    if not n_bad:
        return 0
    where = grid.metadata.get("store_path") or grid.metadata.get("slide_id") or "tile grid"
    model = grid.metadata.get("model_name") or "the model"
    n_tissue = int(tissue.sum())
    if n_bad == n_tissue:
        raise StoreError(f"no tissue tile has a most probable role ({n_bad} of {n_bad} have NaN, "
                         f"all-zero or tied probabilities): the output of {model} is unusable; "
                         "check the model and predict again with --overwrite", where)
    log.warning("%s: %d of %d tissue tiles have NaN, all-zero or tied role probabilities; "
                "they are in no compartment (column n_tiles_without_role)", where, n_bad, n_tissue)
    return n_bad


def _morisita_horn(grid: TileGrid, cells: pd.DataFrame | None, counts: np.ndarray,
                   params: BiomarkerParams) -> dict[str, Any]:
    """Morisita-Horn of tumour cells vs lymphocytes: at cell resolution on ``mh_cell_um``
    squares with a cell table; otherwise on blocks of round(mh_cell_um / tile_um) tiles
    (>= 1, the tile is the finest square) using tumour-cell counts, or tumour-role area
    as the tumour distribution when there are none."""
    if cells is not None and len(cells):
        role = cells["role"].to_numpy()
        x_um, y_um = grid.level0_to_um(cells["x"].to_numpy(float), cells["y"].to_numpy(float))
        lym, tum = square_counts(x_um, y_um, params.mh_cell_um,
                                 [role == "lymphocyte", role == "tumor_cell"])
        return {"morisita_horn": morisita_horn(tum, lym), "morisita_horn_square_um": params.mh_cell_um,
                "morisita_horn_tumor_source": "cell_table"}
    block = max(1, round(params.mh_cell_um / grid.tile_um))
    if grid.tumor_cell_counts is not None:
        tumor, src = grid.tumor_cell_counts, grid.count_source or "model"
    else:
        tumor, src = grid.prob("tumor") * grid.tissue_area_um2, "tumor_area"
    _, (lym, tum) = block_sums(grid.rows, grid.cols, block, [counts, tumor])
    return {"morisita_horn": morisita_horn(tum, lym), "morisita_horn_square_um": block * grid.tile_um,
            "morisita_horn_tumor_source": src}
