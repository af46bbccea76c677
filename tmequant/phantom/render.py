"""Render a phantom layout as H&E-like RGB, band by band, vectorised with numpy.

Colour follows Beer-Lambert: each pixel has a haematoxylin and an eosin optical density
(OD), and RGB = 255 * exp(-(h * H_OD + e * E_OD + glass)), looked up from a 256 x 256
table. Tissue classes set the base stain amounts and textures (periodic, precomputed once);
nuclei are stamped from small template banks at the truth cell positions, so the pixels
and the cell table agree.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from tmequant.phantom.layout import KIND_FIBRO, KIND_FRAGMENT, KIND_LYMPH, KIND_TUMOR, PhantomLayout
from tmequant.phantom.spec import ADI, BACK, LYM, NEC, STR, TUM

# Stain OD vectors (R, G, B), unit length: haematoxylin blue-purple, eosin pink.
_H_OD = np.array([0.60, 0.75, 0.28])
_E_OD = np.array([0.09, 0.92, 0.38])
_H_OD /= np.linalg.norm(_H_OD)
_E_OD /= np.linalg.norm(_E_OD)
_GLASS_OD = np.array([0.035, 0.04, 0.03])
_H_MAX, _E_MAX = 3.0, 2.0
_TEX_PX = 2048  # period of the texture tiles, level-0 px
_BLOCK_ROWS = 128  # rows of a render block (block = 128 x 2048 px, fits in cache)
_LPAD = 2  # label-map padding for the jittered lookup

# Per-class base stain amounts and texture gains:
# (H base, E base, H noise, E noise, E fibre, E fat rim)
_CLASS_STAIN = {
    BACK: (0.00, 0.00, 0.01, 0.01, 0.00, 0.00),
    TUM: (0.20, 0.72, 0.05, 0.14, 0.00, 0.00),
    STR: (0.10, 0.50, 0.03, 0.08, 0.22, 0.00),
    LYM: (0.30, 0.35, 0.05, 0.08, 0.10, 0.00),
    NEC: (0.22, 0.95, 0.06, 0.22, 0.00, 0.00),
    ADI: (0.01, 0.02, 0.01, 0.01, 0.00, 0.75),
}


def _lut() -> np.ndarray:
    """(256 * 256, 3) uint8 RGB for quantised (H, E) amounts."""
    h = np.linspace(0, _H_MAX, 256)[:, None, None]
    e = np.linspace(0, _E_MAX, 256)[None, :, None]
    od = h * _H_OD + e * _E_OD + _GLASS_OD
    return np.clip(255.0 * np.exp(-od), 0, 255).round().astype(np.uint8).reshape(-1, 3)


def _periodic_noise(rng: np.random.Generator, n: int, sigma_px: tuple[float, float] | float) -> np.ndarray:
    """(n, n) float32 periodic Gaussian noise, unit std, smoothed by ``sigma_px`` (y, x) via FFT."""
    from scipy import fft

    if isinstance(sigma_px, tuple):
        sy, sx = sigma_px
    else:
        sy = sx = float(sigma_px)
    spec = fft.rfft2(rng.standard_normal((n, n)).astype(np.float32), workers=2)
    ky = fft.fftfreq(n)[:, None].astype(np.float32)
    kx = fft.rfftfreq(n)[None, :].astype(np.float32)
    spec *= np.exp(-2 * np.pi**2 * ((ky * sy) ** 2 + (kx * sx) ** 2))
    f = fft.irfft2(spec, s=(n, n), workers=2).astype(np.float32)
    f -= f.mean()
    f /= f.std() + 1e-12
    return f


@functools.lru_cache(maxsize=2)
def _textures(mpp_um: float) -> _Textures:
    """Texture tiles of one pixel size, shared by every phantom (the seed varies the layout
    and the cells; stain textures need not vary, and caching saves ~2 s per phantom)."""
    return _Textures(mpp_um, np.random.default_rng(20240607))


class _Textures:
    """Periodic (``_TEX_PX`` square) texture tiles at the slide's pixel size."""

    def __init__(self, mpp_um: float, rng: np.random.Generator):
        n = _TEX_PX
        um = 1.0 / mpp_um  # px per um
        self.fine = _periodic_noise(rng, n, 0.8 * um)
        self.mid = 0.6 * _periodic_noise(rng, n, 4.0 * um) + 0.4 * self.fine
        # fibres: noise stretched along x, then warped by a smooth periodic displacement so
        # they wave and turn; fibre angle for the spindle nuclei follows the warp
        base = _periodic_noise(rng, n, (1.3 * um, 7.0 * um))
        disp_y = _periodic_noise(rng, n, 90.0 * um) * (30.0 * um)
        disp_x = _periodic_noise(rng, n, 90.0 * um) * (20.0 * um)
        gy, gx = np.mgrid[0:n, 0:n].astype(np.float32)
        warped = ndi.map_coordinates(base, [gy + disp_y, gx + disp_x], order=1, mode="grid-wrap")
        # bundles: fibres broken up by a coarser pattern so stroma is not a striped sheet
        bundles = _periodic_noise(rng, n, 12.0 * um)
        self.fibre = (np.tanh(1.2 * warped) * 0.6 + 0.5 * bundles).astype(np.float32)
        self.fibre_angle = np.arctan(-np.gradient(disp_y, axis=1)).astype(np.float32)
        self.fat = _fat_rims(rng, n, mpp_um)
        for a in (self.fine, self.mid, self.fibre, self.fibre_angle, self.fat):
            a.flags.writeable = False  # shared between renderers


