"""``python -m wct.train`` end to end in subprocesses: the offline default task, config errors, sweeps (grid with
a failing job, Optuna with a resumable SQLite study), DDP on CPU, and a short run on the real SmolLM2."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml

from wct.device import resolve_precision

from helpers import REPO, run_dirs, tiny, train


def test_default_task_offline(tmp_path):
    p = train("task=alpaca", *tiny(tmp_path))
    out = p.stdout + p.stderr
    assert "not reachable offline" not in out and "calibrating on the task" not in out  # real data, no fallback
    assert "data: alpaca-libre (embedded: wct/data/embedded/alpaca_libre.jsonl.gz" in out
    assert "2490 training / 4 validation rows" in out and "padding: " in out
    assert "trainable params: 4,096 || all params:" in out and "memory estimate" in out
    assert "[[Below is an instruction that describes a task" in out and "### Response:]]" in out
    for noise in NOISE:  # third-party tips, deprecations and warnings that do not apply (wct/console.py)
        assert noise not in out, noise
    assert "error" not in p.stderr.lower() and "warning" not in out.lower()
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    assert run.parent.name == "alpaca-tiny-llama-owq-w4-k4-weak"  # one run name: task-model-quant-tuning
    config = (run / "config.yaml").read_text()
    assert yaml.safe_load(config)["data_origin"].startswith("alpaca-libre (embedded: wct/data/embedded/alpaca_libre")
    precision = resolve_precision("auto", gpu=False)[0]  # trainer.precision=auto, resolved for this CPU
    assert f"precision: {precision} (auto: this CPU" in out
    assert yaml.safe_load(config)["trainer"]["precision"] == precision  # the saved config says what ran
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and results["val_loss_before"] > 0 and 0 <= results["padding_fraction"] < 1
    assert {"train/loss", "val/loss", "val/ppl", "lr", "perf/tokens_per_s", "perf/peak_mem_gb"} <= set(results["metrics"])
    assert (run / "loss.png").stat().st_size > 0 and (run / "checkpoints" / "last.ckpt").is_file()
    assert "What is the capital of France?" in (run / "samples.csv").read_text()
    assert list((run / "wandb").glob("offline-run-*"))  # W&B ran offline without an API key
    header = (run / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "weak_delta/model.layers.0.self_attn.q_proj" in header
    again = train("task=alpaca", *tiny(tmp_path))
    assert "reusing the cached quantized model" in again.stdout  # the quantized base is cached by content hash
    resumed = train("task=alpaca", *tiny(tmp_path), "trainer.max_steps=3", "ckpt_path=last")
    newest = run_dirs(tmp_path / "outputs" / "train")[-2]  # ckpt_path=last: the newest earlier run ("again")
    assert f"resuming from {newest / 'checkpoints' / 'last.ckpt'}" in resumed.stdout


def test_missing_calibration_text_falls_back_to_the_task_rows(tmp_path, monkeypatch):
    # a user's fresh clone has no ../shared/data: the default run calibrates on its own training rows instead
    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "wct-cache"))
    p = train("task=alpaca", *tiny(tmp_path), f"calib.source={tmp_path / 'absent' / 'emma.txt'}", "calib.seqlen=32")
    assert p.stdout.count("calibrating on the task's own rows (alpaca-libre (embedded") == 1
    assert "2490 rows) instead" in p.stdout
    (text,) = (tmp_path / "wct-cache" / "calib").glob("task-*.txt")
    assert text.read_text().startswith("Below is an instruction that describes a task")
    p = train("task=alpaca", *tiny(tmp_path), f"calib.source={tmp_path / 'absent.txt'}", "calib.fallback=error",
              check=False)
    assert p.returncode == 2 and "absent.txt" in p.stderr and "Traceback" not in p.stderr


NOISE = ["litlogger", "LeafSpec", "not supported by the model summary", "anonymous setting", "GPU available",
         "Tracking run with wandb", "Run history"]


def test_quiet_run_prints_nothing_but_errors(tmp_path):
    p = train("task=alpaca", *tiny(tmp_path), "quiet=true")
    assert p.stdout == "" and p.stderr == ""
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    assert json.loads((run / "results.json").read_text())["steps"] == 2  # it did run: results in the run folder
    p = train("task=alpaca", *tiny(tmp_path), "quiet=true", "task.micro_batch_size=3", check=False)
    assert p.returncode == 2 and p.stdout == "" and p.stderr.startswith("error: ") and p.stderr.count("\n") == 1


def test_config_errors_are_clear(tmp_path):
    p = train("optim.lrr=1", check=False)
    assert p.returncode != 0 and "Key 'lrr' not in 'OptimConfig'" in p.stderr
    p = train("+optim.lrr=1", f"paths.root_dir={tmp_path}", check=False)
    # one unknown-key check for every verb (wct.config.check_keys), worded as python -m wct.quantize's always was
    assert p.returncode == 2 and p.stderr.startswith("error: unknown config key optim.lrr;") and "lrr" in p.stderr
    assert "Traceback" not in p.stderr


def test_grid_sweep_survives_a_failed_job(tmp_path):
    p = train("-m", "optim.name=sgd,adamw", *tiny(tmp_path), "logger=csv", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert "trial failed" in p.stderr and "optim.name='sgd' is unknown" in p.stderr
    assert [d.name for d in run_dirs(tmp_path / "sweep")] == ["1"]  # job 0 failed, job 1 ran to the end


@pytest.mark.slow  # two Optuna sweeps of training processes
def test_optuna_sweep_is_resumable(tmp_path):
    import optuna

    from wct.config import optuna_storage_problem

    sweep = tmp_path / "sweep"
    args = ["-m", "hparams_search=optuna", *tiny(tmp_path), "logger=csv", f"hydra.sweep.dir={sweep}"]
    problem = optuna_storage_problem()
    if problem:  # optuna 2.x + SQLAlchemy 2.x: one clear message instead of Optuna's bare AssertionError
        p = train(*args, "hydra.sweeper.n_trials=2", check=False)
        assert p.returncode != 0 and "pip install 'sqlalchemy<2'" in p.stderr
        pytest.skip(problem)
    train(*args, "hydra.sweeper.n_trials=2")
    storage = f"sqlite:///{sweep / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    assert summary.n_trials == 2 and summary.study_name == "alpaca-tiny-llama-owq-w4-k4-weak"
    train(*args, "hydra.sweeper.n_trials=1")  # the same command again: the study continues
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert len({t.params["optim.lr"] for t in study.trials}) == 3


@pytest.mark.slow  # two ranks of training processes
def test_ddp_two_processes_on_cpu(tmp_path):
    p = train("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *tiny(tmp_path), "logger=csv",
              "task.global_batch_size=8")
    assert "batch: global 8 = micro 2 x 2 device(s) x 2 accumulation steps" in p.stdout
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2


@pytest.mark.slow  # two Lightning processes on 2 cores: ~35 s
def test_fsdp_two_processes_on_cpu(tmp_path):
    """trainer=fsdp (FSDP2 via Lightning's ModelParallelStrategy) over gloo: both ranks shard the packed weights,
    the run trains, validates and writes a checkpoint holding the trained tensors only."""
    p = train("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
              *tiny(tmp_path), "logger=csv", "task.global_batch_size=8")
    assert "batch: global 8 = micro 2 x 2 device(s) x 2 accumulation steps" in p.stdout
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == 2 and math.isfinite(results["metrics"]["val/loss"])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["state_dict"] and all(k.endswith("weak_weight") for k in ckpt["state_dict"])
    assert all(not hasattr(v, "to_local") for v in ckpt["state_dict"].values())  # gathered, plain tensors
    assert "sync_dist=True" not in p.stderr  # val/* and weak* are global already: Lightning's advice is silenced


@pytest.mark.slow  # three 2-process Lightning runs on 2 cores: ~55 s
def test_fsdp_resume_equals_a_straight_run(tmp_path):
    """trainer=fsdp resumed from the gathered checkpoint of a 2-step run (wct.training.sharding.ShardedStrategy):
    the weak columns and their AdamW state are set back into the shards, so steps 3-4 equal a straight 4-step run
    (losses, trained tensors, the weak-column deltas logged at the last validation), and the checkpoint holds
    whole tensors only (no rank's shard)."""
    from wct.training.resume import load_checkpoint

    args = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            *tiny(tmp_path), "logger=csv", "++callbacks.samples=null", "task.global_batch_size=8",
            "trainer.validate_first=false", "optim.lr=1e-2"]
    train(*args, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'straight'}")
    train(*args, f"hydra.run.dir={tmp_path / 'first'}")
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    train(*args, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'resumed'}", f"ckpt_path={first}")
    a, c = (load_checkpoint(tmp_path / r / "checkpoints" / "last.ckpt") for r in ("straight", "resumed"))
    assert c["global_step"] == 4 and c["callbacks"]["LossPlot"]["history"] == a["callbacks"]["LossPlot"]["history"]
    assert a["state_dict"].keys() == c["state_dict"].keys()
    assert all(torch.equal(c["state_dict"][k], v) for k, v in a["state_dict"].items())
    start = load_checkpoint(first)["callbacks"]["WeakColumnStats"]["start"]
    assert start and all(type(t) is torch.Tensor for t in start.values())  # whole, not rank 0's DTensor shard

    def last_deltas(run: str) -> dict[str, str]:
        with open(tmp_path / run / "csv" / "metrics.csv") as f:
            rows = [r for r in csv.DictReader(f) if r.get("weak/delta_mean")]
        return {k: v for k, v in rows[-1].items() if k.startswith("weak")}

    assert last_deltas("resumed") == last_deltas("straight") and float(last_deltas("straight")["weak/delta_max"]) > 0


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_short_run(tmp_path):
    """A few steps on the real SmolLM2-135M with the default 4.01-bit allocation (gate/up keep no weak column):
    the held-out loss falls, and ``python -m wct.export`` writes a folder of the base's size."""
    p = train("task=alpaca", f"paths.root_dir={tmp_path}", f"cache_dir={tmp_path / 'cache'}", "logger=csv",
              "calib.n_samples=2", "calib.seqlen=256", "quant.tuning=minmax",
              "task.max_length=192", "task.val_size=8", "task.global_batch_size=4", "trainer.max_steps=3",
              "trainer.val_check_interval=3",
              "optim.lr=2e-4", "++callbacks.samples=null", "trainer.enable_progress_bar=false")
    assert "gate=0, up=0" in p.stdout
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    results = json.loads((run / "results.json").read_text())
    assert results["metrics"]["val/loss"] < results["val_loss_before"], p.stdout[-2000:]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e = subprocess.run([sys.executable, "-m", "wct.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    (base,) = (tmp_path / "cache").glob("smollm2-135m-owq-w4-t4.01-*")
    assert (run / "export-last" / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
