"""Inference: the batched prediction engine over a slide store (``predict_store``).

The weight-free nucleus counter lives in :mod:`tmequant.inference.nuclei`.
"""

from tmequant.inference.engine import (
    PredictResult,
    autocast_dtype,
    check_compatible,
    predict_store,
    resolve_device,
    weights_digest,
)

__all__ = [
    "PredictResult",
    "autocast_dtype",
    "check_compatible",
    "predict_store",
    "resolve_device",
    "weights_digest",
]
