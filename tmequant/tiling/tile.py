"""Tile a slide at a target MPP into a zarr v3 slide store (layout: docs/store-layout.md).

Regions several tiles wide are read from the level closest to and not coarser than the
target, resampled with an area filter and sliced into tiles; blocks are read by a pool of
threads (OpenSlide, Pillow and the zarr codecs release the GIL) with a bounded number in
flight, and written in whole shards in row-major tile order. The completion marker is
written last; an unfinished store is rebuilt from scratch, so a rerun after a crash gives
the same store as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tmequant._faults import checkpoint
from tmequant.codecs import IMAGE_CODECS, parse_image_codec
from tmequant.defaults import MPP_MAX_UM, MPP_MIN_UM, MPP_UM, TILE_PX, mpp_in_range
from tmequant.errors import StoreError
from tmequant.inputs import SlideSpec, slide_id_from_path, validate_slide_id
from tmequant.pixelsize import PixelSize, pitch_xy
from tmequant.progress import ProgressBar
from tmequant.provenance import file_fingerprint, package_version, params_hash, to_jsonable
from tmequant.store import COMPRESSIONS, NO_PIXELS, SlideStore, store_path, store_state
from tmequant.tiling.grid import TilePlan, blocks, plan_grid
from tmequant.wsi.resample import read_resampled
from tmequant.wsi.slide import Slide, SlideInfo, open_slide
from tmequant.wsi.tissue import TissueParams, detect_tissue, mask_shape

log = logging.getLogger("tmequant")


def pixels_compression(pixels: str, lossless: str = "blosc-lz4") -> str:
    """``--pixels`` -> ``TilingParams.compression``: ``lossless`` -> ``lossless`` (a
    COMPRESSIONS name), ``none`` -> NO_PIXELS, an image codec (``jpeg-95``) as it is.
    ValueError naming the accepted values otherwise."""
    p = str(pixels).strip().lower()
    if p == "lossless":
        return lossless
    if p == "none":
        return NO_PIXELS
    try:
        codec, level = parse_image_codec(p)
    except ValueError:
        raise ValueError(f"--pixels {pixels!r}: use lossless, none or an image codec "
                         f"({', '.join(IMAGE_CODECS)}, e.g. jpeg-95)") from None
    return f"{codec}-{level}"


@dataclass(frozen=True)
class TilingParams:
    """Every parameter that changes the store's content (hashed into ``params_hash``)."""

    target_mpp_um: float = MPP_UM
    tile_px: int = TILE_PX
    min_tissue_fraction: float = 0.25
    tissue: TissueParams = field(default_factory=TissueParams)
    # tiles/images codec: a lossless chain (COMPRESSIONS; blosc-lz4 chosen by
    # scripts/bench_tiling.py), a lossy image codec such as "jpeg-95" (tmequant.codecs;
    # measured by scripts/bench_codecs.py), or NO_PIXELS: no tiles/images at all, the
    # pixels are read from the slide when needed (tmequant.tiling.source; --pixels none)
    compression: str = "blosc-lz4"
    tiles_per_chunk: int = 4
    tiles_per_shard: int = 128
    block_tiles: int = 4  # regions of block_tiles x block_tiles tiles are read at once
    # partial tiles at the right/bottom edge, padded with glass (grid.plan_grid)
    edge_tiles: bool = True
    # an exact 2x/4x reduction from JPEG tiles decodes them at that scale in the DCT domain
    # (tmequant.wsi.jpeg) instead of in full + box average: 1.3-1.8x faster tiling, pixels
    # within ~1 grey level, yet the bundled detector's counts moved by up to 11% on a real
    # H&E crop (scripts/bench_decode.py): off by default
    jpeg_dct_scaling: bool = False

    def __post_init__(self) -> None:
        if not mpp_in_range(self.target_mpp_um):
            raise ValueError(f"target_mpp_um must be in {MPP_MIN_UM}-{MPP_MAX_UM:g} um/px")
        if not 16 <= self.tile_px <= 4096:
            raise ValueError("tile_px must be in 16-4096")
        if not 0.0 <= self.min_tissue_fraction <= 1.0:
            raise ValueError("min_tissue_fraction must be in 0-1")
        if self.compression not in COMPRESSIONS and self.compression != NO_PIXELS:
            try:
                parse_image_codec(self.compression)
            except ValueError:
                raise ValueError(f"compression must be one of {COMPRESSIONS}, {NO_PIXELS!r} or an image codec "
                                 f"({', '.join(IMAGE_CODECS)}, e.g. jpeg-95)") from None
        if self.tiles_per_chunk < 1 or self.tiles_per_shard % self.tiles_per_chunk:
            raise ValueError("tiles_per_shard must be a multiple of tiles_per_chunk")
        if self.block_tiles < 1:
            raise ValueError("block_tiles must be >= 1")

    @property
    def tile_um(self) -> float:
        return self.tile_px * self.target_mpp_um


