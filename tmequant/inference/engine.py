"""Batched prediction over a slide store: ``tiles/images`` -> ``predictions/<model_name>``.

The pipeline keeps the accelerator busy: a DataLoader reads contiguous uint8 slices of
``tiles/images`` in worker processes (pinned memory on CUDA; a card's ``stain_normalization``
is applied there, per tile, exactly as in training), the uint8 batch travels to the
device (4x fewer bytes than float) and is normalised there, the network runs in
``channels_last`` under autocast (bf16 where the GPU supports it, else fp16; fp32 on the
CPU), optionally compiled. An out-of-memory error halves the micro-batch and retries.

Output is written chunk by chunk (``chunk_rows`` tiles at a time) through
:meth:`tmequant.store.SlideStore.write_prediction_chunk`, which flags each chunk done after its
rows; a rerun after a kill redoes only the unfinished chunks. Batches never straddle a chunk,
so the batch partition, and therefore every number on the CPU, is the same whether a run was
interrupted or not. The group is marked complete last (docs/store-layout.md). The store is
written under its lock (another process writing it: StoreLockedError).
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from tmequant._faults import checkpoint
from tmequant.errors import InputError, StoreError
from tmequant.inference.cell_store import run_detector_chunks
from tmequant.inference.runner import (
    DeviceNet,
    autocast_dtype,
    precision_name,
    resolve_device,
    runtime_name,
    usable_runtime,
    weights_sha256,
)
from tmequant.memory import release_memory
from tmequant.models import LoadedModel, ModelCard, TmeNet, load_model
from tmequant.models.stain import normalize_batch
from tmequant.progress import ProgressBar
from tmequant.provenance import package_version, params_hash
from tmequant.store import IMAGES, SlideStore
from tmequant.tiling.source import open_tiles

log = logging.getLogger("tmequant")

CHUNK_ROWS = 1024  # tiles per output chunk (the resume unit)
MPP_REL_TOL = 0.01  # card and store MPP may differ by 1% (rounding in vendor metadata)
CPU_BATCH = 32
CUDA_BATCH = 256
# ONNX Runtime keeps an arena as large as one batch's activations (1.5 GB for 32 detector
# canvases, 0.36 GB for 8) and is as fast at 8-16 tiles as at 32: a smaller batch.
ONNX_CPU_BATCH = 16
# The default batch is a pixel budget, not a tile count: activations grow with tile area, so
# 32 tiles of 224 px and 1 tile of 1024 px cost about the same (a 2048 px card at batch 32
# needed 13 GB on the CPU).
REF_TILE_PX = 224


def default_batch_size(device_type: str, tile_px: int, runtime: str = "torch") -> int:
    """Tiles per batch on ``device_type`` ("cpu" | "cuda") for ``tile_px`` inputs: 32 (CPU),
    16 (CPU, ``runtime`` onnx) or 256 (CUDA) tiles of 224 px, fewer for larger inputs (same
    pixels per batch), at least 1."""
    base = CUDA_BATCH if device_type == "cuda" else (
        ONNX_CPU_BATCH if runtime == "onnx" else CPU_BATCH)
    return max(1, min(base, base * REF_TILE_PX * REF_TILE_PX // (tile_px * tile_px)))


@dataclass
class PredictResult:
    """What one ``predict_store`` call did."""

    store_path: str
    model_name: str
    n_tiles: int
    tiles_per_s: float  # tiles computed in this call / wall time of the compute loop
    device: str
    resumed: bool = False  # finished chunks of an interrupted run were kept
    skipped: bool = False  # predictions were already complete with the same params_hash
    n_computed: int = 0  # tiles computed in this call
    precision: str = "fp32"
    batch_size: int = 0
    runtime: str = "torch"  # torch | onnx (tmequant.inference.runner.RUNTIMES)


# --- reading tiles -------------------------------------------------------------------------

class TileRanges(Dataset):
    """Each item is one batch: ``images[start:stop]`` as a (n, H, W, 3) uint8 tensor.

    Contiguous slices read whole zarr chunks; the array is opened lazily in each worker.
    """

    def __init__(self, store_path: str, ranges: list[tuple[int, int]], pad_to: int = 0,
                 stain: dict[str, Any] | None = None):
        self.store_path, self.ranges, self.pad_to = store_path, ranges, pad_to
        self.stain = stain  # the card's stain normalisation, applied here in the readers
        self._images: Any = None  # StoreArray or SlideTiles (tmequant.tiling.open_tiles)

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, i: int) -> tuple[int, int, torch.Tensor]:
        if self._images is None:
            # predict_store checked a pixel-less store's slide once already: not per reader
            self._images = open_tiles(self.store_path, check=False)
        start, stop = self.ranges[i]
        x = np.ascontiguousarray(self._images[start:stop])
        if self.stain is not None:  # per tile, as in training: same pixels, same numbers
            x = normalize_batch(x, self.stain)
        if self.pad_to and len(x) < self.pad_to:  # static shapes for torch.compile
            x = np.concatenate([x, np.zeros((self.pad_to - len(x),) + x.shape[1:], x.dtype)])
        return start, stop, torch.from_numpy(x)

    def __getstate__(self) -> dict[str, Any]:  # never ship an open array to a worker
        return {**self.__dict__, "_images": None}


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # readers decode; the main process owns the compute threads


def _batch_ranges(chunks: list[int], n_tiles: int, chunk_rows: int, batch: int) -> list[tuple[int, int]]:
    """Batches of ``batch`` tiles aligned to chunk starts (never straddling a chunk)."""
    out: list[tuple[int, int]] = []
    for c in chunks:
        a, b = c * chunk_rows, min((c + 1) * chunk_rows, n_tiles)
        out.extend((s, min(s + batch, b)) for s in range(a, b, batch))
    return out


# --- the model on the device ---------------------------------------------------------------

class _Runner(DeviceNet):
    """uint8 NHWC -> fp32 tissue probabilities (and counts) on the device; the net runs
    ``channels_last`` under the device's autocast dtype (or as an ONNX Runtime graph)."""

    def __init__(self, net: TmeNet, card: ModelCard, device: torch.device, compile: bool,
                 runtime: str = "torch"):
        super().__init__(net, card, device, amp=autocast_dtype(device), channels_last=True,
                         compile=compile, runtime=runtime)

    def __call__(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.forward(x_u8)
        with torch.inference_mode():
            res = {"tissue_probs": out["tissue_logits"].float().softmax(dim=1)}
            if "cell_counts" in out:
                res["cell_counts"] = out["cell_counts"].float()
        return res


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --- provenance ----------------------------------------------------------------------------

def weights_digest(net: torch.nn.Module) -> str:
    """sha256 (16 hex) over the state dict's names, shapes, dtypes and bytes."""
    return weights_sha256(net)[:16]


def check_compatible(card: ModelCard, store: SlideStore, allow_mismatch: bool = False) -> None:
    """Refuse a card whose tile size or MPP differs from the store's (unless allowed)."""
    problems = []
    if card.tile_px != store.tile_px:
        problems.append(f"tile_px {store.tile_px} (model wants {card.tile_px})")
    if abs(card.mpp_um - store.target_mpp_um) > MPP_REL_TOL * card.mpp_um:
        problems.append(f"{store.target_mpp_um:g} um/px (model wants {card.mpp_um:g})")
    if not problems:
        return
    msg = (f"store has {' and '.join(problems)} for model {card.name!r}; re-tile with "
           f"`tmequant tile --mpp {card.mpp_um:g} --tile-px {card.tile_px}` or pass --allow-mismatch")
    if not allow_mismatch:
        raise StoreError(msg, store.path)
    log.warning("%s: %s (allowed by --allow-mismatch)", store.path, msg.split(";")[0])


# --- the engine ----------------------------------------------------------------------------

def _as_loaded(model: LoadedModel | TmeNet | str | os.PathLike[str]) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module) and isinstance(getattr(model, "card", None), ModelCard):
        return LoadedModel(model=model, card=model.card, source="in-memory")  # type: ignore[arg-type]
    assert isinstance(model, (str, os.PathLike))
    return load_model(model)


