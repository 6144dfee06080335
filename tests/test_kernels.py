"""OWQLinear's custom op and its torch / Triton backends against a float64 dequantize-matmul oracle.

Without CUDA the Triton kernels run under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py, before anything
imports triton); with CUDA the same parity tests run compiled on the GPU.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch

import wct.kernels as kernels
from wct.errors import WCTError
from wct.kernels import triton_backend
from wct.nn.owq_linear import OWQLinear
from wct.format.layout import kernel_words3, pack_linear

from kernel_helpers import N_WEAK, TOL, check_fwd_bwd, make_layer, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


pytestmark = pytest.mark.usefixtures("kernel_config")


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("n_o", N_WEAK)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("cache", ["0", "1"])
def test_torch_backend_matches_float64(bits, group, n_o, sym, cache):
    kernels.configure(cache_dense=cache)
    layer, w64 = make_layer(bits, group, n_o, sym=sym)
    with kernels.use_kernel("torch"):
        check_fwd_bwd(layer, w64, torch.randn(2, 3, 256), torch.float32)
    assert (kernels.cached_dense(layer, torch.float32) is not None) == (cache == "1")


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("n_o", N_WEAK)
def test_torch_backend_gives_the_same_bits_with_and_without_the_cache(bits, n_o):
    """Quantization runs each quantized block uncached (wct.kernels.no_dense_cache) and must feed the next block
    exactly what a cached run fed it; training must not depend on the cache budget either."""
    layer, _ = make_layer(bits, 128, n_o)
    x = torch.randn(2, 3, 256)
    outs = []
    for cache in ("1", "0"):
        kernels.configure(cache_dense=cache)
        xg = x.clone().requires_grad_(True)
        with kernels.use_kernel("torch"):
            y = layer(xg)
        y.backward(torch.ones_like(y))
        outs.append((y.detach(), xg.grad, layer.weak_weight.grad.clone()))
        layer.weak_weight.grad = None
    kernels.configure(cache_dense="auto")
    with kernels.no_dense_cache(), kernels.use_kernel("torch"):
        assert torch.equal(layer(x), outs[0][0])
        assert kernels.cached_dense(layer, torch.float32) is None
    for cached, uncached in zip(*outs):
        assert torch.equal(cached, uncached)


def interpreted_half(n_o: int) -> list:
    """fp16/bf16 parameters: under TRITON_INTERPRET (no GPU) the n_o = 1 and 7 cases run with the slow tests."""
    slow = not torch.cuda.is_available() and n_o in (1, 7)
    return [pytest.param(n_o, d, marks=pytest.mark.slow) if slow else (n_o, d) for d in (torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("n_o,dtype", [(n, torch.float32) for n in N_WEAK] + sum(map(interpreted_half, N_WEAK), []))
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_triton_matches_float64(bits, group, n_o, dtype):
    layer, w64 = make_layer(bits, group, n_o, dtype, device=DEVICE)
    with kernels.use_kernel("triton"):
        for m in (1, 3, 20):  # GEMV (BLOCK_M 1 and 4) and the tl.dot GEMM
            check_fwd_bwd(layer, w64, torch.randn(m, 256, device=DEVICE).to(dtype), dtype)
    x = torch.randn(5, 256, device=DEVICE).to(dtype)
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx, layer.bias, None, bits)
    split = triton_backend.forward(x, *args, split_k=2)  # split-K through the fp32 workspace, tail in the last split
    assert rel_err(split, x.double() @ w64.t() + layer.bias.double()) < TOL[dtype]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group,k", [(None, 200), (64, 256)])  # 200: ragged K (planes padded to 224)
@pytest.mark.parametrize("n_o", [0, 1, 40])
@pytest.mark.parametrize("splits", [1, 2, 3, 7])
def test_triton_gemv_split_k_matches_float64(bits, group, k, n_o, splits):
    """owq_gemv: exponent-trick decode, fused split-K (forced splits, ragged and empty last splits), weak columns
    spread over the splits, bias added by the last program; M = 1 and 3 (one row per program)."""
    layer, w64 = make_layer(bits, group, n_o, n=40, k=k, device=DEVICE)
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx, layer.bias, bits)
    for m in (1, 3):
        x = torch.randn(m, k, device=DEVICE)
        y = triton_backend.gemv(x, *args, split_k=splits)
        assert rel_err(y, x.double() @ w64.t() + layer.bias.double()) < TOL[torch.float32]


def test_triton_gemv_fused_split_k_is_deterministic():
    layer, _ = make_layer(3, None, 7, torch.float16, n=40, k=512, device=DEVICE)
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx, layer.bias, 3)
    x = torch.randn(2, 512, device=DEVICE).half()
    first = triton_backend.gemv(x, *args, split_k=7)
    for _ in range(3):
        assert torch.equal(triton_backend.gemv(x, *args, split_k=7), first)


@pytest.mark.parametrize("bits", [3, 4])
def test_triton_masks_k_and_n_off_the_tile_grid(bits):
    layer, w64 = make_layer(bits, None, 5, n=37, k=200, device=DEVICE)  # K padded to 224 in the planes
    with kernels.use_kernel("triton"):
        check_fwd_bwd(layer, w64, torch.randn(2, 9, 200, device=DEVICE), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    layer, _ = make_layer(3, 128, 7, device=DEVICE)
    x = torch.randn(2, 5, 256, device=DEVICE, requires_grad=True)
    planes = list(layer.planes.values())
    dense = kernels.cached_dense(layer, torch.float32) if backend == "torch" else None
    for d in {None, dense}:
        args = (x, layer.weak_weight, planes, layer.scales, layer.zeros, layer.weak_idx, layer.bias, d, 3, backend)
        torch.library.opcheck(kernels.owq_linear_op, args)


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_torch_compile_same_output_and_grads(kernel):
    kernels.configure(kernel=kernel, cache_dense="0")  # compiled graphs skip the eager-only cache: same arithmetic
    model = torch.nn.Sequential(make_layer(4, 128, 7, n=256)[0], torch.nn.GELU(), make_layer(3, None, 40, k=256)[0])
    x = torch.randn(2, 4, 256, device=DEVICE)
    model.to(DEVICE)
    y_eager = model(x)
    y_eager.square().sum().backward()
    weak = [p for p in model.parameters() if p.requires_grad]  # the packed tensors are frozen parameters
    grads = [p.grad.clone() for p in weak]
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-5)
    for p, g in zip(weak, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_dense_cache_reuse_invalidation_and_live_weak_columns(monkeypatch):
    monkeypatch.setenv("WCT_CPU_GEMV", "fp32")  # the auto (cpu) backend's fp32 GEMV: the check below is fp32-tight
    kernels.configure(cache_dense="1")  # off by default
    layer, w64 = make_layer(3, None, 7)
    dense = kernels.cached_dense(layer, torch.float32)
    assert kernels.cached_dense(layer, torch.float32) is dense
    assert torch.equal(dense[:, layer.weak_idx.long()], torch.zeros(48, 7))  # the dense part is 0 at weak columns
    other, w_other = make_layer(3, None, 7, seed=1)
    layer.load_state_dict(other.state_dict())  # new packed values: the cache must not serve the old weight
    assert kernels.cached_dense(layer, torch.float32) is not dense
    x = torch.randn(4, 256)
    with torch.no_grad():
        layer.weak_weight.add_(1.0)  # the weak part is live: a tuned column shows up without a cache rebuild
    w_other[:, layer.weak_idx.long()] += 1.0
    assert rel_err(layer(x), x.double() @ w_other.t() + layer.bias.double()) < 2e-5
    kernels.configure(cache_budget_bytes=0)
    kernels.clear_cache()
    assert kernels.cached_dense(layer, torch.float32) is None


def test_kernel_planes_caches_the_3bit_words_per_layer():
    """dispatch.kernel_planes: the v1 planes for the torch backend and 4 bits; at 3 bits on triton/cuda also the 3-bit
    words, built once (the same tensor on the next call) and rebuilt when the planes change."""
    layer, _ = make_layer(3, None, 7)
    assert [p.data_ptr() for p in kernels.kernel_planes(layer, "torch")] == [layer.qweight_lo.data_ptr(),
                                                                             layer.qweight_hi.data_ptr()]
    assert len(kernels.kernel_planes(make_layer(4, None, 7)[0], "triton")) == 1
    words = kernels.kernel_planes(layer, "triton")[2]
    assert torch.equal(words, kernel_words3(layer.qweight_lo, layer.qweight_hi))
    assert kernels.kernel_planes(layer, "cuda")[2] is words
    other, _ = make_layer(3, None, 7, seed=1)
    layer.load_state_dict(other.state_dict())  # new codes: the cache must not serve the old words
    fresh = kernels.kernel_planes(layer, "triton")[2]
    assert fresh is not words and torch.equal(fresh, kernel_words3(other.qweight_lo, other.qweight_hi))
    kernels.clear_cache()
    assert kernels.kernel_planes(layer, "triton")[2] is not fresh


def test_dispatch_messages_and_log(caplog, monkeypatch):
    cpu = torch.device("cpu")
    assert kernels.resolve_backend("auto", cpu, 1) == "cpu"
    with pytest.raises(WCTError, match="kernel=cuda is unavailable: it needs CUDA tensors"):
        kernels.resolve_backend("cuda", cpu, 1)
    with pytest.raises(WCTError, match="not a backend; choose one of auto, torch, cpu, triton, cuda"):
        kernels.configure(kernel="fast")
    with pytest.raises(WCTError, match="cache_dense='yes' is not a policy"):
        kernels.configure(cache_dense="yes")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(WCTError, match="kernel=triton needs CUDA tensors"):
        kernels.resolve_backend("triton", cpu, 1)
    layer, _ = make_layer(4, None, 1)
    kernels._resolved.clear()
    with caplog.at_level(logging.INFO, logger="wct.kernels"):
        layer(torch.randn(1, 256))
    assert "owq_linear backend: cpu (kernel=auto, device=cpu)" in caplog.text
    kernels.configure(kernel="cuda")
    with pytest.raises(WCTError, match="kernel=cuda is unavailable"):
        layer(torch.randn(1, 256))


AOT_SCRIPT = r"""
import sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from wct.kernels.sources import load_module

