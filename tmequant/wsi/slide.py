"""Open whole-slide images (OpenSlide first, tifffile for what OpenSlide cannot) and resolve MPP.

Pixel size (MPP, microns per level-0 pixel) is resolved in this order, and the source is
recorded: ``override`` (the user's ``--mpp-override`` or manifest ``mpp``, when given: an
explicit value wins, and a disagreement with the file is logged) -> ``vendor`` (OpenSlide's
``openslide.mpp-x/y`` from vendor metadata) -> ``tiff-resolution`` (X/YResolution with a real
unit, centimetre or inch, and a plausible value) -> ``ome`` (``PhysicalSizeX/Y``). It is never
estimated from the objective power. Values outside 0.05-20 um/px are refused.

Pixels need not be square: x and y sizes differing by more than 1% are carried separately
(``SlideInfo.pixel_size``, :class:`tmequant.pixelsize.PixelSize`) and every later step
converts level-0 pixels per axis; within 1% they are one size, their mean (as before).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from tmequant.defaults import MPP_MAX_UM, MPP_MIN_UM, mpp_in_range
from tmequant.errors import SlideError
from tmequant.pixelsize import PixelSize
from tmequant.wsi import jpeg

log = logging.getLogger("tmequant")

# x and y pixel sizes within 1% of each other are one size (their mean: a length is then off
# by < 0.5%, an area by < 0.003%); beyond, they are carried separately (PixelSize)
NON_SQUARE_TOLERANCE = 0.01
MPP_SOURCES = ("vendor", "tiff-resolution", "ome", "override")
MAX_OME_XML_CHARS = 16 << 20
_UNIT_TO_UM = {"m": 1e6, "cm": 1e4, "mm": 1e3, "µm": 1.0, "um": 1.0, "μm": 1.0, "micron": 1.0,
               "nm": 1e-3, "pm": 1e-6}
# TIFF-based formats whose levels are plain tiled pages (read directly, see _TiledTiffLevels)
_FAST_VENDORS = ("aperio", "generic-tiff")
_NO_MPP_FIX = ("has no pixel size (MPP) in its metadata; give it in an `mpp` column of a CSV "
               "manifest (slide_id,path,mpp), or with --mpp-override X (used only for slides "
               "without an MPP)")


@dataclass(frozen=True)
class SlideInfo:
    """What a slide is: reader, vendor, pyramid geometry, associated images and pixel size.

    ``level_dimensions`` are (width, height) in pixels per level; ``level_downsamples`` are
    level-0 pixels per level pixel (the pyramid's integer factor where the sizes show one,
    see :func:`nominal_downsamples`); ``mpp_x_um``, ``mpp_y_um`` are level-0 microns per
    pixel along x and y (equal for square pixels, see :attr:`pixel_size`); ``mpp_um`` is one
    size: for square pixels that size, otherwise the geometric mean sqrt(x * y) (right for
    areas, never for a length).
    """

    path: str
    reader: str  # "openslide" | "tifffile"
    vendor: str
    level_dimensions: tuple[tuple[int, int], ...]
    level_downsamples: tuple[float, ...]
    associated_images: tuple[str, ...]
    mpp_um: float | None
    mpp_source: str | None
    mpp_x_um: float | None = None
    mpp_y_um: float | None = None
    objective_power: float | None = None  # reported only; never used for MPP
    properties: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 (width, height) in pixels."""
        return self.level_dimensions[0]

    def level_mpp_um(self, level: int) -> float:
        """Microns per pixel of ``level`` (requires a resolved MPP; see ``mpp_um``)."""
        if self.mpp_um is None:
            raise SlideError(_NO_MPP_FIX, self.path)
        return self.mpp_um * self.level_downsamples[level]

    @property
    def pixel_size(self) -> PixelSize:
        """Level-0 pixel size along x and y (requires a resolved MPP)."""
        if self.mpp_um is None:
            raise SlideError(_NO_MPP_FIX, self.path)
        mx = self.mpp_x_um if self.mpp_x_um is not None else self.mpp_um
        my = self.mpp_y_um if self.mpp_y_um is not None else self.mpp_um
        return PixelSize(mx, my)


def _float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) and f > 0 else None


def _plausible(mpp: float | None) -> bool:
    return mpp_in_range(mpp)


def _mpp_from_resolution(xres: Any, yres: Any, unit: Any) -> tuple[float, float] | None:
    """X/YResolution (pixels per unit) -> um/px, only for a real unit (cm or inch)."""
    u = str(unit).lower() if unit is not None else ""
    um_per_unit = {"centimeter": 1e4, "3": 1e4, "cm": 1e4, "inch": 25400.0, "2": 25400.0}.get(u)
    if um_per_unit is None:
        return None

    def conv(r: Any) -> float | None:
        if isinstance(r, tuple) and len(r) == 2:
            r = r[0] / r[1] if r[1] else None
        f = _float(r)
        return um_per_unit / f if f else None

    mx, my = conv(xres), conv(yres if yres is not None else xres)
    if mx is None or my is None or not (math.isfinite(mx) and math.isfinite(my)) or mx <= 0 or my <= 0:
        return None
    # An implausible value is returned as it is: resolve_mpp names it ("pixel size 1e+04
    # um/px (tiff-resolution) is outside ..."), where dropping it read "has no pixel size".
    return mx, my


