"""Memory and time of wct at scale, on a model folder (e.g. one from scripts/make_synthetic_llama.py):

    python scripts/bench_scale.py --model /tmp/synth-1.5b --out results/bench_scale-1.5b.json

Three phases, each in a fresh process so its peak resident memory (ru_maxrss of that process, from wait4) is its
own: (1) streaming quantization (wct.quant.stream; few calibration windows: the point is memory and time per
block, not quality), (2) loading the packed result (wct.checkpoint.load_quantized) and the OWQ layers' resident
weight bytes after one token on every backend the device runs (wct.kernels.backends_on: torch and cpu on a CPU,
where the interpreted triton is left out; torch, triton and cuda on a GPU), (3) one WCT training step (forward,
backward, AdamW on the weak columns). Prints the model's fp16 size, the packed size, each phase's
peak RSS (and peak GPU memory on CUDA), seconds per block and weights per block, and the memory estimate of
wct.training.memory from config.json alone next to the measured peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wct.errors import WCTError, cli_errors  # noqa: E402


def _gpu_peak(device) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def phase_quantize(args) -> dict:
    import torch

    from wct.device import resolve_device
    from wct.quant.stream import quantize_streaming

    device = resolve_device(args.device)
    calib = torch.randint(0, 256, (args.n_samples, args.seqlen), generator=torch.Generator().manual_seed(0))
    report = quantize_streaming(args.model, args.packed, calib, device=device, progress=False, bits=args.bits,
                                target_bit=args.bits + 0.01, tuning=args.tuning, overwrite=True)
    return {"seconds": report.seconds, "block_seconds": report.block_seconds, "gpu_peak": _gpu_peak(device),
            "paper_bits": report.paper_bits}


def _rss() -> int:
    """This process's resident size now (bytes)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def phase_load(args) -> dict:
    """Load the packed model, then run one token through it (torch backend, no dense cache): the safetensors
    tensors are memory-mapped and come in as they are touched, so the peak counts only after a forward."""
    import torch

    from wct import kernels
    from wct.checkpoint import load_quantized

    runtime = _rss()
    start = time.time()
    model, _ = load_quantized(args.packed, dtype=None)
    seconds, loaded = time.time() - start, _rss()
    with torch.no_grad(), kernels.no_dense_cache(), kernels.use_kernel("torch"):
        model(torch.zeros(1, 1, dtype=torch.long))
    after = _rss()
    return {"seconds": seconds, "runtime_rss": runtime, "rss_after_load": loaded, "rss_after_forward": after,
            "resident": resident_per_backend(model, args.device)}


def resident_per_backend(model, device_name: str) -> dict:
    """Resident weight bytes of the OWQ layers (:func:`wct.kernels.resident_bytes`: their tensors in the layout held,
    plus any per-layer copy) after a one-token forward on each backend that runs on the device, against the bytes
    they were loaded with (the stored tensors): the total and the largest per-layer ratio."""
    import torch

    from wct import kernels
    from wct.checkpoint import owq_layers
    from wct.device import resolve_device

    device = resolve_device(device_name)
    model.to(device)
    layers = owq_layers(model)
    stored = {name: kernels.resident_bytes(m) for name, m in layers.items()}  # as loaded: the file's tensors
    out = {"stored": sum(stored.values())}
    for backend, why_not in kernels.backends_on(device).items():
        if backend == "triton" and device.type == "cpu" and not why_not:
            why_not = "on a CPU it runs only interpreted (TRITON_INTERPRET=1): far too slow for a whole model"
        if why_not:
            out[backend] = why_not
            continue
        with torch.no_grad(), kernels.no_dense_cache(), kernels.use_kernel(backend):
            model(torch.zeros(1, 1, dtype=torch.long, device=device))
        held = {name: kernels.resident_bytes(m) for name, m in layers.items()}
        out[backend] = {"bytes": sum(held.values()), "max_layer_ratio": max(held[n] / stored[n] for n in held),
                        "words3_layers": sum(m.layout == "words3" for m in layers.values())}
    return out


