"""Write RGB images as tiled pyramidal TIFFs: Aperio-like SVS, generic TIFF, OME-TIFF.

Used by the tests, the benchmark slide and the phantom generator. Memory stays bounded for
any image size: level 0 is read one strip of ``tile_px`` rows at a time from an array-like
(ndarray, ``np.memmap``, zarr array) or a callable, and every coarser level is reduced from
the strip being written into a buffer 1/downsample^2 the size (memory-mapped when large).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import numpy as np

log = logging.getLogger("tmequant")

#: ``read(y0, x0, h, w) -> (h, w, 3) uint8``, level-0 pixel coordinates.
RegionReader = Callable[[int, int, int, int], np.ndarray]
ImageSource = Union[np.ndarray, Any, RegionReader]

FLAVORS = ("svs", "tiff", "ome")
_RAM_LEVEL_BYTES = 64 << 20  # coarser levels above this go to a temporary memmap


def _reader(image: ImageSource, shape: tuple[int, int] | None) -> tuple[RegionReader, int, int]:
    if callable(image) and not hasattr(image, "shape"):
        if shape is None:
            raise ValueError("shape=(height, width) is required when image is a callable")
        return image, int(shape[0]), int(shape[1])
    if len(image.shape) != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {tuple(image.shape)}")
    h, w = int(image.shape[0]), int(image.shape[1])
    arr: Any = image

    def read(y0: int, x0: int, hh: int, ww: int) -> np.ndarray:
        return np.asarray(arr[y0 : y0 + hh, x0 : x0 + ww, :3])

    return read, h, w


def _reduce(strip: np.ndarray, ds: int) -> np.ndarray:
    """Mean of ``ds x ds`` blocks (edge-replicated to a multiple of ds), rounded, uint8."""
    h, w = strip.shape[:2]
    ph, pw = (-h) % ds, (-w) % ds
    if ph or pw:
        strip = np.pad(strip, ((0, ph), (0, pw), (0, 0)), mode="edge")
    # sums of strided slices: ~8x less CPU than .sum(axis=(1, 3)) over a 5-D reshape
    rows = strip[0::ds].astype(np.uint32)
    for i in range(1, ds):
        rows += strip[i::ds]
    s = rows[:, 0::ds]
    for j in range(1, ds):
        s = s + rows[:, j::ds]
    return ((s + (ds * ds) // 2) // (ds * ds)).astype(np.uint8)


def _level_shapes(h: int, w: int, ds: int, tile_px: int, n_levels: int | None) -> list[tuple[int, int]]:
    shapes = [(h, w)]
    while True:
        if n_levels is not None and len(shapes) >= n_levels:
            break
        ph, pw = shapes[-1]
        if n_levels is None and max(ph, pw) <= tile_px:
            break
        nh, nw = math.ceil(ph / ds), math.ceil(pw / ds)
        if nh < 1 or nw < 1 or (nh, nw) == (ph, pw):
            break
        shapes.append((nh, nw))
    return shapes


def _svs_description(w: int, h: int, tile_px: int, quality: int, mpp_um: float | None,
                     app_mag: float | None, compression: str, level: int, w0: int, h0: int) -> str:
    codec = {"jpeg": "JPEG", "jpeg2000": "J2K"}.get(compression, compression.upper())
    head = "Aperio Image Library v12.0.15 \r\n"
    if level == 0:
        desc = f"{head}{w}x{h} [0,0 {w}x{h}] ({tile_px}x{tile_px}) {codec}/RGB Q={quality}"
    else:
        desc = f"{head}{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px}) -> {w}x{h} {codec}/RGB Q={quality}"
    if app_mag is not None:
        desc += f"|AppMag = {app_mag:g}"
    if mpp_um is not None:
        desc += f"|MPP = {mpp_um:.6g}"
    desc += "|Filename = tmequant-synthetic"
    return desc


def write_pyramid_tiff(
    path: str | os.PathLike[str],
    image: ImageSource,
    mpp_um: float | None,
    flavor: str = "svs",
    tile_px: int = 256,
    compression: str = "jpeg",
    quality: int = 90,
    n_levels: int | None = None,
    downsample: int = 4,
    *,
    shape: tuple[int, int] | None = None,
    app_mag: float | None = None,
    bigtiff: bool | None = None,
    maxworkers: int | None = None,
    associated: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write an RGB uint8 image as a tiled pyramidal TIFF and return its path.

    ``image``: (H, W, 3) uint8 array-like (ndarray, memmap, zarr array) or a callable
    ``read(y0, x0, h, w) -> (h, w, 3) uint8`` with ``shape=(H, W)``. ``mpp_um``: level-0
    microns per pixel, or None to write no pixel size anywhere. ``flavor``:

    - ``"svs"``: Aperio-like; ImageDescription ``Aperio Image Library ...|AppMag = m|MPP = x``,
      levels as top-level IFDs (OpenSlide vendor ``aperio``).
    - ``"tiff"``: generic pyramidal TIFF, levels as top-level IFDs, resolution tags in
      pixels per centimetre (OpenSlide vendor ``generic-tiff``).
    - ``"ome"``: OME-TIFF, levels in SubIFDs, ``PhysicalSizeX/Y`` in um (read with tifffile).

    Levels are reduced by ``downsample`` (2 or 4) until one fits in a tile, unless
    ``n_levels`` is given. ``compression``: ``jpeg`` (``quality`` 1-100), ``zlib``,
    ``lzw``, ``jpeg2000`` or ``none``. ``app_mag`` defaults to ``10 / mpp_um`` rounded.
    ``associated`` (svs only): ``{"label": rgb, "macro": rgb}`` written as associated images.
    """
    import tifffile

    _check_pyramid_args(flavor, downsample, tile_px, mpp_um)
    read, h0, w0 = _reader(image, shape)
    shapes = _level_shapes(h0, w0, downsample, tile_px, n_levels)
    if app_mag is None and mpp_um is not None:
        app_mag = float(round(10.0 / mpp_um))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if bigtiff is None:
        bigtiff = flavor == "ome" or h0 * w0 * 3 * 1.4 > 2**31

    comp, cargs = _compression_args(compression, quality)

    tmpdir = tempfile.TemporaryDirectory(prefix=".pyr-", dir=path.parent)
    try:
        with tifffile.TiffWriter(path, bigtiff=bigtiff, ome=(flavor == "ome")) as tif:
            src_read, src_h, src_w = read, h0, w0
            for level, (lh, lw) in enumerate(shapes):
                assert (lh, lw) == (src_h, src_w)
                nxt = _next_level_buffer(shapes, level, Path(tmpdir.name))
                tiles = _tiles(src_read, lh, lw, tile_px, downsample, nxt)
                lmpp = None if mpp_um is None else mpp_um * (downsample**level)
                kw: dict[str, Any] = dict(
                    shape=(lh, lw, 3), dtype=np.uint8, tile=(tile_px, tile_px),
                    photometric="rgb", compression=comp, compressionargs=cargs or None,
                    maxworkers=maxworkers,
                )
                if flavor == "svs":
                    # Aperio: levels are plain (not "reduced") tiled IFDs, IFD 1 is a stripped
                    # thumbnail; tifffile and OpenSlide both rely on that order.
                    kw["description"] = _svs_description(
                        lw, lh, tile_px, quality, mpp_um, app_mag, compression or "none", level, w0, h0)
                    kw["metadata"] = None
                elif flavor == "tiff":
                    kw.update(_generic_tiff_tags(level, lmpp))
                else:  # ome
                    kw.update(_ome_tags(level, len(shapes), mpp_um, path.name))
                tif.write(tiles, **kw)
                if flavor == "svs" and level == 0:
                    _write_svs_thumbnail(tif, nxt if nxt is not None else read(0, 0, h0, w0), w0, h0)
                if nxt is not None:
                    if isinstance(nxt, np.memmap):
                        nxt.flush()
                    src_read = _array_reader(nxt)
                    src_h, src_w = nxt.shape[:2]
            if flavor == "svs":
                _write_svs_associated(tif, associated or {})
    finally:
        try:
            tmpdir.cleanup()
        except OSError:  # pragma: no cover - a memmap still open on some platforms
            pass
    return path


