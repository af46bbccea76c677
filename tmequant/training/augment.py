"""Tile augmentation and stain normalisation on (H, W, 3) uint8 RGB arrays.

Everything takes an explicit ``numpy.random.Generator`` so that a sample's augmentation
depends only on (seed, epoch, sample index): training is reproducible on the CPU and a
resumed run sees exactly the tiles an uninterrupted one would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

# Macenko stain normalisation lives in tmequant.models.stain (inference applies it from the
# model card without importing training); re-exported here for compatibility.
from tmequant.models.stain import MacenkoNormalizer, macenko_stains

# Ruifrok & Johnston stain vectors (rows: haematoxylin, eosin, DAB) in optical density,
# as in skimage.color.rgb_from_hed.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


@dataclass
class AugmentConfig:
    """Training augmentation; ranges are +/- around identity (0 switches one off)."""

    flips: bool = True  # horizontal/vertical flips and 90-degree rotations (dihedral group)
    hed_sigma: float = 0.05  # stain amount: H, E, D concentrations scaled by 1 + U(-s, s)
    hed_bias: float = 0.01  # stain offset in optical density, + U(-b, b)
    brightness: float = 0.1  # added to [0, 1] intensities, U(-b, b)
    contrast: float = 0.1  # intensities scaled about their mean by 1 + U(-c, c)
    scale: float = 0.1  # zoom factor 1 + U(-s, s) about the centre (off for count labels)


def _od(rgb: np.ndarray) -> np.ndarray:
    return -np.log((rgb.astype(np.float32) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.exp(-od) * 256.0 - 1.0, 0, 255)


def hed_jitter(rgb: np.ndarray, rng: np.random.Generator, sigma: float, bias: float) -> np.ndarray:
    """Perturb stain concentrations in HED space (Tellez et al. 2018); returns float32 0-255."""
    od = _od(rgb).reshape(-1, 3)
    hed = od @ _HED_FROM_RGB
    alpha = 1.0 + rng.uniform(-sigma, sigma, 3)
    beta = rng.uniform(-bias, bias, 3)
    od2 = (hed * alpha + beta) @ _RGB_FROM_HED
    return _from_od(od2).reshape(rgb.shape).astype(np.float32)


def dihedral(img: np.ndarray, k: int) -> np.ndarray:
    """One of the 8 flips/90-degree rotations (k in 0..7) of an (H, W, ...) array."""
    out = np.rot90(img, k % 4, axes=(0, 1))
    return out[:, ::-1] if k >= 4 else out


def scale_jitter(rgb: np.ndarray, factor: float) -> np.ndarray:
    """Zoom by ``factor`` about the centre, same output size (reflect-padded when < 1)."""
    h, w = rgb.shape[:2]
    ch, cw = max(int(round(h / factor)), 1), max(int(round(w / factor)), 1)
    if ch > h or cw > w:
        py, px = (ch - h + 1) // 2, (cw - w + 1) // 2
        rgb = np.pad(rgb, ((py, py), (px, px), (0, 0)), mode="reflect")
    y0, x0 = (rgb.shape[0] - ch) // 2, (rgb.shape[1] - cw) // 2
    crop = np.ascontiguousarray(rgb[y0 : y0 + ch, x0 : x0 + cw])
    return np.asarray(Image.fromarray(crop).resize((w, h), Image.Resampling.BILINEAR))


def augment(
    rgb: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig, allow_scale: bool = True
) -> np.ndarray:
    """Apply ``cfg`` to an (H, W, 3) uint8 tile; returns (H, W, 3) float32 in 0-255."""
    img = rgb
    if cfg.flips:
        img = dihedral(img, int(rng.integers(8)))
    if allow_scale and cfg.scale > 0:
        img = scale_jitter(np.ascontiguousarray(img), 1.0 + rng.uniform(-cfg.scale, cfg.scale))
    if cfg.hed_sigma > 0 or cfg.hed_bias > 0:
        x = hed_jitter(np.ascontiguousarray(img), rng, cfg.hed_sigma, cfg.hed_bias)
    else:
        x = img.astype(np.float32)
    if cfg.contrast > 0:
        m = x.mean()
        x = (x - m) * (1.0 + rng.uniform(-cfg.contrast, cfg.contrast)) + m
    if cfg.brightness > 0:
        x = x + 255.0 * rng.uniform(-cfg.brightness, cfg.brightness)
    return np.clip(x, 0, 255).astype(np.float32)

__all__ = ["AugmentConfig", "MacenkoNormalizer", "augment", "dihedral", "hed_jitter",
           "macenko_stains", "scale_jitter"]