def _fat_rims(rng: np.random.Generator, n: int, mpp_um: float) -> np.ndarray:
    """Periodic Voronoi cell borders (adipocyte rims, cells ~70 um) in [0, 1]."""
    step_um = 2.0
    m = max(8, round(n * mpp_um / step_um))
    n_cells = max(4, int((n * mpp_um / 70.0) ** 2))
    seeds = rng.random((n_cells, 2)) * m
    tree = cKDTree(seeds, boxsize=m)
    gy, gx = np.mgrid[0:m, 0:m].astype(np.float64) + 0.5
    d, i = tree.query(np.stack([gy.ravel(), gx.ravel()], 1), k=2)
    sep = seeds[i[:, 1]] - seeds[i[:, 0]]
    sep -= m * np.round(sep / m)  # periodic
    # distance to the bisector of the two nearest seeds = half-width of the cell wall gap
    gap_um = ((d[:, 1] ** 2 - d[:, 0] ** 2) / (2 * np.hypot(sep[:, 0], sep[:, 1]) + 1e-9)).reshape(m, m) * step_um
    rim = np.exp(-((gap_um / 1.0) ** 2)).astype(np.float32)
    return ndi.zoom(rim, n / m, order=1, mode="grid-wrap", grid_mode=True)[:n, :n]


def _templates(kind: int, mpp_um: float, rng: np.random.Generator, n_var: int = 32) -> tuple[np.ndarray, float]:
    """(n_var, T, T) float32 haematoxylin amounts of one nucleus kind; T odd, in px.

    For fibroblasts, variant ``i`` is oriented at angle ``pi * i / n_var`` (for the fibres).
    """
    um = 1.0 / mpp_um
    half_um = {KIND_LYMPH: 4.6, KIND_TUMOR: 8.5, KIND_FIBRO: 10.0, KIND_FRAGMENT: 2.6}[kind]
    t = math.ceil(half_um * um) * 2 + 1
    c = (t - 1) / 2
    yy, xx = (np.mgrid[0:t, 0:t].astype(np.float32) - c) / um  # um from the centre
    out = np.zeros((n_var, t, t), np.float32)
    edge_um = 0.6 * mpp_um + 0.25  # soft edge, about one pixel
    for i in range(n_var):  # a few dozen templates, once per phantom
        if kind == KIND_LYMPH:
            a = rng.uniform(3.0, 3.7)
            b = a * rng.uniform(0.85, 1.0)
            ang = rng.uniform(0, np.pi)
        elif kind == KIND_TUMOR:
            a = rng.uniform(5.0, 7.0)
            b = a * rng.uniform(0.65, 0.9)
            ang = rng.uniform(0, np.pi)
        elif kind == KIND_FIBRO:
            a = rng.uniform(6.0, 9.0)
            b = rng.uniform(1.2, 1.9)
            ang = np.pi * i / n_var
        else:
            a = rng.uniform(0.8, 2.0)
            b = a * rng.uniform(0.6, 1.0)
            ang = rng.uniform(0, np.pi)
        ca, sa = math.cos(ang), math.sin(ang)
        u = xx * ca + yy * sa
        v = -xx * sa + yy * ca
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2)  # 1 on the border
        dist_um = (r - 1.0) * min(a, b)  # signed, approx. um outside the border
        inside = 1.0 / (1.0 + np.exp(dist_um / (edge_um * 0.5)))
        speck = rng.standard_normal((t, t)).astype(np.float32)
        speck = ndi.gaussian_filter(speck, 0.5 * um)
        speck /= speck.std() + 1e-6
        if kind == KIND_LYMPH:
            amt = 2.05 + 0.12 * speck
        elif kind == KIND_TUMOR:
            # vesicular: pale chromatin, a dark rim at the membrane and a nucleolus
            rim = np.exp(-((dist_um + 0.6) / 0.55) ** 2)
            ny, nx = rng.uniform(-0.35, 0.35, 2) * b
            nucleolus = np.exp(-(((u - nx) ** 2 + (v - ny) ** 2) / (0.9 ** 2)))
            amt = 0.80 + 0.15 * speck + 0.75 * rim + 1.0 * nucleolus
        elif kind == KIND_FIBRO:
            amt = 1.45 + 0.1 * speck
        else:
            amt = 2.3 + 0.1 * speck
        out[i] = np.clip(amt, 0, _H_MAX) * inside
    return out, c


