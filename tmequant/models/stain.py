"""Macenko stain normalisation (Macenko et al. 2009) as a pure function of (tile, parameters).

Training (``TrainConfig.macenko_target``) and inference (``ModelCard.stain_normalization``)
both call :func:`macenko_normalize`, so a model sees the same colours at prediction time
as it did in training. Tiles are (H, W, 3) uint8 RGB; stain matrices are (2, 3) unit
optical-density (OD) vectors, rows haematoxylin then eosin.

>>> params = macenko_fit(target_rgb)                      # doctest: +SKIP
>>> out = macenko_normalize(tile_rgb, params["stain_matrix"], params["max_concentrations"])  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np

OD_THRESHOLD = 0.15  # pixels with OD below this in any channel are background
ANGLE_PERCENTILE = 1.0  # robust extremes of the stain angle distribution (percent)
MIN_TISSUE_PX = 16  # fewer tissue pixels than this: leave the tile alone
_MIN_STAIN_ANGLE_COS = 0.9995  # two estimated stains this parallel are one stain


# Optical density of each uint8 intensity (+1 avoids log(0)); a lookup beats a log per pixel.
_OD_LUT = -np.log((np.arange(256, dtype=np.float64) + 1.0) / 256.0)


def _od(rgb: np.ndarray) -> np.ndarray:
    """Optical density (float64) of a uint8 image, same shape."""
    rgb = np.asarray(rgb)
    if rgb.dtype == np.uint8:
        return _OD_LUT[rgb]
    return -np.log((rgb.astype(np.float64) + 1.0) / 256.0)


def _from_od(od: np.ndarray) -> np.ndarray:
    return np.clip(np.exp(-od) * 256.0 - 1.0, 0, 255)


def macenko_stains(
    rgb: np.ndarray, beta: float = OD_THRESHOLD, alpha_pct: float = ANGLE_PERCENTILE
) -> tuple[np.ndarray, np.ndarray]:
    """(stain matrix (2, 3) rows H then E in OD, 99th-percentile concentrations (2,)).

    Pixels with OD below ``beta`` in any channel (background) are ignored. Raises
    ValueError when the tile holds too little tissue or only one stain.
    """
    he, _, max_c = _estimate(_od(rgb).reshape(-1, 3), beta, alpha_pct)
    return he, max_c


def _estimate(
    od: np.ndarray, beta: float, alpha_pct: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(stains (2, 3), concentrations (2, P), 99th percentiles (2,)) of OD pixels (P, 3)."""
    tissue = od[(od > beta).all(axis=1)]
    if len(tissue) < MIN_TISSUE_PX:
        raise ValueError("too little tissue for Macenko stain estimation")
    _, vecs = np.linalg.eigh(np.cov(tissue.T))
    plane = vecs[:, 1:3]  # the two largest eigenvectors
    proj = tissue @ plane
    phi = np.arctan2(proj[:, 1], proj[:, 0])
    lo, hi = np.percentile(phi, [alpha_pct, 100 - alpha_pct])
    v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
    v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
    # Haematoxylin absorbs more red than eosin does: its OD vector has the larger R part.
    he = np.stack([v1, v2]) if v1[0] > v2[0] else np.stack([v2, v1])
    he = he * np.sign(he.sum(axis=1, keepdims=True))  # OD vectors are positive
    norms = np.linalg.norm(he, axis=1, keepdims=True)
    if not np.all(np.isfinite(he)) or np.any(norms < 1e-8):
        raise ValueError("degenerate stain estimate")
    he = he / norms
    if abs(float(he[0] @ he[1])) > _MIN_STAIN_ANGLE_COS:
        raise ValueError("one stain only: cannot separate H from E")
    # Least squares od = c @ he via the (3, 2) pseudo-inverse: one small matmul per tile.
    conc = np.linalg.pinv(he.T) @ od.T
    max_c = np.percentile(conc, 99, axis=1)
    if not np.all(np.isfinite(max_c)) or np.any(max_c <= 1e-6):
        raise ValueError("degenerate stain concentrations")
    return he, conc, max_c


