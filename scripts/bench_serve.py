"""Benchmark: ``python -m wct.serve`` with many weak-column deltas on one packed base (docs/serving.md §5).

Makes ``--deltas`` deltas of the base (each layer's weak columns plus seeded noise, written with the public delta
API: the same file a ``python -m wct.export format=delta`` run writes), starts the real server on 127.0.0.1 and
drives it with the official ``openai`` client:

* throughput (completion tokens / wall second) and p50 / p95 request latency at each ``--clients`` level, (a) every
  request on one delta, (b) requests spread round-robin over all the deltas (so batches mix them); greedy, every
  request generating exactly ``--new-tokens`` tokens (vLLM's ``ignore_eos`` extension: no request stops early at
  EOS, so (a) and (b) do the same work), ``--requests`` requests per level (split over its clients); failed or
  refused requests are counted;
* resident memory of the server process with 0 (an empty folder), 8 and 64 deltas loaded, against the deltas' file
  sizes: VmRSS (the median of several samples after the same one request) and the bytes the delta bank holds
  (``/health``'s ``delta_bytes``), and the slope from 8 to 64 deltas (the cost of one more delta without the
  first load's one-time cost).

    python -m wct.quantize model=smollm2-135m quant=owq-w4-t4.01          # the base, once
    OMP_NUM_THREADS=2 python scripts/bench_serve.py --base outputs/quantized/smollm2-135m-owq-w4-t4.01

Prints a table and writes ``--out`` (JSON) with the load average: timings on a shared machine are not comparable
with a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["Name three primary colors.", "What is the capital of France?", "Write a haiku about rain.",
           "Give two tips for sleeping well.", "What does a thermometer measure?", "Describe a cat in one sentence.",
           "List three fruits.", "Why is the sky blue?"]


def make_deltas(base: Path, folder: Path, count: int) -> list[int]:
    """``count`` deltas d0, d1, ... of ``base`` in ``folder``; their file sizes."""
    from wct.delta import delta_tensors, owq_layers, packed_fingerprint, write_delta
    from wct.checkpoint import load_quantized

    model, _ = load_quantized(base)
    fingerprint = packed_fingerprint(model)
    sizes = []
    for i in range(count):
        g = torch.Generator().manual_seed(1000 + i)
        weak = {n: m.weak_weight.detach().float() + 0.01 * torch.randn(m.weak_weight.shape, generator=g)
                for n, m in owq_layers(model).items() if m.n_weak}
        path = write_delta(folder / f"d{i}.safetensors", delta_tensors(model, weak, {}, {}), fingerprint, str(base),
                           {"made_by": "scripts/bench_serve.py"}, {})
        sizes.append(path.stat().st_size)
    return sizes


class Served:
    """``python -m wct.serve`` in a child process for one measurement."""

    def __init__(self, base: Path, deltas: Path | None, work: Path, *overrides: str) -> None:
        cmd = [sys.executable, "-m", "wct.serve", f"model.quantized={base}", "port=0", "name=base",
               f"hydra.run.dir={work / 'run'}", *overrides] + ([f"deltas={deltas}"] if deltas else [])
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.log = []
        for line in self.proc.stdout:
            self.log.append(line)
            if line.startswith("serving on "):
                self.url = line.split()[2]
                threading.Thread(target=self.log.extend, args=(self.proc.stdout,), daemon=True).start()  # keep reading
                return
        sys.exit("error: the server did not start:\n" + "".join(self.log))

    def rss(self, samples: int = 5) -> int:
        """The median of ``samples`` VmRSS readings 0.2 s apart (the server idle)."""
        values = []
        for _ in range(samples):
            time.sleep(0.2)
            values += [int(line.split()[1]) * 1024 for line in
                       Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if line.startswith("VmRSS:")]
        return int(statistics.median(values))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def drive(url: str, models: list[str], clients: int, requests: int, new_tokens: int) -> dict:
    """``clients`` threads, each sending ``requests`` greedy completions of exactly ``new_tokens`` tokens in turn;
    request i of client c uses ``models[(c * requests + i) % len(models)]``."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)

    def one(c: int) -> list[tuple[float, int, str | None]]:
        out = []
        for i in range(requests):
            k = c * requests + i
            start = time.perf_counter()
            try:
                r = client.completions.create(model=models[k % len(models)], prompt=PROMPTS[k % len(PROMPTS)],
                                              max_tokens=new_tokens, temperature=0, extra_body={"ignore_eos": True})
                out.append((time.perf_counter() - start, r.usage.completion_tokens, None))
            except openai.APIError as e:
                out.append((time.perf_counter() - start, 0, f"{type(e).__name__}: {e}"))
        return out

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(one, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    lat = sorted(r[0] for r in results if r[2] is None)
    failed = [r[2] for r in results if r[2] is not None]
    short = sum(r[1] != new_tokens for r in results if r[2] is None)
    if short:
        sys.exit(f"error: {short} requests did not generate exactly {new_tokens} tokens (ignore_eos)")
    return {"clients": clients, "requests": len(results), "failed": len(failed), "errors": failed[:3],
            "tokens": sum(r[1] for r in results), "wall_s": round(wall, 3),
            "tokens_per_s": round(sum(r[1] for r in results) / wall, 2),
            "p50_s": round(statistics.median(lat), 3) if lat else None,
            "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3) if lat else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default=str(ROOT / "outputs/quantized/smollm2-135m-owq-w4-t4.01"))
    parser.add_argument("--deltas", type=int, default=8)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests", default="16,32,64", help="requests at each clients level (split over them)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--memory-deltas", default="0,8,64")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--out", default=str(ROOT / "results/bench_serve.json"))
    args = parser.parse_args()
    base = Path(args.base)
    if not (base / "config.json").is_file():
        sys.exit(f"error: no packed base at {base}; make it with python -m wct.quantize model=smollm2-135m "
                 "quant=owq-w4-t4.01, or pass --base DIR")
    levels = [int(c) for c in args.clients.split(",")]
    per_level = [int(r) for r in args.requests.split(",")]
    if len(per_level) != len(levels) or any(r % c for r, c in zip(per_level, levels)):
        sys.exit(f"error: --requests {args.requests} must give one multiple of each --clients level {args.clients}")
    memory_counts = [int(c) for c in args.memory_deltas.split(",")]
    load_before, began = os.getloadavg(), time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        pool = work / "all"
        pool.mkdir()
        sizes = make_deltas(base, pool, max(args.deltas, *memory_counts))
        served_dir = work / f"deltas-{args.deltas}"
        served_dir.mkdir()
        for i in range(args.deltas):
            (served_dir / f"d{i}.safetensors").symlink_to(pool / f"d{i}.safetensors")
        server = Served(base, served_dir, work, f"max_batch={args.max_batch}", "max_wait_ms=20", "max_queue=256")
        drive(server.url, ["d0"], 2, 1, 4)  # warm-up: first-call allocations and the dense cache
        rows = []
        for clients, requests in zip(levels, per_level):
            for mode, models in (("a: one delta", ["d0"]), (f"b: {args.deltas} deltas",
                                                          [f"d{i}" for i in range(args.deltas)])):
                row = {"mode": mode, **drive(server.url, models, clients, requests // clients, args.new_tokens)}
                rows.append(row)
                print(f"{mode:14} clients={clients:3} {row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_s']} s  "
                      f"p95 {row['p95_s']} s  failed {row['failed']}", flush=True)
        with urllib.request.urlopen(f"{server.url}/health") as r:
            stats = json.loads(r.read())
        server.stop()
        memory = []
        for count in memory_counts:
            folder = work / f"mem-{count}"
            folder.mkdir()
            for i in range(count):
                (folder / f"d{i}.safetensors").symlink_to(pool / f"d{i}.safetensors")
            s = Served(base, folder, work)  # 0: an empty folder, so every count runs the same code
            drive(s.url, ["base"], 1, 1, 4)
            with urllib.request.urlopen(f"{s.url}/health") as r:
                bank = json.loads(r.read())["delta_bytes"]
            memory.append({"deltas": count, "rss_bytes": s.rss(), "bank_bytes": bank,
                           "files_bytes": sum(sizes[:count])})
            s.stop()
    zero = memory[0]["rss_bytes"]
    for m in memory:
        m["extra_bytes"] = m["rss_bytes"] - zero
        m["extra_over_files"] = round(m["extra_bytes"] / m["files_bytes"], 3) if m["files_bytes"] else None
        m["bank_over_files"] = round(m["bank_bytes"] / m["files_bytes"], 3) if m["files_bytes"] else None
    slope = None
    if len(memory) >= 3:  # one more delta, without the first load's one-time cost
        lo, hi = memory[-2], memory[-1]
        slope = round((hi["rss_bytes"] - lo["rss_bytes"]) / (hi["files_bytes"] - lo["files_bytes"]), 3)
    pairs = {}
    for r in rows:
        pairs.setdefault(r["clients"], {})[r["mode"][0]] = r["tokens_per_s"]
    ratio = {c: round(p["b"] / p["a"], 3) for c, p in pairs.items()}
    print(f"\n{'mode':16}{'clients':>8}{'tok/s':>9}{'p50 s':>8}{'p95 s':>8}{'failed':>8}")
    for r in rows:
        print(f"{r['mode']:16}{r['clients']:>8}{r['tokens_per_s']:>9.1f}{r['p50_s']:>8}{r['p95_s']:>8}{r['failed']:>8}")
    print("throughput (b) / (a):", ", ".join(f"{c} clients {v:.3f}" for c, v in ratio.items()))
    print(f"\n{'deltas':>6}{'RSS MiB':>10}{'+MiB':>8}{'bank MiB':>10}{'files MiB':>11}{'+RSS / files':>14}"
          f"{'bank / files':>14}")
    for m in memory:
        print(f"{m['deltas']:>6}{m['rss_bytes'] / 2**20:>10.2f}{m['extra_bytes'] / 2**20:>8.2f}"
              f"{m['bank_bytes'] / 2**20:>10.2f}{m['files_bytes'] / 2**20:>11.2f}{str(m['extra_over_files']):>14}"
              f"{str(m['bank_over_files']):>14}")
    if slope is not None:
        print(f"one more delta from {memory[-2]['deltas']} to {memory[-1]['deltas']}: +RSS / files = {slope}")
    load_after = os.getloadavg()
    print(f"{time.monotonic() - began:.0f} s; load average before {load_before}, after {load_after}; "
          f"delta file {sizes[0]} bytes; "
          f"server stats {({k: stats[k] for k in ('batches', 'joined', 'largest_batch', 'mixed_batches', 'rejected')})}")
    out = {"base": str(base), "deltas": args.deltas, "new_tokens": args.new_tokens, "ignore_eos": True,
           "requests_per_level": dict(zip(levels, per_level)), "max_batch": args.max_batch,
           "delta_file_bytes": sizes[0], "throughput": rows, "b_over_a": ratio, "memory": memory,
           "rss_slope_over_files": slope, "server_stats": stats, "load_before": load_before, "load_after": load_after,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
