"""Where the verbs run and in which dtype: ``device=auto|cpu|cuda|cuda:N``, ``model.dtype=auto`` and
``trainer.precision=auto``.

``auto`` picks the first CUDA device when torch sees one, else the CPU. ``model.dtype=auto`` and
``trainer.precision=auto`` follow one rule, by what the hardware computes natively: bf16 on a GPU that supports
it (fp16 on one that does not, what the reference OWQ code and GPTQModel use) and on a CPU with AVX512-BF16 or AMX;
fp32 on every other CPU, where bf16 is emulated (a bf16 matmul ran ~4x slower than fp32 on a 2-core Xeon without
AVX512-BF16) and fp16 matmuls are slow or missing. An explicit dtype or precision is kept as is.
"""

from __future__ import annotations

import logging
import re
import time

import torch

from wct.errors import WCTError

log = logging.getLogger("wct")

DEVICES = "auto, cpu, cuda or cuda:N"
KERNELS = ("auto", "torch", "cpu", "triton", "cuda")  # backends of OWQLinear's product (wct.kernels, docs/kernels.md)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """The torch device named by ``spec`` (``auto``/None, ``cpu``, ``cuda``, ``cuda:N``); WCTError if it is
    unknown or names a CUDA device this machine lacks."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    name = (spec or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", name)
    if match is None:
        raise WCTError(f"device={spec!r} is unknown; use {DEVICES}")
    if not torch.cuda.is_available():
        raise WCTError(f"device={spec} but torch sees no CUDA device on this machine (torch {torch.__version__}); "
                       "use device=cpu, or device=auto to take a GPU only when there is one")
    index, count = int(match.group(1) or 0), torch.cuda.device_count()
    if index >= count:
        raise WCTError(f"device={spec} but this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}; "
                       "pick one of those")
    return torch.device("cuda", index)


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``torch.float32`` / ``"float32"`` / ``"fp32"`` / ``"bf16"`` ... -> a torch dtype (None stays None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    name = names.get(str(dtype), str(dtype))
    if name not in ("float32", "float16", "bfloat16", "float64"):
        raise WCTError(f"dtype={dtype!r} is unknown; use float32, bfloat16 or float16")
    return getattr(torch, name)


def accelerator_is_gpu(accelerator: str) -> bool:
    """Whether Lightning's ``trainer.accelerator`` puts the run on a GPU (``auto``: when torch sees one)."""
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), so bf16 matmuls beat fp32 ones."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(device: torch.device) -> torch.dtype:
    """The ``auto`` compute dtype on ``device``: bf16 where it is native (GPU with bf16, CPU with AVX512-BF16/AMX),
    fp16 on a GPU without bf16, fp32 on other CPUs. A CUDA device torch does not see (``model.estimate_only`` of a
    GPU run on a CPU machine) counts as one with bf16, as every GPU since Ampere."""
    if device.type == "cuda":
        native = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if native else torch.float16
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The compute dtype of unquantized tensors: ``auto`` -> :func:`auto_dtype`; anything else through
    :func:`as_dtype` (None keeps the stored dtypes)."""
    if spec != "auto":
        return as_dtype(spec)
    return auto_dtype(device)


def bf16_slowdown(n: int = 768, repeats: int = 3) -> float:
    """How many times slower an n×n bf16 matmul runs than an fp32 one on this CPU, measured now (~0.1 s)."""
    def best(dtype: torch.dtype) -> float:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.bfloat16) / best(torch.float32)


AUTO_PRECISION = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed", torch.float32: "32-true"}
AUTO_REASON = {
    (True, torch.bfloat16): "the GPU computes bf16 natively",
    (True, torch.float16): "this GPU has no bf16",
    (False, torch.bfloat16): "this CPU computes bf16 natively (AVX512-BF16/AMX)",
    (False, torch.float32): "this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 would be emulated",
}


def resolve_precision(spec: str, gpu: bool) -> tuple[str, str]:
    """Lightning's precision for ``trainer.precision=spec`` on a GPU (``gpu``) or the CPU, and why, in words.

    ``auto``: ``bf16-mixed`` where bf16 is native (:func:`auto_dtype`), ``16-mixed`` on a GPU without bf16,
    ``32-true`` on a CPU without AVX512-BF16/AMX. An explicit value is obeyed; an explicit bf16 on such a CPU logs
    one WARNING with the slowdown measured on the spot."""
    if spec != "auto":
        if spec.startswith("bf16") and not gpu and not cpu_native_bf16():
            log.warning("trainer.precision=%s on a CPU without native bf16 (no AVX512-BF16/AMX): bf16 matmuls run "
                        "%.1fx slower than fp32 here (measured now); trainer.precision=auto picks 32-true",
                        spec, bf16_slowdown())
        return spec, "as set"
    dtype = auto_dtype(torch.device("cuda" if gpu else "cpu"))
    return AUTO_PRECISION[dtype], f"auto: {AUTO_REASON[gpu, dtype]}"


def place(spec_device: str | None, spec_dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype | None]:
    """``(device, dtype)`` of a verb's ``device`` and ``model.dtype`` settings, both checked before any loading."""
    device = resolve_device(spec_device)
    return device, resolve_dtype(spec_dtype, device)
