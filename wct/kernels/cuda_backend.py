"""The ``cuda`` backend: ``kernels/owq_cuda.cu`` built by nvcc into a shared library and called through ctypes.

No torch C++ build is involved: the translation unit is torch-free (extern "C" launchers taking raw pointers and a
``cudaStream_t``), so the CPU and CUDA torch wheels both work. The library is built for ``ARCHS`` on first use or by
``python -m wct.kernels build`` into ``$WCT_KERNEL_CACHE`` (default ``~/.cache/wct/kernels``), named by a hash of
the sources and flags so edited sources rebuild. M ≤ ``owq_gemv_max_m()`` runs the decode GEMV; larger M (and dX)
dequantizes into a scratch [K, N] (W_o scattered in) followed by one torch.matmul (cuBLAS).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from wct.errors import WCTError
from wct.kernels.sources import source_dir

ARCHS = ("80", "90")
SOURCES = ("owq_cuda.cu", "owq_dequant.cuh")
_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_P = ctypes.c_void_p
_I = ctypes.c_int
_I64 = ctypes.c_int64


@functools.cache
def nvcc() -> str | None:
    """The nvcc executable: ``$CUDA_HOME/bin/nvcc`` or the one on PATH."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def _flags(archs: tuple[str, ...]) -> list[str]:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-cudart=static", *gencode]


@functools.cache
def library_path(archs: tuple[str, ...] = ARCHS) -> Path:
    """Where the library for these sources and arches lives (built or not); computed once per process."""
    h = hashlib.sha256(" ".join(_flags(archs)).encode())
    for name in SOURCES:
        h.update((source_dir() / name).read_bytes())
    cache = Path(os.environ.get("WCT_KERNEL_CACHE", Path.home() / ".cache" / "wct" / "kernels"))
    return cache / f"libwct_owq_{h.hexdigest()[:16]}.so"


