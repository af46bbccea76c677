"""A network on its device: device choice, precision, runtime, and uint8 NHWC in.

The one place that turns a device name into a ``torch.device``, picks the autocast dtype and
the runtime, and feeds a network uint8 NHWC batches normalised on the device (4x fewer bytes
travel than with float input). The tissue engine (:mod:`tmequant.inference.engine`), the cell
detector (:mod:`tmequant.inference.cells`) and training all use it.

Runtimes: ``torch`` runs the module; ``onnx`` exports it once per process (uint8 NHWC in,
normalisation inside the graph) and runs it with ONNX Runtime, which is 1.2-4x faster than
eager PyTorch on the CPU at outputs equal within 1e-5 (``scripts/bench_cpu_runtimes.py``).
``auto`` is ``onnx`` on the CPU and ``torch`` on GPUs.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import threading
import warnings
from collections import OrderedDict
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from tmequant.defaults import check_runtime
from tmequant.errors import InputError
from tmequant.memory import release_memory
from tmequant.models.card import ModelCard

log = logging.getLogger("tmequant")



def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> the first CUDA GPU if any, else the CPU; ``cuda:N`` is checked to exist.
    A name that is not a device raises InputError (exit 2 in the CLI)."""
    if isinstance(device, torch.device):
        dev = device
    else:
        s = str(device).strip().lower()
        if s == "auto":
            return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
                else torch.device("cpu")
        try:
            dev = torch.device(s)
        except RuntimeError:
            raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device}: no CUDA GPU is available (use --device cpu)")
        idx = 0 if dev.index is None else dev.index
        if idx >= torch.cuda.device_count():
            raise InputError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) here")
        return torch.device("cuda", idx)
    if dev.type not in ("cpu", "mps"):
        raise InputError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    return dev


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on GPUs that support it, else fp16; None (fp32) on the CPU."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def precision_name(dtype: torch.dtype | None) -> str:
    """``fp32`` | ``bf16`` | ``fp16``: the name results record (outputs of two precisions differ)."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime


def resolve_runtime(runtime: str, device: torch.device, compile: bool = False) -> str:
    """``auto`` -> ``onnx`` on the CPU (when onnxruntime imports and ``compile`` is off), else
    ``torch``. An explicit ``onnx`` off the CPU, with ``compile``, or without onnxruntime, and
    any other name, raise InputError."""
    try:
        r = check_runtime(runtime)
    except ValueError as e:
        raise InputError(str(e)) from None
    if r == "auto":
        return "onnx" if device.type == "cpu" and not compile and _onnxruntime() else "torch"
    if r == "onnx":
        if device.type != "cpu":
            raise InputError(f"--runtime onnx runs on the CPU, not {device}; use --runtime torch")
        if compile:
            raise InputError("--compile applies to --runtime torch only")
        if _onnxruntime() is None:
            raise InputError("--runtime onnx needs onnxruntime: pip install onnxruntime")
    return r


def runtime_name(runtime: str) -> str:
    """What results record: ``torch-<version>`` or ``onnxruntime-<version>``."""
    if runtime == "onnx":
        return f"onnxruntime-{_onnxruntime().__version__}"
    return f"torch-{torch.__version__}"


def normalisation(card: ModelCard, device: torch.device | str = "cpu",
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, 3, 1, 1) fp32: ``(x / 255 - mean) / std == x * scale + shift``,
    the card's normalisation of 0-255 pixels folded into one multiply-add."""
    std = torch.tensor(card.std, dtype=torch.float32, device=device)
    mean = torch.tensor(card.mean, dtype=torch.float32, device=device)
    return (1.0 / (255.0 * std)).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)


class ExportError(RuntimeError):
    """The network could not be exported to ONNX (an op the exporter lacks)."""


class _Normalised(torch.nn.Module):
    """uint8 (B, H, W, 3) -> normalised float NCHW -> the net's outputs as a tuple (sorted
    keys): the whole graph ONNX Runtime runs."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self, net: torch.nn.Module, card: ModelCard, keys: list[str]):
        super().__init__()
        self.net, self.keys = net, keys
        scale, shift = normalisation(card)
        self.register_buffer("scale", scale)
        self.register_buffer("shift", shift)

    def forward(self, x_u8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x_u8.permute(0, 3, 1, 2).float() * self.scale + self.shift
        out = self.net(x)
        return tuple(out[k] for k in self.keys)


# The TorchScript exporter: fast, no onnxscript; torch >= 2.5 defaults to the dynamo one.
_LEGACY_EXPORTER: dict[str, Any] = {"dynamo": False} \
    if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}

# Sessions of this process, newest last: one export per network, not one per slide.
_SESSIONS: OrderedDict[str, tuple[Any, list[str]]] = OrderedDict()
_SESSIONS_MAX = 4
_SESSIONS_LOCK = threading.Lock()


def weights_sha256(net: torch.nn.Module) -> str:
    """sha256 (hex) over the state dict's names, shapes, dtypes and bytes."""
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        t = v.detach().to("cpu").contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _session_key(net: torch.nn.Module, card: ModelCard, threads: int) -> str:
    """The weights, the card, the thread count and both libraries' versions: a session is
    reused only for the very same network."""
    h = hashlib.sha256(weights_sha256(net).encode())
    h.update(json.dumps(card.to_dict(), sort_keys=True, default=str).encode())
    h.update(f"{threads};{torch.__version__};{runtime_name('onnx')}".encode())
    return h.hexdigest()


