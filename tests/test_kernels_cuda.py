"""The CUDA sources: nvcc builds them for sm_80 and sm_90 (skipped without nvcc), their __host__ __device__
unpack/dequant helpers run on the CPU against the Python packer, and on a GPU the kernels match float64."""

from __future__ import annotations

import subprocess

import pytest
import torch

import wct.kernels as kernels
from wct.kernels import cuda_backend
from wct.kernels.__main__ import main as kernels_cli
from wct.kernels.sources import source_dir
from wct.format.layout import dequantize_dense, kernel_words3

from kernel_helpers import N_WEAK, TOL, U, check_fwd_bwd, half2_bound, make_layer, overflowing_x, rel_err

needs_nvcc = pytest.mark.skipif(cuda_backend.nvcc() is None, reason="nvcc (CUDA toolkit) not found")


@pytest.mark.slow  # nvcc compiles the library for two architectures
@needs_nvcc
def test_cli_builds_sm80_sm90_and_ctypes_loads(tmp_path, capsys):
    out = tmp_path / "libwct_owq.so"
    kernels_cli(["build", "--arch", "80", "--arch", "90", "--out", str(out)])
    assert "for sm_80, sm_90" in capsys.readouterr().out
    lib = cuda_backend.load(out)  # dlopen works without a GPU: cudart is linked statically
    assert lib.owq_gemv_max_m() == kernels.CUDA_GEMV_MAX_M


@pytest.fixture(scope="module")
def host_check(tmp_path_factory) -> str:
    if cuda_backend.nvcc() is None:
        pytest.skip("nvcc (CUDA toolkit) not found")
    exe = tmp_path_factory.mktemp("host") / "owq_host_check"
    subprocess.run([cuda_backend.nvcc(), "-O2", "-std=c++17", "-o", str(exe), str(source_dir() / "owq_host_check.cu")],
                   check=True, capture_output=True)
    return str(exe)