def _mpp_from_ome(ome_xml: str | None) -> tuple[float, float] | None:
    if not ome_xml:
        return None
    if len(ome_xml) > MAX_OME_XML_CHARS:  # untrusted XML: bounded (expat fetches no entities)
        log.warning("OME-XML of %d characters is over the %d limit; its pixel size is ignored",
                    len(ome_xml), MAX_OME_XML_CHARS)
        return None
    try:
        root = ET.fromstring(ome_xml)
    except ET.ParseError:  # also entity-expansion bombs (expat >= 2.4 refuses them)
        return None
    for el in root.iter():
        if el.tag.endswith("Pixels"):
            sx, sy = _float(el.get("PhysicalSizeX")), _float(el.get("PhysicalSizeY"))
            if sx is None:
                return None
            ux = _UNIT_TO_UM.get(el.get("PhysicalSizeXUnit", "µm"))
            uy = _UNIT_TO_UM.get(el.get("PhysicalSizeYUnit", "µm"))
            if ux is None or uy is None:
                return None
            return sx * ux, (sy if sy is not None else sx) * uy
    return None


def resolve_mpp(
    path: str,
    vendor_mpp: tuple[float | None, float | None],
    tiff_mpp: tuple[float, float] | None,
    ome_mpp: tuple[float, float] | None,
    override_um: float | None,
    require: bool = True,
) -> tuple[float | None, float | None, float | None, str | None]:
    """Pick (mpp_um, mpp_x_um, mpp_y_um, source) in the documented order; refuse bad values.

    x and y within NON_SQUARE_TOLERANCE are one size, their mean (``mpp_um = mpp_x_um =
    mpp_y_um``); non-square pixels keep both, with ``mpp_um`` their geometric mean.
    """
    found: tuple[float, float, str] | None = None
    vx, vy = vendor_mpp
    candidates: list[tuple[float, float, str]] = []
    if vx is not None:
        candidates.append((vx, vy if vy is not None else vx, "vendor"))
    if tiff_mpp is not None:
        candidates.append((tiff_mpp[0], tiff_mpp[1], "tiff-resolution"))
    if ome_mpp is not None:
        candidates.append((ome_mpp[0], ome_mpp[1], "ome"))
    # the first plausible source in the documented order; with none, the first implausible
    # one, so the error below names the value the file holds
    plausible = [c for c in candidates if _plausible(c[0]) and _plausible(c[1])]
    found = (plausible or candidates)[0] if candidates else None
    if override_um is not None:
        ov = _float(override_um)
        if not _plausible(ov):
            raise SlideError(
                f"MPP override {override_um!r} is outside {MPP_MIN_UM}-{MPP_MAX_UM} um/px", path)
        assert ov is not None
        if found is not None:
            fm = (found[0] + found[1]) / 2
            if abs(fm - ov) > 0.05 * ov:
                log.warning("%s: MPP override %.4g um/px replaces the file's %.4g (%s)",
                            path, ov, fm, found[2])
        return ov, ov, ov, "override"
    if found is None:
        if require:
            raise SlideError(_NO_MPP_FIX, path)
        return None, None, None, None
    mx, my, src = found
    square = abs(mx - my) <= NON_SQUARE_TOLERANCE * max(mx, my)
    if not (_plausible(mx) and _plausible(my)):
        shown = f"{(mx + my) / 2:.4g}" if square else f"{mx:.4g} x {my:.4g}"
        raise SlideError(
            f"pixel size {shown} um/px ({src}) is outside {MPP_MIN_UM}-{MPP_MAX_UM} um/px; "
            "give the right value with --mpp-override X", path)
    if square:
        mpp = (mx + my) / 2
        return mpp, mpp, mpp, src
    # Non-square pixels (0.25 x 0.5 um): carried separately. Their mean (0.375) put every
    # area off by ~12% (0.375^2 vs 0.125 um^2); the geometric mean is only for areas.
    log.info("%s: pixels are not square (%.4g x %.4g um/px, %s): x and y are converted "
             "separately", path, mx, my, src)
    return math.sqrt(mx * my), mx, my, src