def phase_train(args) -> dict:
    import torch

    from wct.device import resolve_device
    from wct.checkpoint import load_quantized, owq_layers

    device = resolve_device(args.device)
    model, _ = load_quantized(args.packed, dtype=args.train_dtype, device=device)
    model.requires_grad_(False)
    if args.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    weak = [m.weak_weight for m in owq_layers(model).values()]
    for p in weak:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW(weak, lr=1e-5)
    ids = torch.randint(0, 256, (args.micro, args.seqlen), generator=torch.Generator().manual_seed(1)).to(device)
    start = time.time()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = model(ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt.step()
    return {"seconds": time.time() - start, "loss": loss.item(), "trainable": sum(p.numel() for p in weak),
            "gpu_peak": _gpu_peak(device)}


PHASES = {"quantize": phase_quantize, "load": phase_load, "train": phase_train}


def run_phase(name: str, args) -> dict:
    """One phase in a child process; its result plus the child's own peak RSS (bytes). The child's ``error:``
    line (bad input: a folder that is not wct's, a device that is absent) becomes this program's one line; any
    other failure shows the child's output as it was."""
    argv = [sys.executable, __file__, "--phase", name, "--model", str(args.model), "--packed", str(args.packed),
            "--n-samples", str(args.n_samples), "--seqlen", str(args.seqlen), "--bits", str(args.bits),
            "--device", args.device, "--tuning", args.tuning, "--micro", str(args.micro),
            "--train-dtype", args.train_dtype] + (["--checkpointing"] if args.checkpointing else [])
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err, env={**os.environ, "PYTHONPATH": str(REPO)})
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode:
        errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
        if errors:
            raise WCTError(f"phase {name}: {errors[-1].removeprefix('error: ')}")
        sys.stderr.write(stderr)
        raise SystemExit(f"error: phase {name} failed (exit code {proc.returncode}); its output is above")
    sys.stderr.write(stderr)  # warnings
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss"] = usage.ru_maxrss * 1024  # Linux reports KiB
    return result


