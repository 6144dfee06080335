"""wct.train on a tiny OWQ model: only weak columns train, exact resume, base fingerprint check, loss guard,
config errors, optimizers and schedules."""

from __future__ import annotations

import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from wct.config import CONF_DIR
from wct.errors import WCTError
from wct.checkpoint import load_quantized, owq_layers
from wct.train import fit
from wct.config import OptimConfig
from wct.training.module import lr_lambda, make_optimizer

from helpers import FIXTURE, base_train_config, make_base


def test_only_weak_columns_change(base, tmp_path):
    metric, module = fit(base_train_config(tmp_path, base, "trainer.max_steps=2", "trainer.validate_first=false"))
    assert math.isfinite(metric)
    trained = module.model.state_dict()
    reference, _ = load_quantized(base)
    changed = []
    for name, t in reference.state_dict().items():
        if name.endswith("weak_weight"):
            assert trained[name].dtype == torch.float32  # fp32 master copy
            assert not torch.equal(trained[name].half(), t), f"{name} did not train"
            changed.append(name)
        else:
            assert torch.equal(trained[name], t), f"{name} changed but is frozen"
    assert len(changed) == 14
    assert sorted(n for n, p in module.model.named_parameters() if p.requires_grad) == sorted(changed)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert sorted(ckpt["state_dict"]) == sorted(f"model.{n}" for n in changed)  # trainable tensors only
    assert ckpt["global_step"] == 2 and ckpt["optimizer_states"] and ckpt["lr_schedulers"]
    assert len(ckpt["wct"]["fingerprint"]) == 64 and ckpt["wct"]["base_dir"] == str(base.resolve())
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "results.json").is_file()


@pytest.mark.parametrize("precision, batching", [  # bf16-mixed: the training default; length grouping: default
    ("32-true", "task.group_by_length=true"), ("bf16-mixed", "task.group_by_length=true"), ("32-true", "task.packing=true"),
])
def test_resume_gives_the_same_loss_curve(base, tmp_path, precision, batching):
    p = f"trainer.precision={precision}"
    _, straight = fit(base_train_config(tmp_path / "a", base, p, batching))
    fit(base_train_config(tmp_path / "b", base, "trainer.max_steps=2", p, batching))
    last = tmp_path / "b" / "checkpoints" / "last.ckpt"
    _, resumed = fit(base_train_config(tmp_path / "c", base, f"ckpt_path={last}", p, batching))
    a = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    c = torch.load(tmp_path / "c" / "checkpoints" / "last.ckpt", weights_only=False)
    history_a, history_c = a["callbacks"]["LossPlot"]["history"], c["callbacks"]["LossPlot"]["history"]
    assert [s for s, _ in history_a["train/loss"]] == [1, 2, 3, 4]
    assert history_c == history_a  # the same train and val losses, step by step
    for name, t in a["state_dict"].items():
        assert torch.equal(c["state_dict"][name], t)
    assert c["global_step"] == 4


def test_checkpoint_of_another_base_is_refused(base, tmp_path):
    fit(base_train_config(tmp_path / "a", base, "trainer.max_steps=2", "trainer.validate_first=false"))
    other = make_base(tmp_path / "other", seed=1)  # same shapes, other calibration: other weights
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(WCTError, match="trained on another base"):
        fit(base_train_config(tmp_path / "b", other, f"ckpt_path={ckpt}"))
    with pytest.raises(WCTError, match=r"resuming cannot change tuning.name, tuning.norms \("):
        fit(base_train_config(tmp_path / "c", base, f"ckpt_path={ckpt}", "tuning=weak_norms"))


def test_loss_guard_stops_a_diverging_run(base, tmp_path):
    with pytest.raises(WCTError, match=r"loss (became nan|became inf|exploded) at step \d"):
        fit(base_train_config(tmp_path, base, "optim.lr=1e30", "optim.grad_clip=0", "trainer.validate_first=false"))


def test_config_errors(base, tmp_path):
    with pytest.raises(ConfigCompositionException, match="lrr"):
        base_train_config(tmp_path, base, "optim.lrr=1")
    with pytest.raises(WCTError, match="lrr"):
        fit(base_train_config(tmp_path, base, "+optim.lrr=1"))
    with pytest.raises(WCTError, match="optim.name='sgd' is unknown"):
        fit(base_train_config(tmp_path, base, "optim.name=sgd"))
    with pytest.raises(WCTError, match="not a multiple of task.micro_batch_size"):
        fit(base_train_config(tmp_path, base, "task.global_batch_size=5"))
    with pytest.raises(WCTError, match="no earlier run"):
        fit(base_train_config(tmp_path / "x" / "run", base, "ckpt_path=last"))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "paged_adamw8bit"])