@dataclass
class TileResult:
    """Outcome of tiling one slide; ``reused`` when a finished store with the same params existed."""

    slide_id: str
    store_path: str
    n_tiles: int
    reused: bool
    qc_png: str | None = None
    slide_mpp_um: float | None = None
    mpp_source: str | None = None
    read_level: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def tiles_per_s(self) -> float:
        t = self.seconds.get("tiles", 0.0)
        return self.n_tiles / t if t > 0 else 0.0


# Fields added after stores existed, with the value that reproduces the older pixels: at that
# value they stay out of the params hash, so earlier stores stay valid (and are reused);
# any other value enters it.
_LATER_FIELDS: dict[str, Any] = {"jpeg_dct_scaling": False}


def hashed_params(params: TilingParams) -> dict[str, Any]:
    """The tiling parameters as hashed into the store's ``params_hash``."""
    d = to_jsonable(params)
    for k, legacy in _LATER_FIELDS.items():
        if d.get(k) == legacy:
            d.pop(k)
    return d


def _qc_path(out_dir: str, slide_id: str) -> str:
    return f"{out_dir.rstrip('/')}/{slide_id}.qc.png"


def tile_slide(
    spec_or_path: SlideSpec | str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    params: TilingParams = TilingParams(),
    *,
    overwrite: bool = False,
    workers: int | None = None,
    progress: bool | None = True,
    mpp_override_um: float | None = None,
    qc_png: bool = True,
) -> TileResult:
    """Tile one slide into ``<out_dir>/<slide_id>.zarr`` and write ``<out_dir>/<slide_id>.qc.png``.

    ``spec_or_path``: a SlideSpec (id, path, MPP override) or a slide path (id from its name).
    A finished store with the same parameters and slide is reused untouched; one made with
    other parameters raises StoreError unless ``overwrite``; an unfinished one is rebuilt.
    ``out_dir`` may be an fsspec URL (``memory://...``). The store is written under its lock:
    another process writing it makes this raise StoreLockedError.
    """
    t_start = time.perf_counter()
    spec = _slide_spec(spec_or_path)
    override = spec.mpp_override_um if spec.mpp_override_um is not None else mpp_override_um
    out = str(out_dir)
    if "://" not in out:
        Path(out).mkdir(parents=True, exist_ok=True)
    spath = store_path(out, spec.slide_id)
    workers = max(1, workers if workers else min(4, os.cpu_count() or 1))

    seconds: dict[str, float] = {}
    with open_slide(spec.path, mpp_override_um=override) as slide:
        info = slide.info
        seconds["open"] = time.perf_counter() - t_start
        fp = file_fingerprint(spec.path)
        tparams = hashed_params(params)
        tparams["mpp_override_um"] = override
        phash = params_hash(tparams)
        if store_state(spath) != "missing":
            reused = _check_existing(spath, phash, fp, overwrite)
            if reused is not None:
                return TileResult(spec.slide_id, spath, reused, True,
                                  _qc_path(out, spec.slide_id) if qc_png else None,
                                  info.mpp_um, info.mpp_source, None,
                                  {"total": time.perf_counter() - t_start})
        assert info.mpp_um is not None and info.mpp_source is not None
        # Pixels may be non-square (x and y sizes, tmequant.pixelsize): tiles still cover
        # tile_um x tile_um, i.e. tile_um / mpp_x by tile_um / mpp_y level-0 px, and the
        # thumbnail and mask have square pixels at mask_mpp_um. For square pixels every
        # number below is what tile_um / mpp and mask_mpp / mpp give.
        px = info.pixel_size
        _warn_if_upsampled(spec.slide_id, px, params.target_mpp_um)
        # --- tissue ---------------------------------------------------------------
        t0 = time.perf_counter()
        mask_mpp = params.tissue.mask_mpp_um
        thumb = slide.read_thumbnail(mask_mpp)
        mask = detect_tissue(thumb, mask_mpp, params.tissue)
        assert mask.shape == mask_shape(info.dimensions, px, mask_mpp)
        mask_ds = mask_mpp / info.mpp_um  # the stored one number (geometric mean for non-square)
        mask_ds_xy = px.px(mask_mpp)  # level-0 px per mask px along x, y
        tile_level0_px = params.tile_um / info.mpp_um
        tile_xy = px.px(params.tile_um)  # grid pitch in level-0 px along x, y
        plan = plan_grid(info.dimensions, tile_xy, mask, mask_ds_xy, params.min_tissue_fraction,
                         edge_tiles=params.edge_tiles)
        read_level = slide.best_level_for_mpp(params.target_mpp_um)
        seconds["tissue"] = time.perf_counter() - t0
        if plan.n_tiles == 0:
            log.warning("%s: no tissue found (no tile with tissue fraction >= %g); "
                        "the store is empty", spec.slide_id, params.min_tissue_fraction)
        # --- store ----------------------------------------------------------------
        header = _store_header(spec.slide_id, info, px, fp, params, tparams, phash, tile_level0_px,
                               tile_xy, read_level)
        # the lock first, then the old store goes: no other writer is inside it
        with SlideStore.open(spath, "w") as st:
            st.write_header(**header)
            st.write_tissue(mask, thumb, downsample=mask_ds, mask_mpp_um=mask_mpp)
            st.write_tile_grid(plan.coords, plan.grid, plan.tissue_fraction)
            t0 = time.perf_counter()
            if params.compression != NO_PIXELS:  # without pixels, predict reads the slide
                _write_tiles(slide, read_level, plan, params, st, workers, spec.slide_id, progress)
            seconds["tiles"] = time.perf_counter() - t0
            qc = None
            if qc_png:
                qc = _qc_path(out, spec.slide_id)
                write_qc_png(qc, thumb, mask, plan, mask_ds_xy)
            st.mark_complete(n_tiles=int(plan.n_tiles))
    seconds["total"] = time.perf_counter() - t_start
    res = TileResult(spec.slide_id, spath, plan.n_tiles, False, qc, info.mpp_um, info.mpp_source,
                     read_level, seconds)
    log.info("%s: %d tiles at %.3g um/px from level %d in %.1f s (%.1f tiles/s)", spec.slide_id,
             plan.n_tiles, params.target_mpp_um, read_level, seconds["total"], res.tiles_per_s)
    return res


