"""Inference: the batched prediction engine over a slide store (``predict_store``) and the
weight-free nucleus counter (``count_store``).

Names load on first use: the nucleus counter needs no torch, so importing it (or this
package) must not pay for importing the network engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_ENGINE = ("PredictResult", "autocast_dtype", "check_compatible", "predict_store",
           "resolve_device", "weights_digest")
_NUCLEI = ("CountResult", "NucleusCounterParams", "count_store", "count_tiles", "detect_nuclei")

__all__ = sorted(_ENGINE + _NUCLEI)

if TYPE_CHECKING:
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


def __getattr__(name: str) -> Any:
    if name in _ENGINE:
        return getattr(importlib.import_module("tmequant.inference.engine"), name)
    if name in _NUCLEI:
        return getattr(importlib.import_module("tmequant.inference.nuclei"), name)
    raise AttributeError(f"module 'tmequant.inference' has no attribute {name!r}")


def __dir__() -> list[str]:
    return list(__all__)
