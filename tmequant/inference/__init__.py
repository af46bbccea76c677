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
from tmequant.inference.nuclei import (
    CountResult,
    NucleusCounterParams,
    count_store,
    count_tiles,
    detect_nuclei,
)

__all__ = [
    "CountResult",
    "NucleusCounterParams",
    "PredictResult",
    "count_store",
    "count_tiles",
    "detect_nuclei",
    "autocast_dtype",
    "check_compatible",
    "predict_store",
    "resolve_device",
    "weights_digest",
]
