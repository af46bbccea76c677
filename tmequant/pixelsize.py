"""The size of a slide's level-0 pixel along x and y: the one place lengths become pixels.

Stored coordinates (tile corners, cell centres) are level-0 pixels of the slide file, so a
QuPath overlay matches the file. Most slides have square pixels; some scanners (and
resampled exports) do not, e.g. 0.25 um wide and 0.5 um tall. Every conversion between
level-0 pixels and micrometres goes through :class:`PixelSize`, per axis:

>>> px = PixelSize(0.25, 0.5)
>>> px.to_um(400, 200)             # level-0 px -> um
(100.0, 100.0)
>>> px.px(112.0)                   # a 112 um length spans (x px, y px)
(448.0, 224.0)
>>> round(px.mean_um, 4), px.area_um2
(0.3536, 0.125)

``mean_um`` (the store's ``slide_mpp_um``) is the side of a square pixel of the same area:
right for areas of level-0 pixels (``px_count * mean_um**2``), never a length unless the
pixels are square. For square pixels every method computes exactly what ``x * mpp`` and
``um / mpp`` with the one size compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PixelSize:
    """Level-0 pixel size in micrometres along x (``x_um``) and y (``y_um``)."""

    x_um: float
    y_um: float

    def __post_init__(self) -> None:
        for name in ("x_um", "y_um"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"pixel size {name} must be a positive number, got {v!r}")
            object.__setattr__(self, name, float(v))

    @classmethod
    def square(cls, mpp_um: float) -> PixelSize:
        return cls(mpp_um, mpp_um)

    @property
    def is_square(self) -> bool:
        return self.x_um == self.y_um

    @property
    def mean_um(self) -> float:
        """Geometric mean sqrt(x * y): the side of a square pixel of the same area
        (``x_um`` itself for square pixels)."""
        return self.x_um if self.is_square else math.sqrt(self.x_um * self.y_um)

    @property
    def coarsest_um(self) -> float:
        """The larger of the two sizes (a level is fine enough for a target when this is)."""
        return self.x_um if self.is_square else max(self.x_um, self.y_um)

    @property
    def area_um2(self) -> float:
        """Area of one level-0 pixel, um^2."""
        return self.x_um * self.y_um

    def to_um(self, x: Any, y: Any) -> tuple[Any, Any]:
        """Level-0 px (numbers or arrays) -> micrometres, per axis."""
        return x * self.x_um, y * self.y_um

    def to_px(self, x_um: Any, y_um: Any) -> tuple[Any, Any]:
        """Micrometres (numbers or arrays) -> level-0 px, per axis."""
        return x_um / self.x_um, y_um / self.y_um

    def px(self, length_um: float) -> tuple[float, float]:
        """Level-0 px spanned by ``length_um`` along x and along y."""
        return length_um / self.x_um, length_um / self.y_um

    def describe(self) -> str:
        """``0.25 um/px`` or ``0.25 x 0.5 um/px`` (x first)."""
        if self.is_square:
            return f"{self.x_um:.4g} um/px"
        return f"{self.x_um:.4g} x {self.y_um:.4g} um/px"


def pitch_xy(pitch: float | tuple[float, float] | list[float]) -> tuple[float, float]:
    """A length in level-0 px given as one number (square pixels) or as (x, y) -> (x, y)."""
    if isinstance(pitch, (tuple, list)):
        px, py = pitch
        return float(px), float(py)
    p = float(pitch)
    return p, p


__all__ = ["PixelSize", "pitch_xy"]
