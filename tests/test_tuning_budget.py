"""A training base built for its task (calib.source=task|mix: training rows only) and a tuning budget independent of
the quantization label (tuning.k: more trainable FP16 columns per layer, gate/up included): selection by the
documented score, the function of the base unchanged, export and resume, and the bad inputs, on tiny-llama."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from wct.config import CONF_DIR, QuantizeApp, TrainApp, to_app
from wct.data import instruct
from wct.errors import WCTError
from wct.models import load_model
from wct.format.layout import dequantize_dense
from wct.checkpoint import load_quantized, owq_layers
from wct.quant.gptq import GPTQ
from wct.quant.owq import quantize_model

FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.json"
PLANTED = "Zqxj planted validation row Zqxj"


def tiny_app(tmp_path: Path, *overrides: str) -> TrainApp:
    """The real train config on tiny-llama, the fixture rows, a small validation split and a local base cache."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            "model=tiny-llama", "quant.target_bit=null", "quant.target_rank=2", "calib.n_samples=4",
            "calib.seqlen=64", f"cache_dir={tmp_path / 'bases'}", f"task.data.path={FIXTURE}", "task.val_size=4",
            "task.max_length=512", "progress=false", f"paths.run_dir={tmp_path / 'run'}", "logger=csv",
            "++callbacks.samples=null", "trainer.precision=32-true", "trainer.enable_progress_bar=false",
            *overrides])
    return to_app(cfg, TrainApp), cfg


def planted_rows(app: TrainApp, in_validation: bool) -> list[dict[str, str]]:
    """The fixture rows with the planted row at an index the seeded split puts in (or out of) validation."""
    rows = json.loads(FIXTURE.read_text())
    t = app.task
    marked = [dict(r, _i=i) for i, r in enumerate(rows)]
    train, val = instruct.split_rows(marked, t.val_fraction, t.val_size, t.seed)
    i = (val if in_validation else train)[0]["_i"]
    rows[i] = {"instruction": PLANTED, "input": "", "output": PLANTED}
    return rows


@pytest.mark.parametrize("in_validation", [True, False])
def test_task_calibration_reads_training_rows_only(tmp_path, monkeypatch, in_validation):
    """calib.source=task: the windows the Hessians are built from hold the planted row only when it is a training
    row (many short windows cover the short text, so a planted training row is always seen)."""
    from wct.training.base import calibration_source, task_windows

    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "cache"))
    app, _ = tiny_app(tmp_path, "calib.source=task", "calib.n_samples=256", "calib.seqlen=32")
    rows = planted_rows(app, in_validation)
    _, tok = load_model("tiny-llama")
    source = calibration_source(app, (rows, "fixture"))
    windows = task_windows(app, tok, source, False)
    assert windows.shape == (256, 32)
    marker = tok("Zqxj", add_special_tokens=False).input_ids
    flat = windows.flatten().tolist()
    found = any(flat[i:i + len(marker)] == marker for i in range(len(flat) - len(marker)))
    assert found != in_validation
    assert (PLANTED in Path(source).read_text()) != in_validation


def test_mix_takes_half_its_windows_from_the_generic_text(tmp_path, monkeypatch):
    from wct.data.text import calibration_windows
    from wct.training.base import MIX_GENERIC, calibration_source, task_windows

    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "cache"))
    app, _ = tiny_app(tmp_path, "calib.source=mix", "calib.n_samples=5", "calib.seqlen=32")
    _, tok = load_model("tiny-llama")
    rows = json.loads(FIXTURE.read_text())
    windows = task_windows(app, tok, calibration_source(app, (rows, "fixture")), False)
    generic = calibration_windows(tok, MIX_GENERIC, 2, 32, 0, False)
    assert windows.shape == (5, 32) and torch.equal(windows[3:], generic)


