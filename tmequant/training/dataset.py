"""Pixels for a LabelSet: read, crop/resize to the model's tile, augment, normalise.

Tile image files are taken to be at the model's MPP already: larger ones are cropped to
``tile_px`` (a random crop in training, the centre otherwise) so the pixel size is kept;
smaller ones are resized up, with a warning. Slide tiles are read through
:mod:`tmequant.tiling` at the model's MPP exactly as inference reads them.
"""

from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from PIL import Image

from tmequant.errors import InputError
from tmequant.training.augment import AugmentConfig, MacenkoNormalizer, augment
from tmequant.training.labels import LabelSet, Sample, open_training_slide
from tmequant.wsi import read_resampled

log = logging.getLogger("tmequant")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def read_image(path: str | Path) -> np.ndarray:
    """An image file -> (H, W, 3) uint8 RGB (PIL first, tifffile for what PIL cannot read)."""
    p = Path(path)
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError("image not found", p) from None
    except Exception:  # PIL cannot read some TIFF compressions/bit depths
        try:
            arr = np.asarray(tifffile.imread(p))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"cannot read image ({type(e).__name__}: {e})", p) from None
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.dtype != np.uint8:
            arr = (arr.astype(np.float64) / max(float(arr.max()), 1.0) * 255).astype(np.uint8)
        return np.ascontiguousarray(arr[..., :3])


def _resize(rgb: np.ndarray, px: int) -> np.ndarray:
    if rgb.shape[0] == px and rgb.shape[1] == px:
        return rgb
    # area filter when shrinking (as tmequant.tiling reads slides), bicubic when enlarging
    down = rgb.shape[0] >= px and rgb.shape[1] >= px
    return np.asarray(
        Image.fromarray(np.ascontiguousarray(rgb)).resize(
            (px, px), Image.Resampling.BOX if down else Image.Resampling.BICUBIC
        )
    )


def fit_tile(rgb: np.ndarray, tile_px: int, rng: np.random.Generator | None) -> np.ndarray:
    """Crop (random with ``rng``, else centred) or resize an image to (tile_px, tile_px, 3)."""
    h, w = rgb.shape[:2]
    if h < tile_px or w < tile_px:
        return _resize(rgb, tile_px)
    if rng is not None:
        y0, x0 = int(rng.integers(h - tile_px + 1)), int(rng.integers(w - tile_px + 1))
    else:
        y0, x0 = (h - tile_px) // 2, (w - tile_px) // 2
    return rgb[y0 : y0 + tile_px, x0 : x0 + tile_px]


class TileReader:
    """Reads the tile of a Sample; keeps slides open and small images decoded (per process)."""

    def __init__(self, tile_px: int, mpp_um: float, cache_images_bytes: int = 1 << 30):
        self.tile_px, self.mpp_um = tile_px, mpp_um
        self._slides: dict[str, Any] = {}
        self._images: dict[str, np.ndarray] = {}
        self._cache_left = cache_images_bytes
        self._warned_small = False

    def __getstate__(self) -> dict[str, Any]:  # DataLoader workers open their own handles
        d = dict(self.__dict__)
        d["_slides"] = {}
        return d

    def _image(self, path: str) -> np.ndarray:
        img = self._images.get(path)
        if img is None:
            img = read_image(path)
            if img.nbytes <= self._cache_left:
                self._images[path] = img
                self._cache_left -= img.nbytes
        return img

    def _slide(self, s: Sample):
        sl = self._slides.get(s.path)
        if sl is None:
            sl = self._slides[s.path] = open_training_slide(s.path, s.mpp_override_um)
        return sl

    def read(self, s: Sample, rng: np.random.Generator | None = None) -> np.ndarray:
        """(tile_px, tile_px, 3) uint8 RGB of ``s`` (``rng`` picks a random crop of a file)."""
        if s.kind == "file":
            img = read_image(s.path)
            if (
                img.shape[0] < self.tile_px or img.shape[1] < self.tile_px
            ) and not self._warned_small:
                log.warning(
                    "%s is %dx%d px, smaller than the model's %d px tile: resized up "
                    "(the pixel size then differs from the model's)",
                    s.path,
                    img.shape[1],
                    img.shape[0],
                    self.tile_px,
                )
                self._warned_small = True
            return np.ascontiguousarray(fit_tile(img, self.tile_px, rng))
        if s.kind == "image":
            assert s.box is not None
            x, y, side = s.box
            img = self._image(s.path)
            x0, y0, n = int(round(x)), int(round(y)), int(round(side))
            crop = img[y0 : y0 + n, x0 : x0 + n]
            if crop.shape[0] != n or crop.shape[1] != n:
                raise InputError(
                    f"tile box {s.box} reaches outside the {img.shape[1]}x{img.shape[0]} image",
                    s.path,
                )
            return _resize(crop, self.tile_px)
        if s.kind == "slide":
            assert s.box is not None
            return read_slide_tile(self._slide(s), s.box, self.tile_px, self.mpp_um)
        raise ValueError(f"unknown sample kind {s.kind!r}")

    def close(self) -> None:
        for sl in self._slides.values():
            close = getattr(sl, "close", None)
            if close is not None:
                close()
        self._slides.clear()


