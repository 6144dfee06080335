"""The CPU backend (wct.kernels.cpu_backend): the compiled GEMV (M ≤ GEMV_MAX_M) and the slab path (larger M, and dX;
compiled slab dequantization) read the owq-pack v1 planes and must match a float64 dequantize-matmul oracle built
from the codes (the int16 GEMV within its documented bound, the fp32 one to fp32 rounding), the compiled
dequantization the torch one bit for bit; nothing besides the stored tensors stays resident; an export generates the
tokens of the model it was saved from."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import wct.kernels as kernels
from wct.kernels import cpu_backend, dispatch
from wct.kernels.sources import source_dir
from wct.nn.owq_linear import OWQLinear
from wct.format.layout import dequantize_dense, pack_linear


pytestmark = pytest.mark.usefixtures("kernel_config")


def packed_layer(bits: int, group: int | None, n_o: int, n: int, k: int, seed: int = 0):
    """A random OWQLinear and its weight [N, K] in float64, computed from the codes (s·(q − z), weak columns free)."""
    g = torch.Generator().manual_seed(seed)
    groups = 1 if group is None else k // group
    scales = (torch.rand(groups, n, generator=g) * 0.1 + 0.01).half()
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g)
    codes = torch.randint(0, 2**bits, (k, n), generator=g)
    idx = torch.randperm(k, generator=g)[:n_o].sort().values
    rep = k // groups
    w = ((codes - zeros.repeat_interleave(rep, 0)) * scales.double().repeat_interleave(rep, 0)).t().contiguous()
    w[:, idx] = torch.randn(n, n_o, generator=g, dtype=torch.float64).float().double()
    bias = torch.randn(n, generator=g)
    packed = pack_linear(w.float(), scales, zeros, idx, bits, bias=bias, weak_dtype=torch.float32)
    return OWQLinear.from_packed(packed, bits, k), w


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def int16_bound(layer: OWQLinear, x: torch.Tensor, scales: torch.Tensor | None = None) -> torch.Tensor:
    """The int16 GEMV's documented bound on |y − y_float64| per output [M, N] (docs/kernels.md "CPU backend"), in
    float64: (xs/2)·Σ_g |s_{g,n}|·Σ_{k∈g} |c_k − z_g| with xs = max_{k∉weak} |x_k| / 16319 (Wq = s·(c − z) from
    dequantize_dense in float64 is 0 at the weak columns, so the double sum is Σ_k |Wq[n, k]|), plus fp32 rounding:
    γ = (groups + n_o + 4)·2^-24 times the magnitudes summed (the quantized terms, the weak product, the bias)."""
    bits, k = layer.bits, layer.in_features
    scales = layer.scales if scales is None else scales
    wq = dequantize_dense(dict(layer.planes), scales, layer.zeros, bits, k, torch.float64)  # [N, K]
    idx = layer.weak_idx.long()
    x64 = x.detach().double().reshape(-1, k)
    xs = x64.clone().index_fill_(1, idx, 0).abs().amax(1, keepdim=True) / 16319
    quant = xs / 2 * wq.abs().sum(1)
    weak = x64[:, idx].abs() @ layer.weak_weight.detach().double().abs()
    bias = 0 if layer.bias is None else layer.bias.detach().double().abs()
    gamma = (scales.shape[0] + idx.numel() + 4) * 2.0**-24
    return quant + gamma * (x64.abs() @ wq.abs().t() + quant + weak + bias)


def test_the_cpu_backend_is_the_cpu_default():
    kernels.configure(kernel="auto")
    assert kernels.resolve_backend("auto", torch.device("cpu"), 1) == "cpu"
    assert kernels.resolve_backend("auto", torch.device("cpu"), 64) == "cpu"
    assert cpu_backend.extension() is not None, "the compiled GEMV must build on this machine (g++ and ninja)"


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("n_o", [0, 1, 40])
@pytest.mark.parametrize("m", [1, 4, 33, 130])
@pytest.mark.parametrize("gemv", ["fp32", "int16"])
def test_cpu_backend_matches_float64(bits, group, n_o, m, gemv, monkeypatch):
    """y, dX and dW_o against float64 on ragged shapes (N = 100; K = 204 per-row, 192 grouped: not multiples of
    64, 32 or 8 where the format allows); M = 1, 4 and 33 run the GEMV, 130 the slab path (by GEMV_MAX_M = 96).
    The fp32 GEMV (WCT_CPU_GEMV=fp32) and the slab path to fp32 rounding, the int16 GEMV within its bound."""
    monkeypatch.setenv("WCT_CPU_GEMV", gemv)
    k = 204 if group is None else 192
    layer, w64 = packed_layer(bits, group, n_o, n=100, k=k, seed=bits * 100 + n_o + m)
    x = torch.randn(m, k, requires_grad=True)
    with kernels.use_kernel("cpu"):
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64, dy64 = x.detach().double(), dy.double()
    ref = x64 @ w64.t() + layer.bias.double()
    if gemv == "int16" and m <= cpu_backend.GEMV_MAX_M:
        assert ((y.double() - ref).abs() <= int16_bound(layer, x)).all()
    else:
        assert rel_err(y, ref) < 2e-6
    assert rel_err(x.grad, dy64 @ w64) < 2e-6
    if n_o:
        assert rel_err(layer.weak_weight.grad, x64[:, layer.weak_idx.long()].t() @ dy64) < 2e-6


@pytest.mark.parametrize("gemv", ["fp32", "int16"])
def test_gemv_and_slab_paths_agree_and_batch_rows_are_independent(gemv, monkeypatch):
    """Row m of a batch is the same product whatever else is in the batch (the GEMV blocks rows by 4, 2, 1; the
    weak-column addmm may round differently per batch size), and the slab path agrees with the GEMV (the int16 one:
    both against float64, the GEMV within its bound)."""
    monkeypatch.setenv("WCT_CPU_GEMV", gemv)
    layer, w64 = packed_layer(3, 64, 5, n=130, k=256)
    x = torch.randn(7, 256)
    with kernels.use_kernel("cpu"):
        with torch.no_grad():
            batch = layer(x)
            rows = torch.cat([layer(x[i : i + 1]) for i in range(7)])
            slab = layer(torch.cat([x, torch.zeros(cpu_backend.GEMV_MAX_M, 256)]))[:7]  # the slab path
        via_op = layer(x.requires_grad_())  # with autograd: through the custom op wct::owq_linear
    torch.testing.assert_close(batch, rows, rtol=1e-5, atol=1e-5)
    if gemv == "fp32":
        torch.testing.assert_close(batch, slab, rtol=1e-5, atol=1e-5)
    else:
        ref = x.detach().double() @ w64.t() + layer.bias.double()
        assert ((batch.double() - ref).abs() <= int16_bound(layer, x)).all() and rel_err(slab, ref) < 2e-6
    assert torch.equal(via_op, batch)  # the no-grad shortcut past the custom op computes the same bits


# (group, N, K): per-row and G = 64 with ragged N and K, and groups that are not whole 32-row steps of the 3-bit
# planes (24, 40: a step is split between two groups)
INT16_SHAPES = [(None, 67, 72), (None, 200, 200), (64, 67, 128), (64, 200, 192), (24, 200, 72), (40, 67, 200)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group,n,k", INT16_SHAPES)
@pytest.mark.parametrize("n_o", [0, 1, 40])
@pytest.mark.parametrize("m", [1, 3, 7])  # rows of x blocked by 2, then 1
def test_int16_gemv_is_within_its_bound_of_float64(bits, group, n, k, n_o, m, monkeypatch):
    """The default GEMV (int16 x, int32 dot products) against float64 within the documented bound, which is tight
    enough to fail on one wrong code (s·|x_k| ≫ xs/2·Σ|Wq|); rows of x blocked by 2, 1 (M = 3: 2 + 1, M = 7:
    2 + 2 + 2 + 1). These groups are short (< 256 rows): the column-blocked GEMV."""
    monkeypatch.delenv("WCT_CPU_GEMV", raising=False)
    assert cpu_backend.extension().gemv_mode().startswith("int16")
    layer, w64 = packed_layer(bits, group, n_o, n=n, k=k, seed=bits * 1000 + n_o * 10 + m)
    x = torch.randn(m, k)
    with torch.no_grad(), kernels.use_kernel("cpu"):
        y = layer(x)
    ref = x.double() @ w64.t() + layer.bias.double()
    err, bound = (y.double() - ref).abs(), int16_bound(layer, x)
    assert (err <= bound).all(), (err - bound).max()


# (group, N, K) of the K-split GEMV (M ≤ 4, groups of ≥ 256 rows): per-row with a ragged K (a short last tile),
# per-row past the 2048-row int32 flush, and G = 256 (a flush per group)
KSPLIT_SHAPES = [(None, 67, 600), (None, 100, 4100), (256, 200, 768)]


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group,n,k", KSPLIT_SHAPES)
@pytest.mark.parametrize("m", [1, 4, 5])  # 5: past the K split, the column-blocked GEMV
@pytest.mark.parametrize("threads", [1, 3])
def test_k_split_gemv_is_within_its_bound_of_float64(bits, group, n, k, m, threads, monkeypatch):
    """The decode GEMV that splits K across threads (each thread's range cuts segments at its ends) within the same
    bound of float64, for one thread and for three."""
    monkeypatch.delenv("WCT_CPU_GEMV", raising=False)
    monkeypatch.setenv("WCT_CPU_KSPLIT_MIN", "0")  # these layers are below the default size (2^22 weights)
    layer, w64 = packed_layer(bits, group, 40, n=n, k=k, seed=bits * 100 + k + m)
    x = torch.randn(m, k)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad(), kernels.use_kernel("cpu"):
            y = layer(x)
    finally:
        torch.set_num_threads(before)
    ref = x.double() @ w64.t() + layer.bias.double()
    err, bound = (y.double() - ref).abs(), int16_bound(layer, x)
    assert (err <= bound).all(), (err - bound).max()


@pytest.mark.parametrize("bits", [3, 4])
def test_fp32_gemv_is_selected_by_the_environment_and_exact_to_fp32(bits, monkeypatch):
    """WCT_CPU_GEMV=fp32 runs the fp32 GEMV, read per call (rel. error < 2e-6 where the int16 one is ~1e-5, on
    the grouped ragged shape with a split 3-bit step); an unknown mode is an error naming the choices."""
    ext = cpu_backend.extension()
    layer, w64 = packed_layer(bits, 40, 7, n=67, k=200, seed=bits)
    x = torch.randn(7, 200)
    ref = x.double() @ w64.t() + layer.bias.double()
    errs = {}
    for mode in ("fp32", "int16"):
        monkeypatch.setenv("WCT_CPU_GEMV", mode)
        assert ext.gemv_mode().startswith(mode)
        with torch.no_grad(), kernels.use_kernel("cpu"):
            errs[mode] = rel_err(layer(x), ref)
    assert errs["fp32"] < 2e-6 < errs["int16"] < 2e-4
    monkeypatch.setenv("WCT_CPU_GEMV", "int8")
    with pytest.raises(RuntimeError, match="WCT_CPU_GEMV must be int16 or fp32"):
        ext.gemv_mode()


@pytest.mark.parametrize("bits", [3, 4])
def test_int16_gemv_excludes_the_weak_columns_from_the_scale(bits, monkeypatch):
    """A massive activation (1e6) at a weak column: the GEMV (the planes' product, 0 at the weak columns) stays
    within the bound computed without it; passed no weak columns, the same call breaks the bound (the outlier sets
    xs and every other activation rounds to 0), so the check can fail. A row of x that is not finite runs the
    fp32 GEMV (inf/nan propagate as they do there)."""
    monkeypatch.delenv("WCT_CPU_GEMV", raising=False)
    layer, _ = packed_layer(bits, None, 3, n=67, k=200, seed=bits)
    idx, ext = layer.weak_idx, cpu_backend.extension()
    x = torch.randn(3, 200)
    x[:, idx[1]] = 1e6
    args = (list(layer.planes.values()), layer.scales, layer.zeros)
    wq = dequantize_dense(dict(layer.planes), layer.scales, layer.zeros, bits, 200, torch.float64)
    ref = x.double() @ wq.t()
    bound = int16_bound(layer, x.index_fill(1, idx.long(), 0))  # without the outlier
    assert ((ext.owq_gemv(x, *args, idx, bits).double() - ref).abs() <= bound).all()
    assert not ((ext.owq_gemv(x, *args, idx[:0], bits).double() - ref).abs() <= bound).all()
    x[1, 5] = float("nan")
    y = ext.owq_gemv(x, *args, idx, bits)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32, torch.bfloat16, torch.float64])
def test_int16_gemv_reads_every_scale_dtype(bits, scale_dtype, monkeypatch):
    """Scales as stored in any float dtype (fp16/fp32/bf16 vector loads, others converted one by one)."""
    monkeypatch.delenv("WCT_CPU_GEMV", raising=False)
    layer, _ = packed_layer(bits, 40, 5, n=67, k=200, seed=bits)
    scales = layer.scales.to(scale_dtype)
    x = torch.randn(3, 200)
    wq = dequantize_dense(dict(layer.planes), scales, layer.zeros, bits, 200, torch.float64)
    y = cpu_backend.extension().owq_gemv(x, list(layer.planes.values()), scales, layer.zeros, layer.weak_idx, bits)
    assert ((y.double() - x.double() @ wq.t()).abs() <= int16_bound(layer, x, scales)).all()


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group", [None, 64])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32, torch.bfloat16])
def test_compiled_slab_dequant_is_bit_identical_to_the_torch_dequant(bits, group, scale_dtype):
    """owq_dequant writes deq(W_q)ᵀ[:, n0:n1] as a contiguous fp32 [K, n] with the bits of wct.format.layout.dequantize_dense
    (ragged K = 204 per-row; N = 100; column ranges across, inside and at the end of the 64-column blocks)."""
    k = 204 if group is None else 192
    layer, _ = packed_layer(bits, group, 5, n=100, k=k, seed=bits + (group or 0))
    scales = layer.scales.to(scale_dtype)
    ref = dequantize_dense(dict(layer.planes), scales, layer.zeros, bits, k, torch.float32)  # [N, K]
    ext = cpu_backend.extension()
    for n0, n1 in [(0, 100), (37, 100), (0, 64), (64, 65), (3, 70), (50, 50)]:
        w = ext.owq_dequant(list(layer.planes.values()), scales, layer.zeros, bits, k, n0, n1)
        assert w.dtype == torch.float32 and w.shape == (k, n1 - n0) and w.is_contiguous()
        assert torch.equal(w, ref[n0:n1].t()), (n0, n1)


@pytest.mark.parametrize("bits", [3, 4])
def test_the_slab_path_uses_the_compiled_dequant_and_matches_float64_across_slabs(bits, monkeypatch):
    """M > GEMV_MAX_M forward and dX never call the torch dequantization while the extension is loaded, and slabs
    smaller than a layer (ragged last slab) give the float64 product."""
    layer, w64 = packed_layer(bits, 64, 7, n=150, k=256, seed=bits)

    def no_torch_dequant(*args, **kwargs):
        raise AssertionError("the slab path fell back to wct.format.layout.dequantize_dense")

    monkeypatch.setattr(cpu_backend, "dequantize_dense", no_torch_dequant)
    monkeypatch.setattr(cpu_backend, "DEQUANT_CHUNK_ELEMS", 256 * 40)  # slabs of 40 columns: 40, 40, 40, 30
    x = torch.randn(cpu_backend.GEMV_MAX_M + 5, 256, requires_grad=True)
    with kernels.use_kernel("cpu"):
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
    x64, dy64 = x.detach().double(), dy.double()
    assert rel_err(y, x64 @ w64.t() + layer.bias.double()) < 2e-6
    assert rel_err(x.grad, dy64 @ w64) < 2e-6


def layer_bytes(layer: OWQLinear) -> int:
    """Bytes of everything the layer holds: its tensors plus any per-layer copy the dispatcher keeps."""
    return kernels.resident_bytes(layer)


def test_resident_bytes_after_load_and_after_a_forward(tmp_path):
    """Resident ≤ stored × 1.05 after a forward on the CPU backend (decode and prefill), and 3-bit below 4-bit."""
    resident = {}
    for bits in (3, 4):
        layer, _ = packed_layer(bits, None, 8, n=576, k=576)
        stored = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
        assert layer_bytes(layer) == stored
        with torch.no_grad(), kernels.use_kernel("cpu"):
            layer(torch.randn(1, 576))
            layer(torch.randn(cpu_backend.GEMV_MAX_M + 1, 576))
        resident[bits] = layer_bytes(layer)
        assert resident[bits] <= stored * 1.05
    assert resident[3] < resident[4]
    kernels.configure(cache_dense="1")  # the torch backend's opt-in cache is what the bound excludes
    layer, _ = packed_layer(4, None, 8, n=576, k=576)
    with torch.no_grad(), kernels.use_kernel("torch"):
        layer(torch.randn(1, 576))
    assert layer_bytes(layer) > 2 * resident[4]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_resident_bytes_per_backend_are_the_stored_bytes(backend, kernel_config):
    """After a decode-sized and a larger forward (and its backward), each backend holds exactly the stored bytes, 3-bit
    below 4-bit: on triton a 3-bit layer holds the kernel words in place of the v1 planes (docs/kernels.md "3-bit
    words"), and its state_dict is still the v1 tensors it was built from, bit for bit."""
    kernels.configure(cache_dense="0")
    resident = {}
    for bits in (3, 4):
        layer, _ = packed_layer(bits, None, 8, n=64, k=64)
        saved = {k: v.clone() for k, v in layer.state_dict().items()}
        stored = sum(t.numel() * t.element_size() for t in saved.values())
        with kernels.use_kernel(backend):
            with torch.no_grad():
                layer(torch.randn(1, 64))
            layer(torch.randn(cpu_backend.GEMV_MAX_M + 1, 64, requires_grad=True)).sum().backward()
        resident[bits] = layer_bytes(layer)
        assert resident[bits] == stored
        assert layer.layout == ("words3" if bits == 3 and backend == "triton" else "v1")
        state = layer.state_dict()
        assert list(state) == list(saved) and all(torch.equal(state[k], saved[k]) for k in saved)
    assert resident[3] < resident[4]


def test_an_export_generates_the_tokens_of_the_model_it_was_saved_from(tmp_path, rtn_pack):
    """Greedy decoding of a packed tiny model and of its saved-and-reloaded checkpoint on the CPU backend."""
    from wct.models import load_model
    from wct.checkpoint import load_quantized, save_quantized

    model, tok = load_model("tiny-llama")
    rtn_pack(model, 4, n_weak={"q_proj": 3, "down_proj": 5})
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        before = model.generate(ids, **kw)
        save_quantized(model, tok, tmp_path / "export")
        loaded, _ = load_quantized(tmp_path / "export")
        after = loaded.generate(ids, **kw)
    assert torch.equal(before, after)
    layers = [m for m in loaded.modules() if isinstance(m, OWQLinear)]
    assert layers and all(layer_bytes(m) == sum(t.nbytes for t in m.state_dict().values()) for m in layers)
    assert {dispatch._resolved[k] for k in dispatch._resolved if k[1].type == "cpu"} >= {"cpu"}


def test_a_kernel_that_cannot_build_is_one_error_line_and_the_slab_path_answers(tmp_path):
    """No usable compiler: one `error:` log line naming the fallback, and the product is still right."""
    script = (
        "import logging, torch, wct.kernels as k\n"
        "from wct.kernels import cpu_backend\n"
        "logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
        "from wct.nn.owq_linear import OWQLinear\n"
        "from wct.format.layout import pack_linear\n"
        "w = torch.randn(32, 64)\n"
        "p = pack_linear(w, torch.rand(1, 32) * 0.1 + 0.01, torch.full((1, 32), 8), torch.tensor([3]), 4)\n"
        "layer = OWQLinear.from_packed(p, 4, 64).float()\n"
        "x = torch.randn(1, 64)\n"
        "with k.use_kernel('cpu'):\n"
        "    y = layer(x); y = layer(x)\n"
        "assert cpu_backend.extension() is None\n"
        "torch.testing.assert_close(y, x @ layer.dequantize().t(), rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), "CXX": str(tmp_path / "no-such-compiler")}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "falling back to the slab path" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # compiles the extension from scratch into an empty cache (~40 s)
def test_build_cpu_compiles_ahead_and_a_failed_build_is_one_error_line(tmp_path):
    """`python -m wct.kernels build-cpu` (what `make install` runs) leaves the extension in torch's cache, so a
    later process loads it without compiling; with no compiler the command fails with one `error:` line per
    problem (the compiler's, then the command's) and no traceback."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    built = subprocess.run([sys.executable, "-m", "wct.kernels", "build-cpu"], env=env, capture_output=True,
                           text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    path = built.stdout.strip().removeprefix("built ")
    assert os.path.isfile(path) and path.startswith(str(tmp_path / "ext"))
    bad = subprocess.run([sys.executable, "-m", "wct.kernels", "build-cpu"], capture_output=True, text=True,
                         env={**env, "TORCH_EXTENSIONS_DIR": str(tmp_path / "none"),
                              "CXX": str(tmp_path / "no-such-compiler")}, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
    assert bad.returncode != 0 and len(errors) == 2, bad.stderr[-2000:]
    assert "could not be built" in errors[0] and "were not built" in errors[1]
    assert "Traceback" not in bad.stderr


def test_the_extension_sources_are_staged_by_content_so_every_copy_shares_one_build(tmp_path, monkeypatch):
    """A checkout and an installed wheel hold the same sources at different paths; torch rebuilds whenever the
    ninja command (which names the paths) changes. Staged under a digest of their contents, equal sources get equal
    paths (one build), and an edited source gets its own folder."""
    import shutil

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    first = cpu_backend.staged_sources()
    assert [p.name for p in first] == list(cpu_backend.SOURCES)
    assert all(p.read_bytes() == (source_dir() / p.name).read_bytes() for p in first)
    assert first[0].parent.parent == tmp_path / "ext" / "wct_owq_cpu_src"
    copy = tmp_path / "wheel_copy"
    shutil.copytree(source_dir(), copy)
    monkeypatch.setattr(cpu_backend, "source_dir", lambda: copy)
    assert cpu_backend.staged_sources() == first  # another location, the same contents: the same build
    (copy / cpu_backend.SOURCES[0]).write_text((copy / cpu_backend.SOURCES[0]).read_text() + "\n// edited\n")
    edited = cpu_backend.staged_sources()
    assert edited[0].parent != first[0].parent and edited[0].read_text().endswith("// edited\n")
    assert first[0].read_bytes() == (source_dir() / first[0].name).read_bytes()  # the first stage is untouched