def _slide_spec(spec_or_path: SlideSpec | str | os.PathLike[str]) -> SlideSpec:
    """The spec as given, or one for a slide path (id from its file name, no MPP override)."""
    if isinstance(spec_or_path, SlideSpec):
        return spec_or_path
    p = Path(spec_or_path)
    return SlideSpec(validate_slide_id(slide_id_from_path(p), str(p)), p, None)


def _warn_if_upsampled(slide_id: str, px: PixelSize, target_mpp_um: float) -> None:
    """Warn when the slide's pixels are coarser than the target (tiles are then upsampled)."""
    if px.coarsest_um > target_mpp_um * 1.001:
        log.warning("%s: slide MPP %s is coarser than the target %.3g um/px; tiles are upsampled",
                    slide_id, f"{px.x_um:.3g}" if px.is_square else px.describe(),
                    target_mpp_um)


def _store_header(
    slide_id: str, info: SlideInfo, px: PixelSize, fp: dict[str, Any], params: TilingParams,
    tparams: dict[str, Any], phash: str, tile_level0_px: float, tile_xy: tuple[float, float],
    read_level: int,
) -> dict[str, Any]:
    """The store's header attributes: the slide, its pixel size, the grid and the parameters."""
    assert info.mpp_um is not None  # resolved: tile_slide checked it
    return {
        "slide_id": slide_id,
        "source_path": info.path,
        "source_size_bytes": int(fp["size_bytes"]),
        "source_fingerprint": str(fp["sha256_head_tail"]),
        "reader": info.reader,
        "vendor": info.vendor,
        "level0_width_px": int(info.dimensions[0]),
        "level0_height_px": int(info.dimensions[1]),
        "slide_mpp_um": float(info.mpp_um),
        "slide_mpp_x_um": float(px.x_um),
        "slide_mpp_y_um": float(px.y_um),
        "mpp_source": info.mpp_source,
        "target_mpp_um": float(params.target_mpp_um),
        "tile_px": int(params.tile_px),
        "tile_um": float(params.tile_um),
        "tile_level0_px": float(tile_level0_px),
        "tile_level0_x_px": float(tile_xy[0]),
        "tile_level0_y_px": float(tile_xy[1]),
        "read_level": int(read_level),
        "tissue": to_jsonable(params.tissue),
        "min_tissue_fraction": float(params.min_tissue_fraction),
        "tiling_params": tparams,
        "params_hash": phash,
        "package_version": package_version(),
    }