def layer_inputs(model, calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """Block 0's linear inputs [tokens, in] on ``calib`` in the full-precision model."""
    block = model.model.layers[0]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, x, y, n=n: seen.setdefault(n, []).append(x[0].reshape(-1, x[0].shape[-1])))
             for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def test_tuning_columns_hold_the_budget_in_every_layer_type():
    """tuning.k=3 on a recipe whose weak columns skip gate/up: every block-0 layer trains ⊇ the 3 columns of
    highest s_j = H_jj·‖W_:,j − RTN(W)_:,j‖² on the selection windows (docs/algorithm.md §3.5), plus the recipe's
    own, and the base computes what the recipe alone gives (those columns start from their dequantized values)."""
    model, _ = load_model("tiny-llama")
    reference, _ = load_model("tiny-llama")
    plain, _ = load_model("tiny-llama")
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(0, 256, (4, 64), generator=g)
    select = torch.randint(0, 256, (4, 64), generator=g)
    recipe = {"bits": 4, "target_rank": 2, "layers": ["q", "k", "v", "o", "down"]}
    inputs = layer_inputs(reference, select)
    weights = {n: m.weight.detach().clone() for n, m in reference.model.layers[0].named_modules()
               if isinstance(m, torch.nn.Linear)}
    report = quantize_model(model, calib, select=select, tune_k=3, progress=False, **recipe)
    quantize_model(plain, calib, select=select, progress=False, **recipe)
    assert model.config.quantization_config["tuning_k"] == 3 and "k=3" in report.summary()
    tuned, base = owq_layers(model), owq_layers(plain)
    for name, w in weights.items():
        g = GPTQ(w)
        g.add_batch(inputs[name])
        top = set(GPTQ.weak_columns(g.sensitivity(4, tuning="mse", grid=40), 3).tolist())
        layer = tuned[f"model.layers.0.{name}"]
        chosen = set(layer.weak_idx.tolist())
        recipe_cols = set(base[f"model.layers.0.{name}"].weak_idx.tolist())
        assert top <= chosen and chosen == top | recipe_cols, name
        assert len(recipe_cols) == (0 if name.endswith(("gate_proj", "up_proj")) else 2)
    for name, layer in tuned.items():  # the same function: extra columns hold their grid values (fp16-rounded)
        extra = sorted(set(layer.weak_idx.tolist()) - set(base[name].weak_idx.tolist()))
        dense = dequantize_dense(layer.planes, layer.scales, layer.zeros, layer.bits, layer.in_features)
        assert extra and not dense[:, extra].any()  # codes at the zero-point there: the FP16 column is the value
        torch.testing.assert_close(layer.dequantize(), base[name].dequantize(), rtol=2 ** -10, atol=1e-6)


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    """A 2-step run of wct.train with tuning.k=3 on a tiny base quantized on the fly (recipe: 2 weak columns in
    q/k/v/o/down only), task-calibrated; its folder and config."""
    from wct.train import fit

    root = tmp_path_factory.mktemp("tuned")
    mp = pytest.MonkeyPatch()
    mp.setenv("WCT_CACHE_DIR", str(root / "cache"))
    try:
        _, cfg = tiny_app(root, "quant.layers=[q,k,v,o,down]", "tuning.k=3", "trainer.max_steps=2",
                          "task.global_batch_size=4", "task.micro_batch_size=2", "trainer.val_check_interval=2",
                          "trainer.validate_first=false", "callbacks.checkpoint.every_n_train_steps=2", "optim.lr=1e-3")
        _, module = fit(cfg)
    finally:
        mp.undo()
    return root, module


