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


@pytest.mark.parametrize("layout", ["v1", "words3"])
@pytest.mark.parametrize("group,k,n_o", [(None, 200, 40), (64, 256, 1)])  # 200: ragged K (codes padded to 224)
def test_triton_reads_both_3bit_layouts(layout, group, k, n_o):
    """Every triton kernel on a 3-bit layer's codes in either layout (the v1 planes, which sharded or compiled layers
    keep, and the kernel words the backend converts to): the GEMV's fp32 path with forced splits (M = 1, 4), the
    tl.dot GEMM (M = 33) and dX, against float64."""
    layer, w64 = make_layer(3, group, n_o, n=40, k=k, device=DEVICE)
    layer.to_layout(layout)
    planes = list(layer.planes.values())
    assert len(planes) == (1 if layout == "words3" else 2)
    args = (layer.weak_weight, planes, layer.scales, layer.zeros, layer.weak_idx, layer.bias)
    bias = layer.bias.double()
    for m in (1, 4, 33):
        x = torch.randn(m, k, device=DEVICE)
        assert rel_err(triton_backend.forward(x, *args, None, 3), x.double() @ w64.t() + bias) < TOL[torch.float32]
        dy = torch.randn(m, 40, device=DEVICE)
        dx = triton_backend.grad_input(dy, *args[:-1], None, 3, k)
        assert rel_err(dx, dy.double() @ w64) < TOL[torch.float32]
    x = torch.randn(2, k, device=DEVICE)
    assert rel_err(triton_backend.gemv(x, *args, 3, split_k=3), x.double() @ w64.t() + bias) < TOL[torch.float32]


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


def test_hold_kernel_layout_converts_3bit_layers_in_place(monkeypatch):
    """dispatch.hold_kernel_layout: a 3-bit layer holds the kernel words in place of the v1 planes on triton and
    cuda (the same tensor on the next call, nothing kept beside it), the planes again on cpu; 4-bit layers and the
    torch backend are left alone; nothing is replaced while torch.compile traces. Each conversion is bit-exact."""
    layer, _ = make_layer(3, None, 7)
    lo, hi = layer.qweight_lo.clone(), layer.qweight_hi.clone()
    kernels.hold_kernel_layout(layer, "torch")
    assert layer.layout == "v1"
    kernels.hold_kernel_layout(layer, "triton")
    assert layer.layout == "words3" and set(layer.planes) == {"qweight_w3"}
    assert not hasattr(layer, "qweight_lo") and not layer.qweight_w3.requires_grad
    words = layer.qweight_w3
    assert torch.equal(words, kernel_words3(lo, hi))
    kernels.hold_kernel_layout(layer, "cuda")
    assert layer.qweight_w3 is words
    kernels.hold_kernel_layout(layer, "cpu")
    with torch.inference_mode():  # a conversion during generation must still serve a later training step
        kernels.hold_kernel_layout(layer, "triton")
    assert layer.layout == "words3" and not layer.qweight_w3.is_inference()
    assert torch.equal(layer.qweight_w3, words)
    kernels.hold_kernel_layout(layer, "cpu")
    assert layer.layout == "v1" and torch.equal(layer.qweight_lo, lo) and torch.equal(layer.qweight_hi, hi)
    four, _ = make_layer(4, None, 7)
    kernels.hold_kernel_layout(four, "triton")
    assert four.layout == "v1"
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    kernels.hold_kernel_layout(layer, "triton")
    assert layer.layout == "v1"
    monkeypatch.undo()
    model = torch.nn.Sequential(make_layer(3, None, 7)[0], four, make_layer(3, 128, 0)[0])
    assert kernels.hold_kernel_layouts(model, "triton") == 2
    assert [m.layout for m in model] == ["words3", "v1", "words3"]


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
    on_cpu = kernels.backends_on(cpu)  # what the benchmarks run: every backend but auto, with the reason it cannot
    assert list(on_cpu) == ["torch", "cpu", "triton", "cuda"] and on_cpu["torch"] is None and on_cpu["cpu"] is None
    assert on_cpu["triton"].startswith("kernel=triton needs CUDA tensors")
    assert on_cpu["cuda"].startswith("kernel=cuda is unavailable: it needs CUDA tensors")
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
types = {"plane_a": "*i32", "plane_b": "*i32", "scales": "*fp16", "zeros": "*u8", "idx": "*i32", "out": "*fp32",
         "ws": "*fp32", "counters": "*i32"}
for case in sys.argv[1:]:
    arch, kernel, bits, dtype, block_m, use_dot, words = case.split(",")
    fn = {"fwd": mod.owq_fwd, "dx": mod.owq_dx, "gemv": mod.owq_gemv}[kernel]
    const = dict(BITS=int(bits), BLOCK_N=64, BLOCK_K=64, WORDS=words == "1")
    if kernel == "gemv":  # its fp32 path
        const.update(HALF2=False, ASM=False, EVEN_N=False)
    else:
        const.update(BLOCK_M=int(block_m), USE_DOT=use_dot == "1", UPCAST=False)
    if kernel != "dx":
        const.update(BLOCK_O=16, HAS_BIAS=True)
    act = {"x", "wo", "bias", "dy", "dx", "y"}
    sig = {a: "constexpr" if a in const else types.get(a, f"*{dtype}" if a in act else "i32") for a in fn.arg_names}
    k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", int(arch), 32))
    assert ("mma" in k.asm["ptx"]) == (use_dot == "1"), f"{case}: tensor cores expected exactly when USE_DOT"
"""


def test_triton_kernels_aot_compile_for_sm80_sm90():
    """Compile to PTX/cubin without a GPU (docs/kernels.md): tile-shape and layout rules the interpreter skips, for
    the v1 planes and the 3-bit kernel words. A subprocess, because kernels decorated under TRITON_INTERPRET=1 cannot be compiled."""
    import subprocess
    import sys

    cases = [f"{arch},{c}" for arch in (80, 90) for c in (
        "fwd,3,fp16,1,0,0", "fwd,3,bf16,16,1,0", "fwd,4,fp16,64,1,0", "dx,3,bf16,16,1,0",  # the v1 planes
        "fwd,3,fp16,16,1,1", "dx,3,bf16,16,1,1", "gemv,3,fp32,1,0,1")]  # the 3-bit kernel words
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