def _check_pyramid_args(flavor: str, downsample: int, tile_px: int, mpp_um: float | None) -> None:
    if flavor not in FLAVORS:
        raise ValueError(f"flavor must be one of {FLAVORS}, got {flavor!r}")
    if downsample not in (2, 4):
        raise ValueError("downsample must be 2 or 4")
    if tile_px % 16 or tile_px < 16:
        raise ValueError("tile_px must be a positive multiple of 16")
    if mpp_um is not None and not (mpp_um > 0 and math.isfinite(mpp_um)):
        raise ValueError(f"mpp_um must be positive, got {mpp_um!r}")


def _compression_args(compression: str, quality: int) -> tuple[Any, dict[str, Any]]:
    """tifffile's ``compression`` and ``compressionargs`` for a compression name."""
    comp: Any = None if compression in (None, "none") else compression
    cargs: dict[str, Any] = {}
    if comp == "jpeg" or comp == "jpeg2000":
        cargs = {"level": int(quality)}
    elif comp == "zlib":
        cargs = {"level": 6}
    return comp, cargs


def _next_level_buffer(shapes: list[tuple[int, int]], level: int, tmpdir: Path) -> np.ndarray | None:
    """The buffer the next coarser level is reduced into (memory-mapped when large), or None
    after the last level."""
    nxt: np.ndarray | None = None
    if level + 1 < len(shapes):
        nh, nw = shapes[level + 1]
        nbytes = nh * nw * 3
        if nbytes > _RAM_LEVEL_BYTES:
            nxt = np.memmap(tmpdir / f"level{level + 1}.u8", dtype=np.uint8,
                            mode="w+", shape=(nh, nw, 3))
        else:
            nxt = np.empty((nh, nw, 3), np.uint8)
    return nxt


