"""WCT vs QLoRA vs LoRA on SmolLM2-135M-Instruct, Alpaca-format instruction tuning on CPU or GPU.

    python scripts/bench_wct_vs_qlora.py                       # 12 rows, 30 steps x 8 seqs x <= 256 tokens
    python scripts/bench_wct_vs_qlora.py --rows wct-default,qlora-r8,qlora-r64,lora-r8   # the README's table
    python scripts/bench_wct_vs_qlora.py --rows wct-default --wct "calib.source=emma calib.n_samples=8"
    python scripts/bench_wct_vs_qlora.py --rows wct-w4-k8,qlora-r8 --steps 100 --global-batch 16 --eval-rows 300

The defaults are sized for a quiet 2-core CPU: about 6-9 min per row (WCT ~130 tok/s, QLoRA ~80 tok/s at micro
batch 4 x 256 tokens), ~70 min in all; each new OWQ base takes ~3 min more (cached afterwards in ``--bases-dir``).

Data: ``alpaca-libre`` (shared data): the first ``--train-rows`` (2,528) rows train, the last ``--eval-rows``
(200) of the final 300 are held out: no row's training or calibration sees them, and they are in no file of the
repository (the package embeds the first 2,528 rows only, wct/data/embedded). Every row sees the same sequence
length, steps, batch stream and hence tokens.

Rows: ``wct-default`` is ``python -m wct.train task=alpaca`` with every default (conf/, composed by Hydra, plus
``--wct`` overrides): its base is quantized by the pipeline itself (``wct.training.base.quantized_base``: the
task-calibrated base, the tuning budget) with the benchmark's training rows as the task's rows, and it trains
with the default optimizer and schedule. WCT on OWQ bases of 4 and 3 bits with k = 8 and k = 32 weak columns per layer (``target_rank``; the bases
are quantized once, calibrated on Emma, and cached in ``--bases-dir``); the same k = 8 bases with the weak columns
chosen on the training rows' Hessians (``-task``, as ``tuning=weak_task``); WCT on the plain OWQ-4.01 allocation
(2 columns in q/k/v/o/down, none in gate/up) and on k = 3 task-chosen columns (under a fifth of LoRA r = 8's
parameters); QLoRA r = 8 and r = 64 (NF4 base), LoRA r = 8 (fp32 base).
Each row runs in a fresh process through the project's pipeline: ``wct.training.TuneModule`` +
``InstructDataModule`` on a Lightning Trainer (fp32, AdamW, constant lr, grad clip 0.3), then the row's export
(``wct.export``: merged owq-pack folder for WCT, peft adapter for LoRA/QLoRA).

Columns: trainable parameters; peak memory = the increase of the process's resident set size (RSS, sampled every
20 ms) during training over the RSS after the base is loaded and prepared (CPU; on CUDA the peak allocated
memory); tokens/s = non-padding tokens trained / wall time of ``Trainer.fit``; held-out loss before and after
(token-weighted mean NLL on the response tokens, the pipeline's ``val/loss``); exported bytes (the weights file of
the export: the whole model for WCT, the adapter for LoRA/QLoRA). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import threading
import time
from pathlib import Path

ROWS = {  # name: method, OWQ bits / weak columns (k, or the target_bit allocation) or LoRA rank, learning rate
    # python -m wct.train's defaults (conf/train.yaml + --wct overrides): base, calibration, tuning budget, optimizer
    "wct-default": {"method": "wct", "config": "train.yaml"},
    "wct-w4-k8": {"method": "wct", "bits": 4, "k": 8, "lr": 1e-4},
    "wct-w4-k32": {"method": "wct", "bits": 4, "k": 32, "lr": 5e-5},
    "wct-w3-k8": {"method": "wct", "bits": 3, "k": 8, "lr": 1e-4},
    "wct-w3-k32": {"method": "wct", "bits": 3, "k": 32, "lr": 5e-5},
    "wct-w4-k8-task": {"method": "wct", "bits": 4, "k": 8, "select": "task", "lr": 1e-4},
    "wct-w3-k8-task": {"method": "wct", "bits": 3, "k": 8, "select": "task", "lr": 1e-4},
    "wct-w4-t4.01": {"method": "wct", "bits": 4, "target_bit": 4.01, "lr": 2e-4},
    "wct-w4-k3-task": {"method": "wct", "bits": 4, "k": 3, "select": "task", "lr": 1.5e-4},  # < 1/5 of r=8's
    "qlora-r8": {"method": "qlora", "r": 8, "lr": 2e-4},
    "qlora-r64": {"method": "qlora", "r": 64, "lr": 2e-4},
    "lora-r8": {"method": "lora", "r": 8, "lr": 2e-4},
}
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def base_dir(args, spec: dict) -> Path:
    """The cached OWQ base of a WCT row, quantized on first use: ``--calib-samples`` x 512 Emma tokens calibrate;
    with ``select: task`` the weak columns are chosen on as many 512-token windows of the training rows."""
    import torch

    from wct.data.instruct import read_file, render_text
    from wct.data.text import calibration_windows
    from wct.models import load_model
    from wct.checkpoint import save_quantized
    from wct.quant.owq import quantize_model

    bits, k, target = spec["bits"], spec.get("k"), spec.get("target_bit")
    task = spec.get("select") == "task"
    out = Path(args.bases_dir) / f"smollm2-owq-w{bits}-{f'k{k}' if k else f't{target}'}{'-task' if task else ''}"
    if not (out / "model.safetensors").is_file():
        model, tok = load_model("smollm2-135m", dtype=torch.float32)
        calib = calibration_windows(tok, DATA / "janeausten" / "emma.txt", args.calib_samples, 512, 0)
        select = None
        if task:
            text = Path(args.bases_dir) / f"alpaca-libre-train-{args.train_rows}.txt"
            text.write_text(render_text(read_file(DATA / "alpaca-libre" / "alpaca_libre.json")[: args.train_rows]))
            select = calibration_windows(tok, text, args.calib_samples, 512, 0)
        quantize_model(model, calib, bits=bits, target_rank=k, target_bit=target, select=select)
        save_quantized(model, tok, out)
    return out


def default_app(args):
    """The TrainApp of ``python -m wct.train task=alpaca trainer.precision=32-true <--wct overrides>``, composed
    from conf/ (every default of the real command), with its base cache in ``--bases-dir``."""
    from hydra import compose, initialize_config_dir

    from wct.config import CONF_DIR, TrainApp, to_app

    overrides = ["task=alpaca", "trainer.precision=32-true", f"cache_dir={args.bases_dir}", *args.wct.split()]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return to_app(compose(config_name="train", overrides=overrides), TrainApp)


def default_base(args, rows: list[dict]) -> tuple[Path, object]:
    """``(base folder, app)`` of the default row: quantized by the pipeline (:func:`wct.training.base.
    quantized_base`) with the task's rows = the benchmark's training rows, so the held-out rows reach neither the
    calibration nor the training; the quantization time is printed by the pipeline and measured here."""
    from wct.training.base import quantized_base

    app = default_app(args)
    start = time.perf_counter()
    folder = quantized_base(app, (rows, f"alpaca-libre, first {len(rows)} rows"))
    print(f"wct-default base ready in {time.perf_counter() - start:.1f} s: {folder}", flush=True)
    return folder, app


def fitting(tok, rows: list[dict], seq_len: int) -> list[dict]:
    """Encoded rows whose prompt leaves room for a response within ``seq_len`` (the others are dropped)."""
    from wct.data.instruct import encode
    from wct.errors import WCTError

    out = []
    for i, row in enumerate(rows):
        try:
            out.append(encode(tok, row, seq_len, i))
        except WCTError:
            continue
    return out


class PeakRSS:
    """Peak resident set size of this process above its value at start, sampled in a thread."""

    def __init__(self, every: float = 0.02) -> None:
        import psutil

        self.proc, self.every, self.peak, self.stop = psutil.Process(), every, 0, threading.Event()
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.start) / 2**20


def run_row(name: str, spec: dict, args) -> dict:
    """One row in this (fresh) process: load + prepare, validate, fit, validate, export."""
    import lightning as L
    import torch

    from wct.baselines import prepare_lora_model
    from wct.data.instruct import read_file
    from wct.exporting import export_adapter, export_wct
    from wct.runs import Trained
    from wct.models import load_model
    from wct.checkpoint import load_quantized
    from wct.config import OptimConfig, TaskConfig, TuningConfig
    from wct.training.datamodule import InstructDataModule
    from wct.training.module import TuneModule, prepare_wct

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = spec["method"]
    rows = read_file(DATA / "alpaca-libre" / "alpaca_libre.json")
    optim = OptimConfig(lr=spec.get("lr", 1.0), grad_clip=0.3)
    extra = {}
    if "config" in spec:  # the default row: base, tuning set and optimizer as python -m wct.train has them
        start = time.perf_counter()
        folder, app = default_base(args, rows[: args.train_rows])
        extra["base_seconds"] = time.perf_counter() - start
        model, tok = load_quantized(folder, dtype=torch.float32)
        prepare_wct(model, app.tuning)
        optim = app.optim
        qc = model.config.quantization_config
        extra |= {"lr": optim.lr, "scheduler": optim.scheduler, "wct": args.wct, "base": folder.name,
                  "paper_bits": qc["paper_bits"], "stored_bits": qc["stored_bits"],
                  "calibration": qc.get("calibration", {}).get("source")}
    elif method == "wct":
        folder = base_dir(args, spec)
        model, tok = load_quantized(folder, dtype=torch.float32)
        prepare_wct(model, TuningConfig())
    else:
        folder = None
        model, tok = load_model("smollm2-135m", dtype=torch.float32)
        lora = {"r": spec["r"], "alpha": 16.0, "dropout": 0.1, "target_modules": "all-linear"}
        model = prepare_lora_model(model, method, **lora)
    model.config.use_cache = False
    model.train()  # as wct.train does: loaded models are in eval mode (LoRA dropout would be off)
    task = TaskConfig(max_length=args.seq_len, global_batch_size=args.global_batch, micro_batch_size=args.micro_batch)
    dm = InstructDataModule(task, tok, max_steps=args.steps)
    dm.train_set = fitting(tok, rows[: args.train_rows], args.seq_len)
    dm.val_set = fitting(tok, rows[len(rows) - 300 :][-args.eval_rows :], args.seq_len)
    module = TuneModule(model, optim, args.steps, {"fingerprint": "bench", "base": str(folder or "smollm2-135m")})
    trainer = L.Trainer(
        accelerator="auto", devices=1, precision="32-true", max_steps=args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, accumulate_grad_batches=dm.accumulation(1), gradient_clip_val=0.3,
    )
    # inference_mode=False: wct.kernels caches the dequantized dense weights at first use, and a cache built
    # under torch.inference_mode cannot be used by the training backward that follows
    evaluator = L.Trainer(accelerator="auto", devices=1, precision="32-true", logger=False, inference_mode=False,
                          enable_progress_bar=False, enable_model_summary=False)
    before = evaluator.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        seconds = time.perf_counter() - start
    after = evaluator.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trained = module.trainable_state()
    with tempfile.TemporaryDirectory() as tmp:
        model.cpu()
        if method == "wct":
            weak = {n.removesuffix(".weak_weight"): t for n, t in trained.items()}
            meta = export_wct(Trained(model, tok, method, {"row": name}, str(folder), folder, weak), Path(tmp) / "x")
        else:
            config = {"model": {"name": "smollm2-135m", "dtype": "float32"}, "method": {"name": method, **lora}}
            meta = export_adapter(Trained(model, tok, method, config, "smollm2-135m", None, trained), Path(tmp) / "x")
    return {
        "row": name, **spec, **extra,
        "trainable_params": sum(t.numel() for t in trained.values()),
        "peak_mem_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.delta_mb,
        "memory_measure": "cuda max_memory_allocated" if cuda else "RSS increase during fit",
        "peak_rss_mb": rss.peak / 2**20,
        "train_rows": len(dm.train_set),
        "eval_rows": len(dm.val_set),
        "tokens": module.tokens_seen,
        "fit_seconds": seconds,
        "tokens_per_s": module.tokens_seen / seconds,
        "loss_before": before,
        "loss_after": after,
        "export_bytes": meta["bytes"],
        "export_max_abs_diff": meta["max_abs_diff"],
    }


def _worker(name: str, spec: dict, args, queue) -> None:
    try:
        queue.put(run_row(name, spec, args))
    except Exception as e:  # a failed row is reported in the table, the others still run
        queue.put({"row": name, "lr": 0.0, **spec, "error": f"{type(e).__name__}: {e}"})


def table(results: list[dict]) -> str:
    head = f"{'row':<15} {'lr':>7} {'trainable':>11} {'peak MB':>8} {'RSS MB':>7} {'tok/s':>7} {'loss before':>11} " \
           f"{'loss after':>10} {'export bytes':>13}"
    lines = [head, "-" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['row']:<15} {r['lr']:>7.1e} ERROR {r['error'][:90]}")
            continue
        lines.append(
            f"{r['row']:<15} {r['lr']:>7.1e} {r['trainable_params']:>11,} {r['peak_mem_mb']:>8.0f} "
            f"{r['peak_rss_mb']:>7.0f} {r['tokens_per_s']:>7.1f} {r['loss_before']:>11.4f} {r['loss_after']:>10.4f} {r['export_bytes']:>13,}"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per row")
    p.add_argument("--seq-len", type=int, default=256, help="max tokens per sequence (prompt + response)")
    p.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per forward")
    p.add_argument("--train-rows", type=int, default=2528, help="first rows of alpaca-libre used for training")
    p.add_argument("--eval-rows", type=int, default=200, help="held-out rows (taken from the last 300)")
    p.add_argument("--calib-samples", type=int, default=32, help="512-token Emma windows to quantize a new base")
    p.add_argument("--bases-dir", default=str(Path(tempfile.gettempdir()) / "wct_bench" / "bases"))
    p.add_argument("--wct", default="", help="Hydra overrides of the wct-default row, space-separated, e.g. "
                   "'calib.source=emma calib.n_samples=8 tuning.k=4'")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every chosen row (default: each row's)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="bench_wct_vs_qlora.json")
    args = p.parse_args()
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown or not 1 <= args.eval_rows <= 300 or args.train_rows > 2528:
        p.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}; --eval-rows in 1..300, --train-rows <= 2528")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx = mp.get_context("spawn")
    settings = vars(args) | {"precision": "fp32", "optimizer": "AdamW, constant lr, grad clip 0.3"}
    results = []
    for name in names:
        queue = ctx.Queue()
        spec = ROWS[name] | ({"lr": args.lr} if args.lr else {})
        if "config" in spec and args.lr:
            args.wct += f" optim.lr={args.lr}"
        proc = ctx.Process(target=_worker, args=(name, spec, args, queue))
        proc.start()
        results.append(queue.get() | {"loadavg": os.getloadavg()})
        proc.join()
        print(table(results[-1:]).splitlines()[-1], flush=True)
        Path(args.out).write_text(json.dumps({"settings": settings, "rows": results}, indent=2) + "\n")  # per row
    print(f"\nSmolLM2-135M, alpaca-libre, {args.steps} steps x {args.global_batch} seqs x <= {args.seq_len} tokens, "
          f"{args.eval_rows} held-out rows; peak MB = {results[0].get('memory_measure', 'RSS increase during fit')}")
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
