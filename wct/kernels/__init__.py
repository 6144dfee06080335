"""Backends for OWQLinear's product y = deq(W_q)·x + W_o·x[idx] + b (docs/kernels.md).

The public names live in :mod:`wct.kernels.dispatch` (backend choice, dense cache, 3-bit kernel layout) and :mod:`wct.kernels.op`
(the custom ops); this package only re-exports them.
"""

from wct.kernels.dispatch import (
    CUDA_GEMV_MAX_M, KERNELS, _config, _dense_cache, _resolved, backends_on, cached_dense, clear_cache, configure,
    hold_kernel_layout, hold_kernel_layouts, kernel_layout, no_dense_cache, owq_linear, resident_bytes,
    resolve_backend, triton_available, use_kernel,
)
from wct.kernels.op import owq_linear_dx_op, owq_linear_op

__all__ = [
    "CUDA_GEMV_MAX_M", "KERNELS", "backends_on", "cached_dense", "clear_cache", "configure", "hold_kernel_layout",
    "hold_kernel_layouts", "kernel_layout", "no_dense_cache", "owq_linear", "owq_linear_dx_op", "owq_linear_op",
    "resident_bytes", "resolve_backend", "triton_available", "use_kernel",
]
