"""Where the verbs run and in which dtype: ``device=auto|cpu|cuda|cuda:N`` and ``model.dtype=auto``.

``auto`` picks the first CUDA device when torch sees one, else the CPU. ``model.dtype=auto`` is fp32 on a CPU
(fp16 matmuls are slow or missing there, bf16 loses accuracy for no speed on most CPUs) and bf16 on a GPU that
supports it, else fp16 (what the reference OWQ code and GPTQModel use on a GPU). An explicit dtype is kept as is.
"""

from __future__ import annotations

import re

import torch

from wct.errors import WCTError

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


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """The compute dtype of unquantized tensors: ``auto`` -> fp32 on a CPU, bf16 (or fp16 where the GPU lacks
    bf16) on CUDA; anything else through :func:`as_dtype` (None keeps the stored dtypes)."""
    if spec != "auto":
        return as_dtype(spec)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def place(spec_device: str | None, spec_dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype | None]:
    """``(device, dtype)`` of a verb's ``device`` and ``model.dtype`` settings, both checked before any loading."""
    device = resolve_device(spec_device)
    return device, resolve_dtype(spec_dtype, device)