def test_export_of_a_base_training_more_columns_than_it_quantized(tuned_run, tmp_path):
    """The trained set (recipe ∪ tuning.k columns) exceeds the quantization's: the export reloads bit-exactly and
    its metadata and card report the true bits, which count every FP16 column."""
    from omegaconf import OmegaConf

    from wct.exporting import check_batch, logits
    from wct.export import run
    from wct.checkpoint import bit_summary

    root, module = tuned_run
    layers = owq_layers(module.model)
    assert all(m.n_weak >= 3 for m in layers.values())
    assert {m.n_weak for n, m in layers.items() if n.endswith(("gate_proj", "up_proj"))} == {3}
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={root / 'run' / 'checkpoints' / 'last.ckpt'}",
                                           f"out={tmp_path / 'exp'}"])
    meta = run(cfg)
    reloaded, _ = load_quantized(tmp_path / "exp")
    for m in layers.values():
        m.weak_weight.data = m.weak_weight.data.half().float()  # the stored rounding, nothing else
    ids = check_batch(reloaded.config.vocab_size)
    assert meta["max_abs_diff"] == 0 and torch.equal(logits(reloaded, ids), logits(module.model, ids))
    true = bit_summary(owq_layers(reloaded))
    recipe_only = 4 + 12 * 2 * sum(m.out_features for n, m in layers.items() if not n.endswith(("gate_proj", "up_proj"))
                                   ) / sum(m.in_features * m.out_features for m in layers.values())
    assert meta["paper_bits"] == pytest.approx(true["paper_bits"]) and meta["paper_bits"] > recipe_only + 0.1
    assert meta["stored_bits"] == pytest.approx(true["stored_bits"]) and meta["tuning_k"] == 3
    card = (tmp_path / "exp" / "README.md").read_text()
    assert f"{true['paper_bits']:.4f} bits per weight" in card and "(tuning.k)" in card
    qc = json.loads((tmp_path / "exp" / "config.json").read_text())["quantization_config"]
    assert qc["tuning_k"] == 3 and qc["calibration"]["source"].startswith("task: alpaca training rows")
    assert OmegaConf.load(tmp_path / "exp" / "training_config.yaml").tuning.k == 3


def test_resume_refuses_a_changed_tuning_budget(tuned_run, tmp_path, monkeypatch):
    from wct.train import fit

    root, _ = tuned_run
    monkeypatch.setenv("WCT_CACHE_DIR", str(root / "cache"))
    before = sorted((root / "bases").iterdir())
    _, cfg = tiny_app(root, "quant.layers=[q,k,v,o,down]", "tuning.k=4", "trainer.max_steps=3",
                      "task.global_batch_size=4", "task.micro_batch_size=2", "trainer.val_check_interval=2",
                      f"ckpt_path={root / 'run' / 'checkpoints' / 'last.ckpt'}", f"paths.run_dir={tmp_path}")
    with pytest.raises(WCTError, match=r"resuming cannot change tuning.k \(tuning.k: 3 -> 4"):
        fit(cfg)
    assert sorted((root / "bases").iterdir()) == before  # refused before a new base was quantized


@pytest.mark.parametrize("overrides,message", [
    (["calib.source=task", "calib.seqlen=100000"], "calib.source=task: the task's training rows are too short"),
    (["calib.source=mix", "calib.seqlen=100000"], "calib.source=mix: the task's training rows are too short"),
    (["task.val_size=22"], "22 rows cannot give a validation split of 22 rows and a non-empty training split"),
    (["tuning.k=64"], "tuning.k=64 trainable columns per layer do not fit self_attn.q_proj, which has 64 input columns"),
    (["method=lora", "tuning.k=4"], "tuning.k=4 adds trainable FP16 columns .* method=lora"),
    (["method=qlora", "tuning.k=4"], "tuning.k=4 adds trainable FP16 columns .* method=qlora"),
    (["tuning.k=0"], "tuning.k=0 is invalid"),
])
def test_bad_input_is_one_error_before_quantization(tmp_path, monkeypatch, overrides, message):
    from wct.train import fit

    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "cache"))
    started = []
    monkeypatch.setattr("wct.quant.owq._catch", lambda *a, **k: started.append(1))  # the first quantization step
    with pytest.raises(WCTError, match=message):
        _, cfg = tiny_app(tmp_path, *overrides)  # the schema refuses some (tuning.k on LoRA) before anything runs
        fit(cfg)
    assert not started


def test_quantize_refuses_task_calibration():
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose("quantize", overrides=["calib.source=task"])
    with pytest.raises(WCTError, match="calib.source='task' is a training setting"):
        to_app(cfg, QuantizeApp)


def test_chat_rows_calibrate_through_the_chat_template(tmp_path, monkeypatch):
    from wct.training.base import calibration_source
    from wct.training.datamodule import task_rows

    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "cache"))
    app, _ = tiny_app(tmp_path, "task=chat", "task.template=alpaca", "task.data.path=null", "task.data.max_rows=40",
                      "calib.source=task")
    text = Path(calibration_source(app, task_rows(app.task))).read_text()
    assert text.count("### Response:") == 36 and text.count("</s>") == 36  # 40 rows less 4 validation, EOS each