def _generic_tiff_tags(level: int, lmpp: float | None) -> dict[str, Any]:
    """Generic pyramidal TIFF: resolution in pixels per centimetre, coarser levels reduced."""
    kw: dict[str, Any] = {}
    kw["metadata"] = None
    if lmpp is not None:
        kw["resolution"] = (1e4 / lmpp, 1e4 / lmpp)
        kw["resolutionunit"] = "CENTIMETER"
    if level:
        kw["subfiletype"] = 1
    return kw


def _ome_tags(level: int, n_levels: int, mpp_um: float | None, name: str) -> dict[str, Any]:
    """OME-TIFF: the OME metadata on level 0, which holds the coarser levels as SubIFDs."""
    kw: dict[str, Any] = {}
    if level == 0:
        md: dict[str, Any] = {"axes": "YXS", "Name": name}
        if mpp_um is not None:
            md.update(PhysicalSizeX=mpp_um, PhysicalSizeXUnit="µm",
                      PhysicalSizeY=mpp_um, PhysicalSizeYUnit="µm")
        kw["metadata"] = md
        kw["subifds"] = n_levels - 1
    else:
        kw["subfiletype"] = 1
        kw["metadata"] = None
    return kw


def _write_svs_thumbnail(tif: Any, level: np.ndarray, w0: int, h0: int) -> None:
    """The Aperio thumbnail: a stripped IFD right after level 0."""
    thumb = _thumbnail(level)
    tif.write(thumb, photometric="rgb", compression="jpeg", metadata=None,
              compressionargs={"level": 90},
              description=f"Aperio Image Library v12.0.15 \r\n{w0}x{h0} -> "
                          f"{thumb.shape[1]}x{thumb.shape[0]} - ")


def _write_svs_associated(tif: Any, associated: dict[str, np.ndarray]) -> None:
    """Aperio associated images (label: LZW, others: JPEG), after the pyramid."""
    for i, (name, img) in enumerate(associated.items()):
        img = np.ascontiguousarray(img, dtype=np.uint8)[..., :3]
        tif.write(img, photometric="rgb", compression="lzw" if name == "label" else "jpeg",
                  metadata=None, subfiletype=1 if name == "label" else 9,
                  description=f"Aperio Image Library v12.0.15 \r\n{name} "
                              f"{img.shape[1]}x{img.shape[0]}")


def _array_reader(a: np.ndarray) -> RegionReader:
    def read(y0: int, x0: int, h: int, w: int) -> np.ndarray:
        return a[y0 : y0 + h, x0 : x0 + w]

    return read


def _thumbnail(level: np.ndarray, max_px: int = 768) -> np.ndarray:
    """A nearest-neighbour thumbnail (max side ``max_px``) of an in-memory or memmapped level."""
    step = max(1, math.ceil(max(level.shape[:2]) / max_px))
    return np.ascontiguousarray(level[::step, ::step, :3], dtype=np.uint8)


def _tiles(read: RegionReader, h: int, w: int, tile_px: int, ds: int,
           nxt: np.ndarray | None) -> Iterator[np.ndarray]:
    """Yield the level's tiles row by row; reduce each strip into ``nxt`` on the way."""
    for y in range(0, h, tile_px):
        sh = min(tile_px, h - y)
        strip = np.ascontiguousarray(read(y, 0, sh, w), dtype=np.uint8)
        if strip.shape != (sh, w, 3):
            raise ValueError(f"image reader returned {strip.shape}, expected {(sh, w, 3)}")
        if nxt is not None:
            red = _reduce(strip, ds)
            y1 = y // ds
            nxt[y1 : y1 + red.shape[0], : red.shape[1]] = red[: nxt.shape[0] - y1, : nxt.shape[1]]
        for x in range(0, w, tile_px):
            yield strip[:, x : x + tile_px]