class Slide:
    """An open slide. Use as a context manager; reading is thread-safe.

    >>> with open_slide("a.svs") as s:                  # doctest: +SKIP
    ...     rgb = s.read_region((1000, 2000), 0, (512, 512))  # (512, 512, 3) uint8
    """

    def __init__(self, info: SlideInfo, backend: Any):
        self.info = info
        self._b = backend

    # -- context manager ----------------------------------------------------------------
    def __enter__(self) -> Slide:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._b.close()

    # -- reading ------------------------------------------------------------------------
    # -- geometry, as OpenSlide names it ------------------------------------------------
    @property
    def level_count(self) -> int:
        return self.info.level_count

    @property
    def level_dimensions(self) -> tuple[tuple[int, int], ...]:
        """(width, height) in pixels per level."""
        return self.info.level_dimensions

    @property
    def level_downsamples(self) -> tuple[float, ...]:
        """Level-0 pixels per level pixel (the pyramid's integer factors, see SlideInfo)."""
        return self.info.level_downsamples

    @property
    def properties(self) -> dict[str, str]:
        return self.info.properties

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """OpenSlide's arguments: ``location`` (x, y) of the top-left corner in level-0 px,
        ``level``, ``size`` (w, h) in level px. Unlike OpenSlide it returns an (h, w, 3)
        uint8 RGB array, with pixels outside the slide (and transparent ones) white.
        """
        (x0, y0), (w, h) = location, size
        if not 0 <= level < self.info.level_count:
            raise SlideError(f"level {level} does not exist (0-{self.info.level_count - 1})",
                             self.info.path)
        if w <= 0 or h <= 0:
            return np.full((max(h, 0), max(w, 0), 3), 255, np.uint8)
        k = self.info.level_downsamples[level]
        lw, lh = self.info.level_dimensions[level]
        lx, ly = math.floor(x0 / k), math.floor(y0 / k)
        # Clip to the level and pad with white here: OpenSlide truncates negative level
        # coordinates toward zero, which would shift a region that starts outside the slide.
        cx0, cy0, cx1, cy1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        try:
            if cx1 <= cx0 or cy1 <= cy0:
                return np.full((h, w, 3), 255, np.uint8)
            if (cx0, cy0, cx1, cy1) == (lx, ly, lx + w, ly + h):
                return self._b.read_region(level, int(x0), int(y0), int(w), int(h))
            out = np.full((h, w, 3), 255, np.uint8)
            out[cy0 - ly : cy1 - ly, cx0 - lx : cx1 - lx] = self._b.read_region(
                level, round(cx0 * k), round(cy0 * k), cx1 - cx0, cy1 - cy0)
            return out
        except SlideError:
            raise
        except Exception as e:  # a corrupt tile deep inside the file
            raise SlideError(f"cannot read region at level {level} ({x0}, {y0}, {w}x{h}): "
                             f"{type(e).__name__}: {e}", self.info.path) from None

    def read_region_scaled(self, location: tuple[int, int], level: int, size: tuple[int, int],
                           factor: int, dct: bool = False,
                           only: np.ndarray | None = None) -> np.ndarray | None:
        """:meth:`read_region` averaged over ``factor`` x ``factor`` pixels, (h // f, w // f, 3),
        from the level's JPEG tiles one at a time: decoded in full and box-averaged, exactly
        what reading the region and Pillow's ``reduce(factor)`` give (``dct=False``), or
        decoded at 1/``factor`` (2 or 4) in the DCT domain (``dct=True``: faster, within about
        one grey level). None where that is not possible exactly (the region must lie inside
        the level, on the factor's grid, in 3-sample JPEG tiles; multiples of 8 * factor for
        ``dct``): read in full then. ``only``: (k, 4) boxes (x0, y0, x1, y1, output px) the
        caller will use; JPEG tiles under none of them are skipped and left white."""
        (x0, y0), (w, h) = location, size
        k = self.info.level_downsamples[level]
        lw, lh = self.info.level_dimensions[level]
        lx, ly = math.floor(x0 / k), math.floor(y0 / k)
        if not (0 <= level < self.info.level_count and lx >= 0 and ly >= 0
                and lx + w <= lw and ly + h <= lh and w > 0 and h > 0 and factor >= 1):
            return None
        fast: _TiledTiffLevels | None = getattr(self._b, "fast", None)  # both backends have one
        if fast is None or level not in fast.pages:
            return None
        try:
            return fast.read_scaled(level, lx, ly, int(w), int(h), int(factor), dct, only)
        except Exception as e:  # a corrupt tile deep inside the file
            raise SlideError(f"cannot read region at level {level} ({x0}, {y0}, {w}x{h}) at 1/{factor}: "
                             f"{type(e).__name__}: {e}", self.info.path) from None

    def best_level_for_mpp(self, mpp_um: float) -> int:
        """Coarsest level whose MPP is not coarser than ``mpp_um`` (0 if none is); with
        non-square pixels, along neither axis."""
        coarsest = self.info.pixel_size.coarsest_um
        best = 0
        for lv, ds in enumerate(self.info.level_downsamples):
            if coarsest * ds <= mpp_um * (1 + 1e-3) and ds >= self.info.level_downsamples[best]:
                best = lv
        return best

    def read_thumbnail(self, mpp_um: float) -> np.ndarray:
        """Whole slide as (h, w, 3) uint8 at ``mpp_um`` microns per pixel along both axes
        (area-averaged; square output pixels whatever the slide's).

        ``w = ceil(level-0 width * slide_mpp_x / mpp_um)``, ``h`` likewise with y; read in
        strips so memory stays bounded by the output size.
        """
        from tmequant.wsi.resample import read_resampled

        dsx, dsy = self.info.pixel_size.px(mpp_um)  # level-0 px per output px, x and y
        w0, h0 = self.info.dimensions
        ow, oh = max(1, math.ceil(w0 / dsx)), max(1, math.ceil(h0 / dsy))
        level = self.best_level_for_mpp(mpp_um)
        out = np.empty((oh, ow, 3), np.uint8)
        # output rows per strip so that one read stays under ~64 MB of RGBA
        lds = self.info.level_downsamples[level]
        bytes_per_out_row = (w0 / lds) * (dsy / lds) * 4
        strip = min(oh, max(8, int((64 << 20) / max(bytes_per_out_row, 1.0))))
        for y in range(0, oh, strip):
            sh = min(strip, oh - y)
            out[y : y + sh] = read_resampled(self, level, (0.0, y * dsy, ow * dsx, (y + sh) * dsy),
                                             (ow, sh))
        return out

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.info.dimensions

    def __repr__(self) -> str:
        i = self.info
        return (f"Slide({i.path!r}, reader={i.reader}, vendor={i.vendor}, levels={i.level_count}, "
                f"mpp_um={i.mpp_um}, mpp_source={i.mpp_source})")