mod = load_module("owq_triton.py", "owq_triton_aot")
types = {"plane_a": "*i32", "plane_b": "*i32", "scales": "*fp16", "zeros": "*u8", "idx": "*i32", "out": "*fp32"}
for case in sys.argv[1:]:
    arch, kernel, bits, dtype, block_m, use_dot = case.split(",")
    fn = mod.owq_fwd if kernel == "fwd" else mod.owq_dx
    const = dict(BITS=int(bits), BLOCK_M=int(block_m), BLOCK_N=64, BLOCK_K=64, USE_DOT=use_dot == "1", UPCAST=False)
    if kernel == "fwd":
        const.update(BLOCK_O=16, HAS_BIAS=True)
    act = {"x", "wo", "bias", "dy", "dx"}
    sig = {a: "constexpr" if a in const else types.get(a, f"*{dtype}" if a in act else "i32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", int(arch), 32))
    assert ("mma" in k.asm["ptx"]) == (use_dot == "1"), f"{case}: tensor cores expected exactly when USE_DOT"
"""


def test_triton_kernels_aot_compile_for_sm80_sm90():
    """Compile to PTX/cubin without a GPU (docs/kernels.md): tile-shape and layout rules the interpreter skips.
    A subprocess, because kernels decorated under TRITON_INTERPRET=1 cannot be compiled."""
    import subprocess
    import sys

    cases = [f"{arch},{c}" for arch in (80, 90) for c in ("fwd,3,fp16,1,0", "fwd,3,bf16,16,1", "fwd,4,fp16,64,1", "dx,3,bf16,16,1")]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT, *cases], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_cache_built_under_inference_mode_serves_a_later_backward():
    w = torch.randn(16, 64)
    packed = pack_linear(w, torch.rand(1, 16) * 0.1 + 0.01, torch.full((1, 16), 8), torch.tensor([2, 9]), 4)
    layer = OWQLinear.from_packed(packed, 4, 64).float()
    x = torch.randn(3, 64)
    kernels.configure(cache_dense="1")
    with kernels.use_kernel("torch"):
        with torch.inference_mode():
            y0 = layer(x)
        xr = x.clone().requires_grad_(True)
        y = layer(xr)
        y.sum().backward()
    kernels.configure(cache_dense="auto")
    torch.testing.assert_close(y.detach(), y0)
    torch.testing.assert_close(xr.grad, torch.ones(3, 16) @ layer.dequantize(torch.float32).detach())
