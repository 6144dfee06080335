"""The dispatcher: which backend computes OWQLinear's product y = deq(W_q)·x + W_o·x[idx] + b.

``kernel`` (``configure(kernel=...)``, :func:`use_kernel`, or the ``WCT_KERNEL`` environment variable):

- ``torch``  : reference (unpack, dequantize, scatter W_o, matmul); the oracle. With ``cache_dense=1`` (off by
  default) it caches the frozen dense part deq(W_q) per layer while the cache budget allows; the weak columns stay
  live because they train.
- ``cpu``    : reads the owq-pack v1 planes directly: a compiled GEMV for decode-sized M (``kernels/owq_cpu.cpp``)
  and a slab-at-a-time dequantize + matmul otherwise (:mod:`wct.kernels.cpu_backend`); no dense copy resident.
- ``triton`` : fused dequant GEMV (M ≤ 4) / split-K tensor-core GEMM with the weak columns as a K-tail, and a dX
  kernel over the same planes (``kernels/owq_triton.py``). Needs a CUDA GPU, or ``TRITON_INTERPRET=1`` (tests).
- ``cuda``   : CUDA C++ decode GEMV (M ≤ 8) and dequantize-to-scratch + one GEMM (``kernels/owq_cuda.cu``), built
  by nvcc on first use or by ``python -m wct.kernels build`` and loaded with ctypes.
- ``auto``   : on a GPU, ``cuda`` for decode-sized M when its library loads (built by nvcc if needed) and a probe
  launch on the device returns the right result, else
  ``triton``, else ``cuda``'s dequant path; on CPU ``cpu``.

Every product goes through the custom op ``torch.ops.wct.owq_linear`` (see :mod:`wct.kernels.op`). Imports run one
way: this module imports the op and the backends; the op imports the backends, never this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import weakref
from typing import Iterator

import torch

import wct.kernels.cpu_backend as cpu_backend
import wct.kernels.cuda_backend as cuda_backend
import wct.kernels.reference as reference
from wct.device import KERNELS
from wct.errors import WCTError
from wct.kernels.op import owq_linear_op

log = logging.getLogger("wct.kernels")

CUDA_GEMV_MAX_M = 8

_config: dict = {
    "kernel": os.environ.get("WCT_KERNEL", "auto"),
    "cache_dense": os.environ.get("WCT_CACHE_DENSE", "auto"),  # "auto" (= off) | "1" | "0"
    "cache_budget_bytes": None,  # None: no cache unless forced with "1"
}
_resolved: dict[tuple, str] = {}
_dense_cache: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def configure(kernel: str | None = None, cache_dense: str | bool | None = None, cache_budget_bytes: int | None = None) -> None:
    """Set the backend (``auto|torch|cpu|triton|cuda``) and the torch backend's dense-cache policy."""
    if kernel is not None:
        if kernel not in KERNELS:
            raise WCTError(f"kernel={kernel!r} is not a backend; choose one of {', '.join(KERNELS)}")
        _config["kernel"] = kernel
    if cache_dense is not None:
        mode = {True: "1", False: "0"}.get(cache_dense, cache_dense)
        if mode not in ("auto", "0", "1"):
            raise WCTError(f"cache_dense={cache_dense!r} is not a policy; use auto, 1 (always) or 0 (never)")
        _config["cache_dense"] = mode
        clear_cache()
    if cache_budget_bytes is not None:
        _config["cache_budget_bytes"] = cache_budget_bytes


@contextlib.contextmanager
def use_kernel(kernel: str) -> Iterator[None]:
    """Run a block with another backend."""
    old = _config["kernel"]
    configure(kernel=kernel)
    try:
        yield
    finally:
        _config["kernel"] = old


@contextlib.contextmanager
def no_dense_cache() -> Iterator[None]:
    """Run a block with the torch backend building each dense weight per call and dropping it (the same bits as
    cached calls, wct.kernels.reference): quantization runs each quantized block once, so a cache would only add a
    dense block to its peak memory."""
    old = _config["cache_dense"]
    _config["cache_dense"] = "0"
    try:
        yield
    finally:
        _config["cache_dense"] = old