def _prepare_group(
    st: SlideStore, name: str, n: int, card: ModelCard, phash: str, attrs: dict[str, Any],
    chunk_rows: int, overwrite: bool,
) -> tuple[bool, bool]:
    """The output group, created or reused. Returns (already_complete, resumed)."""
    n_chunks = max(1, math.ceil(n / chunk_rows))
    state = st.prediction_state(name)
    if state is not None:
        same = state.params_hash == phash and state.chunk_rows == chunk_rows \
            and state.n_chunks == n_chunks
        if same and not overwrite:
            if state.complete:
                return True, False
            return False, bool(state.done.any())
        if state.complete and not overwrite:
            raise StoreError(
                f"predictions of {name!r} were made with other parameters (params_hash "
                f"{state.params_hash} != {phash}); pass --overwrite to redo them", st.path)
    # absent, unfinished with other params, or --overwrite: start over
    st.create_predictions(name, n, chunk_rows=chunk_rows, params_hash=phash, attrs=attrs,
                          n_tissue=card.n_tissue, n_cell=card.n_cell if card.has_count_head else 0,
                          cell_classes=card.cell_classes if card.is_detector else None)
    return False, False


def predict_store(
    store_path: str | os.PathLike[str],
    model: LoadedModel | TmeNet | str | os.PathLike[str],
    *,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    num_workers: int | None = None,
    compile: bool = False,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    progress: bool | None = True,
    chunk_rows: int = CHUNK_ROWS,
    max_chunks: int | None = None,
    runtime: str = "auto",
) -> PredictResult:
    """Predict every tile of a finished store into ``predictions/<card.name>``.

    ``model``: a LoadedModel, a TmeNet, or a name/path for :func:`tmequant.models.load_model`
    (the network is moved to ``device``). ``batch_size`` None: 32 on the CPU, 256 on CUDA for
    224 px tiles (16 with ONNX Runtime), fewer for larger tiles or detector canvases
    (:func:`default_batch_size`; halved on out-of-memory). ``num_workers`` None: 1 reader on the CPU, up to 8 on CUDA.
    ``progress``: True/False, or None to follow the process-wide switch (the CLI's --quiet).
    ``max_chunks`` stops after that many chunks without marking the group complete (for
    tests and for spreading work); a later call resumes. ``runtime``: ``auto`` (ONNX Runtime
    on the CPU, torch on GPUs), ``torch`` or ``onnx`` (:mod:`tmequant.inference.runner`).
    Returns a :class:`PredictResult`.
    """
    path = str(store_path)
    store = SlideStore(path)  # refuses missing / unfinished stores
    loaded = _as_loaded(model)
    card = loaded.card
    check_compatible(card, store, allow_mismatch)
    dev = resolve_device(device)
    amp = autocast_dtype(dev)
    n = store.n_tiles
    images = open_tiles(store)
    if tuple(images.shape[:1]) != (n,) or images.ndim != 4 or images.shape[3] != 3:
        raise StoreError(f"{IMAGES} has shape {images.shape}, expected ({n}, H, W, 3)", path)
    if chunk_rows < 1:
        raise InputError("chunk_rows must be >= 1")
    rt = usable_runtime(runtime, loaded.model, card, dev, compile)  # exports once for onnx
    # a detector runs each tile inside its neighbours' context: the budget counts the canvas
    side = int(images.shape[1]) + (2 * int(card.detector.context_px) if card.detector else 0)
    bs = batch_size or default_batch_size(dev.type, side, rt)
    if bs < 1:
        raise InputError(f"--batch-size {bs}: must be >= 1")
    bs = min(bs, chunk_rows)

    provenance = {
        "model": card.to_dict(),
        "weights_sha256_16": weights_digest(loaded.model),
        "store_params_hash": store.params_hash,
        "store_fingerprint": store.source_fingerprint,
        "n_tiles": n,
        "precision": precision_name(amp),  # bf16 and fp32 results differ: never mixed
    }
    if rt != "torch":  # outputs differ in the last digits: never mixed (torch: as before)
        provenance["runtime"] = rt
    phash = params_hash(provenance)
    attrs = {
        "card": card.to_dict(),
        "model_name": card.name,
        "model_version": card.version,
        "model_source": loaded.source,
        "weights_sha256_16": provenance["weights_sha256_16"],
        "precision": provenance["precision"],
        "runtime": runtime_name(rt),
        "mismatch_allowed": bool(allow_mismatch and (card.tile_px != store.tile_px or abs(
            card.mpp_um - store.target_mpp_um) > MPP_REL_TOL * card.mpp_um)),
        "package_version": package_version(),
    }
    with SlideStore.open(path, "r+") as st:  # the store's lock, held while we write
        return _predict_locked(st, loaded, card, dev, amp, phash, attrs, n, bs, num_workers,
                               compile, overwrite, progress, chunk_rows, max_chunks, rt)


