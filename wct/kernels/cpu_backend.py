"""The CPU backend: OWQLinear's product read straight from the owq-pack v1 planes, one resident copy of the weights.

- Decode-sized inputs (M ≤ :data:`GEMV_MAX_M` rows, 3- or 4-bit): a compiled GEMV (``kernels/owq_cpu.cpp``, built
  by ``torch.utils.cpp_extension`` with ``-O3 -march=native`` on first use and cached by torch) that unpacks the
  codes in registers and computes Σ_g s_g·Σ_{k∈g} x_k·(q_k − z_g) (docs/kernels.md "CPU backend"). By default
  (``WCT_CPU_GEMV=int16``, AVX-512) each row of x is rounded to 15 bits with the scale xs = max_{k∉weak}|x_k| / 16319
  and the per-group sums are exact int32 dot products (VNNI): |Δy_n| ≤ (xs/2)·Σ_g |s_{g,n}|·Σ_{k∈g} |q_k − z_g|
  plus fp32 rounding, a relative 2^-15 of the row's largest non-weak activation. ``WCT_CPU_GEMV=fp32`` (and CPUs
  without AVX-512) runs the fp32 GEMV, exact up to fp32 rounding.
- Larger M (prefill, training) and 2-bit: a bounded workspace — a slab of at most ``DEQUANT_CHUNK_ELEMS`` weights
  is dequantized at a time (the compiled ``owq_dequant``, written as the [K, n] fp32 slab the BLAS multiplies and
  bit-identical to :func:`wct.format.layout.dequantize_dense`; that function itself for 2-bit or without the extension) and
  multiplied, so no dense copy of a layer outlives the call. dX = dY·W_full takes the same slabs.
- The weak columns are a separate small product x[:, idx]·W_o (their codes equal the zero-point, so the planes
  contribute exactly 0 there).

Nothing is converted or cached: the planes the checkpoint stores are the planes the kernel reads, so resident
weight bytes equal stored bytes and a converted model saves bit-identically. If the extension cannot be built or
loaded (no C++ compiler, no ninja), one ``error:`` line is logged naming the fallback (the slab path with the torch
dequantization for every M).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from wct.io import atomic_file
from wct.kernels.reference import add_weak, add_weak_dx
from wct.kernels.sources import source_dir
from wct.format.layout import DEQUANT_CHUNK_ELEMS, dequantize_dense, holds_words3, named_codes

log = logging.getLogger("wct.kernels")

# Rows the compiled GEMV takes; larger batches dequantize a slab at a time and call the BLAS. Measured on SmolLM2's
# shapes (scripts/bench_kernels.py --cpu-gemv-json, results/bench_cpu_gemv.json, 2 threads, the int16 GEMV): per
# decoder block the GEMV wins at M = 96 by 40 % at 4 bits (2368 vs 3920 µs) and 11 % at 3 bits (3396 vs 3821); at
# M = 128 the 3-bit margin is within run-to-run noise (6 %, 2 % in another run). The fp32 GEMV (WCT_CPU_GEMV=fp32)
# won only up to M = 32 at 4 bits and 24 at 3 bits, the value this constant had before.
GEMV_MAX_M = 96
SOURCES = ("owq_cpu.cpp", "decode_cpu.cpp")  # the kernels, and the decode step built on them (one extension)
_ext: dict = {}


def extension():
    """The compiled module (``owq_gemv``, ``owq_dequant``, ``gemv_mode``), built on first use (its GEMV mode logged
    once); None (after one ``error:`` log line) when it cannot be built or ``WCT_CPU_KERNEL=0``."""
    if "mod" in _ext:
        return _ext["mod"]
    _ext["mod"] = None
    if os.environ.get("WCT_CPU_KERNEL", "1") == "0":
        log.info("owq_linear cpu backend: WCT_CPU_KERNEL=0, the slab path serves every batch size")
        return None
    try:
        from torch.utils.cpp_extension import load

        _ext["mod"] = load(
            name="wct_owq_cpu", sources=[str(p) for p in staged_sources()],
            # -fopenmp: at::parallel_for is header code that runs serially unless the extension itself is built
            # with OpenMP (it then shares torch's libgomp, already loaded under the same soname)
            extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False,
        )
    except Exception as exc:  # a compiler, ninja or header problem: any of them means "use the fallback"
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        log.error("error: the wct CPU kernels (kernels/owq_cpu.cpp) could not be built or loaded (%s); falling back "
                  "to the slab path (dequantize a slab with torch ops, then matmul), which is correct but slower. "
                  "Fix: install a C++ compiler and `pip install ninja`, or set WCT_CPU_KERNEL=0 to silence this", reason)
    if _ext["mod"] is not None:
        log.info("owq_linear cpu backend: decode GEMV %s (WCT_CPU_GEMV=int16|fp32)", _ext["mod"].gemv_mode())
    return _ext["mod"]


def staged_sources() -> list[Path]:
    """The extension's sources, copied (once, atomically) to ``<torch's extension root: $TORCH_EXTENSIONS_DIR or
    ~/.cache/torch_extensions>/wct_owq_cpu_src/<sha256 of their contents>/``. torch rebuilds an extension whenever
    its ninja command changes, and the command names the source paths: a checkout's ``kernels/`` and an installed
    wheel's ``wct/kernels_src`` would rebuild each other's build (about 40 s each time). Staged by content, every copy of the same sources compiles once."""
    from torch.utils.cpp_extension import get_default_build_root

    texts = {name: (source_dir() / name).read_bytes() for name in SOURCES}
    digest = hashlib.sha256(b"".join(hashlib.sha256(t).digest() for t in texts.values())).hexdigest()[:16]
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()  # where torch builds (its own rule)
    folder = Path(root) / "wct_owq_cpu_src" / digest
    for name, text in texts.items():
        if not (folder / name).is_file() or (folder / name).read_bytes() != text:
            with atomic_file(folder / name, "wb") as fh:
                fh.write(text)
    return [folder / name for name in SOURCES]


def _slabs(planes: list[Tensor], scales: Tensor, zeros: Tensor, bits: int, in_features: int, dtype: torch.dtype):
    """(column slice, deq(W_q)ᵀ[:, slice] as [K, n] in ``dtype``) for slabs of output columns of at most
    ``DEQUANT_CHUNK_ELEMS`` weights: the workspace of the slab path.

    3/4-bit with the extension: the compiled ``owq_dequant`` writes the slab contiguous [K, n] in fp32 (bit-identical
    to :func:`wct.format.layout.dequantize_dense`). Otherwise (2-bit, the 3-bit kernel words, ``WCT_CPU_KERNEL=0``,
    no compiler) the torch ops of :func:`wct.format.layout.dequantize_dense`, transposed as a view."""
    n_out = scales.shape[1]
    step = max(1, DEQUANT_CHUNK_ELEMS // max(1, in_features))
    ext = extension() if bits in (3, 4) and not holds_words3(planes, bits) else None
    names = named_codes(planes, bits)
    for n in range(0, n_out, step):
        sl = slice(n, min(n + step, n_out))
        if ext is not None:
            w = ext.owq_dequant(planes, scales, zeros, bits, in_features, sl.start, sl.stop)
            yield sl, (w if dtype == torch.float32 else w.to(dtype))
        else:
            yield sl, dequantize_dense({k: p[:, sl] for k, p in names.items()}, scales[:, sl], zeros[:, sl],
                                       bits, in_features, dtype).t()


def slab_matmul(x: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, bits: int) -> Tensor:
    """deq(W_q)·x as x [M, K] @ slab [K, n] per slab of output columns: the path for M > :data:`GEMV_MAX_M`."""
    y = x.new_empty(x.shape[0], scales.shape[1])
    for sl, w in _slabs(planes, scales, zeros, bits, x.shape[1], x.dtype):
        if sl.stop - sl.start == y.shape[1]:  # one slab (every SmolLM2 layer): its product is y
            y = x @ w
        else:
            y[:, sl] = x @ w
    return y


def forward(
    x: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    bias: Tensor | None, dense: Tensor | None, bits: int,
) -> Tensor:
    """y [M, N] for x [M, K] (``dense`` is unused: this backend keeps no dense copy)."""
    ext = extension() if x.shape[0] <= GEMV_MAX_M and bits in (3, 4) and not holds_words3(planes, bits) else None
    if ext is not None:
        y = ext.owq_gemv(x.float().contiguous(), planes, scales, zeros, weak_idx, bits).to(x.dtype)
    else:
        y = slab_matmul(x, planes, scales, zeros, bits)
    return add_weak(y, x, weak_weight, weak_idx, bias)


def dense_gemv(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, K] fp32 · weightᵀ for a dense ``weight`` [N, K] read in its own dtype (fp32/fp16/bf16), fp32
    accumulation: the compiled ``dense_gemv`` (an fp16 head reads half the bytes of an fp32 one), else the BLAS on an
    fp32 copy."""
    ext = extension()
    if ext is None:
        return x @ weight.float().t()
    return ext.dense_gemv(x.contiguous(), weight.contiguous())


def grad_input(
    dy: Tensor, weak_weight: Tensor, planes: list[Tensor], scales: Tensor, zeros: Tensor, weak_idx: Tensor,
    dense: Tensor | None, bits: int, in_features: int,
) -> Tensor:
    """dX [M, K] = dY·W_full for dY [M, N], a slab of W at a time."""
    dx = None
    for sl, w in _slabs(planes, scales, zeros, bits, in_features, dy.dtype):
        dx = dy[:, sl] @ w.t() if dx is None else dx.addmm_(dy[:, sl], w.t())
    if dx is None:  # no output columns
        dx = dy.new_zeros(dy.shape[0], in_features)
    return add_weak_dx(dx, dy, weak_weight, weak_idx)