def build(archs: tuple[str, ...] = ARCHS, out: Path | None = None) -> Path:
    """Compile ``owq_cuda.cu`` for ``archs`` (e.g. ("80", "90")) into ``out`` (default: :func:`library_path`)."""
    compiler = nvcc()
    if compiler is None:
        raise WCTError("nvcc not found: install the CUDA toolkit (>= 12) or set CUDA_HOME, then run `python -m wct.kernels build`")
    out = Path(out) if out else library_path(archs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    os.close(fd)
    cmd = [compiler, *_flags(archs), "-o", tmp, str(source_dir() / "owq_cuda.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        os.unlink(tmp)
        raise WCTError(f"nvcc failed building the OWQ CUDA kernels ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    os.replace(tmp, out)
    return out


def unavailable_reason(device: torch.device) -> str | None:
    """Why the cuda backend cannot run on ``device``, or None."""
    if device.type != "cuda":
        return f"it needs CUDA tensors (got {device.type})"
    if not library_path().is_file() and nvcc() is None:
        return f"no built library at {library_path()} and no nvcc to build it (run `python -m wct.kernels build` where the CUDA toolkit is installed)"
    return None


@functools.cache
def load(path: Path | None = None) -> ctypes.CDLL:
    """The loaded library (built first if missing), with the launchers' argument types declared."""
    path = path or library_path()
    if not path.is_file():
        logging.getLogger("wct.kernels").info("building the OWQ CUDA kernels with nvcc for sm_%s", ",".join(ARCHS))
        build(out=path)
    lib = ctypes.CDLL(str(path))
    lib.owq_gemv.argtypes = [_I, _I, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, _I, _P]
    lib.owq_dequant.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P]
    return lib


@functools.cache
def loads() -> bool:
    """Whether the library loads (building it first if needed); ``kernel=auto`` skips the backend when not, and the
    reason is logged once."""
    try:
        load()
        return True
    except (WCTError, OSError) as e:
        logging.getLogger("wct.kernels").warning("kernel=auto skips the cuda backend: %s", e)
        return False


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check(err: int, what: str) -> None:
    if err:
        raise WCTError(f"CUDA kernel {what} failed with cudaError {err}; run with CUDA_LAUNCH_BLOCKING=1 to locate it")


def _common(x, planes, scales, weak_weight, in_features: int):
    """(dtype code, scales-are-float flag, scales, planes a/b, W_o in x's dtype, group size) for the launchers."""
    if x.dtype not in _DTYPES:
        raise WCTError(f"kernel=cuda supports float32/float16/bfloat16 activations, got {x.dtype}; use kernel=torch")
    group = in_features // scales.shape[0]
    if group % 32 and scales.shape[0] > 1:
        raise WCTError(f"kernel=cuda needs a group size that is a multiple of 32 (got {group}); use kernel=triton")
    scales = scales.contiguous() if scales.dtype == x.dtype else scales.float().contiguous()
    a = planes[0].contiguous()
    b = planes[1].contiguous() if len(planes) > 1 else a
    scale_is_float = int(scales.dtype == torch.float32)
    return _DTYPES[x.dtype], scale_is_float, scales, a, b, weak_weight.to(x.dtype).contiguous(), group


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def dequantize(
    planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor, weak_weight: Tensor, bits: int,
    in_features: int, dtype: torch.dtype,
) -> Tensor:
    """W_fullᵀ [K, N] in ``dtype`` in a fresh scratch tensor (dequant kernel + weak-row scatter)."""
    probe = torch.empty(0, dtype=dtype, device=scales.device)
    act, sf, scales, a, b, wo, group = _common(probe, planes, scales, weak_weight, in_features)
    n = scales.shape[1]
    out = torch.empty(in_features, n, dtype=dtype, device=scales.device)
    idx = weak_idx.contiguous()
    _check(load().owq_dequant(act, sf, a.data_ptr(), b.data_ptr(), scales.data_ptr(), zeros.contiguous().data_ptr(),
                              idx.data_ptr(), wo.data_ptr(), out.data_ptr(), n, in_features, idx.numel(), group, bits,
                              _stream(scales.device)), "owq_dequant")
    return out


def forward(
    x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    bias: Tensor | None, dense: Tensor | None, bits: int,
) -> Tensor:
    """y [M, N] for x [M, K]: the GEMV for small M, else dequantize-to-scratch and one GEMM."""
    m, k = x.shape
    lib = load()
    if m > lib.owq_gemv_max_m():
        y = x @ dequantize(planes, scales, zeros, weak_idx, weak_weight, bits, k, x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
    x = x.contiguous()
    act, sf, scales_c, a, b, wo, group = _common(x, planes, scales, weak_weight, k)
    n = scales.shape[1]
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    want = max(1, (2 * sms) // _cdiv(n, 256))  # K splits so that ≥ 2 blocks of 256 columns run per SM
    k_per_split = min(1024, max(256, _cdiv(_cdiv(k, want), 32) * 32))  # ≤ 32 KiB of staged activations
    splits = _cdiv(k, k_per_split)
    ws = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_c = bias.to(x.dtype).contiguous() if bias is not None else None
    idx = weak_idx.contiguous()
    _check(lib.owq_gemv(act, sf, x.data_ptr(), x.stride(0), a.data_ptr(), b.data_ptr(), scales_c.data_ptr(),
                        zeros.contiguous().data_ptr(), idx.data_ptr(), wo.data_ptr(),
                        bias_c.data_ptr() if bias_c is not None else None, ws.data_ptr(), y.data_ptr(),
                        m, n, k, idx.numel(), group, bits, splits, k_per_split, _stream(x.device)), "owq_gemv")
    return y


def grad_input(
    dy: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    dense: Tensor | None, bits: int, in_features: int,
) -> Tensor:
    """dX [M, K] = dY·W_full through the dequantized scratch."""
    return dy @ dequantize(planes, scales, zeros, weak_idx, weak_weight, bits, in_features, dy.dtype).t()