def _check_existing(spath: str, phash: str, fp: dict[str, Any], overwrite: bool) -> int | None:
    """n_tiles of a reusable finished store, None when it must be (re)built; raises on mismatch."""
    state = store_state(spath)
    if state == "foreign":
        if overwrite:
            return None
        raise StoreError("exists but is not a zarr slide store; move it away or use --overwrite", spath)
    if state == "unreadable":
        if overwrite:
            return None
        raise StoreError("exists but cannot be opened as a slide store; use --overwrite", spath)
    if state in ("missing", "unfinished"):
        if state == "unfinished":
            log.info("%s: unfinished store (interrupted run); rebuilding it", spath)
        return None
    if overwrite:
        return None
    st = SlideStore(spath, require_complete=False)
    old = st.params_hash
    if old != phash:
        raise StoreError(
            f"store was made with other tiling parameters (params_hash {old} != {phash}); "
            "use --overwrite to rebuild it or choose another --out", spath)
    if st.source_fingerprint != fp["sha256_head_tail"]:
        raise StoreError("the slide file changed since this store was made; use --overwrite", spath)
    log.info("%s: finished store with the same parameters; nothing to do", spath)
    n = st.attrs.get("n_tiles", 0)
    return int(n) if isinstance(n, (int, float)) else 0


def _read_block(slide: Slide, level: int, plan: TilePlan, idx: np.ndarray, tile_px: int,
                dct_scaled: bool = False) -> list[np.ndarray]:
    """Tiles ``idx`` of the plan read as one region: len(idx) (tile_px, tile_px, 3) uint8
    arrays, the whole tiles views into that region (whoever stacks them copies them once).

    Partial edge tiles (``TilingParams.edge_tiles``) are read one by one, the part on the
    slide resampled at the grid's scale and glass (255) beyond it; the whole tiles of the
    block are read as one region exactly as without edge tiles.
    """
    tx, ty = plan.pitch_xy  # equal on square pixels; a tile's footprint otherwise
    w0, h0 = slide.info.dimensions
    g = plan.grid[idx]
    whole = ((g[:, 1] + 1) * tx <= w0 + 1e-6) & ((g[:, 0] + 1) * ty <= h0 + 1e-6)
    out: list[np.ndarray] = [np.empty(0, np.uint8)] * len(idx)
    if whole.any():
        gw = g[whole]
        r0, c0 = int(gw[:, 0].min()), int(gw[:, 1].min())
        r1, c1 = int(gw[:, 0].max()) + 1, int(gw[:, 1].max()) + 1
        # the kept tiles in the region's output px: the reader skips JPEG tiles under none
        x = (gw[:, 1] - c0) * tile_px
        y = (gw[:, 0] - r0) * tile_px
        only = np.stack([x, y, x + tile_px, y + tile_px], axis=1)
        region = read_resampled(slide, level, (c0 * tx, r0 * ty, c1 * tx, r1 * ty),
                                ((c1 - c0) * tile_px, (r1 - r0) * tile_px), dct_scaled=dct_scaled,
                                only=only)
        for k in np.flatnonzero(whole):
            r, c = g[k]
            ty0, tx0 = (int(r) - r0) * tile_px, (int(c) - c0) * tile_px
            out[k] = region[ty0 : ty0 + tile_px, tx0 : tx0 + tile_px]
    for k in np.flatnonzero(~whole):
        r, c = (int(v) for v in g[k])
        x0, y0 = c * tx, r * ty
        x1, y1 = min(x0 + tx, float(w0)), min(y0 + ty, float(h0))
        t = np.full((tile_px, tile_px, 3), 255, np.uint8)
        ow, oh = round((x1 - x0) / tx * tile_px), round((y1 - y0) / ty * tile_px)
        if ow > 0 and oh > 0:
            t[:oh, :ow] = read_resampled(slide, level, (x0, y0, x1, y1), (ow, oh),
                                         dct_scaled=dct_scaled)
        out[k] = t
    return out


