"""The ``cuda`` backend: ``kernels/owq_cuda.cu`` built by nvcc into a shared library and called through ctypes.

No torch C++ build is involved: the translation unit is torch-free (extern "C" launchers taking raw pointers and a
``cudaStream_t``), so the CPU and CUDA torch wheels both work. The library is built for ``ARCHS`` on first use or by
``python -m wct.kernels build`` into ``$WCT_KERNEL_CACHE`` (default ``~/.cache/wct/kernels``), named by a hash of
the sources and flags so edited sources rebuild; SASS for each arch plus PTX of the newest, which the driver
compiles for newer GPUs. M ≤ ``owq_gemv_max_m()`` runs the decode GEMV (fused split-K: one launch); larger M
(and dX) dequantizes into a scratch [K, N] (W_o scattered in) followed by one torch.matmul (cuBLAS).
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
from wct.kernels.workspace import tile_counters
from wct.format.layout import holds_words3, kernel_words3

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
    gencode.append(f"-gencode=arch=compute_{max(archs, key=int)},code=compute_{max(archs, key=int)}")
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
    return probe(device)


@functools.cache
def load(path: Path | None = None) -> ctypes.CDLL:
    """The loaded library (built first if missing), with the launchers' argument types declared."""
    path = path or library_path()
    if not path.is_file():
        logging.getLogger("wct.kernels").info("building the OWQ CUDA kernels with nvcc for sm_%s", ",".join(ARCHS))
        build(out=path)
    lib = ctypes.CDLL(str(path))
    lib.owq_gemv.argtypes = [_I, _I, _P, _I64, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, *[_I] * 9, _P]
    lib.owq_dequant.argtypes = [_I, _I, _P, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P]
    return lib


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_NO_IMAGE = {209, 222}  # cudaErrorNoKernelImageForDevice, cudaErrorUnsupportedPtxVersion


def _check(err: int, what: str, device: torch.device) -> None:
    if err in _NO_IMAGE:
        major, minor = torch.cuda.get_device_capability(device)
        raise WCTError(
            f"kernel=cuda: the library {library_path().name} has no code for this GPU (sm_{major}{minor}; built for "
            f"sm_{', sm_'.join(ARCHS)}); rebuild with `python -m wct.kernels build --arch {major}{minor}` or use kernel=triton"
        )
    if err:
        raise WCTError(f"CUDA kernel {what} failed with cudaError {err}; run with CUDA_LAUNCH_BLOCKING=1 to locate it")


def _common(x, planes, scales, weak_weight, in_features: int):
    """(dtype code, scales-are-float flag, scales, planes a/b, W_o in x's dtype, group size) for the launchers; one
    group is passed as the padded K (a multiple of 32, never exceeded). The 3-bit kernel words come as a = b (the
    launchers get them as pw: :func:`_words_ptr`)."""
    if x.dtype not in _DTYPES:
        raise WCTError(f"kernel=cuda supports float32/float16/bfloat16 activations, got {x.dtype}; use kernel=torch")
    group = in_features // scales.shape[0] if scales.shape[0] > 1 else _cdiv(in_features, 32) * 32
    if group % 32:
        raise WCTError(f"kernel=cuda needs a group size that is a multiple of 32 (got {group}); use kernel=triton")
    scales = scales.contiguous() if scales.dtype == x.dtype else scales.float().contiguous()
    a = planes[0].contiguous()
    b = planes[1].contiguous() if len(planes) > 1 else a
    scale_is_float = int(scales.dtype == torch.float32)
    return _DTYPES[x.dtype], scale_is_float, scales, a, b, weak_weight.to(x.dtype).contiguous(), group


def _words_ptr(planes: list[Tensor], bits: int, a: Tensor) -> int | None:
    """The launchers' pw: the address of the 3-bit kernel words when the layer holds them (``a`` is then the words,
    made contiguous), else null (the v1 planes)."""
    return a.data_ptr() if holds_words3(planes, bits) else None


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
    _check(load().owq_dequant(act, sf, a.data_ptr(), b.data_ptr(), _words_ptr(planes, bits, a), scales.data_ptr(),
                              zeros.contiguous().data_ptr(),
                              idx.data_ptr(), wo.data_ptr(), out.data_ptr(), n, in_features, idx.numel(), group, bits,
                              _stream(scales.device)), "owq_dequant", scales.device)
    return out


_SMEM_LIMIT = 48 * 1024  # bytes of shared memory a launch may use without opting in