def _predict_locked(
    st: SlideStore, loaded: LoadedModel, card: ModelCard, dev: torch.device,
    amp: torch.dtype | None, phash: str, attrs: dict[str, Any], n: int, bs: int,
    num_workers: int | None, compile: bool, overwrite: bool, progress: bool | None,
    chunk_rows: int, max_chunks: int | None, runtime: str,
) -> PredictResult:
    path = st.path
    done_already, resumed = _prepare_group(st, card.name, n, card, phash, attrs, chunk_rows,
                                           overwrite)
    result = PredictResult(path, card.name, n, 0.0, str(dev), resumed=resumed,
                           precision=precision_name(amp), batch_size=bs, runtime=runtime)
    if done_already:
        log.info("%s: predictions of %s already complete (params_hash %s); skipping",
                 path, card.name, phash)
        result.skipped = True
        return result

    state = st.prediction_state(card.name)
    assert state is not None
    done = state.done
    todo = [int(c) for c in np.flatnonzero(~done)] if n else []
    if max_chunks is not None:
        todo = todo[:max_chunks]
    if resumed:
        log.info("%s: resuming predictions of %s, %d of %d chunks left", path, card.name,
                 len(todo), len(done))

    t0 = time.perf_counter()
    n_done = _run_chunks(st, loaded, card, dev, todo, n, chunk_rows, bs, num_workers,
                         compile, progress, result)
    dt = time.perf_counter() - t0
    result.n_computed = n_done
    result.tiles_per_s = n_done / dt if dt > 0 and n_done else 0.0

    state = st.prediction_state(card.name)
    if (state is not None and bool(state.done.all())) or n == 0:
        st.mark_predictions_complete(card.name, card=card.to_dict(), params_hash=phash)
    return result