def clear_cache() -> None:
    """Drop every cached dense weight."""
    _dense_cache.clear()


def triton_available(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(kernel: str, device: torch.device, m: int) -> str:
    """The backend that runs ``kernel`` for inputs on ``device`` with ``m`` rows; WCTError if it cannot run."""
    if kernel not in KERNELS:
        raise WCTError(f"kernel={kernel!r} is not a backend; choose one of {', '.join(KERNELS)}")
    if kernel == "triton" and not triton_available(device):
        raise WCTError(
            f"kernel=triton needs CUDA tensors (got {device.type}) and the triton package; "
            "use kernel=torch or kernel=auto on CPU (tests may set TRITON_INTERPRET=1)"
        )
    if kernel == "cuda":
        problem = cuda_backend.unavailable_reason(device)
        if problem:
            raise WCTError(f"kernel=cuda is unavailable: {problem}; use kernel=triton, kernel=torch or kernel=auto")
    if kernel == "cpu" and device.type != "cpu":
        raise WCTError(f"kernel=cpu runs CPU tensors (got {device.type}); use kernel=auto, triton or cuda on a GPU")
    if kernel != "auto":
        return kernel
    if device.type != "cuda":
        return "cpu" if device.type == "cpu" else "torch"
    problem = cuda_backend.unavailable_reason(device)  # builds the library if needed and probes a real launch
    if problem:
        log.warning("kernel=auto skips the cuda backend: %s", problem)
    cuda_ok = problem is None
    if cuda_ok and m <= CUDA_GEMV_MAX_M:
        return "cuda"
    if triton_available(device):
        return "triton"
    return "cuda" if cuda_ok else "torch"


def backends_on(device: torch.device) -> dict[str, str | None]:
    """Every backend but ``auto``, with None where it runs on ``device`` and otherwise why not (the message of
    :func:`resolve_backend`): what the benchmarks iterate over."""
    reasons = {}
    for backend in KERNELS[1:]:
        try:
            resolve_backend(backend, device, 1)
            reasons[backend] = None
        except WCTError as e:
            reasons[backend] = str(e)
    return reasons


def cache_budget(device: torch.device) -> int:
    """Bytes the torch backend may spend on dense weights on ``device`` (0: no cache). Off unless forced with
    ``cache_dense=1`` / ``WCT_CACHE_DENSE=1``: a dense copy of every layer holds more memory than the FP model (the
    CPU backend reads the planes instead); ``cache_budget_bytes`` then bounds it."""
    if _config["cache_dense"] != "1":
        return 0
    if _config["cache_budget_bytes"] is not None:
        return _config["cache_budget_bytes"]
    return 1 << 62


def cached_dense(layer, dtype: torch.dtype) -> torch.Tensor | None:
    """The layer's dequantized dense part [N, K] in ``dtype``, built once and reused while the budget allows.

    Keyed by dtype, device and the packed buffers' storage and version counters, so ``.to()`` and
    ``load_state_dict`` invalidate it. Returns None when caching is off or the budget is spent."""
    packed = layer.packed
    device = layer.scales.device
    budget = cache_budget(device)
    if budget == 0:
        return None
    key = (dtype, device, tuple((t.data_ptr(), t._version) for t in packed))
    hit = _dense_cache.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    _dense_cache.pop(layer, None)
    size = layer.out_features * layer.in_features * torch.empty(0, dtype=dtype).element_size()
    used = sum(t.numel() * t.element_size() for _, t in _dense_cache.values())
    if used + size > budget:
        return None
    with torch.inference_mode(False):  # a cache built under inference_mode could not be saved for a later backward
        dense = reference.dense_weight(
            list(layer.planes.values()), layer.scales, layer.zeros, layer.bits, layer.in_features, dtype
        )
    _dense_cache[layer] = (key, dense)
    return dense


def kernel_layout(backend: str) -> str:
    """The code layout ``backend`` reads at 3 bits: the kernel words on triton and cuda (their fast GEMVs decode
    them; every other path of theirs reads them too), the v1 planes on cpu; torch reads either (``v1`` here)."""
    return "words3" if backend in ("triton", "cuda") else "v1"


def hold_kernel_layout(layer, backend: str) -> None:
    """Convert a 3-bit ``layer`` in place to the layout ``backend`` reads (:func:`kernel_layout`; the torch backend
    reads both and converts nothing): one resident copy of the codes, 3/8 byte per weight in either layout
    (docs/kernels.md "3-bit words"). Not while torch.compile traces or a CUDA graph captures (nothing may be
    replaced there; the kernels read the layout held), nor on sharded (DTensor) codes, which belong to FSDP;
    :func:`owq_linear` calls it on every product except in a distributed run (DDP and FSDP hold references to the
    parameters: call :func:`hold_kernel_layouts` before wrapping the model)."""
    if layer.bits != 3 or backend == "torch" or torch.compiler.is_compiling() or layer.layout == kernel_layout(backend):
        return
    codes = list(layer.planes.values())
    if any(type(t.data) is not torch.Tensor for t in codes):
        return
    if codes[0].is_cuda and torch.cuda.is_current_stream_capturing():
        return
    layer.to_layout(kernel_layout(backend))


def hold_kernel_layouts(model: torch.nn.Module, kernel: str | None = None) -> int:
    """:func:`hold_kernel_layout` for every 3-bit OWQLinear of ``model`` on the backend ``kernel`` (default: the
    configured one) resolves to on the layer's device; the number of layers converted. Loaders call it after
    placing a model, so a model is compiled or graph-captured in the layout its kernels read."""
    kernel = kernel or _config["kernel"]
    done = 0
    for layer in model.modules():
        if getattr(layer, "bits", None) == 3 and hasattr(layer, "to_layout"):
            before = layer.layout
            hold_kernel_layout(layer, resolve_backend(kernel, layer.scales.device, 1))
            done += layer.layout != before
    return done


def resident_bytes(layer) -> int:
    """Bytes held for an OWQLinear ``layer`` now: its parameters and buffers (the codes in the layout held, the
    same bytes in both) plus the torch backend's opt-in dense cache."""
    own = sum(t.numel() * t.element_size() for t in [*layer.parameters(recurse=False), *layer.buffers(recurse=False)])
    hit = _dense_cache.get(layer)
    return own + (0 if hit is None else hit[1].numel() * hit[1].element_size())


@torch.compiler.assume_constant_result
def _backend_for(kernel: str, device: torch.device, decode: bool) -> str:
    """:func:`resolve_backend` once per (kernel, device, M ≤ CUDA_GEMV_MAX_M), announced in the log; a constant to
    torch.compile (it reads files and the environment, which must not be traced)."""
    key = (kernel, device, decode)
    if key not in _resolved:
        _resolved[key] = resolve_backend(kernel, device, 1 if decode else CUDA_GEMV_MAX_M + 1)
        log.info("owq_linear backend: %s (kernel=%s, device=%s)", _resolved[key], kernel, device.type)
    return _resolved[key]


def owq_linear(x: torch.Tensor, layer) -> torch.Tensor:
    """y = deq(W_q)·x + W_o·x[idx] + b for an :class:`wct.nn.OWQLinear` ``layer`` on the configured backend."""
    decode = x.numel() <= CUDA_GEMV_MAX_M * x.shape[-1]
    backend = _backend_for(_config["kernel"], x.device, decode)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        hold_kernel_layout(layer, backend)  # under DDP/FSDP the wrapper owns the parameters: convert before wrapping
    if backend == "cpu" and not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or layer.weak_weight.requires_grad)
    ):  # no autograd, no tracing: skip the custom op's Python dispatch (a large share of a CPU decode step)
        y = cpu_backend.forward(x.reshape(-1, x.shape[-1]), layer.weak_weight, list(layer.planes.values()),
                                layer.scales, layer.zeros, layer.weak_idx, layer.bias, None, layer.bits)
        return y.reshape(*x.shape[:-1], layer.out_features)
    dense = None
    if backend == "torch" and not torch.compiler.is_compiling():  # eager-only state; compiled graphs dequantize
        dense = cached_dense(layer, x.dtype)
    return owq_linear_op(x, layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx,
                         layer.bias, dense, layer.bits, backend)