def test_optimizers_step_on_cpu(name):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 128))  # >= 4096 elements: bitsandbytes keeps 8-bit state
    start = p.detach().clone()
    opt = make_optimizer([p], OptimConfig(name=name, lr=1e-2))
    for _ in range(3):
        opt.zero_grad()
        (p ** 2).sum().backward()
        opt.step()
    assert (p.detach().norm() < start.norm()) and not torch.equal(p.detach(), start)
    if name != "adamw":
        assert opt.state[p]["state1"].dtype == torch.uint8


def test_schedules():
    const = lr_lambda(OptimConfig(scheduler="constant", warmup_steps=3), 10)
    assert [const(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = lr_lambda(OptimConfig(scheduler="cosine", min_lr_ratio=0.1), 10)
    assert cos(0) == 1.0 and cos(5) == pytest.approx(0.55) and cos(10) == pytest.approx(0.1)
    lin = lr_lambda(OptimConfig(scheduler="linear", warmup_ratio=0.2), 10)
    assert lin(1) == pytest.approx(2 / 3) and lin(2) == 1.0 and lin(6) == pytest.approx(0.5)
    with pytest.raises(WCTError, match="optim.scheduler='step' is unknown"):
        lr_lambda(OptimConfig(scheduler="step"), 10)


def test_weak_columns_selected_on_the_task(base, tmp_path, monkeypatch):
    """tuning=weak_task quantizes the base with the task rows' Hessians choosing the weak columns: another cached
    base, recorded as such, with other columns than the calibration-selected one."""
    import json

    from wct.nn.owq_linear import OWQLinear
    from wct.config import TrainApp, to_app
    from wct.training.base import quantized_base
    from wct.training.datamodule import task_rows

    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "wct-cache"))
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        tiny = ["model=tiny-llama", "quant.target_bit=null", "quant.target_rank=4", f"calib.source={FIXTURE}",
                "calib.n_samples=2", "calib.seqlen=64", f"cache_dir={tmp_path / 'bases'}", f"task.data.path={FIXTURE}",
                "task.val_size=4", "progress=false", f"paths.run_dir={tmp_path}"]
        cfgs = {t: compose("train", overrides=[*tiny, f"tuning={t}"]) for t in ("weak", "weak_task")}
        apps = {t: to_app(c, TrainApp) for t, c in cfgs.items()}
        folders = {t: quantized_base(a, task_rows(a.task)) for t, a in apps.items()}
    assert folders["weak"] != folders["weak_task"] and "-task-" in folders["weak_task"].name
    selection = json.loads((folders["weak_task"] / "config.json").read_text())["quantization_config"]["weak_selection"]
    assert selection.startswith("task:task-") and (tmp_path / "wct-cache" / "calib" / selection[5:]).is_file()
    idx = {t: [m.weak_idx for m in load_quantized(f)[0].modules() if isinstance(m, OWQLinear)] for t, f in folders.items()}
    assert len(idx["weak"]) == 14 and any(not torch.equal(a, b) for a, b in zip(idx["weak"], idx["weak_task"]))
    with pytest.raises(WCTError, match="tuning.select=task chooses the weak columns while the base is quantized"):
        fit(base_train_config(tmp_path, base, "tuning=weak_task"))
    with pytest.raises(WCTError, match="tuning.select='hessian' is unknown"):
        fit(base_train_config(tmp_path, base, "tuning.select=hessian"))


def test_tuning_norms_and_head(base, tmp_path):
    from wct.training.module import prepare_wct
    from wct.config import TuningConfig

    model, _ = load_quantized(base)
    names = prepare_wct(model, TuningConfig(norms=True, lm_head=True))
    assert sum(n.endswith("weak_weight") for n in names) == 14
    assert {n for n in names if not n.endswith("weak_weight")} == {
        "model.embed_tokens.weight", "model.norm.weight", *(f"model.layers.{i}.{k}.weight" for i in range(2)
                                                            for k in ("input_layernorm", "post_attention_layernorm"))}
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert len(owq_layers(model)) == 14


@pytest.mark.parametrize("override", [
    "task=json", "task=alpaca_libre", "task=chat",
    "tuning=weak_norms", "tuning=weak_lm_head", "tuning=weak_task", "optim=adamw8bit",
    "optim=paged_adamw8bit", "optim=cosine", "trainer=cpu", "trainer=gpu", "trainer=ddp", "trainer=fsdp",
    "logger=wandb", "callbacks=none", "debug=default", "debug=fdr", "debug=overfit", "experiment=smoke_tiny",
    "experiment=alpaca_smollm2_w3",
])
def test_every_config_option_composes(override, tmp_path):
    from omegaconf import OmegaConf

    cfg = base_train_config(tmp_path, tmp_path, override)
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.run_name.startswith(cfg.task.name)