def read_slide_tile(
    slide: Any, box: tuple[float, float, float], tile_px: int, mpp_um: float
) -> np.ndarray:
    """(tile_px, tile_px, 3) uint8 of the level-0 square ``box = (x0, y0, side)`` at ``mpp_um``.

    Same level choice (``best_level_for_mpp``) and resampling (``read_resampled``, an area
    filter) as ``tmequant.tiling.tile_slide``, so training sees the pixels inference sees.
    """
    x0, y0, side = box
    level = slide.best_level_for_mpp(mpp_um)
    return np.ascontiguousarray(
        read_resampled(slide, level, (x0, y0, x0 + side, y0 + side), (tile_px, tile_px)),
        dtype=np.uint8,
    )


def macenko_from_target(path: str | Path) -> tuple[MacenkoNormalizer, dict[str, Any]]:
    """(normaliser, ``ModelCard.stain_normalization`` dict) fitted on the image ``path``."""
    p = Path(path)
    try:
        norm = MacenkoNormalizer(read_image(p))
    except ValueError as e:
        raise InputError(f"--macenko-target: {e}; choose a tile with more tissue", p) from None
    sha = hashlib.sha256(p.read_bytes()).hexdigest()
    return norm, norm.card_params(source=f"{p.name} sha256:{sha}")


class TileDataset(torch.utils.data.Dataset):
    """``__getitem__(i)`` -> (x (3, H, W) float32 normalised, label int (-1: none),
    counts (C,) float32 (NaN: unknown)).

    Augmentation is seeded by (seed, epoch, i): call :meth:`set_epoch` before each epoch.
    """

    def __init__(
        self,
        labels: LabelSet,
        tile_px: int,
        mpp_um: float,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        augment_cfg: AugmentConfig | None = None,
        seed: int = 0,
        macenko: MacenkoNormalizer | None = None,
    ):
        self.labels = labels
        self.reader = TileReader(tile_px, mpp_um)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1) * 255.0
        self.augment_cfg = augment_cfg
        self.seed = seed
        self.epoch = 0
        self.macenko = macenko
        self.cls_index = {c: i for i, c in enumerate(labels.tissue_classes)}
        self.n_cell = len(labels.cell_classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels.samples)

    def image(self, i: int) -> np.ndarray:
        """The (H, W, 3) float32 0-255 tile of sample ``i`` after augmentation."""
        s = self.labels.samples[i]
        rng = (
            np.random.default_rng([self.seed, self.epoch, i])
            if self.augment_cfg is not None
            else None
        )
        rgb = self.reader.read(s, rng)
        if self.macenko is not None:
            rgb = self.macenko(rgb)
        if self.augment_cfg is None or rng is None:
            return rgb.astype(np.float32)
        # Zooming changes how many cells a tile holds: no scale jitter for count labels.
        return augment(rgb, rng, self.augment_cfg, allow_scale=s.counts is None)

    def __getitem__(self, i: int):
        s = self.labels.samples[i]
        img = self.image(i).transpose(2, 0, 1)
        x = torch.from_numpy(((img - self.mean) / self.std).astype(np.float32))
        label = self.cls_index[s.label] if s.label is not None else -1
        if s.counts is not None:
            counts = torch.tensor(s.counts, dtype=torch.float32)
        else:
            counts = torch.full((self.n_cell,), math.nan, dtype=torch.float32)
        return x, label, counts