def run_host_check(exe: str, mode: str, layer, x: torch.Tensor, splits: int = 1, words: bool = False) -> torch.Tensor:
    """Feed a packed layer (and x) to owq_host_check; returns its output matrix. At 3 bits the 3-bit words come from
    the converter (wct.format.layout.kernel_words3), so decode and GEMV checks test it too; ``words``: dequant and
    general read them instead of the planes (the layout a 3-bit layer holds on the cuda backend)."""
    n_o, n = layer.weak_weight.shape
    numbers = [layer.bits, layer.in_features, n, layer.scales.shape[0], x.shape[0], n_o, splits]
    numbers += [w for p in layer.planes.values() for w in p.flatten().tolist()]
    if layer.bits == 3:
        numbers += kernel_words3(layer.qweight_lo, layer.qweight_hi).flatten().tolist()
    numbers += layer.scales.half().view(torch.int16).to(torch.int32).bitwise_and(0xFFFF).flatten().tolist()
    numbers += layer.zeros.flatten().tolist() + layer.weak_idx.tolist()
    numbers += [repr(v) for v in layer.weak_weight.float().flatten().tolist() + x.flatten().tolist()]
    proc = subprocess.run([exe, mode] + (["words"] if words else []), input=" ".join(map(str, numbers)), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return torch.tensor([[float(v) for v in line.split()] for line in proc.stdout.splitlines()], dtype=torch.float64)


@pytest.mark.parametrize("bits,words", [(2, False), (3, False), (3, True), (4, False)])
@pytest.mark.parametrize("k,group", [(200, None), (256, 128)])
def test_host_dequant_matches_python_packer(host_check, bits, words, k, group):
    layer, _ = make_layer(bits, group, 7, n=13, k=k, sym=bits == 2)
    got = run_host_check(host_check, "dequant", layer, torch.zeros(0, k), words=words)
    want = dequantize_dense(layer.planes, layer.scales, layer.zeros, bits, k).t()  # [K, N], 0 at weak columns
    torch.testing.assert_close(got.float(), want, rtol=0, atol=0)  # %.9g round-trips fp32 exactly


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("k,group", [(200, None), (256, 64)])
def test_host_fast_decode_is_bit_exact(host_check, bits, k, group):
    """The LOP3/0x6400 fp16x2 word decoders (pairs (k, k+4) / (k, k+8); at 3 bits (k, k+16) from the converted
    3-bit words) and the pair order of owq_slot: code - z of every row, exactly, against the float64 weights
    (w / s)."""
    layer, w64 = make_layer(bits, group, 5, n=12, k=k, sym=bits == 2)
    got = run_host_check(host_check, "decode", layer, torch.zeros(0, k))[:k]  # rows past K are padding
    rep = k // layer.scales.shape[0]
    want = (w64.t() / layer.scales.double().repeat_interleave(rep, 0)).round()
    want[layer.weak_idx.long()] = 0  # weak columns are stored as code == zero point
    assert torch.equal(got, want)


@pytest.mark.parametrize("path,bits", [("fast", 3), ("fast", 4), ("general", 3), ("general", 4), ("words", 3)])
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("n_o", [0, 1, 40])
@pytest.mark.parametrize("m,splits", [(1, 1), (1, 2), (8, 3), (2, 7)])
def test_host_gemv_matches_float64(host_check, path, bits, group, n_o, m, splits):
    """Each GEMV body with split-K staging, weak columns spread over the splits and the ordered reduction
    (``words``: the general body reading the 3-bit kernel words, the planes overwritten)."""
    k = 1024 if group else 1000  # 1000: ragged K (planes padded to 1024), a ragged last split
    layer, w64 = make_layer(bits, group, n_o, n=36, k=k)
    x = torch.randn(m, k)
    got = run_host_check(host_check, "general" if path == "words" else path, layer, x, splits, words=path == "words")
    assert got.shape == (m, 36)
    tol = 2e-3 if path == "fast" else 2e-5  # fast: x and the per-step partials in fp16
    assert rel_err(got, x.double() @ w64.t()) < tol


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group,splits", [(None, 1), (64, 3)])
def test_host_fast_gemv_overflowing_step_falls_back_to_fp32(host_check, bits, group, splits):
    """|x| ≈ 5000 on quantized columns overflows fp16x2 step partials (inf without the fallback): the fast body's
    outputs stay finite, within the documented bound, and the overflowed ones within the fp32 path's."""
    k = 256
    layer, w64 = make_layer(bits, group, 40, torch.float16, n=64, k=k)
    x, over = overflowing_x(bits, layer, w64, k)
    assert over.any() and not over.all()
    got = run_host_check(host_check, "fast", layer, x, splits)
    ref = x.double() @ w64.t()
    assert torch.isfinite(got).all()
    err = (got - ref).abs()
    assert (err <= half2_bound(bits, w64, layer.weak_idx, x, ref)).all()
    terms = (w64.unsqueeze(0) * x.double().unsqueeze(1)).abs().sum(-1)
    assert (err[over] <= (2.0**-20 * terms + U * ref.abs())[over]).all()  # recomputed in fp32


def test_host_fast_gemv_at_k11008(host_check):
    """K = 11008 (a real MLP down-projection) with 7 splits: the last one ragged."""
    layer, w64 = make_layer(3, None, 40, n=8, k=11008)
    x = torch.randn(1, 11008)
    got = run_host_check(host_check, "fast", layer, x, 7)
    assert rel_err(got, x.double() @ w64.t()) < 2e-3


@pytest.mark.parametrize("m,n,k,n_o,group", [(1, 4096, 11008, 64, None), (8, 11008, 4096, 400, 128),
                                              (5, 37, 200, 3, None), (1, 4096, 4096, 0, 128)])
def test_split_plan_fills_the_sms_within_shared_memory(m, n, k, n_o, group):
    splits, kps = cuda_backend.split_plan(m, n, k, n_o, group, sms=132)
    assert kps % 32 == 0 and (group is None or kps % group == 0)
    assert (splits - 1) * kps < k <= splits * kps  # no empty split, K covered
    mt = 1 << (m - 1).bit_length()
    assert 4 * mt * (kps + -(-n_o // splits)) <= 48 * 1024
    if k >= 4096 and n <= 4096:
        assert splits * -(-n // 512) >= 132  # at least one block per SM


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_o", N_WEAK)
@pytest.mark.parametrize("group", [None, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_cuda_matches_float64(bits, group, n_o, dtype):
    layer, w64 = make_layer(bits, group, n_o, dtype, n=300, k=512, device="cuda")
    with kernels.use_kernel("cuda"):
        for m in (1, 4, 8, 33):  # the GEMV up to 8 rows, dequantize-to-scratch + GEMM above
            check_fwd_bwd(layer, w64, torch.randn(m, 512, device="cuda").to(dtype), dtype)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("n,group", [(4096, None), (4096, 128), (37, None)])  # 37: ragged N, the general kernel
def test_cuda_fast_and_general_paths_agree(bits, n, group):
    """The fast kernel (fp16, N % 4 == 0) against the general one and float64, forced splits 1, 3, 7."""
    layer, w64 = make_layer(bits, group, 40, torch.float16, n=n, k=11008 if group is None else 4096, device="cuda")
    layer.to_layout("words3" if bits == 3 else "v1")  # the layout a 3-bit layer holds on this backend
    args = (layer.weak_weight, list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx,
            layer.bias, bits)
    for m in (1, 3, 8):
        x = torch.randn(m, layer.in_features, device="cuda", dtype=torch.float16)
        ref = x.double() @ w64.t() + layer.bias.double()
        for splits in (1, 3, 7):
            fast = cuda_backend.gemv(x, *args, splits=splits)
            general = cuda_backend.gemv(x, *args, splits=splits, path=1)
            assert rel_err(fast, ref) < TOL[torch.float16] and rel_err(general, ref) < TOL[torch.float16]


@gpu
@pytest.mark.gpu
def test_cuda_gemv_first_launch_inside_graph_capture():
    """A first call (backend probe, counters, workspace) made while capturing a CUDA graph."""
    kernels._resolved.clear()
    cuda_backend.probe.cache_clear()
    layer, w64 = make_layer(4, 128, 8, torch.float16, n=512, k=1024, device="cuda")
    x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
    graph = torch.cuda.CUDAGraph()
    with kernels.use_kernel("cuda"), torch.no_grad(), torch.cuda.graph(graph):
        y = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(y, x.double() @ w64.t() + layer.bias.double()) < TOL[torch.float16]


@gpu
@pytest.mark.gpu
def test_cuda_gemv_is_deterministic_and_graph_capturable():
    layer, _ = make_layer(3, None, 7, torch.float16, n=4096, k=4096, device="cuda")
    x = torch.randn(1, 4096, device="cuda", dtype=torch.float16)
    with kernels.use_kernel("cuda"), torch.no_grad():
        y0 = layer(x)
        assert torch.equal(layer(x), y0)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = layer(x)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(y, y0)