def read_tiles(slide: Slide, level: int, plan: TilePlan, idx: np.ndarray, tile_px: int,
               dct_scaled: bool = False) -> np.ndarray:
    """Tiles ``idx`` of the plan, in that order: (len(idx), tile_px, tile_px, 3) uint8,
    exactly as the tiler stores them. Read per run of adjacent tiles of one grid row, so a
    batch that spans rows never reads the glass between them."""
    idx = np.asarray(idx, dtype=np.int64)
    out = np.empty((len(idx), tile_px, tile_px, 3), np.uint8)
    if not len(idx):
        return out
    order = np.argsort(idx, kind="stable")
    g = plan.grid[idx[order]].astype(np.int64)
    # a new run where the row changes or the column does not follow the previous one
    brk = np.flatnonzero((np.diff(g[:, 0]) != 0) | (np.diff(g[:, 1]) != 1)) + 1
    for run in np.split(np.arange(len(idx)), brk):
        for k, t in zip(order[run], _read_block(slide, level, plan, idx[order[run]], tile_px, dct_scaled)):
            out[k] = t
    return out


def _write_tiles(slide: Slide, level: int, plan: TilePlan, params: TilingParams, st: SlideStore,
                 workers: int, desc: str, progress: bool | None) -> None:
    n, tp = plan.n_tiles, params.tile_px
    shard = params.tiles_per_shard
    st.create_images(n, tp, tiles_per_chunk=params.tiles_per_chunk, tiles_per_shard=shard,
                     compression=params.compression, mpp_um=params.target_mpp_um)
    if n == 0:
        return
    n_shards = math.ceil(n / shard)
    need = np.array([min(shard, n - s * shard) for s in range(n_shards)])
    done = np.zeros(n_shards, np.int64)
    staged: dict[int, np.ndarray] = {}
    next_shard = 0
    todo = blocks(plan, params.block_tiles)
    window = max(2, 2 * workers)
    with ProgressBar(n, desc, unit="tiles", enabled=progress) as bar, \
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tmequant-tile") as pool:
        pending: deque[tuple[np.ndarray, Future[list[np.ndarray]]]] = deque()
        it = iter(todo)
        exhausted = False
        while pending or not exhausted:
            while not exhausted and len(pending) < window:
                try:
                    idx = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((idx, pool.submit(_read_block, slide, level, plan, idx, tp,
                                                   params.jpeg_dct_scaling)))
            if not pending:
                break
            idx, fut = pending.popleft()
            try:
                data = fut.result()
            except BaseException:
                for _, f in pending:
                    f.cancel()
                raise
            for k, i in enumerate(idx):
                staged[int(i)] = data[k]
            np.add.at(done, idx // shard, 1)
            bar.update(len(idx))
            # write every shard whose tiles are all staged, in order (whole-shard writes only)
            while next_shard < n_shards and done[next_shard] == need[next_shard]:
                a = next_shard * shard
                b = a + int(need[next_shard])
                st.write_tiles(a, np.stack([staged.pop(i) for i in range(a, b)]))
                next_shard += 1
                checkpoint("tile_shard")  # tests: a kill between shards
    assert next_shard == n_shards and not staged


def write_qc_png(path: str, thumb: np.ndarray, mask: np.ndarray, plan: TilePlan,
                 mask_downsample: float | tuple[float, float]) -> None:
    """Thumbnail with the tissue outline (blue) and the kept tiles' grid (green) as PNG;
    ``mask_downsample``: level-0 px per mask px, one number or (x, y)."""
    import fsspec
    from PIL import Image
    from scipy import ndimage as ndi

    img = thumb.copy()
    edge = mask & ~ndi.binary_erosion(mask)
    img[edge] = (0, 60, 255)
    h, w = mask.shape
    (tx, ty), (dx, dy) = plan.pitch_xy, pitch_xy(mask_downsample)
    tx, ty = tx / dx, ty / dy  # tile side in mask px (equal: mask pixels are square)
    for x, y in plan.coords / np.array([dx, dy]):
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = min(int(round(x + tx)), w - 1), min(int(round(y + ty)), h - 1)
        if x0 >= w or y0 >= h:
            continue
        img[y0, x0 : x1 + 1] = img[y1, x0 : x1 + 1] = (0, 200, 0)
        img[y0 : y1 + 1, x0] = img[y0 : y1 + 1, x1] = (0, 200, 0)
    with fsspec.open(path, "wb") as fh:
        # zlib level 1: a third of the default's CPU for a QC picture a few % larger
        Image.fromarray(img).save(fh, format="PNG", compress_level=1)


__all__ = ["COMPRESSIONS", "NO_PIXELS", "TileResult", "TilingParams", "pixels_compression", "read_tiles",
           "tile_slide", "write_qc_png"]