def _run_chunks(
    st: SlideStore, loaded: LoadedModel, card: ModelCard, dev: torch.device,
    todo: list[int], n: int, chunk_rows: int, bs: int, num_workers: int | None,
    compile: bool, progress: bool | None, result: PredictResult,
) -> int:
    if not todo:
        return 0
    if card.is_detector:  # heatmaps -> cells, each tile with its neighbours' borders
        return run_detector_chunks(st, loaded.model, card, dev, todo, n, chunk_rows, bs,
                                   progress, autocast_dtype(dev), runtime=result.runtime)
    if dev.type != "cuda":
        return _loop(st, loaded, card, dev, todo, n, chunk_rows, bs, num_workers, compile,
                     progress, result)
    # Fixed input shapes: let cuDNN pick the fastest kernels (restored afterwards).
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return _loop(st, loaded, card, dev, todo, n, chunk_rows, bs, num_workers, compile,
                     progress, result)
    finally:
        torch.backends.cudnn.benchmark = old


def _loop(
    st: SlideStore, loaded: LoadedModel, card: ModelCard, dev: torch.device,
    todo: list[int], n: int, chunk_rows: int, bs: int, num_workers: int | None,
    compile: bool, progress: bool | None, result: PredictResult,
) -> int:
    path = st.path
    runner = _Runner(loaded.model, card, dev, compile, result.runtime)
    if num_workers is None:
        cpus = os.cpu_count() or 1
        num_workers = min(8, max(1, cpus - 2)) if dev.type == "cuda" else (1 if cpus > 1 else 0)
    if path.startswith("memory://"):
        num_workers = 0  # fsspec's in-memory filesystem lives in this process: no reader processes
    ranges = _batch_ranges(todo, n, chunk_rows, bs)
    stain = card.stain_normalization.model_dump() if card.stain_normalization else None
    ds = TileRanges(path, ranges, pad_to=bs if compile else 0, stain=stain)
    loader = DataLoader(
        ds, batch_size=None, shuffle=False, num_workers=num_workers,
        pin_memory=dev.type == "cuda", worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
    n_todo = sum(b - a for a, b in ranges)
    micro = bs
    buf: dict[str, list[torch.Tensor]] = {}
    pending: tuple[int, dict[str, list[torch.Tensor]]] | None = None
    cur_chunk, n_done = -1, 0

    def flush(chunk: int, res: dict[str, list[torch.Tensor]]) -> None:
        probs = torch.cat(res["tissue_probs"]).cpu().numpy()
        counts = torch.cat(res["cell_counts"]).cpu().numpy() \
            if card.has_count_head and "cell_counts" in res else None
        # rows first, then the chunk's flag: a chunk is done only once it is on disk
        st.write_prediction_chunk(card.name, chunk, tissue_probs=probs.astype(np.float16),
                                  cell_counts=counts)
        checkpoint("predict_chunk")  # tests: a kill between chunks
        release_memory()  # as in the detector's loop: the heap does not grow chunk by chunk

    desc = f"predict {Path(path).name} [{card.name}]"
    with ProgressBar(n_todo, desc, unit="tiles", enabled=progress) as bar:
        for start, stop, x in loader:
            start, stop = int(start), int(stop)
            chunk = start // chunk_rows
            if chunk != cur_chunk:
                if buf:  # written after the next batch is queued: the GPU never waits on disk
                    pending, buf = (cur_chunk, buf), {}
                cur_chunk = chunk
            k = stop - start
            while True:
                try:
                    outs = [runner(x[i:i + micro]) for i in range(0, len(x), micro)]
                    break
                except RuntimeError as e:
                    if dev.type != "cuda" or not _is_oom(e) or micro == 1:
                        raise
                    torch.cuda.empty_cache()
                    micro //= 2
                    log.warning("%s: CUDA out of memory; batch size halved to %d", path, micro)
            # Keep results on the device until the chunk ends: no per-batch sync.
            for key in outs[0]:
                buf.setdefault(key, []).append(torch.cat([o[key] for o in outs])[:k])
            if pending is not None:
                flush(*pending)
                pending = None
            n_done += k
            bar.update(k)
        if buf:
            flush(cur_chunk, buf)
    result.batch_size = micro
    return n_done
