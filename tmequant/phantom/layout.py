"""The phantom's truth: a tissue label map (coarse, level-0 geometry) and its cells.

Everything here is a pure function of a ``PhantomSpec``: the same spec (and seed) gives
the same labels and the same cells, bit for bit.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from tmequant.phantom.spec import ADI, BACK, CELL_CLASSES, LYM, NEC, STR, TUM, PhantomSpec

log = logging.getLogger("tmequant")

# Render-only nucleus kinds (the cell table keeps the first three, mapped to CELL_CLASSES).
KIND_LYMPH, KIND_TUMOR, KIND_FIBRO, KIND_FRAGMENT = range(4)
_KIND_TO_CELL = {KIND_LYMPH: "lymphocyte", KIND_TUMOR: "tumor_cell", KIND_FIBRO: "other"}


@dataclass
class PhantomLayout:
    """Truth of one phantom.

    ``labels``: (h, w) uint8 class ids (``spec.TISSUE_CLASSES``), one pixel per
    ``downsample`` level-0 pixels (``label_um`` um). ``tumor_region``: (h, w) bool, the
    drawn tumour region (nests + intratumoural stroma + necrosis). ``nuclei_xy``: (N, 2)
    float64 level-0 px centres of every rendered nucleus, ``nuclei_kind`` (N,) uint8 kind,
    ``tls_centers_px``: (n_tls, 2) level-0 x, y.
    """

    spec: PhantomSpec
    labels: np.ndarray
    tumor_region: np.ndarray
    nuclei_xy: np.ndarray
    nuclei_kind: np.ndarray
    tls_centers_px: np.ndarray

    @property
    def downsample(self) -> int:
        return self.spec.label_downsample

    def cells(self) -> pd.DataFrame:
        """Truth cell table: columns ``x``, ``y`` (level-0 px) and ``class`` (CELL_CLASSES)."""
        keep = self.nuclei_kind != KIND_FRAGMENT
        kinds = self.nuclei_kind[keep]
        names = np.array([_KIND_TO_CELL[k] for k in range(3)], dtype=object)
        return pd.DataFrame({
            "x": self.nuclei_xy[keep, 0].astype(np.float32),
            "y": self.nuclei_xy[keep, 1].astype(np.float32),
            "class": pd.Categorical(names[kinds], categories=list(CELL_CLASSES)),
        })

    def class_areas_mm2(self) -> dict[str, float]:
        """Area of each tissue class in mm^2 (label pixels x label_um^2)."""
        from tmequant.phantom.spec import CLASS_NAMES

        px_mm2 = (self.spec.label_um * 1e-3) ** 2
        counts = np.bincount(self.labels.ravel(), minlength=len(CLASS_NAMES))
        return {n: float(c * px_mm2) for n, c in zip(CLASS_NAMES, counts)}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """Gaussian random field, zero mean, unit std, correlation ``sigma_px`` (FFT, padded)."""
    from scipy import fft

    pad = int(3 * sigma_px)
    ph, pw = shape[0] + 2 * pad, shape[1] + 2 * pad
    spec = fft.rfft2(rng.standard_normal((ph, pw)).astype(np.float32), workers=2)
    ky = fft.fftfreq(ph)[:, None].astype(np.float32)
    kx = fft.rfftfreq(pw)[None, :].astype(np.float32)
    spec *= np.exp(-2 * np.pi**2 * sigma_px**2 * (ky**2 + kx**2))
    f = fft.irfft2(spec, s=(ph, pw), workers=2)[pad : pad + shape[0], pad : pad + shape[1]]
    f = f.astype(np.float32)
    return (f - f.mean()) / (f.std() + 1e-12)


def _lobed_disk(shape: tuple[int, int], step_um: float, cx: float, cy: float, rx: float, ry: float,
                lobulation: float, rng: np.random.Generator, n_lobes: int = 7) -> np.ndarray:
    """(h, w) bool ellipse (centre, semi-axes in um; pixel centres at (i + 0.5) * step_um)
    with a lobed border: radius x (1 + lobulation * sum_k a_k cos(k theta + phi_k))."""
    amps = rng.uniform(0.3, 1.0, n_lobes) / np.arange(1, n_lobes + 1) ** 0.7
    phases = rng.uniform(0, 2 * np.pi, n_lobes)
    out = np.zeros(shape, bool)
    grow = 1.0 + lobulation * float(amps.sum())
    y0 = max(0, int((cy - ry * grow) / step_um) - 1)
    y1 = min(shape[0], int((cy + ry * grow) / step_um) + 2)
    x0 = max(0, int((cx - rx * grow) / step_um) - 1)
    x1 = min(shape[1], int((cx + rx * grow) / step_um) + 2)
    if y1 <= y0 or x1 <= x0:
        return out
    dy = ((np.arange(y0, y1, dtype=np.float32) + 0.5) * step_um - cy)[:, None] / ry
    dx = ((np.arange(x0, x1, dtype=np.float32) + 0.5) * step_um - cx)[None, :] / rx
    z = dx + 1j * dy
    rho = np.abs(z)
    u = z / np.maximum(rho, 1e-9)  # e^{i theta}
    border = np.ones(rho.shape, np.float32)
    uk = u * u
    for k in range(n_lobes):  # harmonics 2..n_lobes+1 by repeated multiplication, no per-pixel loop
        border += lobulation * amps[k] * (uk * np.exp(1j * phases[k])).real
        uk = uk * u
    out[y0:y1, x0:x1] = rho < border
    return out


def make_layout(spec: PhantomSpec) -> PhantomLayout:
    """Draw the label map and cell positions of ``spec`` (deterministic in ``spec.seed``)."""
    rng = np.random.default_rng([spec.seed, 7])
    lu = spec.label_um
    ds = spec.label_downsample
    h, w = math.ceil(spec.height_px / ds), math.ceil(spec.width_px / ds)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy = (yy + 0.5) * lu
    xx = (xx + 0.5) * lu  # label-pixel centres in um
    H_um, W_um = spec.height_um, spec.width_um

    # tissue: slide minus a wavy glass margin
    edge_um = np.minimum(np.minimum(xx, W_um - xx), np.minimum(yy, H_um - yy))
    wobble = _smooth_field(rng, (h, w), 120.0 / lu) * (0.25 * spec.background_margin_um)
    tissue = edge_um > spec.background_margin_um + wobble
    lab_cc, n_cc = ndi.label(tissue)
    if n_cc > 1:  # one piece of tissue: drop islands of the wavy edge
        tissue = lab_cc == (1 + int(np.argmax(np.bincount(lab_cc.ravel())[1:])))

    # tumour region: lobed ellipse; nests: thresholded smooth field inside it
    cx, cy = spec.tumor_center_frac[0] * W_um, spec.tumor_center_frac[1] * H_um
    rx, ry = spec.tumor_radii_um
    region = _lobed_disk((h, w), lu, cx, cy, rx, ry, spec.tumor_lobulation, rng) & tissue
    nest_field = _smooth_field(rng, (h, w), spec.nest_scale_um / lu)
    if region.any():
        thr = np.quantile(nest_field[region], 1.0 - spec.nest_fraction)
    else:
        thr = np.inf
    labels = np.full((h, w), STR, np.uint8)
    labels[~tissue] = BACK
    labels[region & (nest_field >= thr)] = TUM

    # necrosis: a lobed focus inside the tumour region, off-centre
    region_area_um2 = float(region.sum()) * lu * lu
    if spec.necrosis_fraction > 0 and region.any():
        r_nec = math.sqrt(spec.necrosis_fraction * region_area_um2 / math.pi)
        ang = rng.uniform(0, 2 * np.pi)
        ncx = cx + 0.3 * rx * math.cos(ang)
        ncy = cy + 0.3 * ry * math.sin(ang)
        nec = _lobed_disk((h, w), lu, ncx, ncy, r_nec, r_nec, 0.15, rng) & region
        labels[nec] = NEC

    # distance (um) from the tumour region, outside it
    dist_out_um = ndi.distance_transform_edt(~region) * lu if region.any() else np.full((h, w), np.inf)
    dist_bg_um = ndi.distance_transform_edt(tissue) * lu

    # fat: a lobed lobule where the tissue is farthest from the tumour
    fat = np.zeros((h, w), bool)
    if spec.fat_area_mm2 > 0:
        r_fat = math.sqrt(spec.fat_area_mm2 * 1e6 / math.pi)
        score = np.where(dist_bg_um > 0.5 * r_fat, dist_out_um, -1.0)
        iy, ix = np.unravel_index(int(np.argmax(score)), score.shape)
        fat = _lobed_disk((h, w), lu, float(xx[iy, ix]), float(yy[iy, ix]), r_fat, r_fat, 0.12, rng) & tissue & ~region
        labels[fat] = ADI
    dist_fat_um = ndi.distance_transform_edt(~fat) * lu if fat.any() else np.full((h, w), np.inf)

    # TLS: round aggregates at a chosen distance outside the tumour border, kept apart so
    # that each is its own 8-connected component on a 112 um tile grid
    r_tls = spec.tls_radius_um
    centers: list[tuple[float, float]] = []
    if spec.n_tls:
        dmin, dmax = spec.tls_distance_um
        ok = ((dist_out_um >= dmin) & (dist_out_um <= dmax) & (dist_bg_um > r_tls + 30.0)
              & (dist_fat_um > r_tls + 30.0))
        cand = np.flatnonzero(ok)
        rng.shuffle(cand)
        min_sep = 2 * r_tls + 3 * 112.0
        for c in cand:
            py, px = divmod(int(c), w)
            p = (float(xx[py, px]), float(yy[py, px]))
            if all(math.hypot(p[0] - q[0], p[1] - q[1]) > min_sep for q in centers):
                centers.append(p)
                if len(centers) == spec.n_tls:
                    break
        if len(centers) < spec.n_tls:
            raise ValueError(
                f"room for only {len(centers)} of n_tls={spec.n_tls} TLS at {dmin}-{dmax} um from "
                "the tumour; enlarge the slide or lower n_tls / tls_radius_um")
        for (tx, ty) in centers:
            disk = _lobed_disk((h, w), lu, tx, ty, r_tls, r_tls * rng.uniform(0.8, 1.0), 0.08, rng)
            labels[disk & tissue] = LYM

    xy, kind = _draw_nuclei(spec, labels, region, rng)
    tls_px = np.array(centers, dtype=np.float64).reshape(-1, 2) / spec.mpp_um
    return PhantomLayout(spec, labels, region, xy, kind, tls_px)


def _poisson_in_labels(density_map_per_mm2: np.ndarray, label_um: float, ds: int,
                       rng: np.random.Generator) -> np.ndarray:
    """Exact inhomogeneous Poisson points over a piecewise-constant density map.

    Returns (N, 2) level-0 px (x, y); the count in each label pixel is Poisson with mean
    density x pixel area, and the points are uniform inside their pixel.
    """
    lam = density_map_per_mm2.ravel().astype(np.float64) * (label_um * 1e-3) ** 2
    counts = rng.poisson(lam)
    idx = np.repeat(np.arange(lam.size), counts)
    py, px = np.divmod(idx, density_map_per_mm2.shape[1])
    off = rng.random((idx.size, 2))
    return np.stack([(px + off[:, 0]) * ds, (py + off[:, 1]) * ds], axis=1)


def _draw_nuclei(spec: PhantomSpec, labels: np.ndarray, region: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    ds, lu = spec.label_downsample, spec.label_um
    # lymphocytes: Poisson with a density per compartment
    lym = np.zeros(labels.shape, np.float32)
    lym[(labels == TUM)] = spec.lymph_nest_per_mm2
    lym[(labels == STR) & region] = spec.lymph_stroma_per_mm2
    lym[(labels == STR) & ~region] = spec.lymph_outer_stroma_per_mm2
    lym[labels == LYM] = spec.tls_lymph_per_mm2
    lym[labels == NEC] = spec.lymph_necrosis_per_mm2
    lym[labels == ADI] = spec.lymph_fat_per_mm2
    p_lym = _poisson_in_labels(lym, lu, ds, rng)
    # fibroblasts in stroma (and a few in the TLS stroma), fragments in necrosis
    fib = np.zeros(labels.shape, np.float32)
    fib[labels == STR] = spec.fibroblast_per_mm2
    p_fib = _poisson_in_labels(fib, lu, ds, rng)
    frag = np.zeros(labels.shape, np.float32)
    frag[labels == NEC] = 2500.0
    p_frag = _poisson_in_labels(frag, lu, ds, rng)
    # tumour cells: a jittered hexagonal lattice (epithelium packs regularly), kept in nests
    s_px = spec.tumor_cell_spacing_um / spec.mpp_um
    gy = np.arange(0, spec.height_px, s_px * math.sqrt(3) / 2)
    gx = np.arange(0, spec.width_px, s_px)
    ty, tx = np.meshgrid(gy, gx, indexing="ij")
    tx = tx + (np.arange(gy.size)[:, None] % 2) * (s_px / 2)
    pts = np.stack([tx.ravel(), ty.ravel()], axis=1)
    pts = pts + rng.uniform(-0.25, 0.25, pts.shape) * s_px
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < spec.width_px) & (pts[:, 1] >= 0) & (pts[:, 1] < spec.height_px)
    pts = pts[inside]
    lab = labels[(pts[:, 1] // ds).astype(np.intp), (pts[:, 0] // ds).astype(np.intp)]
    p_tum = pts[lab == TUM]

    xy = np.concatenate([p_lym, p_tum, p_fib, p_frag]).astype(np.float64)
    kind = np.concatenate([np.full(len(p_lym), KIND_LYMPH), np.full(len(p_tum), KIND_TUMOR),
                           np.full(len(p_fib), KIND_FIBRO), np.full(len(p_frag), KIND_FRAGMENT)]).astype(np.uint8)
    return xy, kind
