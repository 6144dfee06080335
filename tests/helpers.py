"""Helpers shared by the test files (their fixtures are in conftest.py): composed configs, tiny end-to-end runs,
independent reference computations. A test file imports these, never another test file
(tests/test_structure.py checks it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from wct.config import CONF_DIR
from wct.models import load_model
from wct.checkpoint import load_quantized, owq_layers, save_quantized
from wct.quant.owq import quantize_model
from wct.runs import Trained, set_weak_columns

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.json"


TEXT = "".join(f"Line {i}: she said that {i * 37 % 101} letters had come by the morning post.\n" for i in range(200))


TINY = ["model=tiny-llama", "calib=local", "calib.n_samples=4", "calib.seqlen=64", "eval.seqlen=64",
        "eval.max_windows=3", "progress=false"]


def cfg_of(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_overrides(tmp_path: Path, text: Path, *extra: str) -> list[str]:
    return [*TINY, f"calib.source={text}", f"eval.corpora=[{text}]", f"paths.run_dir={tmp_path / 'run'}",
            f"paths.quantized_dir={tmp_path / 'q'}", *extra]


def tiny(tmp: Path) -> list[str]:
    """Overrides shrinking the default run to seconds: tiny-llama quantized on the fly (4 weak columns per layer,
    calibrated on the fixture's text), 2 steps, a small validation split."""
    return [
        "model=tiny-llama", "quant.target_bit=null", "quant.target_rank=4", f"calib.source={FIXTURE}",
        "calib.n_samples=2", "calib.seqlen=64", f"cache_dir={tmp / 'cache'}", f"paths.root_dir={tmp}",
        "task.max_length=1024", "task.val_size=4", "task.global_batch_size=4", "task.micro_batch_size=2",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "callbacks.samples.max_new_tokens=4",
        "trainer.enable_progress_bar=false",
    ]


def train(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    p = subprocess.run([sys.executable, "-m", "wct.train", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def run_dirs(root: Path) -> list[Path]:
    return sorted(p.parent for p in root.rglob("results.json"))


def make_base(path: Path, seed: int) -> Path:
    model, tok = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(seed))
    quantize_model(model, calib, bits=4, target_rank=4, progress=False)
    return save_quantized(model, tok, path)


def compose_train(run_dir: Path, steps: int, every: int, lr: str, *overrides: str):
    """The real train config, shrunk: fixture data, CSV logs, fp32, ``steps`` steps validated and checkpointed
    every ``every``, no samples."""
    return cfg_of("train", [
        "logger=csv", f"task.data.path={FIXTURE}", "task.max_length=512", "task.val_size=4",
        "task.global_batch_size=4", "task.micro_batch_size=2", "trainer.precision=32-true",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}", "trainer.enable_progress_bar=false",
        f"callbacks.checkpoint.every_n_train_steps={every}", "++callbacks.samples=null", f"paths.run_dir={run_dir}",
        f"optim.lr={lr}", *overrides])


def base_train_config(run_dir: Path, base: Path, *overrides: str):
    """:func:`compose_train` on the saved tiny OWQ base ``base``: 4 steps, lr 1e-3."""
    return compose_train(run_dir, 4, 2, "1e-3", f"model.quantized={base}", *overrides)


def train_config(run_dir: Path, *overrides: str):
    """:func:`compose_train` on tiny-llama (quantized on the fly by WCT runs): 3 steps, lr 1e-2."""
    return compose_train(run_dir, 3, 3, "1e-2", "model=tiny-llama", *overrides)


def trained_from(base_dir, scale: float = 0.05) -> Trained:
    """The base with 'trained' fp32 master weak columns (base columns + a perturbation), as training leaves it."""
    model, tok = load_quantized(base_dir)
    g = torch.Generator().manual_seed(3)
    weak = {n: m.weak_weight.detach().float() + scale * torch.randn(m.weak_weight.shape, generator=g)
            for n, m in owq_layers(model).items()}
    set_weak_columns(model, weak, dtype=torch.float32)
    return Trained(model=model, tokenizer=tok, method="wct", config={"model": {"name": str(base_dir)}},
                   base=str(base_dir), base_dir=base_dir, trained=weak, metrics={"val/loss": 1.5})


def export_config(*overrides: str):
    return cfg_of("export", list(overrides))


def generate_config(*overrides: str):
    return cfg_of("generate", ["model=tiny-llama", "paths.run_dir=.", *overrides])


def greedy_reference(model, tok, text: str, n: int) -> str:
    """Greedy decoding by hand: argmax of the last logits, n times, no cache (stops at EOS)."""
    ids = tok(text, return_tensors="pt", add_special_tokens=True).input_ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[0, -1].argmax()
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, len(tok(text, add_special_tokens=True).input_ids):], skip_special_tokens=True)


def logits(model, seed: int = 1) -> torch.Tensor:
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(x).logits
