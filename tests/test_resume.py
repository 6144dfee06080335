"""Honest resume (wct.training.resume): a new lr / schedule takes effect, changes that cannot are refused naming the
keys, checkpoints are read with weights_only=True even under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, unreadable ones
are one line, and Lightning's warnings that do not apply here are gone."""

from __future__ import annotations

import csv
import logging
import math
import warnings

import pytest
import torch

from helpers import FIXTURE, REPO, base_train_config, tiny
from wct.errors import WCTError
from wct.train import fit
from wct.training.callbacks import AtomicCheckpointIO
from wct.training.resume import load_checkpoint


@pytest.fixture(scope="module")
def runs(base, tmp_path_factory):  # noqa: F811
    """A straight 3-step run and a 2-step run to resume from (constant lr 1e-3, no weight decay)."""
    root = tmp_path_factory.mktemp("runs")
    fit(base_train_config(root / "straight", base, "trainer.max_steps=3", "trainer.validate_first=false"))
    fit(base_train_config(root / "first", base, "trainer.max_steps=2", "trainer.validate_first=false"))
    return root


def weak(run) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]


def logged_lr(run) -> dict[int, float]:
    with open(run / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["lr"]) for r in csv.DictReader(f) if r.get("lr")}


def test_resume_with_a_new_lr_and_schedule_trains_at_them(base, runs, tmp_path, capsys, caplog):  # noqa: F811
    ckpt = runs / "first" / "checkpoints" / "last.ckpt"
    caplog.set_level(logging.INFO)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, module = fit(base_train_config(tmp_path, base, f"ckpt_path={ckpt}", "trainer.max_steps=3", "optim.lr=1e-2",
                               "optim.scheduler=cosine", "trainer.validate_first=false"))
    out = capsys.readouterr().out
    assert "resume: optim.lr: 0.001 -> 0.01" in out and "resume: optim.scheduler: 'constant' -> 'cosine'" in out
    # cosine over 3 steps, no warmup, at step 2: 0.5 * (1 + cos(pi * 2/3)) of the new lr
    factor = 0.5 * (1 + math.cos(math.pi * 2 / 3))
    # the rate of the resumed 3rd step, logged at step 2 as the straight run logs its 3rd step (0-based steps)
    assert logged_lr(tmp_path) == {2: pytest.approx(1e-2 * factor, rel=1e-6)} and 2 in logged_lr(runs / "straight")
    group = module.trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == 1e-2 and module.trainer.lr_scheduler_configs[0].scheduler.base_lrs == [1e-2]
    # the same gradients and Adam state as the straight run's 3rd step: the update is the straight run's, scaled
    first, straight, resumed = weak(runs / "first"), weak(runs / "straight"), weak(tmp_path)
    for name, w in first.items():
        torch.testing.assert_close(resumed[name] - w, (straight[name] - w) * (1e-2 * factor / 1e-3),
                                   rtol=1e-3, atol=1e-7)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "not resumable" in m or "weights_only` was not set" in m]


@pytest.mark.parametrize("override,keys", [
    ("task.global_batch_size=8", "task.global_batch_size"),
    ("seed=1", "seed"),
    ("trainer.precision=bf16-mixed", "trainer.precision"),
    ("task.max_length=256", "task.max_length"),
])
def test_resume_refuses_changes_that_cannot_take_effect(base, runs, tmp_path, override, keys):  # noqa: F811
    ckpt = runs / "first" / "checkpoints" / "last.ckpt"
    with pytest.raises(WCTError, match=rf"resuming cannot change {keys} \("):
        fit(base_train_config(tmp_path, base, f"ckpt_path={ckpt}", override))
    assert not (tmp_path / "checkpoints").exists()  # refused before any training


class WritesAFile:
    """Unpickling this calls open(path, "w"): code execution."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_crafted_pickle_is_refused_even_when_torch_is_told_otherwise(base, runs, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    evil, pwned = tmp_path / "evil.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "wct": {}, "payload": WritesAFile(str(pwned))}, evil)
    with pytest.raises(WCTError, match="holds Python objects other than tensors") as e:
        fit(base_train_config(tmp_path / "run", base, f"ckpt_path={evil}"))
    assert "GLOBAL builtins.open" in str(e.value) or "GLOBAL io.open" in str(e.value)
    assert "weights_only=False" not in str(e.value) and "safe_globals" not in str(e.value)
    with pytest.raises(WCTError, match="holds Python objects"):  # Lightning's own load path: the CheckpointIO
        AtomicCheckpointIO().load_checkpoint(evil, weights_only=False)
    assert not pwned.exists()
    torch.load(evil, weights_only=None)  # the control: torch's default under this variable runs the payload
    assert pwned.exists()


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all\n", "truncated"])
def test_unreadable_checkpoint_is_one_line(base, runs, tmp_path, content):  # noqa: F811
    bad = tmp_path / "bad.ckpt"
    real = (runs / "first" / "checkpoints" / "last.ckpt").read_bytes()
    bad.write_bytes(real[: len(real) // 2] if content == "truncated" else content)
    with pytest.raises(WCTError, match=rf"ckpt_path={bad} is not a readable checkpoint") as e:
        fit(base_train_config(tmp_path / "run", base, f"ckpt_path={bad}"))
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)


@pytest.mark.slow  # three training processes, one killed
def test_kill_9_then_resume_equals_a_straight_run(tmp_path):
    """A real ``kill -9`` of ``python -m wct.train`` after a mid-run checkpoint (taken at a validation step), then
    ``ckpt_path=`` that checkpoint: every train and val loss and every trained weight equal the straight run's."""
    import os
    import signal
    import subprocess
    import sys
    import time


    args = [*tiny(tmp_path), "task=alpaca", "logger=csv", "++callbacks.samples=null", "trainer.precision=32-true",
            "trainer.validate_first=false", "trainer.max_steps=30", "trainer.val_check_interval=5",
            "callbacks.checkpoint.every_n_train_steps=5", "optim.lr=1e-3", f"calib.source={FIXTURE}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))

    def train(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "wct.train", *args, f"hydra.run.dir={tmp_path / name}", *extra],
                                cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    assert train("straight").wait(timeout=600) == 0
    killed, ckpt = train("killed"), tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 600
    while not (ckpt.exists() and load_checkpoint(ckpt)["global_step"] >= 10) and time.time() < deadline:
        assert killed.poll() is None, "the run ended before it could be killed"
        time.sleep(0.1)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    at = load_checkpoint(ckpt)["global_step"]
    assert 10 <= at < 30 and not [p for p in ckpt.parent.iterdir() if ".tmp-" in p.name]
    assert train("resumed", f"ckpt_path={ckpt}").wait(timeout=600) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    c = load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    history = a["callbacks"]["LossPlot"]["history"]
    assert [s for s, _ in history["val/loss"]] == [5, 10, 15, 20, 25, 30] and len(history["train/loss"]) == 30
    assert c["callbacks"]["LossPlot"]["history"] == history
    assert all(torch.equal(c["state_dict"][k], v) for k, v in a["state_dict"].items()) and c["global_step"] == 30
