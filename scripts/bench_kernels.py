"""Benchmark OWQLinear's backends; prints a table and writes JSON.

CPU (always): SmolLM2-135M forward of 1×512 tokens, FP32 model vs the OWQ-4.01 packed model (GPTQ with min-max
fit on one 128-token window: the weights' values do not matter for speed; weak columns as at 4.01 bits) on the
torch backend with the dense cache off and on (target: within 1.5× of FP32), with the logits of both packed runs compared.

GPU (needs CUDA; docs/kernels.md): Llama-7B layer shapes K×N ∈ {4096×4096, 4096×11008, 11008×4096}, M ∈ {1, 4, 16},
3/4-bit per-row, n_o ∈ {0, 8, 64}; the cuda and triton backends, torch fp16 F.linear and bitsandbytes NF4. Each
timing replays a CUDA graph that calls a rotation of weight copies (≥ 2× L2, so the weights come from HBM): µs per
call, GB/s from the bytes model, % of a measured device-to-device copy, speedups over fp16 and NF4, weak-column
overhead against n_o = 0, max |error| against the torch backend in the same run; the eager per-call time (host
dispatch included) separately.

    python scripts/bench_kernels.py [--out results/bench_kernels.json] [--reps 5] [--skip-cpu] [--skip-gpu]
    python scripts/bench_kernels.py --gpu-json OUT.json [--reps 5]   # the GPU table only (GPU validation)
    python scripts/bench_kernels.py --cpu-gemv-json results/bench_cpu_gemv.json [--threads 2]   # GEMV_MAX_M
    python scripts/bench_kernels.py --cpu-stream-json results/bench_cpu_stream.json   # the decode GEMV from DRAM
    TRITON_INTERPRET=1 python scripts/bench_kernels.py --resident-json results/bench_resident.json   # bytes held

Resident bytes (``--resident-json``): per SmolLM2 layer shape, 3/4 bits and backend, the bytes one OWQLinear holds
after a decode-sized forward and a training step against its stored bytes, and the code layout it holds
(docs/kernels.md "3-bit words"; bench_resident).

CPU GEMV vs slab (``--cpu-gemv-json``): SmolLM2's layer shapes (576×576, 576×192, 576×1536, 1536×576), 3/4-bit
per-row, fp32, M ∈ {1, 2, 4, 8, 12, 16, 24, 32, 64, 96, 128}: µs per call of the compiled GEMVs (int16, fp32), of
the slab path (compiled dequantization + BLAS) and of fp32 F.linear, each over a rotation of 64 MiB of weight copies;
per decoder block the largest M at which the (int16) GEMV still wins, which sets
``wct.kernels.cpu_backend.GEMV_MAX_M``.

CPU decode GEMV from DRAM (``--cpu-stream-json``): the layers of the 1.5B synthetic model (27 blocks of 2048×2048 ×4,
2048×5632 ×2, 5632×2048; 0.69 GB of 4-bit codes, per-row scales) in one huge-page arena as the decode loop holds them
(wct.heap), called in the model's order at M = 1 as one decode step does: ms per pass and GB/s of codes for the K-split
GEMV (the default at these sizes) and the column-blocked one (``WCT_CPU_KSPLIT_MIN`` above every layer), against fp32
``F.linear`` over 8 blocks of the same shapes (1.6 GB) as the yardstick of what the memory streams.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F

import wct.kernels as kernels
from wct.errors import WCTError, cli_errors
from wct.io import atomic_file
from wct.nn.owq_linear import OWQLinear
from wct.format.layout import pack_linear, stored_bits

GPU_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]  # (K = in, N = out): Llama-7B attention and MLP
GPU_M = [1, 4, 16]
GPU_N_WEAK = [0, 8, 64]
CPU_M = [1, 2, 4, 8, 12, 16, 24, 32, 64, 96, 128]
SYNTH_1_5B_SHAPES = {(2048, 2048): 4, (2048, 5632): 2, (5632, 2048): 1}  # (K, N): per block of the 1.5B model
SMOLLM2_SHAPES = {(576, 576): 2, (576, 192): 2, (576, 1536): 2, (1536, 576): 1}  # (K, N): count per decoder block


@torch.no_grad()
def bench_cpu(reps: int) -> list[dict]:
    """SmolLM2-135M, 1×512 tokens: FP32 vs packed OWQ-4.01 uncached / cached on the torch backend.

    The three runs are interleaved rep by rep after one warm-up each; medians of wall time and of process CPU time
    (the fairer ratio on a shared machine when run with OMP_NUM_THREADS=1)."""
    from wct.models import load_model
    from wct.quant.config import QuantConfig
    from wct.quant.owq import quantize_model

    fp32, _ = load_model("smollm2-135m")
    packed = copy.deepcopy(fp32)
    ids = torch.randint(0, fp32.config.vocab_size, (1, 512), generator=torch.Generator().manual_seed(0))
    quantize_model(packed, ids[:, :128], QuantConfig(bits=4, target_bit=4.01, tuning="minmax"), progress=False)
    runs = {
        "fp32 nn.Linear": (fp32, "auto"),
        "owq-4.01 torch, uncached": (packed, "0"),
        "owq-4.01 torch, dense cache": (packed, "1"),
    }
    times = {name: [] for name in runs}  # (wall, process CPU) seconds
    logits = {}
    for rep in range(reps + 1):
        for name, (model, cache) in runs.items():
            kernels.configure(kernel="torch", cache_dense=cache)  # configure(cache_dense=...) empties the cache
            if cache == "1":
                model(ids)  # fill the cache outside the timed call
            t, c = time.perf_counter(), time.process_time()
            logits[name] = model(ids).logits
            if rep:
                times[name].append((time.perf_counter() - t, time.process_time() - c))
    cached_mb = sum(d.numel() * d.element_size() for _, d in kernels._dense_cache.values()) / 2**20
    kernels.configure(kernel="auto", cache_dense="auto")  # the default: no cache
    base = [statistics.median(v) for v in zip(*times["fp32 nn.Linear"])]
    rows = []
    for name, ts in times.items():
        wall, cpu = (statistics.median(v) for v in zip(*ts))
        rows.append({"model": "SmolLM2-135M 1x512", "weights": name, "wall_ms": wall * 1e3,
                     "min_wall_ms": min(w for w, _ in ts) * 1e3, "cpu_ms": cpu * 1e3,
                     "vs_fp32_wall": wall / base[0], "vs_fp32_cpu": cpu / base[1]})
    rows[-1]["cache_MB"] = cached_mb
    rows[-1]["max_abs_logit_diff_vs_uncached"] = (logits["owq-4.01 torch, dense cache"] - logits["owq-4.01 torch, uncached"]).abs().max().item()
    return rows


def _cpu_time(fns, reps: int, min_s: float = 0.02) -> float:
    """Median seconds per call over ``reps`` samples; each sample calls the rotation ``fns`` (one callable per weight
    copy, so the weights come from memory as in a decode step, not from the cache) for at least ``min_s``."""
    for f in fns[:2]:
        f()
    n, s = 0, time.perf_counter()
    while time.perf_counter() - s < min_s / 4:
        fns[n % len(fns)]()
        n += 1
    calls = max(len(fns), int(n * 4))
    samples = []
    for _ in range(reps):
        s = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        samples.append((time.perf_counter() - s) / calls)
    return statistics.median(samples)


@torch.no_grad()
def bench_cpu_gemv(reps: int, ms=CPU_M, shapes=SMOLLM2_SHAPES, bits_list=(4, 3), threads: int = 2) -> dict:
    """The CPU backend's two products on SmolLM2's layer shapes, fp32 activations, per-row scales, ``threads``
    threads: the compiled GEMV (``owq_gemv``; the default int16 one, and the fp32 one of ``WCT_CPU_GEMV=fp32``)
    against the slab path (``owq_dequant`` + BLAS, what M > GEMV_MAX_M runs), with fp32 ``F.linear`` on the dense
    weight as the yardstick. Per shape and M: µs per call (median), and per decoder block (the shapes weighted by
    their count in a block) the M from which the slab path is faster than the default GEMV."""
    from wct.kernels import cpu_backend

    torch.set_num_threads(threads)
    ext = cpu_backend.extension()
    if ext is None:
        raise WCTError("the CPU kernels did not build (see the error line above); the GEMV table needs them")
    rows = []
    for bits in bits_list:
        for (k, n), count in shapes.items():
            layer = _random_layer(k, n, bits, 0, "cpu")
            planes, scales, zeros, idx = list(layer.planes.values()), layer.scales, layer.zeros, layer.weak_idx
            nbytes = sum(p.nbytes for p in planes) + scales.nbytes + zeros.nbytes
            copies = max(2, (64 << 20) // nbytes)  # 64 MiB of weights: more than the caches hold
            packs = [([p.clone() for p in planes], scales.clone(), zeros.clone()) for _ in range(copies)]
            dense = [layer.dequantize().float() for _ in range(max(2, (64 << 20) // (4 * k * n)))]
            for m in ms:
                x = torch.randn(m, k)
                gemv, gemv_fp32 = (_gemv_time(ext, mode, x, packs, idx, bits, reps) for mode in ("int16", "fp32"))
                slab = _cpu_time([lambda p=p: cpu_backend.slab_matmul(x, p[0], p[1], p[2], bits) for p in packs], reps)
                deq = _cpu_time([lambda p=p: ext.owq_dequant(p[0], p[1], p[2], bits, k, 0, n) for p in packs], reps)
                fp32 = _cpu_time([lambda w=w: F.linear(x, w) for w in dense], reps)
                rows.append({"bits": bits, "K": k, "N": n, "per_block": count, "M": m, "gemv_us": gemv * 1e6,
                             "gemv_fp32_us": gemv_fp32 * 1e6, "slab_us": slab * 1e6, "dequant_us": deq * 1e6, "fp32_linear_us": fp32 * 1e6,
                             "faster": "gemv" if gemv <= slab else "slab"})
                print(f"  {bits}-bit {k}x{n} M={m:3d}: gemv {gemv * 1e6:8.1f} µs  (fp32 gemv {gemv_fp32 * 1e6:8.1f})  "
                      f"slab {slab * 1e6:8.1f} µs  "
                      f"(dequant {deq * 1e6:7.1f})  fp32 F.linear {fp32 * 1e6:8.1f} µs", flush=True)
    blocks = []
    for bits in bits_list:
        for m in ms:
            sel = [r for r in rows if r["bits"] == bits and r["M"] == m]
            g, g32, sl = (sum(r[c] * r["per_block"] for r in sel) for c in ("gemv_us", "gemv_fp32_us", "slab_us"))
            blocks.append({"bits": bits, "M": m, "block_gemv_us": g, "block_gemv_fp32_us": g32, "block_slab_us": sl,
                           "block_fp32_us": sum(r["fp32_linear_us"] * r["per_block"] for r in sel),
                           "faster": "gemv" if g <= sl else "slab"})
    crossover = {}
    for bits in bits_list:
        slower = [b["M"] for b in blocks if b["bits"] == bits and b["faster"] == "gemv"]
        crossover[bits] = max(slower) if slower else 0  # the largest M at which the GEMV still wins
    return {"threads": threads, "loadavg": os.getloadavg(), "gemv_mode": ext.gemv_mode(), "rows": rows, "blocks": blocks,
            "gemv_wins_up_to_M": crossover, "GEMV_MAX_M": cpu_backend.GEMV_MAX_M}


@torch.no_grad()
def bench_cpu_stream(reps: int, blocks: int = 27, threads: int = 2, shapes=SYNTH_1_5B_SHAPES) -> dict:
    """The int16 decode GEMV over a model's worth of 4-bit layers from DRAM (module docstring): K-split against
    column-blocked, and fp32 ``F.linear`` as the memory's yardstick."""
    from wct.heap import huge_page_arena
    from wct.kernels import cpu_backend

    torch.set_num_threads(threads)
    ext = cpu_backend.extension()
    if ext is None:
        raise WCTError("the CPU kernels did not build (see the error line above); the stream table needs them")
    layers = [(k, n) for _ in range(blocks) for (k, n), count in shapes.items() for _ in range(count)]
    nbytes = sum(k * n // 2 for k, n in layers)
    arena, off, calls = huge_page_arena(nbytes), 0, []
    gen = torch.Generator().manual_seed(0)
    for k, n in layers:
        codes = arena[off:off + k * n // 2].view(torch.int32).view(k // 8, n)
        codes.copy_(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen))
        off += k * n // 2
        calls.append((torch.randn(1, k, generator=gen), [codes], torch.rand(1, n, generator=gen).half(),
                      torch.randint(0, 16, (1, n), dtype=torch.uint8, generator=gen), torch.zeros(0, dtype=torch.int32)))

    def one_pass() -> None:
        for x, planes, scales, zeros, idx in calls:
            ext.owq_gemv(x, planes, scales, zeros, idx, 4)

    rows = []
    for name, ksplit_min in (("k-split", None), ("column-blocked", str(1 << 62))):
        with _env("WCT_CPU_KSPLIT_MIN", ksplit_min):
            one_pass()
            t = min(_wall(one_pass) for _ in range(reps))
        rows.append({"gemv": name, "pass_ms": t * 1e3, "gb_s": nbytes / t / 1e9, "bytes": nbytes})
    fp32 = [torch.randn(n, k, generator=gen) for _ in range(8) for (k, n), count in shapes.items() for _ in range(count)]
    xs = {k: torch.randn(1, k) for k, _ in shapes}
    t = min(_wall(lambda: [F.linear(xs[w.shape[1]], w) for w in fp32]) for _ in range(reps))
    fp32_bytes = sum(w.nbytes for w in fp32)
    rows.append({"gemv": "fp32 F.linear (8 blocks)", "pass_ms": t * 1e3, "gb_s": fp32_bytes / t / 1e9, "bytes": fp32_bytes})
    for r in rows:
        print(f"  {r['gemv']:26s} {r['pass_ms']:8.1f} ms per pass  {r['gb_s']:6.1f} GB/s", flush=True)
    return {"threads": threads, "loadavg": os.getloadavg(), "gemv_mode": ext.gemv_mode(), "blocks": blocks, "rows": rows}


def _wall(fn) -> float:
    s = time.perf_counter()
    fn()
    return time.perf_counter() - s


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` (unset for None) inside the block, restored after."""
    saved = os.environ.pop(name, None)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)
        if saved is not None:
            os.environ[name] = saved


def _gemv_time(ext, mode: str, x, packs, idx, bits: int, reps: int) -> float:
    """:func:`_cpu_time` of ``owq_gemv`` over the rotation ``packs`` with ``WCT_CPU_GEMV=mode``."""
    with _env("WCT_CPU_GEMV", mode):
        return _cpu_time([lambda p=p: ext.owq_gemv(x, p[0], p[1], p[2], idx, bits) for p in packs], reps)


def bench_resident(shapes=tuple(SMOLLM2_SHAPES), bits_list=(3, 4), n_o: int = 8) -> list[dict]:
    """Resident bytes of one OWQLinear per backend and bit width (``--resident-json``): the bytes it holds
    (:func:`wct.kernels.resident_bytes`) after a decode-sized forward (M = 1, no grad) and a training step (M = 33,
    forward and backward), against its stored bytes (the state_dict), and the layout it then holds. Backends: those
    that run here (torch and cpu on a CPU, triton too under ``TRITON_INTERPRET=1``; torch, triton and cuda on a GPU)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backends = []
    for backend, why_not in kernels.backends_on(device).items():
        if why_not:
            print(f"{backend}: not run ({why_not})")
        else:
            backends.append(backend)
    rows = []
    for k, n in shapes:
        for bits in bits_list:
            for backend in backends:
                layer = _random_layer(k, n, bits, n_o, device.type)
                stored = sum(t.nbytes for t in layer.state_dict().values())
                with kernels.use_kernel(backend), kernels.no_dense_cache():
                    with torch.no_grad():
                        layer(torch.randn(1, k, device=device))
                    decode = kernels.resident_bytes(layer)
                    layer.weak_weight.requires_grad_(True)
                    layer(torch.randn(33, k, device=device, requires_grad=True)).sum().backward()
                    layer.weak_weight.grad = None  # the gradient is the optimizer's, not the layer's weights
                    train = kernels.resident_bytes(layer)
                rows.append({"K": k, "N": n, "bits": bits, "backend": backend, "stored_B": stored,
                             "decode_B": decode, "train_B": train, "ratio": max(decode, train) / stored,
                             "B/weight": max(decode, train) / (k * n), "layout": layer.layout})
    return rows


def _random_layer(k: int, n: int, bits: int, n_o: int, device: str) -> OWQLinear:
    g = torch.Generator().manual_seed(k + n + bits + n_o)
    scales = torch.rand(1, n, generator=g) * 0.01 + 1e-3
    zeros = torch.randint(0, 2**bits, (1, n), generator=g)
    w = torch.randn(n, k, generator=g) * 0.02
    idx = torch.randperm(k, generator=g)[:n_o]
    return OWQLinear.from_packed(pack_linear(w, scales, zeros, idx, bits), bits, k).to(device)


def _graph_time(fns, reps: int, replays: int = 20) -> float:
    """Seconds per call of a rotation of callables (one per weight copy, so L2 cannot hold the weights), captured
    once in a CUDA graph and replayed: the kernels' time without the host's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (autotuning, workspaces) outside the capture
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    return _event_time(lambda: [graph.replay() for _ in range(replays)], reps) / (replays * len(fns))


def _eager_time(fns, reps: int) -> float:
    """Seconds per eager call (launch and dispatch overhead included) over the same rotation."""
    for f in fns:
        f()
    return _event_time(lambda: [f() for f in fns], reps) / len(fns)


def _event_time(run, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def _copy_bandwidth() -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write of 1 GiB)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = _event_time(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / t / 1e9


def _nf4_layers(w: torch.Tensor, copies: int) -> list | str:
    """bitsandbytes NF4 copies of w [N, K], or why there are none."""
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        return f"bitsandbytes unavailable: {e}"
    layers = []
    for _ in range(copies):
        lin = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, compute_dtype=torch.float16, quant_type="nf4")
        lin.weight = bnb.nn.Params4bit(w.cpu(), requires_grad=False, quant_type="nf4")
        layers.append(lin.cuda())
    return layers


def _timed(fns, reps: int) -> tuple[float, bool]:
    """(seconds per call, captured in a graph): graph timing, or eager when the callables cannot be captured."""
    try:
        return _graph_time(fns, reps), True
    except RuntimeError:
        torch.cuda.synchronize()
        return _eager_time(fns, reps), False


@torch.no_grad()
def bench_gpu(reps: int, shapes=GPU_SHAPES, ms=GPU_M, n_weak=GPU_N_WEAK, bits_list=(3, 4)) -> dict:
    """The kernel table (module docstring): per shape, bits, n_o, M and backend."""
    props = torch.cuda.get_device_properties(0)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    copy_gbs = _copy_bandwidth()
    runs = kernels.backends_on(torch.device("cuda"))
    backends = [b for b in ("cuda", "triton") if runs[b] is None]
    rows = []
    for k, n in shapes:
        w16 = torch.randn(n, k, device="cuda", dtype=torch.float16) * 0.02
        fp16 = [w16.clone() for _ in range(max(2, -(-2 * l2 // (n * k * 2))))]
        copies = max(2, -(-2 * l2 // (n * k * 3 // 8)))  # ≥ 2× L2 of 3-bit weights per rotation
        nf4 = _nf4_layers(w16, max(2, -(-2 * l2 // (n * k // 2))))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)
            t16, _ = _timed([lambda w=w: F.linear(x, w) for w in fp16], reps)
            tnf4 = _timed([lambda l=l: l(x) for l in nf4], reps)[0] if isinstance(nf4, list) else None
            for bits in bits_list:
                for n_o in n_weak:
                    first = _random_layer(k, n, bits, n_o, "cuda").half()
                    layers = [first, *(copy.deepcopy(first) for _ in range(copies - 1))]  # distinct buffers
                    nbytes = stored_bits(n, k, bits, 1, n_o) * n * k / 8 + 2 * m * (k + n)
                    with kernels.use_kernel("torch"):
                        ref = layers[0](x).float()
                    for backend in backends:
                        for layer in layers:  # a 3-bit layer holds the kernel words there (before any capture)
                            kernels.hold_kernel_layout(layer, backend)
                        with kernels.use_kernel(backend):
                            err = (layers[0](x).float() - ref).abs().max().item()
                            fns = [lambda l=l: l(x) for l in layers]
                            t, graphed = _timed(fns, reps)
                            eager = _eager_time(fns, reps)
                        rows.append({
                            "K": k, "N": n, "M": m, "bits": bits, "n_o": n_o, "backend": backend, "us": t * 1e6,
                            "GB/s": nbytes / t / 1e9, "%copy": 100 * nbytes / t / 1e9 / copy_gbs,
                            "x_fp16": t16 / t, "x_nf4": tnf4 / t if tnf4 else None, "eager_us": eager * 1e6,
                            "fp16_us": t16 * 1e6, "nf4_us": tnf4 * 1e6 if tnf4 else None, "graph": graphed,
                            "max_err": err,
                        })
    base = {(r["K"], r["N"], r["M"], r["bits"], r["backend"]): r["us"] for r in rows if r["n_o"] == 0}
    for r in rows:
        key = (r["K"], r["N"], r["M"], r["bits"], r["backend"])
        r["weak_overhead_%"] = 100 * (r["us"] / base[key] - 1) if key in base else None
    return {"device": props.name, "copy_GB/s": copy_gbs, "L2_bytes": l2,
            "nf4": "ok" if isinstance(nf4, list) else nf4, "rows": rows}


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))
    cells = [[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


@cli_errors
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/bench_kernels.json")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true")
    parser.add_argument("--skip-gpu", action="store_true")
    parser.add_argument("--gpu-json", help="run only the GPU table and write it to this JSON file")
    parser.add_argument("--cpu-gemv-json", help="run only the CPU GEMV-vs-slab table (GEMV_MAX_M) into this JSON")
    parser.add_argument("--cpu-stream-json", help="run only the CPU decode GEMV from DRAM (1.5B layers) into this JSON")
    parser.add_argument("--threads", type=int, default=2, help="threads of the CPU GEMV tables")
    parser.add_argument("--resident-json", help="run only the resident-bytes table (backend × bits) into this JSON")
    args = parser.parse_args()
    result = {"torch": torch.__version__, "threads": torch.get_num_threads()}
    if args.cpu_gemv_json:
        print(f"CPU GEMV vs slab path, SmolLM2 shapes, fp32, {args.threads} threads, load {os.getloadavg()}")
        result["cpu_gemv"] = bench_cpu_gemv(args.reps, threads=args.threads)
        print_table(result["cpu_gemv"]["blocks"])
        print(f"the GEMV wins up to M = {result['cpu_gemv']['gemv_wins_up_to_M']} (bits: M); load {os.getloadavg()}")
        with atomic_file(args.cpu_gemv_json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.cpu_gemv_json}")
        return
    if args.cpu_stream_json:
        print(f"CPU decode GEMV from DRAM, 1.5B layer shapes, 4-bit, {args.threads} threads, load {os.getloadavg()}")
        result["cpu_stream"] = bench_cpu_stream(args.reps, threads=args.threads)
        with atomic_file(args.cpu_stream_json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.cpu_stream_json}; load {os.getloadavg()}")
        return
    if args.resident_json:
        result["resident"] = bench_resident()
        print_table(result["resident"])
        with atomic_file(args.resident_json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.resident_json}")
        return
    if args.gpu_json:
        if not torch.cuda.is_available():
            raise WCTError("--gpu-json needs a CUDA device (none found); run without it for the CPU rows")
        result["gpu"] = bench_gpu(args.reps)
        print_table(result["gpu"]["rows"])
        with atomic_file(args.gpu_json, "w") as fh:
            json.dump(result, fh, indent=1)
        print(f"wrote {args.gpu_json}")
        return
    if not args.skip_cpu:
        result["cpu"] = bench_cpu(args.reps)
        print_table(result["cpu"])
    if args.skip_gpu:
        result["gpu"] = "skipped (--skip-gpu)"
    elif not torch.cuda.is_available():
        result["gpu"] = "skipped: the GPU rows need CUDA (no CUDA device here)"
        print(result["gpu"])
    else:
        result["gpu"] = bench_gpu(args.reps)
        print_table(result["gpu"]["rows"])
    with atomic_file(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
