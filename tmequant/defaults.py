"""Values several stages share, defined once.

The tile geometry most timm models are trained at (224 px at 0.5 um/px, i.e. 112 um tiles,
"20x"), and the range of pixel sizes tmequant accepts anywhere (slide metadata, overrides,
manifests, tiling targets): 0.05 um/px is beyond any optical scanner, 20 um/px is a
thumbnail; outside it a value is a unit mistake (mm, nm, pixels per cm). The inference
runtimes (:mod:`tmequant.inference.runner`), named here so the CLI checks them without torch.
"""

from __future__ import annotations

import math

TILE_PX = 224
MPP_UM = 0.5
MPP_MIN_UM, MPP_MAX_UM = 0.05, 20.0
RUNTIMES = ("auto", "torch", "onnx")


def mpp_in_range(mpp_um: float | None) -> bool:
    """True when ``mpp_um`` is a finite pixel size in [MPP_MIN_UM, MPP_MAX_UM]."""
    return mpp_um is not None and math.isfinite(mpp_um) and MPP_MIN_UM <= mpp_um <= MPP_MAX_UM


def check_runtime(runtime: str) -> str:
    """The runtime's name, lower case; ValueError naming the choices for any other."""
    r = str(runtime).strip().lower()
    if r not in RUNTIMES:
        raise ValueError(f"--runtime {runtime!r}: use {', '.join(RUNTIMES)}")
    return r
