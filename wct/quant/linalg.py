"""In-place linear algebra on one layer's K x K Hessian: the symmetric permutation and the upper Cholesky factor
of its inverse that :meth:`wct.quant.gptq.GPTQ.solve` needs (docs/algorithm.md §1.8 steps 1 and 5).

Out of place, each step keeps two K x K matrices alive (input and result): 2 x 3.1 GiB for a 70B model's
28672-wide down projection. Here the CPU path holds one: rows are permuted by following the permutation's
cycles, columns a slab of rows at a time, and the three factorization steps call LAPACK's potrf/potri (the MKL
that torch links) on the Hessian's own storage. The LAPACK calls are made exactly as ``torch.linalg.cholesky``,
``torch.cholesky_inverse`` and ``torch.linalg.cholesky(upper=True)`` make them on their column-major copies, so the
factor has the same bits as that chain (tests/test_linalg.py). Elsewhere (CUDA, or a torch without the LAPACK
symbols) the torch chain runs out of place.
"""

from __future__ import annotations

import ctypes
import functools
import os

import torch

SLAB_ELEMS = 1 << 18  # elements per temporary slab (rows of a column permutation or of a triangle mirror; 1 MiB fp32)

# A matrix's row-major storage read column-major is its transpose. For the row-major H, LAPACK's 'L' (lower,
# column-major) is therefore H's upper triangle, and 'U' its lower one.
_POTRF = {torch.float32: "spotrf_", torch.float64: "dpotrf_"}
_POTRI = {torch.float32: "spotri_", torch.float64: "dpotri_"}


@functools.cache
def _lapack() -> ctypes.CDLL | None:
    """torch's CPU library when it exports the LAPACK routines used here (MKL builds do), else None."""
    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        for name in (*_POTRF.values(), *_POTRI.values()):
            getattr(lib, name)
    except (OSError, AttributeError):
        return None
    return lib


def _call(routine: str, uplo: bytes, A: torch.Tensor) -> int:
    """LAPACK ``routine`` (potrf or potri, Fortran interface) on the square contiguous ``A`` in place; its info."""
    n, info = ctypes.c_int(A.shape[0]), ctypes.c_int(0)
    getattr(_lapack(), routine)(ctypes.c_char_p(uplo), ctypes.byref(n), ctypes.c_void_p(A.data_ptr()),
                                ctypes.byref(n), ctypes.byref(info))
    return info.value


def in_place_ok(H: torch.Tensor) -> bool:
    """Whether :func:`inverse_cholesky_` factors ``H`` in its own storage."""
    return H.device.type == "cpu" and H.dtype in _POTRF and H.is_contiguous() and _lapack() is not None


def permute_(H: torch.Tensor, perm: torch.Tensor, rows: bool = True) -> torch.Tensor:
    """``H`` <- ``H[perm][:, perm]`` in place, with temporaries of one row and one slab. ``rows=False``: only the
    columns (the rows are permuted already, e.g. by a copying ``index_select``)."""
    if rows:
        order = perm.tolist()
        done = [False] * len(order)
        for start in range(len(order)):  # row i takes row order[i]: walk each cycle once with one saved row
            if done[start] or order[start] == start:
                continue
            saved, i = H[start].clone(), start
            while order[i] != start:
                H[i] = H[order[i]]
                done[i], i = True, order[i]
            H[i], done[i] = saved, True
    perm = perm.to(H.device)
    step = max(1, SLAB_ELEMS // max(1, H.shape[1]))
    for r in range(0, H.shape[0], step):
        H[r:r + step] = H[r:r + step].index_select(1, perm)
    return H


def _mirror_(A: torch.Tensor, lower_to_upper: bool) -> None:
    """Copy one triangle of the square ``A`` onto the other (transposed), a slab of rows at a time. The source
    triangle is left undefined (each slab's diagonal square is transposed whole), and no later step reads it."""
    step = max(1, SLAB_ELEMS // max(1, A.shape[0]))
    for r in range(0, A.shape[0], step):
        e = min(r + step, A.shape[0])
        if lower_to_upper:  # rows r:e right of the diagonal <- columns r:e below it
            A[r:e, r:] = A[r:, r:e].t().clone()
        else:
            A[r:, r:e] = A[r:e, r:].t().clone()


def inverse_cholesky_(H: torch.Tensor) -> torch.Tensor | None:
    """U with H⁻¹ = UᵀU (upper triangular; below the diagonal is undefined), computed in ``H``'s storage when
    :func:`in_place_ok` (then ``H`` is consumed), else out of place. None when ``H`` is not positive definite.

    Same bits as ``cholesky(cholesky_inverse(cholesky(H)), upper=True)`` reading H's lower triangle."""
    if not in_place_ok(H):
        L, info = torch.linalg.cholesky_ex(H)
        if info.any():
            return None
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        return None if info.any() else U
    potrf, potri = _POTRF[H.dtype], _POTRI[H.dtype]
    _mirror_(H, lower_to_upper=True)  # torch factors the lower triangle: make the upper one (LAPACK's 'L') equal
    if _call(potrf, b"L", H):  # L, column-major lower = row-major upper
        return None
    if _call(potri, b"L", H):  # H⁻¹ from L, same triangle
        return None
    _mirror_(H, lower_to_upper=False)  # the factor of H⁻¹ reads LAPACK's 'U' = row-major lower
    if _call(potrf, b"U", H):  # column-major upper U
        return None
    return H.t()  # U column-major, as torch returns it (the solve's products then take the same BLAS kernels)
