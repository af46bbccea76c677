"""Lossy image codecs for ``tiles/images``: a zarr v3 array-to-bytes codec over imagecodecs.

A chunk of ``(n, H, W, 3)`` uint8 tiles is stored as one image (the tiles stacked top to
bottom, ``(n * H, W, 3)``) in JPEG, JPEG XL or AVIF. With one tile per chunk (what
:meth:`tmequant.store.SlideStore.create_images` uses for lossy codecs) every tile is its own
image inside the shard, decoded on its own.

The codec's name in ``zarr.json`` is ``tmequant.image``; importing this module registers it
(:mod:`tmequant.store` does), so any store written by tmequant opens wherever tmequant is
installed. Which codec and level are the default is decided by measurement
(``scripts/bench_codecs.py``; README "Stored pixels"), against lossless blosc-lz4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import imagecodecs
import numpy as np
from zarr.abc.codec import ArrayBytesCodec
from zarr.core.buffer import Buffer, NDBuffer
from zarr.core.common import JSON, parse_named_configuration
from zarr.registry import register_codec

if TYPE_CHECKING:
    from typing import Self

    from zarr.core.array_spec import ArraySpec

CODEC_NAME = "tmequant.image"

# name -> (encode, decode, level range, default level). Levels: JPEG quality 1-100; JPEG XL
# quality 1-100 (libjxl's distance mapping; 100 is lossless); AVIF quality 0-100.
_CODECS: dict[str, tuple[Any, Any, tuple[int, int], int]] = {
    "jpeg": (imagecodecs.jpeg8_encode, imagecodecs.jpeg8_decode, (1, 100), 90),
    "jpegxl": (imagecodecs.jpegxl_encode, imagecodecs.jpegxl_decode, (1, 100), 90),
    "avif": (imagecodecs.avif_encode, imagecodecs.avif_decode, (0, 100), 90),
}
IMAGE_CODECS = tuple(_CODECS)


def parse_image_codec(text: str) -> tuple[str, int]:
    """``"jpeg"`` / ``"jpeg-95"`` / ``"jpegxl-90"`` -> (codec, level); ValueError naming the
    accepted forms otherwise."""
    name, _, lvl = str(text).strip().lower().partition("-")
    if name not in _CODECS:
        raise ValueError(f"unknown image codec {text!r}: use one of {', '.join(IMAGE_CODECS)}, "
                         "optionally with a level, e.g. jpeg-90")
    lo, hi = _CODECS[name][2]
    if not lvl:
        return name, _CODECS[name][3]
    if not lvl.isdigit() or not lo <= int(lvl) <= hi:
        raise ValueError(f"image codec {text!r}: the level must be an integer in {lo}-{hi}")
    return name, int(lvl)


def encode_image(rgb: np.ndarray, codec: str, level: int) -> bytes:
    """(H, W, 3) uint8 -> encoded bytes."""
    enc = _CODECS[codec][0]
    if codec == "jpeg":
        # 4:4:4: no chroma subsampling, so eosin/haematoxylin edges keep their colour
        return bytes(enc(rgb, level=level, subsampling="444"))
    if codec == "jpegxl":
        return bytes(enc(rgb, level=level, effort=3))
    return bytes(enc(rgb, level=level, speed=8))


def decode_image(data: bytes, codec: str) -> np.ndarray:
    """Encoded bytes -> (H, W, 3) uint8."""
    out = np.asarray(_CODECS[codec][1](data))
    return out[..., :3] if out.ndim == 3 else np.repeat(out[..., None], 3, axis=2)


@dataclass(frozen=True)
class ImageCodec(ArrayBytesCodec):
    """zarr v3 array -> bytes codec: (n, H, W, 3) uint8 chunks as one lossy image."""

    is_fixed_size = False

    codec: str = "jpeg"
    level: int = 90

    def __init__(self, *, codec: str = "jpeg", level: int | None = None) -> None:
        name, lvl = parse_image_codec(codec if level is None else f"{codec}-{level}")
        object.__setattr__(self, "codec", name)
        object.__setattr__(self, "level", lvl)

    @classmethod
    def from_dict(cls, data: dict[str, JSON]) -> Self:
        _, cfg = parse_named_configuration(data, CODEC_NAME, require_configuration=True)
        cfg = cfg or {}
        return cls(codec=str(cfg["codec"]), level=int(cfg["level"]))  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, JSON]:
        return {"name": CODEC_NAME, "configuration": {"codec": self.codec, "level": self.level}}

    def validate(self, *, shape: tuple[int, ...], dtype: Any, chunk_grid: Any) -> None:
        if len(shape) != 4 or shape[-1] != 3 or np.dtype(dtype.to_native_dtype()) != np.uint8:
            raise ValueError(f"{CODEC_NAME} stores (n, H, W, 3) uint8 arrays, not {shape} {dtype}")

    def _decode_sync(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        img = decode_image(chunk_bytes.to_bytes(), self.codec)
        arr: Any = np.ascontiguousarray(img).reshape(chunk_spec.shape)
        return chunk_spec.prototype.nd_buffer.from_ndarray_like(arr)

    async def _decode_single(self, chunk_bytes: Buffer, chunk_spec: ArraySpec) -> NDBuffer:
        return self._decode_sync(chunk_bytes, chunk_spec)

    def _encode_sync(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        a = np.asarray(chunk_array.as_ndarray_like())
        n, h, w, c = a.shape
        data = encode_image(np.ascontiguousarray(a.reshape(n * h, w, c)), self.codec, self.level)
        return chunk_spec.prototype.buffer.from_bytes(data)

    async def _encode_single(self, chunk_array: NDBuffer, chunk_spec: ArraySpec) -> Buffer | None:
        return self._encode_sync(chunk_array, chunk_spec)

    def compute_encoded_size(self, input_byte_length: int, _chunk_spec: ArraySpec) -> int:
        raise NotImplementedError  # variable size: zarr never asks for a variable-size codec


register_codec(CODEC_NAME, ImageCodec)