def macenko_fit(
    target_rgb: np.ndarray, beta: float = OD_THRESHOLD, alpha_pct: float = ANGLE_PERCENTILE
) -> dict[str, Any]:
    """Parameters of a target image, in the ``ModelCard.stain_normalization`` layout
    (without ``source``). Raises ValueError if the target holds too little tissue."""
    he, max_c = macenko_stains(target_rgb, beta, alpha_pct)
    return {
        "method": "macenko",
        "stain_matrix": [[float(v) for v in row] for row in he],
        "max_concentrations": [float(v) for v in max_c],
        "od_threshold": float(beta),
        "angle_percentile": float(alpha_pct),
    }


def macenko_normalize(
    rgb: np.ndarray,
    stain_matrix: Any,
    max_concentrations: Any,
    beta: float = OD_THRESHOLD,
    alpha_pct: float = ANGLE_PERCENTILE,
) -> np.ndarray:
    """Map an (H, W, 3) uint8 tile onto the target ``stain_matrix`` (2, 3) and
    ``max_concentrations`` (2,); returns (H, W, 3) uint8.

    A tile with too little tissue (background, white, blank) or a single stain is returned
    unchanged. Deterministic: float64 throughout, rounded to the nearest integer.
    """
    od = _od(rgb).reshape(-1, 3)
    try:
        _, conc, max_c = _estimate(od, beta, alpha_pct)
    except (ValueError, np.linalg.LinAlgError):
        return rgb  # nothing to normalise
    target = np.asarray(stain_matrix, dtype=np.float64)
    target_c = np.asarray(max_concentrations, dtype=np.float64)
    conc *= (target_c / max_c)[:, None]
    out = np.rint(_from_od(conc.T @ target))
    return out.reshape(rgb.shape).astype(np.uint8)


def normalize_batch(tiles: np.ndarray, params: Any) -> np.ndarray:
    """Apply card parameters (``ModelCard.stain_normalization`` or its dict) to an
    (N, H, W, 3) uint8 batch; returns a new (N, H, W, 3) uint8 array.

    Per tile (each tile's own stains are estimated), so a tile's result does not depend on
    the batch it is in: training, ``evaluate`` and ``predict_store`` agree exactly.
    """
    p = params if isinstance(params, dict) else params.model_dump()
    if p["method"] != "macenko":
        raise ValueError(f"unknown stain normalisation method {p['method']!r}")
    out = np.empty_like(tiles)
    for i in range(len(tiles)):
        out[i] = macenko_normalize(tiles[i], p["stain_matrix"], p["max_concentrations"],
                                   p.get("od_threshold", OD_THRESHOLD),
                                   p.get("angle_percentile", ANGLE_PERCENTILE))
    return out


class MacenkoNormalizer:
    """Callable normaliser onto a target's stains: ``norm(tile) -> tile`` (uint8).

    >>> norm = MacenkoNormalizer(target_rgb)                  # doctest: +SKIP
    >>> norm = MacenkoNormalizer.from_params(card.stain_normalization)   # doctest: +SKIP
    >>> out = norm(tile_rgb)                                  # (H, W, 3) uint8
    """

    def __init__(self, target_rgb: np.ndarray | None = None, *, params: Any = None):
        if params is None:
            if target_rgb is None:
                raise ValueError("MacenkoNormalizer needs a target image or params")
            params = macenko_fit(target_rgb)
        p = dict(params) if isinstance(params, dict) else params.model_dump()
        self.params = p
        self.stains = np.asarray(p["stain_matrix"], dtype=np.float64)
        self.max_conc = np.asarray(p["max_concentrations"], dtype=np.float64)
        self.beta = float(p.get("od_threshold", OD_THRESHOLD))
        self.alpha_pct = float(p.get("angle_percentile", ANGLE_PERCENTILE))

    @classmethod
    def from_params(cls, params: Any) -> MacenkoNormalizer:
        return cls(params=params)

    def card_params(self, source: str = "") -> dict[str, Any]:
        """The ``ModelCard.stain_normalization`` dict of this normaliser."""
        return {**{k: v for k, v in self.params.items() if k != "source"}, "source": source}

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return macenko_normalize(rgb, self.stains, self.max_conc, self.beta, self.alpha_pct)