# --- backends -----------------------------------------------------------------------------
def nominal_downsamples(dims: tuple[tuple[int, int], ...]) -> tuple[float, ...]:
    """Level downsamples, snapped to the integer factor the pyramid was built with.

    A level made by reducing level 0 by k has size ceil or floor(level-0 size / k), so the
    ratio of sizes (what OpenSlide reports, e.g. 15.95) is off by up to a pixel at the far
    edge; the integer k maps coordinates exactly. Non-integer ratios are kept as they are.
    """
    w0, h0 = dims[0]
    out = []
    for w, h in dims:
        r = w0 / w
        k = round(r)
        ok = k >= 1 and all(abs(v - v0 / k) < 1.0 for v, v0 in ((w, w0), (h, h0)))
        out.append(float(k) if ok else r)
    return tuple(out)


class _TiledTiffLevels:
    """Direct tile decoding of the TIFF pages behind OpenSlide's levels (SVS, generic TIFF).

    OpenSlide decodes, composites and converts to ARGB one region at a time (~15 MP/s here);
    reading the raw tiles with ``os.pread`` and decoding them with tifffile's codec
    (imagecodecs: libjpeg-turbo, OpenJPEG) from several threads is several times faster.
    Only levels that are plain tiled 8-bit RGB/YCbCr pages are taken; the others stay with
    OpenSlide. Thread-safe (``pread`` has no shared file position).
    """

    _CODECS = {1, 5, 7, 8, 32946, 33003, 33005, 34712}  # none, LZW, JPEG, deflate, JPEG 2000

    def __init__(self, path: Path, dims: tuple[tuple[int, int], ...], series_levels: list[Any] | None = None):
        import tifffile

        self.pages: dict[int, Any] = {}
        self._tf = tifffile.TiffFile(path)
        if series_levels is not None:  # OME: the levels of series 0 (SubIFDs)
            candidates = [lv.keyframe for lv in series_levels]
        else:
            candidates = list(self._tf.pages)
        by_size: dict[tuple[int, int], Any] = {}
        for page in candidates:
            if (page.is_tiled and page.bitspersample == 8 and page.samplesperpixel in (3, 4)
                    and page.planarconfig == 1 and page.photometric in (2, 6)
                    and page.compression in self._CODECS and page.imagedepth == 1):
                by_size.setdefault((page.imagewidth, page.imagelength), page)
        for level, wh in enumerate(dims):
            if wh in by_size:
                self.pages[level] = by_size[wh]
        self._fd = os.open(path, os.O_RDONLY)
        self._decoders = {lv: pg.decode for lv, pg in self.pages.items()}

    def read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """(h, w, 3) uint8 of level pixels [ly, ly+h) x [lx, lx+w), inside the level."""
        page = self.pages[level]
        decode = self._decoders[level]
        tw, th = page.tilewidth, page.tilelength
        ntx = -(-page.imagewidth // tw)
        tables = page.jpegtables
        out = np.empty((h, w, 3), np.uint8)
        offsets, counts = page.dataoffsets, page.databytecounts
        for ty in range(ly // th, (ly + h - 1) // th + 1):
            for tx in range(lx // tw, (lx + w - 1) // tw + 1):
                idx = ty * ntx + tx
                y0, x0 = ty * th, tx * tw
                ys, ye = max(ly, y0), min(ly + h, y0 + th)
                xs, xe = max(lx, x0), min(lx + w, x0 + tw)
                if counts[idx] == 0:  # sparse tile: nothing was scanned there
                    out[ys - ly : ye - ly, xs - lx : xe - lx] = 255
                    continue
                data = os.pread(self._fd, counts[idx], offsets[idx])
                tile = decode(data, idx, jpegtables=tables)[0]
                tile = tile.reshape(tile.shape[-3:])  # (th, tw, samples)
                out[ys - ly : ye - ly, xs - lx : xe - lx] = tile[ys - y0 : ye - y0, xs - x0 : xe - x0, :3]
        return out

    def read_scaled(self, level: int, lx: int, ly: int, w: int, h: int, f: int,
                    dct: bool = False, only: np.ndarray | None = None) -> np.ndarray | None:
        """(h // f, w // f, 3) uint8: level pixels [ly, ly+h) x [lx, lx+w) reduced by ``f``
        one JPEG tile at a time, or None where that is not exact: a page that is not 3-sample
        JPEG, tiles or a region off the f grid (then a 2 x 2 cell would span two tiles).

        ``dct=False``: each tile decoded in full, straight to RGBX (which Pillow maps without
        a copy), and box-averaged by Pillow's ``reduce`` while in cache: bit-identical to
        decoding the region and reducing it (rounding half up), at a fraction of the copies.
        ``dct=True``: each tile decoded at 1/``f`` (2 or 4, tiles multiples of 8 * f) in
        the DCT domain (:mod:`tmequant.wsi.jpeg`): faster, not identical. ``only``: (k, 4)
        x0, y0, x1, y1 boxes in output px that the caller will use; a tile under none of
        them is not decoded (left white)."""
        page = self.pages[level]
        tw, th = page.tilewidth, page.tilelength
        if (page.compression != 7 or page.samplesperpixel != 3 or page.extrasamples
                or tw % f or th % f or lx % f or ly % f or w % f or h % f
                or (dct and (f not in jpeg.SCALES or tw % (8 * f) or th % (8 * f)))):
            return None
        rgb = page.photometric == 2  # Photometric=RGB: stored without colour transform
        tables = page.jpegtables
        if dct:
            def decode(data: bytes) -> np.ndarray:
                return jpeg.decode_scaled(jpeg.jpeg_stream(data, tables, rgb), f, (tw, th))
        else:
            # tifffile's colour spaces (Aperio's RGB JPEG carries no marker saying so);
            # libjpeg-turbo's RGBX output: 4 bytes a pixel, Pillow's own layout
            import imagecodecs
            from PIL import Image

            cs = 2 if rgb and not page.is_jfif else None
            rgbx = np.empty((th, tw, 4), np.uint8)  # one per call: threads share the reader

            def decode(data: bytes) -> np.ndarray:
                imagecodecs.jpeg8_decode(data, tables=tables, colorspace=cs, outcolorspace=7, out=rgbx)
                im = Image.frombuffer("RGBX", (tw, th), rgbx, "raw", "RGBX", 0, 1).reduce(f)
                return np.frombuffer(im.tobytes("raw", "RGB"), np.uint8).reshape(th // f, tw // f, 3)
        ntx = -(-page.imagewidth // tw)
        sw, sh, stw, sth = w // f, h // f, tw // f, th // f
        out = np.empty((sh, sw, 3), np.uint8)
        offsets, counts = page.dataoffsets, page.databytecounts
        ty0, tx0 = ly // th, lx // tw
        need = None if only is None else _tiles_under(only, f, lx - tx0 * tw, ly - ty0 * th, tw, th,
                                                       (ly + h - 1) // th - ty0 + 1,
                                                       (lx + w - 1) // tw - tx0 + 1)
        for ty in range(ty0, (ly + h - 1) // th + 1):
            for tx in range(tx0, (lx + w - 1) // tw + 1):
                idx = ty * ntx + tx
                # tile and region in scaled pixels
                y0, x0 = ty * sth, tx * stw
                ys, ye = max(ly // f, y0), min((ly + h) // f, y0 + sth)
                xs, xe = max(lx // f, x0), min((lx + w) // f, x0 + stw)
                dst = out[ys - ly // f : ye - ly // f, xs - lx // f : xe - lx // f]
                # a sparse tile (nothing scanned there), or one under no kept tile (the
                # tiler decodes only what it keeps): glass
                if counts[idx] == 0 or (need is not None and not need[ty - ty0, tx - tx0]):
                    dst[...] = 255
                    continue
                tile = decode(os.pread(self._fd, counts[idx], offsets[idx]))
                dst[...] = tile[ys - y0 : ye - y0, xs - x0 : xe - x0, :3]
        return out

    def close(self) -> None:
        os.close(self._fd)
        self._tf.close()


def _tiles_under(boxes: np.ndarray, f: int, ox: int, oy: int, tw: int, th: int,
                 n_rows: int, n_cols: int) -> np.ndarray:
    """(n_rows, n_cols) bool: which tiles of a region overlap one of ``boxes`` ((k, 4)
    x0, y0, x1, y1 in the region's output px, ``f`` level px each); the region starts
    ``ox``, ``oy`` level px into its first tile."""
    need = np.zeros((n_rows, n_cols), bool)
    for x0, y0, x1, y1 in np.asarray(boxes, np.int64).tolist():
        if x1 > x0 and y1 > y0:
            need[(oy + y0 * f) // th:(oy + y1 * f - 1) // th + 1,
                 (ox + x0 * f) // tw:(ox + x1 * f - 1) // tw + 1] = True
    return need


class _OpenSlideBackend:
    def __init__(self, osr: Any, scales: tuple[float, ...], fast: _TiledTiffLevels | None = None):
        self.osr = osr
        self.scales = scales  # nominal downsamples (ours); OpenSlide's are size ratios
        self.os_ds = tuple(float(d) for d in osr.level_downsamples)
        self.fast = fast

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if self.fast is not None and level in self.fast.pages:
            k = self.scales[level]
            return self.fast.read(level, math.floor(x0 / k), math.floor(y0 / k), w, h)
        return self._read_openslide(level, x0, y0, w, h)

    def _read_openslide(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        if level:
            # level pixel (floor(x0 / k)) -> the level-0 coordinate OpenSlide maps onto it
            # exactly (OpenSlide interpolates fractional level coordinates)
            k, d = self.scales[level], self.os_ds[level]
            x0 = math.ceil(math.floor(x0 / k) * d - 1e-6)
            y0 = math.ceil(math.floor(y0 / k) * d - 1e-6)
        rgba = np.asarray(self.osr.read_region((x0, y0), level, (w, h)))
        return rgba_to_rgb_white(rgba)

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.osr.close()


def rgba_to_rgb_white(rgba: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied RGBA -> RGB composited on white (transparent -> 255)."""
    rgb = rgba[..., :3]
    a = rgba[..., 3]
    if a.min() == 255:
        return np.ascontiguousarray(rgb)
    # premultiplied: out = rgb + (255 - a) * white / 255
    return (rgb.astype(np.uint16) + (255 - a)[..., None]).clip(0, 255).astype(np.uint8)


class _TiffBackend:
    """Level arrays through tifffile's zarr store (decodes only the tiles a region touches)."""

    def __init__(self, path: str, tf: Any, series: Any):
        self.tf = tf
        self.levels = []
        self._lock = threading.Lock()
        for lv in range(len(series.levels)):
            big = _oversized_chunk(series.levels[lv].keyframe)
            if big is None:
                self.levels.append(_open_level(series.aszarr(level=lv)))
                continue
            page = series.levels[lv].keyframe
            if page.is_memmappable and "".join(series.axes) in ("YXS", "YX"):
                # uncompressed: read regions straight from the file (the page cache holds them)
                self.levels.append(np.memmap(path, dtype=page.dtype, mode="r",
                                             offset=int(page.dataoffsets[0]), shape=page.shape))
                continue
            raise SlideError(
                f"level {lv} is stored as compressed {big / 2**20:.0f} MiB pieces (a single strip?): "
                "reading any tile would decode all of it; convert the slide to a tiled pyramid "
                "(e.g. vips tiffsave in.tif out.tif --tile --pyramid)", path)
        self.shapes = [lvl.shape for lvl in series.levels]
        self.axes = series.axes
        xi, yi = series.axes.index("X"), series.axes.index("Y")
        dims = tuple((int(s.shape[xi]), int(s.shape[yi])) for s in series.levels)
        self.ds = nominal_downsamples(dims)
        self.fast: _TiledTiffLevels | None = None
        if os.environ.get("TMEQUANT_OPENSLIDE_ONLY") != "1" and "".join(series.axes) == "YXS":
            try:
                self.fast = _TiledTiffLevels(Path(path), dims, list(series.levels))
            except Exception:
                log.debug("direct tile reading unavailable for %s", path, exc_info=True)

    def read_region(self, level: int, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        arr = self.levels[level]
        ds = self.ds[level]
        lx, ly = math.floor(x0 / ds), math.floor(y0 / ds)
        H, W = arr.shape[0], arr.shape[1]
        if (self.fast is not None and level in self.fast.pages
                and lx >= 0 and ly >= 0 and lx + w <= W and ly + h <= H):
            return self.fast.read(level, lx, ly, w, h)
        return self._read_levels(level, lx, ly, w, h)

    def _read_levels(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        arr = self.levels[level]
        H, W = arr.shape[0], arr.shape[1]
        out = np.full((h, w, 3), 255, np.uint8)
        sx0, sy0 = max(lx, 0), max(ly, 0)
        sx1, sy1 = min(lx + w, W), min(ly + h, H)
        if sx1 > sx0 and sy1 > sy0:
            with self._lock:  # one file handle; tifffile serialises reads on it anyway
                data = np.asarray(arr[sy0:sy1, sx0:sx1])
            if data.ndim == 2:
                data = np.repeat(data[..., None], 3, axis=2)
            data = _to_uint8(data[..., :3])
            out[sy0 - ly : sy1 - ly, sx0 - lx : sx1 - lx] = data
        return out

    def close(self) -> None:
        if self.fast is not None:
            self.fast.close()
        self.tf.close()


# A strip or tile that decodes to more than this is refused or memory-mapped: tifffile decodes
# a whole chunk for any region in it (a 20k x 20k single strip took 1.4 GB per read).
MAX_CHUNK_BYTES = 64 << 20


def _oversized_chunk(page: Any) -> int | None:
    """Decoded bytes of one chunk (tile or strip) of ``page`` when over MAX_CHUNK_BYTES."""
    spp = int(getattr(page, "samplesperpixel", 1) or 1)
    item = np.dtype(page.dtype).itemsize if page.dtype is not None else 1
    if page.is_tiled:
        n = int(page.tilewidth) * int(page.tilelength) * max(int(page.tiledepth or 1), 1)
    else:
        rows = min(int(page.rowsperstrip or page.imagelength), int(page.imagelength))
        n = rows * int(page.imagewidth)
    size = n * spp * item
    return size if size > MAX_CHUNK_BYTES else None


def _open_level(store: Any) -> Any:
    import zarr

    z = zarr.open(store, mode="r")
    return z


def _to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.uint16:
        return (a >> 8).astype(np.uint8)
    a = a.astype(np.float32)
    hi = float(a.max()) or 1.0
    return (a / hi * 255).clip(0, 255).astype(np.uint8)


# --- opening --------------------------------------------------------------------------------
# DICOM transfer syntaxes by UID: OpenSlide's errors name only the UID.
DICOM_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.51": "JPEG Extended",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 (HTJ2K) Lossless",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 (HTJ2K) Lossless RPCL",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 (HTJ2K)",
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
}


def name_transfer_syntaxes(text: str) -> str:
    """Append the name to each DICOM transfer-syntax UID in ``text``:
    ``"... 1.2.840.10008.1.2.4.201"`` -> ``"... 1.2.840.10008.1.2.4.201 (High-Throughput JPEG
    2000 (HTJ2K) Lossless; not supported: convert the slide to JPEG or JPEG 2000)"``."""
    import re

    def sub(m: re.Match[str]) -> str:
        uid = m.group(0)
        name = DICOM_TRANSFER_SYNTAXES.get(uid, "unknown transfer syntax")
        return f"{uid} ({name}; not supported by this OpenSlide: convert the slide to JPEG or JPEG 2000)"

    return re.sub(r"1\.2\.840\.10008\.1\.2(?:\.\d+)*", sub, text)


def _check_file(path: Path) -> None:
    if not path.exists():
        from tmequant.inputs import missing_reason

        raise SlideError(missing_reason(path), path)
    if path.is_dir():
        raise SlideError("is a folder, not a slide file", path)
    size = path.stat().st_size
    if size == 0:
        raise SlideError("is empty (0 bytes)", path)
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise SlideError(f"cannot be read: {e.strerror or e}", path) from None


def _open_openslide(path: Path) -> tuple[Any, str] | None:
    import openslide

    try:
        fmt = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        fmt = None
    if fmt is None:
        return None
    try:
        return openslide.OpenSlide(str(path)), fmt
    except openslide.OpenSlideError as e:
        first = str(e).splitlines()[0] if str(e) else "corrupt file"
        raise SlideError(f"OpenSlide cannot read it ({fmt}): {name_transfer_syntaxes(first)}",
                         path) from None
    except Exception as e:
        raise SlideError(f"cannot open ({fmt}): {type(e).__name__}: {e}", path) from None


def _is_ome_or_subifd(path: Path) -> bool:
    import tifffile

    tlog = logging.getLogger("tifffile")
    old_level = tlog.level
    tlog.setLevel(logging.CRITICAL)
    try:
        with tifffile.TiffFile(path) as tf:
            return bool(tf.is_ome) or bool(tf.pages.first.subifds)
    except Exception:
        return False
    finally:
        tlog.setLevel(old_level)


def open_slide(path: str | os.PathLike[str], mpp_override_um: float | None = None,
               require_mpp: bool = True) -> Slide:
    """Open a slide; raises SlideError (one line naming the file) if it cannot be read.

    ``mpp_override_um`` replaces the file's pixel size; without it a slide with no usable
    MPP raises SlideError unless ``require_mpp=False`` (then ``info.mpp_um`` is None).
    """
    p = Path(path)
    _check_file(p)
    opened = None
    if not _is_ome_or_subifd(p):  # OpenSlide reads an OME pyramid as one level: use tifffile
        opened = _open_openslide(p)
    if opened is not None:
        osr, fmt = opened
        try:
            return _slide_from_openslide(p, osr, fmt, mpp_override_um, require_mpp)
        except BaseException:
            osr.close()
            raise
    return _open_tifffile(p, mpp_override_um, require_mpp)


def _slide_from_openslide(p: Path, osr: Any, fmt: str, override: float | None,
                          require: bool) -> Slide:
    props = dict(osr.properties)
    vendor = props.get("openslide.vendor", fmt)
    vx, vy = _float(props.get("openslide.mpp-x")), _float(props.get("openslide.mpp-y"))
    tiff_mpp = _mpp_from_resolution(props.get("tiff.XResolution"), props.get("tiff.YResolution"),
                                    props.get("tiff.ResolutionUnit"))
    if vendor == "generic-tiff":
        # OpenSlide derives generic-tiff MPP from the resolution tags: report it as such.
        vx = vy = None
    ome = None
    mpp, mx, my, src = resolve_mpp(str(p), (vx, vy), tiff_mpp, ome, override, require)
    dims = tuple((int(d[0]), int(d[1])) for d in osr.level_dimensions)
    scales = nominal_downsamples(dims)
    info = SlideInfo(
        path=str(p.resolve()), reader="openslide", vendor=vendor,
        level_dimensions=dims, level_downsamples=scales,
        associated_images=tuple(sorted(osr.associated_images.keys())),
        mpp_um=mpp, mpp_source=src, mpp_x_um=mx, mpp_y_um=my,
        objective_power=_float(props.get("openslide.objective-power")), properties=props,
    )
    fast = None
    if vendor in _FAST_VENDORS and os.environ.get("TMEQUANT_OPENSLIDE_ONLY") != "1":
        try:
            fast = _TiledTiffLevels(p, dims)
            if not fast.pages:
                fast.close()
                fast = None
        except Exception:  # anything unexpected: OpenSlide reads it all
            log.debug("direct tile reading unavailable for %s", p, exc_info=True)
            fast = None
    return Slide(info, _OpenSlideBackend(osr, scales, fast))


def _check_not_truncated(p: Path, series: Any) -> None:
    """SlideError when a level's image data runs past the end of the file (a cut copy)."""
    size = p.stat().st_size
    for lv in series.levels:
        page = lv.keyframe
        ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts) if c]
        if ends and max(ends) > size:
            raise SlideError(f"TIFF is truncated: its image data runs to byte {max(ends)} but the "
                             f"file has {size} bytes (an incomplete copy or download?)", p)


def _open_tifffile(p: Path, override: float | None, require: bool) -> Slide:
    import tifffile

    tlog = logging.getLogger("tifffile")
    old_level = tlog.level
    tlog.setLevel(logging.CRITICAL)  # its warnings about corrupt files would be noise here
    try:
        tf = tifffile.TiffFile(p)
        _ = tf.series
    except Exception as e:
        raise SlideError(f"not a readable slide (neither OpenSlide nor tifffile can open it: "
                         f"{type(e).__name__})", p) from None
    finally:
        tlog.setLevel(old_level)
    try:
        if not tf.series:
            raise SlideError("TIFF is truncated or corrupt (no readable image in it)", p)
        series = tf.series[0]
        axes = series.axes
        if "Y" not in axes or "X" not in axes or any(a not in "YXSC" for a in axes):
            raise SlideError(f"TIFF image axes {axes!r} are not a 2-D RGB slide", p)
        _check_not_truncated(p, series)
        page = series.levels[0].keyframe
        tags = page.tags
        tiff_mpp = None
        if "XResolution" in tags and "ResolutionUnit" in tags:
            tiff_mpp = _mpp_from_resolution(tags["XResolution"].value,
                                            tags["YResolution"].value if "YResolution" in tags else None,
                                            int(tags["ResolutionUnit"].value))
        ome_mpp = _mpp_from_ome(tf.ome_metadata) if tf.is_ome else None
        mpp, mx, my, src = resolve_mpp(str(p), (None, None), tiff_mpp, ome_mpp, override, require)
        xi, yi = axes.index("X"), axes.index("Y")
        dims = tuple((int(lv.shape[xi]), int(lv.shape[yi])) for lv in series.levels)
        kind = (series.kind or "tiff").lower()
        vendor = "ome" if tf.is_ome else kind
        assoc = tuple(s.name.lower() for s in tf.series[1:] if s.name)
        backend = _TiffBackend(str(p), tf, series)
        info = SlideInfo(
            path=str(p.resolve()), reader="tifffile", vendor=vendor, level_dimensions=dims,
            level_downsamples=nominal_downsamples(dims), associated_images=assoc,
            mpp_um=mpp, mpp_source=src, mpp_x_um=mx, mpp_y_um=my,
        )
        return Slide(info, backend)
    except SlideError:
        tf.close()
        raise
    except Exception as e:
        tf.close()
        raise SlideError(f"cannot read TIFF structure: {type(e).__name__}: {e}", p) from None
