"""Decode speed and memory on this CPU: tokens/s and peak RSS of FP32 SmolLM2 (transformers) against wct exports.

Each (model, decoder, batch) runs in its own subprocess (peak RSS = the child's ``ru_maxrss``: load + generation),
with ``torch.set_num_threads(threads)``: a prompt of ``--prompt`` random tokens, one warm-up generation, then greedy
decoding of ``--new`` tokens (``min_new_tokens`` = ``max_new_tokens``). Decode tokens/s excludes the prefill:
(batch · (new − 1)) / (t(new) − t(1 token)). ``--decoders``: ``loop`` = the wct decode loop
(:class:`wct.decoding.LlamaDecoder`, what ``wct.generate`` runs; an export is loaded in its stored dtypes, fp16
embedding), ``generate`` = transformers' ``model.generate`` (fp32). Ratios (``decode_vs_fp32``, ``rss_vs_fp32``)
divide by the ``--baseline`` label's ``generate`` row of the same batch.

Models: ``fp32`` (SmolLM2-135M-Instruct in fp32), the folders named with ``--ckpt LABEL=PATH`` (an owq-pack
checkpoint, e.g. an export of ``python -m wct.quantize``, or a full-precision model folder, loaded in fp32), or, for
labels without a path, checkpoints made here once into ``--ckpt-dir`` with min-max fitted codes (decode speed and
memory do not depend on the codes' values): ``owq-4.01`` (4-bit per-row), ``owq-3.01`` (3-bit per-row),
``owq-4.01-g64`` (4-bit, groups of 64), weak columns at the target's share. ``llama.cpp``: SmolLM2's own Q4_1 GGUF
through llama-cpp-python when it is installed (batch 1), else its row records why not (on a CPU whose AMX llama.cpp
cannot use, e.g. this VM, its AMX path crashes: build it with ``CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX512=ON
-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF"``, README). ``--kernel`` picks wct's backend (``auto``: the CPU backend;
``torch`` with ``WCT_CACHE_DENSE=1`` reproduces the old dense-cache path).

    python scripts/bench_decode.py [--out results/bench_decode.json] [--batches 1 4] [--prompt 128] [--new 128]
        [--threads 2] [--models fp32 owq-4.01 owq-3.01 owq-4.01-g64 llama.cpp] [--decoders loop generate]
        [--ckpt LABEL=PATH ...] [--baseline fp32] [--profile]
    # a 1.5B synthetic model (scripts/make_synthetic_llama.py, quantized by scripts/bench_scale.py):
    python scripts/bench_decode.py --ckpt fp=/tmp/synth-1.5b owq=/tmp/synth-1.5b-owq --models fp owq \
        --baseline fp --batches 1 --new 64 --out results/bench_decode-1.5b.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from wct.errors import WCTError, cli_errors
from wct.io import atomic_file

RECIPES = {"owq-4.01": (4, 4.01, -1), "owq-3.01": (3, 3.01, -1), "owq-4.01-g64": (4, 4.01, 64)}


def _child(label: str, path: str, batch: int, prompt: int, new: int, threads: int, kernel: str, decoder: str,
           profile: bool, train_step: bool) -> dict:
    """One measurement in this process (the subprocess side)."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    if label == "llama.cpp":
        return _llama_cpp(batch, prompt, new, threads)
    if label == "fp32" or (label not in RECIPES and not _is_owq(path)):  # SmolLM2, or an FP model folder
        from wct.models import load_model

        model, _ = load_model("smollm2-135m" if label == "fp32" else path, dtype=torch.float32)
    else:
        import wct.kernels as kernels
        from wct.checkpoint import load_quantized

        kernels.configure(kernel=kernel)
        # the wct loop computes in fp32 whatever the stored dtype, so it keeps the stored (fp16) embedding / head;
        # model.generate runs the model's own dtype, fp32 on a CPU
        model, _ = load_quantized(path, dtype=None if decoder == "loop" else torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    if decoder == "loop":
        from wct.decoding import LlamaDecoder

        loop = LlamaDecoder(model, batch, prompt + new)

    def gen(n: int) -> float:
        s = time.perf_counter()
        with torch.no_grad():
            if decoder == "loop":
                loop.generate(ids, n, min_new_tokens=n)
            else:
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        return time.perf_counter() - s

    gen(4)  # warm-up (kernel build / load, allocator)
    t1, tn = gen(1), gen(new)
    res = {"load_s": load_s, "prefill_s": t1, "decode_tok_s": batch * (new - 1) / max(tn - t1, 1e-9),
           "total_tok_s": batch * new / tn,  # peak RSS of load + generation (before profiling or training)
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if profile:
        res["profile"] = _profile_step(loop.forward if decoder == "loop" else model, ids, decoder == "loop")
    if train_step and label != "fp32":
        res["train_step_s"] = _train_step(model, ids[:1])
    return res


def _is_owq(path: str) -> bool:
    from wct.models import is_owq_checkpoint

    return path != "-" and is_owq_checkpoint(Path(path))


def _profile_step(forward, ids, loop: bool) -> list[dict]:
    """torch.profiler of one decode step (one token after the prompt, KV cache filled): the top ops by self CPU
    time, with the step's wall time. ``forward``: the model (transformers' cache) or the wct loop's ``forward``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        if loop:
            decoder = forward.__self__
            decoder.pos = 0
            nxt = forward(ids).argmax(-1, keepdim=True)
            step = lambda: forward(nxt)  # noqa: E731
            undo = lambda: setattr(decoder, "pos", decoder.pos - 1)  # noqa: E731
        else:
            out = forward(ids, use_cache=True)
            nxt = out.logits[:, -1:].argmax(-1)
            past = out.past_key_values
            step = lambda: forward(nxt, past_key_values=past, use_cache=True)  # noqa: E731
            undo = lambda: past.crop(-1)  # noqa: E731 (drop the token just added)
        for _ in range(3):  # warm-up of the one-token path
            step()
            undo()
        s = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        wall = time.perf_counter() - s
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    print(f"profile of one decode step: {wall * 1e3:.1f} ms wall (profiled), {total / 1e3:.1f} ms self CPU",
          file=sys.stderr)
    return [{"step_ms_profiled": wall * 1e3, "self_cpu_ms_total": total / 1e3}] + [
        {"op": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in rows]


def _train_step(model, ids) -> float:
    """Seconds of one forward + backward (next-token loss, gradients into the weak columns) on ``ids``."""

    for p in model.parameters():
        p.requires_grad_(False)
    weak = [m.weak_weight for m in model.modules() if hasattr(m, "weak_weight")]
    for w in weak:
        w.data = w.data.float()
        w.requires_grad_(True)
    times = []
    for _ in range(3):
        s = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        times.append(time.perf_counter() - s)
    return min(times[1:])


def _llama_cpp(batch: int, prompt: int, new: int, threads: int) -> dict:
    """llama.cpp on SmolLM2's Q4_1 GGUF (batch 1 only: llama-cpp-python's high-level API decodes one sequence)."""
    try:
        import llama_cpp
    except ImportError:
        return {"skipped": "llama-cpp-python is not installed (pip install llama-cpp-python builds llama.cpp)"}
    if batch != 1:
        return {"skipped": "batch > 1 is not measured for llama.cpp"}
    import random

    from wct.models import smollm2_gguf

    llm = llama_cpp.Llama(model_path=str(smollm2_gguf()), n_threads=threads, n_ctx=prompt + new + 8, verbose=False)
    toks = [random.Random(0).randrange(llm.n_vocab()) for _ in range(prompt)]

    def run(n: int) -> float:
        llm.reset()
        s = time.perf_counter()
        llm.eval(toks)
        for _ in range(n):
            nxt = llm.sample(temp=0.0)
            llm.eval([nxt])
        return time.perf_counter() - s

    run(4)
    t1, tn = run(1), run(new)
    return {"version": llama_cpp.__version__, "prefill_s": t1, "decode_tok_s": (new - 1) / max(tn - t1, 1e-9),
            "total_tok_s": new / tn}


def make_checkpoint(label: str, folder: Path) -> Path:
    """An owq-pack checkpoint of SmolLM2 for ``label`` (min-max codes at the recipe's bits, group and weak share)."""
    out = folder / label
    if (out / "config.json").is_file():
        return out
    import torch

    from wct.models import load_model
    from wct.checkpoint import save_quantized
    from wct.quant.config import QuantConfig
    from wct.quant.owq import quantize_model

    bits, target, group = RECIPES[label]
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    quantize_model(model, ids, QuantConfig(bits=bits, target_bit=target, group_size=group, tuning="minmax"),
                   progress=False)
    save_quantized(model, tok, out)
    return out


@cli_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/bench_decode.json")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kernel", default="auto")
    ap.add_argument("--decoders", nargs="+", default=["loop", "generate"], choices=["loop", "generate"],
                    help="loop: the wct decode loop (wct/decoding.py, what wct.generate runs); generate: "
                         "transformers' model.generate")
    ap.add_argument("--models", nargs="+", default=["fp32", *RECIPES, "llama.cpp"])
    ap.add_argument("--ckpt", nargs="*", default=[],
                    help="LABEL=PATH of a model folder to measure: an owq-pack checkpoint, or an FP model (fp32)")
    ap.add_argument("--baseline", default="fp32", help="the label whose model.generate rows the ratios divide by")
    ap.add_argument("--profile", action="store_true", help="profile one decode step (batch 1) of each model")
    ap.add_argument("--train-step", action="store_true", help="time one forward + backward of each wct model")
    ap.add_argument("--ckpt-dir", default=str(Path.home() / ".cache" / "wct" / "bench_decode"))
    ap.add_argument("--child", nargs=4, metavar=("LABEL", "PATH", "BATCH", "DECODER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        label, path, batch, decoder = args.child
        res = _child(label, path, int(batch), args.prompt, args.new, args.threads, args.kernel, decoder,
                     args.profile and batch == "1", args.train_step and batch == "1")
        if "skipped" not in res:
            res.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        print("RESULT " + json.dumps(res))
        return
    paths = dict(c.split("=", 1) for c in args.ckpt)
    for label in args.models:
        if label not in ("fp32", "llama.cpp", *paths, *RECIPES):
            raise WCTError(f"--models {label}: unknown; use fp32, llama.cpp, {', '.join(RECIPES)} or a --ckpt label")
    print(f"bench_decode: {args.models} batches {args.batches}, prompt {args.prompt}, new {args.new}, "
          f"{args.threads} threads, kernel={args.kernel}, load {os.getloadavg()}")
    rows = []
    runs = []
    for label in args.models:
        path = paths.get(label) or (str(make_checkpoint(label, Path(args.ckpt_dir))) if label in RECIPES else "-")
        runs += [(label, path, batch, d) for d in (["-"] if label == "llama.cpp" else args.decoders)
                 for batch in args.batches]
    for label, path, batch, decoder in runs:
        cmd = [sys.executable, __file__, "--child", label, path, str(batch), decoder, "--prompt", str(args.prompt),
               "--new", str(args.new), "--threads", str(args.threads), "--kernel", args.kernel,
               *(["--profile"] if args.profile else []), *(["--train-step"] if args.train_step else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
        if proc.returncode or not line:  # recorded, and the other rows still run
            res = {"model": label, "decoder": decoder, "batch": batch,
                   "skipped": f"failed: {proc.stderr.strip().splitlines()[-1:]}"}
        else:
            res = {"model": label, "decoder": decoder, "batch": batch, **json.loads(line[0][7:])}
        rows.append(res)
        for p in res.get("profile", [])[1:9]:
            print(f"    {p['op'][:40]:40s} {p['calls']:5d} calls {p['self_cpu_ms']:8.2f} ms", flush=True)
        if "profile" in res:
            print(f"    one decode step: {res['profile'][0]}", flush=True)
        if "train_step_s" in res:
            print(f"    training step (1x{args.prompt}, fwd+bwd): {res['train_step_s']:.2f} s", flush=True)
        name = f"{label} ({decoder})" if decoder != "-" else label
        if "skipped" in res:
            print(f"{name:26s} b{batch}  skipped: {res['skipped']}", flush=True)
        else:
            print(f"{name:26s} b{batch}  decode {res['decode_tok_s']:7.1f} tok/s  total "
                  f"{res['total_tok_s']:7.1f} tok/s  prefill {res['prefill_s']:.2f} s  peak RSS "
                  f"{res['peak_rss_mb']:6.0f} MB", flush=True)
    fp = {r["batch"]: r for r in rows if r["model"] == args.baseline and r["decoder"] == "generate"}
    for r in rows:
        if r["batch"] in fp and "decode_tok_s" in r:
            r["decode_vs_fp32"] = r["decode_tok_s"] / fp[r["batch"]]["decode_tok_s"]
            r["rss_vs_fp32"] = r["peak_rss_mb"] / fp[r["batch"]]["peak_rss_mb"]
    result = {"config": vars(args) | {"loadavg_end": os.getloadavg()}, "rows": rows}
    out = Path(args.out)
    with atomic_file(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"wrote {out}; load {os.getloadavg()}")


if __name__ == "__main__":
    main()