def onnx_session(net: torch.nn.Module, card: ModelCard) -> tuple[Any, list[str]]:
    """An ONNX Runtime session of ``net`` (uint8 NHWC in, outputs in sorted key order) and
    those keys; exported on first use in this process (seconds), then cached.
    Raises ExportError when the network does not export."""
    ort = _onnxruntime()
    threads = torch.get_num_threads()
    key = _session_key(net, card, threads)
    with _SESSIONS_LOCK:
        if key in _SESSIONS:
            _SESSIONS.move_to_end(key)
            return _SESSIONS[key]
    side = int(card.tile_px)
    example = torch.full((2, side, side, 3), 255, dtype=torch.uint8)
    net = net.to("cpu").eval()
    try:
        with torch.inference_mode():
            keys = sorted(net(torch.zeros(1, 3, side, side)).keys())
        wrapped = _Normalised(net, card, keys).eval()
        buf = io.BytesIO()
        with warnings.catch_warnings():  # the exporter's tracer and deprecation chatter
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), buf,  # type: ignore[arg-type]  # file objects work
                input_names=["x_u8"], output_names=keys,
                dynamic_axes={"x_u8": {0: "batch", 1: "height", 2: "width"}},
                opset_version=17, **_LEGACY_EXPORTER)
    except Exception as e:  # any exporter failure means: not exportable
        raise ExportError(f"model {card.name!r} does not export to ONNX: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Spinning threads burn CPU between batches while readers decode: off.
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # Memory patterns pre-plan one block per input shape: 180 MB more for the detector, and
    # the heap grew by ~10 MB per output chunk with them on (measured); no speed difference.
    so.enable_mem_pattern = False
    sess = ort.InferenceSession(buf.getvalue(), so, providers=["CPUExecutionProvider"])
    del buf, wrapped
    release_memory()  # the traced graph and the protobuf: ~150 MB otherwise kept by the heap
    with _SESSIONS_LOCK:
        _SESSIONS[key] = (sess, keys)
        while len(_SESSIONS) > _SESSIONS_MAX:
            _SESSIONS.popitem(last=False)
    return sess, keys


def usable_runtime(runtime: str, net: torch.nn.Module, card: ModelCard, device: torch.device,
                   compile: bool = False) -> str:
    """The runtime a run will use: :func:`resolve_runtime`, then, for ``onnx``, the export
    done (and cached) now. Under ``auto`` a network that does not export runs on torch with a
    warning; under an explicit ``onnx`` that is an InputError."""
    rt = resolve_runtime(runtime, device, compile)
    if rt != "onnx":
        return rt
    try:
        onnx_session(net, card)
    except ExportError as e:
        if str(runtime).strip().lower() == "onnx":
            raise InputError(f"--runtime onnx: {e}") from None
        log.warning("%s; running it on torch", e)
        return "torch"
    return rt


class DeviceNet:
    """``net`` in eval mode on ``device``, called with uint8 (B, H, W, 3) batches.

    The card's mean/std are folded into one multiply-add on the device; ``amp`` is the
    autocast dtype (None: fp32); ``channels_last`` stores the net NHWC (the input is already
    NHWC, so the permuted view needs no copy); ``compile`` wraps it in ``torch.compile``.
    ``runtime`` ``onnx`` runs the exported graph with ONNX Runtime instead (CPU, fp32; the
    other options then do not apply). Calling returns the net's output dict, computed under
    ``torch.inference_mode``.
    """

    def __init__(self, net: torch.nn.Module, card: ModelCard, device: torch.device, *,
                 amp: torch.dtype | None = None, channels_last: bool = False,
                 compile: bool = False, runtime: str = "torch"):
        self.card, self.device, self.amp = card, device, amp
        self.runtime = resolve_runtime(runtime, device, compile)
        self.session: Any = None
        if self.runtime == "onnx":
            self.session, self.keys = onnx_session(net, card)
            channels_last = False  # torch does not run the net: leave it as it is
        net = net.to(device).eval()
        if channels_last and device.type != "mps":
            net = net.to(memory_format=torch.channels_last)
        self.net: Any = torch.compile(net) if compile else net
        self.scale, self.shift = normalisation(card, device)

    @torch.inference_mode()
    def forward(self, x_u8: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, H, W, 3) uint8 -> the net's outputs (autocast dtype; callers cast)."""
        if self.session is not None:
            x_np = np.ascontiguousarray(x_u8.numpy())
            outs = self.session.run(self.keys, {"x_u8": x_np})
            return {k: torch.from_numpy(v) for k, v in zip(self.keys, outs)}
        x = x_u8.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale).add_(self.shift)
        ctx = torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()
        with ctx:
            out: dict[str, torch.Tensor] = self.net(x)
        return out