class PhantomRenderer:
    """Renders a ``PhantomLayout`` on demand: ``read(y0, x0, h, w) -> (h, w, 3) uint8``.

    Pixels are produced in full-width bands of ``band_px`` rows and the last band is kept,
    so the strip-by-strip reads of ``write_pyramid_tiff`` render each pixel once.
    """

    def __init__(self, layout: PhantomLayout, band_px: int | None = None):
        spec = layout.spec
        self.layout = layout
        self.spec = spec
        self.shape = (spec.height_px, spec.width_px)
        rng = np.random.default_rng([spec.seed, 11])
        self.tex = _textures(spec.mpp_um)
        self.lut = _lut()
        stain = np.array([_CLASS_STAIN[k] for k in range(len(_CLASS_STAIN))], np.float32)
        self.stain = stain.T.copy()  # (6 params, n_classes)
        self.banks = {k: _templates(k, spec.mpp_um, rng) for k in (KIND_LYMPH, KIND_TUMOR, KIND_FIBRO, KIND_FRAGMENT)}
        # per-nucleus template variant: fibroblasts follow the local fibre angle
        xy, kind = layout.nuclei_xy, layout.nuclei_kind
        var = rng.integers(0, 32, len(kind))
        fib = kind == KIND_FIBRO
        if fib.any():
            fx = (xy[fib, 0].astype(np.int64)) % _TEX_PX
            fy = (xy[fib, 1].astype(np.int64)) % _TEX_PX
            ang = self.tex.fibre_angle[fy, fx] + rng.normal(0, 0.15, int(fib.sum()))
            var[fib] = np.round((ang % np.pi) / np.pi * 32).astype(np.int64) % 32
        order = np.argsort(xy[:, 1], kind="stable")
        self._y_sorted = xy[order, 1]
        self._xy, self._kind, self._var = xy[order], kind[order], var[order]
        # jittered label lookup: for texture pixel (ty, tx), the flat index into the padded
        # label map relative to the texture period's origin; +-1.5 label px of smooth jitter
        ds = spec.label_downsample
        lab_pad = np.pad(layout.labels, _LPAD, mode="edge")
        self._ds, self._lw = ds, lab_pad.shape[1]
        self._lflat = lab_pad.ravel()
        jit = np.round(np.clip(self.tex.mid * 0.9, -1.5, 1.5) * ds).astype(np.int32)
        ar = np.arange(_TEX_PX, dtype=np.int32)
        jy = (ar[:, None] % ds + jit) // ds  # in label px, relative to the block origin's label px
        jx = (ar[None, :] % ds - jit) // ds
        jy += (ar[:, None] // ds)
        jx += (ar[None, :] // ds)
        self._jidx = (jy * self._lw + jx).astype(np.int64)
        self._has_fat = bool((layout.labels == ADI).any())
        self._glass = np.broadcast_to(self.lut[0], (_BLOCK_ROWS * _TEX_PX, 3))
        if band_px is None:
            band_px = max(256, min(2048, (16_000_000 // max(1, spec.width_px)) // 256 * 256))
        self.band_px = int(band_px)
        self._band: tuple[int, np.ndarray] | None = None

    # -- public -----------------------------------------------------------------------
    def read(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """RGB uint8 (h, w, 3) of the level-0 region at (x0, y0); outside the slide is glass."""
        H, W = self.shape
        if 0 <= y0 and 0 <= x0 and y0 + h <= H and x0 + w <= W:
            b0 = (y0 // self.band_px) * self.band_px
            if y0 + h <= b0 + self.band_px:  # inside one band (the writer's strips): one copy
                if self._band is None or self._band[0] != b0:
                    self._band = (b0, self.render_band(b0, min(self.band_px, H - b0)))
                return self._band[1][y0 - b0 : y0 - b0 + h, x0 : x0 + w].copy()
        out = np.empty((h, w, 3), np.uint8)
        out[...] = self.lut[0]
        xa, xb = max(x0, 0), min(x0 + w, W)
        y = max(y0, 0)
        while y < min(y0 + h, H) and xa < xb:
            b0 = (y // self.band_px) * self.band_px
            if self._band is None or self._band[0] != b0:
                self._band = (b0, self.render_band(b0, min(self.band_px, H - b0)))
            band = self._band[1]
            y1 = min(y0 + h, b0 + band.shape[0])
            out[y - y0 : y1 - y0, xa - x0 : xb - x0] = band[y - b0 : y1 - b0, xa:xb]
            y = y1
        return out

    def render(self) -> np.ndarray:
        """The whole level-0 image (H, W, 3) uint8 (for small phantoms)."""
        return self.read(0, 0, *self.shape)

    # -- internals ----------------------------------------------------------------------
    def render_band(self, y0: int, bh: int) -> np.ndarray:
        """Full-width band of rows [y0, y0 + bh) as (bh, W, 3) uint8 (``y0`` a multiple of 256)."""
        W = self.shape[1]
        out = np.empty((bh, W, 3), np.uint8)
        nuc = np.zeros((bh, W), np.float32)
        self._stamp(nuc, y0)
        # cache-sized blocks aligned to the texture period: textures are views, not copies
        for r0 in range(0, bh, _BLOCK_ROWS):
            rh = min(_BLOCK_ROWS, bh - r0)
            for c0 in range(0, W, _TEX_PX):
                cw = min(_TEX_PX, W - c0)
                out[r0 : r0 + rh, c0 : c0 + cw] = self._block(y0 + r0, c0, rh, cw, nuc[r0 : r0 + rh, c0 : c0 + cw])
        return out

    def _block(self, y0: int, x0: int, bh: int, bw: int, nuc: np.ndarray) -> np.ndarray:
        ty = y0 % _TEX_PX
        t = self.tex
        # class label through the jittered-index texture: organic borders at one gather
        base = ((y0 - ty) // self._ds + _LPAD) * self._lw + (x0 // self._ds + _LPAD)
        lab = self._lflat.take(self._jidx[ty : ty + bh, :bw] + base)
        if not lab.any():  # glass only
            return self._glass[: bh * bw].reshape(bh, bw, 3)
        s = self.stain
        h_od = s[0].take(lab)
        h_od += s[2].take(lab) * t.fine[ty : ty + bh, :bw]
        e_od = s[1].take(lab)
        e_od += s[3].take(lab) * t.mid[ty : ty + bh, :bw]
        e_od += s[4].take(lab) * t.fibre[ty : ty + bh, :bw]
        if self._has_fat:
            g = s[5].take(lab) * t.fat[ty : ty + bh, :bw]
            e_od += g
            h_od += 0.1 * g
        np.maximum(h_od, nuc, out=h_od)
        e_od *= 1.0 - 0.4 * np.minimum(nuc, 1.0)
        h_od *= 255.0 / _H_MAX
        e_od *= 255.0 / _E_MAX
        np.clip(h_od, 0, 255, out=h_od)
        np.clip(e_od, 0, 255, out=e_od)
        idx = h_od.astype(np.uint16)
        idx <<= 8
        idx |= e_od.astype(np.uint16)
        return self.lut.take(idx, axis=0)

    def _stamp(self, nuc: np.ndarray, y0: int) -> None:
        """Max-stamp the nuclei overlapping rows [y0, y0 + bh) into ``nuc`` (H amount)."""
        bh, W = nuc.shape
        flat = nuc.ravel()
        for kind, (bank, c) in self.banks.items():
            t = bank.shape[1]
            lo = np.searchsorted(self._y_sorted, y0 - t, "left")
            hi = np.searchsorted(self._y_sorted, y0 + bh + t, "right")
            sel = np.flatnonzero(self._kind[lo:hi] == kind) + lo
            if sel.size == 0:
                continue
            cx = np.round(self._xy[sel, 0] - c).astype(np.int64)
            cy = np.round(self._xy[sel, 1] - c).astype(np.int64) - y0
            off = np.arange(t)
            # chunk to bound memory: (chunk, t, t) index arrays
            chunk = max(1, 2_000_000 // (t * t))
            for i in range(0, sel.size, chunk):
                yy = cy[i : i + chunk, None, None] + off[None, :, None]
                xx = cx[i : i + chunk, None, None] + off[None, None, :]
                vals = bank[self._var[sel[i : i + chunk]]]
                ok = (yy >= 0) & (yy < bh) & (xx >= 0) & (xx < W) & (vals > 0.02)
                idx = (yy * W + xx)[ok]
                v = vals[ok]
                flat[idx] = np.maximum(flat[idx], v)