@cli_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--packed", type=Path, default=None, help="output folder (default: <model>-owq)")
    ap.add_argument("--out", type=Path, default=None, help="JSON results file")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tuning", default="minmax", help="minmax (fast) or mse (the paper's search)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--micro", type=int, default=1, help="training step: sequences of --seqlen tokens")
    ap.add_argument("--train-dtype", default="float32", help="training step: model.dtype (wct.train's default)")
    ap.add_argument("--checkpointing", action="store_true", help="training step: gradient checkpointing")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip (quantize, load, train)")
    ap.add_argument("--phase", choices=list(PHASES), help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.packed = args.packed or args.model.with_name(args.model.name + "-owq")
    if args.phase:
        print(json.dumps(PHASES[args.phase](args)))
        return

    from wct.device import resolve_device
    from wct.kernels.dispatch import cache_budget
    from wct.device import as_dtype
    from wct.models import config_dict
    from wct.quant.config import QuantConfig
    from wct.training.memory import estimate_from_config, train_memory

    if not (args.model / "config.json").is_file():
        raise WCTError(f"--model {args.model} has no config.json: pass a Hugging Face model folder with safetensors "
                       "shards (scripts/make_synthetic_llama.py writes one)")
    skip = set(filter(None, args.skip.split(",")))
    if skip - set(PHASES):
        raise WCTError(f"--skip {args.skip}: {', '.join(sorted(skip - set(PHASES)))} is not a phase; the phases are "
                       f"{', '.join(PHASES)}")
    if "quantize" in skip and {"load", "train"} - skip and not list(args.packed.glob("*.safetensors")):
        raise WCTError(f"--packed {args.packed} holds no packed model to load or train; run the quantize phase "
                       "(leave it out of --skip) or pass the folder it wrote with --packed")
    config = json.loads((args.model / "config.json").read_text())
    fp16 = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    res: dict = {"model": str(args.model), "fp16_bytes": fp16, "blocks": config["num_hidden_layers"],
                 "hidden": config["hidden_size"], "n_samples": args.n_samples, "seqlen": args.seqlen,
                 "bits": args.bits, "tuning": args.tuning, "threads": os.environ.get("OMP_NUM_THREADS"),
                 "loadavg_before": os.getloadavg()}
    h, i = config["hidden_size"], config["intermediate_size"]
    res["block_weights"] = 4 * h * h + 3 * h * i
    for name in ("quantize", "load", "train"):
        if name not in skip:
            res[name] = run_phase(name, args)
    res["packed_bytes"] = sum(f.stat().st_size for f in args.packed.glob("*.safetensors"))
    res["estimate"] = estimate_from_config(config, bits=args.bits, n_samples=args.n_samples, seqlen=args.seqlen)
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    print(f"model {args.model}: {res['blocks']} blocks, hidden {h}, fp16 {gib(fp16)}, packed {gib(res['packed_bytes'])}")
    if "quantize" in res:
        q = res["quantize"]
        per = sorted(q["block_seconds"])[len(q["block_seconds"]) // 2]
        print(f"quantize (streaming): peak RSS {gib(q['peak_rss'])} = {q['peak_rss'] / fp16:.0%} of fp16; "
              f"{q['seconds']:.0f} s, median {per:.2f} s per block of {res['block_weights'] / 1e6:.1f} M weights "
              f"({per / res['block_weights'] * 1e9:.2f} s per G weights)"
              + (f"; peak GPU {gib(q['gpu_peak'])}" if q.get("gpu_peak") else ""))
    if "load" in res:
        ld = res["load"]
        above = ld["peak_rss"] - ld["runtime_rss"]
        print(f"load packed + one token: peak RSS {gib(ld['peak_rss'])} = {ld['peak_rss'] / res['packed_bytes']:.2f}x "
              f"the packed size ({gib(above)} = {above / res['packed_bytes']:.2f}x above the runtime's "
              f"{gib(ld['runtime_rss'])}); RSS after load {gib(ld['rss_after_load'])}; {ld['seconds']:.1f} s")
        r = ld["resident"]
        print(f"resident OWQ weight bytes after one token (stored {gib(r['stored'])}): " + "; ".join(
            f"{b} {v['bytes'] / r['stored']:.3f}x (largest layer {v['max_layer_ratio']:.3f}x, "
            f"{v['words3_layers']} layers in 3-bit words)" if isinstance(v, dict) else f"{b}: not run ({v})"
            for b, v in r.items() if b != "stored"))
    if "train" in res:
        packed_config = config_dict(args.packed)  # the guarded owq-pack config.json, read as its base architecture
        device = resolve_device(args.device)
        est = train_memory(packed_config, QuantConfig(), as_dtype(args.train_dtype), "bf16-mixed", args.micro,
                           args.seqlen, "adamw", device.type, cache_budget=cache_budget(device),
                           torch_kernel=device.type == "cpu")
        print(est.table())
        res["train_estimate"] = {"rows": est.rows, "total": est.total, "checkpointing": args.checkpointing}
        t = res["train"]
        print(f"one WCT step ({args.micro} x {args.seqlen} tokens, checkpointing {args.checkpointing}): peak RSS "
              f"{gib(t['peak_rss'])}, estimate {gib(est.total[args.checkpointing])}; {t['seconds']:.1f} s; loss "
              f"{t['loss']:.3f}" + (f"; peak GPU {gib(t['gpu_peak'])}" if t.get("gpu_peak") else ""))
    print("estimate from config.json: " + ", ".join(f"{k} {gib(v)}" for k, v in res["estimate"].items()))
    if args.out:
        from wct.io import atomic_file

        with atomic_file(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