def split_plan(m: int, n: int, k: int, n_o: int, group: int | None, sms: int) -> tuple[int, int]:
    """(splits, k_per_split) for the GEMV: enough K splits that ≥ 2 blocks of 512 columns run per SM, chunks a
    multiple of 32 rows and of the group (grouped layers), at most 1024 rows, within 48 KiB of shared memory (for the
    kernel's template row count: M rounded up to 1, 2, 4 or 8)."""
    m = 1 << (m - 1).bit_length()
    align = 32 if group is None else max(32, group)
    want = max(1, (2 * sms) // _cdiv(n, 512))
    kps = max(align, _cdiv(_cdiv(k, want), align) * align)
    kps = min(kps, max(align, 1024 // align * align))
    while True:
        splits = _cdiv(k, kps)
        if 4 * m * (kps + _cdiv(n_o, splits)) <= _SMEM_LIMIT or kps <= align:
            return splits, kps
        kps -= align


def gemv(x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
         bias: Tensor | None, bits: int, splits: int | None = None, path: int = 0) -> Tensor:
    """y [M, N] for x [M, K] (M ≤ 8) by the GEMV; ``splits`` forces the K split count, ``path`` 1 forces the
    general kernel (tests compare it with the fast one). At 3 bits the fast kernel reads the 3-bit kernel words
    (``planes`` = [words], :func:`wct.format.layout.kernel_words3`: the layout wct.kernels.dispatch holds a 3-bit
    layer in on this backend; the general kernel reads them too); from the v1 planes 3 bits take the general
    kernel."""
    m, k = x.shape
    lib = load()
    act, sf, scales_c, a, b, wo, group = _common(x, planes, scales, weak_weight, k)
    n = scales.shape[1]
    grouped = scales.shape[0] > 1
    if splits is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits, kps = split_plan(m, n, k, weak_idx.numel(), group if grouped else None, sms)
    else:
        align = group if grouped else 32
        kps = _cdiv(_cdiv(k, splits), align) * align
        splits = _cdiv(k, kps)
    ws = torch.empty(splits if splits > 1 else 0, m, n, dtype=torch.float32, device=x.device)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    bias_c = bias.to(x.dtype).contiguous() if bias is not None else None
    idx = weak_idx.contiguous()
    err = lib.owq_gemv(act, sf, x.data_ptr(), x.stride(0), a.data_ptr(), b.data_ptr(), _words_ptr(planes, bits, a),
                       scales_c.data_ptr(),
                       zeros.contiguous().data_ptr(), idx.data_ptr(), wo.data_ptr(),
                       bias_c.data_ptr() if bias_c is not None else None, ws.data_ptr(),
                       tile_counters(x.device, _cdiv(n, 256)).data_ptr(), y.data_ptr(), m, n, k, idx.numel(), group, bits, splits,
                       kps, path, _stream(x.device))
    _check(err, "owq_gemv", x.device)
    return y


def forward(
    x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    bias: Tensor | None, dense: Tensor | None, bits: int,
) -> Tensor:
    """y [M, N] for x [M, K]: the GEMV for small M, else dequantize-to-scratch and one GEMM."""
    m, k = x.shape
    if m > load().owq_gemv_max_m():
        y = x @ dequantize(planes, scales, zeros, weak_idx, weak_weight, bits, k, x.dtype)
        return y if bias is None else y + bias.to(y.dtype)
    if x.stride(-1) != 1:
        x = x.contiguous()
    return gemv(x, weak_weight, planes, scales, zeros, weak_idx, bias, bits)


@functools.cache
def probe(device: torch.device) -> str | None:
    """Launch the GEMV once on ``device`` (a 1×64 → 4 layer, 3 bits, the fast kernel) and check its result: why the
    backend cannot run there, or None. Inside CUDA-graph capture only the launch status is checked (no
    synchronization)."""
    try:
        load()
    except (WCTError, OSError) as e:
        return str(e)
    planes = [kernel_words3(torch.full((4, 4), 0x55555555, dtype=torch.int32, device=device),  # every code 1
                            torch.zeros(2, 4, dtype=torch.int32, device=device))]
    scales = torch.ones(1, 4, dtype=torch.float16, device=device)
    zeros = torch.zeros(1, 4, dtype=torch.uint8, device=device)
    x = torch.ones(1, 64, dtype=torch.float16, device=device)
    empty = torch.zeros(0, dtype=torch.int32, device=device)
    try:
        y = gemv(x, torch.zeros(0, 4, dtype=torch.float16, device=device), planes, scales, zeros, empty, None, 3)
    except WCTError as e:
        return str(e)
    if torch.cuda.is_current_stream_capturing():
        return None
    return None if torch.equal(y.float().cpu(), torch.full((1, 4), 64.0)) else "the probe GEMV gave a wrong result"


def grad_input(
    dy: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    dense: Tensor | None, bits: int, in_features: int,
) -> Tensor:
    """dX [M, K] = dY·W_full through the dequantized scratch."""
    return dy @ dequantize(planes, scales, zeros, weak_idx, weak_weight, bits, in_features, dy.dtype).t()
