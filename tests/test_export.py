"""wct.export: trained weak columns -> merged owq-pack folder, reloaded with logits equal to the in-training model."""

from __future__ import annotations

import json

import pytest
import torch

import wct.exporting as export
import wct.runs as runs
from wct.errors import WCTError
from wct.exporting import check_batch, export_wct, logits
from wct.runs import Trained, set_weak_columns
from wct.models import load_model
from wct.checkpoint import WEIGHTS, load_quantized, owq_layers, save_quantized
from wct.quant.owq import quantize_model

from helpers import export_config, generate_config, greedy_reference, train_config, trained_from


def test_export_reloads_with_equal_logits(base_dir, tmp_path):
    trained = trained_from(base_dir)
    ids = check_batch(trained.model.config.vocab_size)
    master = logits(trained.model, ids)
    meta = export_wct(trained, tmp_path / "out")
    out = tmp_path / "out"
    reloaded, tok = load_quantized(out)
    # the in-training model with its weak columns rounded to fp16 (the stored dtype), built independently
    reference, _ = load_quantized(base_dir)
    for name, m in owq_layers(reference).items():
        m.weak_weight.data = trained.trained[name].half()
        assert torch.equal(owq_layers(reloaded)[name].weak_weight, trained.trained[name].half())
        assert owq_layers(reloaded)[name].weak_weight.dtype == torch.float16
    assert torch.equal(logits(reloaded, ids), logits(reference, ids))
    assert meta["max_abs_diff"] == 0.0
    assert 0 < meta["max_abs_diff_fp32_master"] == (logits(reloaded, ids) - master).abs().max().item()
    base_model, _ = load_quantized(base_dir)
    assert not torch.equal(logits(base_model, ids), logits(reloaded, ids))  # the training did change the model
    assert (out / WEIGHTS).stat().st_size == (base_dir / WEIGHTS).stat().st_size == meta["bytes"] == meta["base_bytes"]
    files = {p.name for p in out.iterdir()}
    assert {"README.md", "training_config.yaml", "wct_export.json", "generation_config.json", "config.json"} <= files
    assert json.loads((out / "wct_export.json").read_text())["trainable_params"] == sum(
        t.numel() for t in trained.trained.values())
    card = (out / "README.md").read_text()
    assert "wct" in card and "val/loss" in card and str(meta["trainable_params"]) in card.replace(",", "")
    assert tok.chat_template  # tiny-llama has none: the Alpaca template was added


def test_export_refuses_tensors_of_another_base(base_dir, tmp_path):
    trained = trained_from(base_dir)
    other, _ = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(other, calib, bits=4, target_rank=2, progress=False)  # 2 weak columns, not 4
    with pytest.raises(WCTError, match="another base"):
        set_weak_columns(other, trained.trained)
    with pytest.raises(WCTError, match="do not fit this base"):
        set_weak_columns(other, {"model.layers.0.mlp.up_proj": torch.zeros(2, 128)})


def test_trained_norms_and_tied_head_are_exported(base_dir, tmp_path):
    """tuning.norms / tuning.lm_head runs export too: the trained norms and the (tied) head are written in the
    base's dtype, the file keeps the base's size, and the reload reproduces the trained model's logits."""
    from wct.runs import set_parameters, stored_dtypes

    trained = trained_from(base_dir)
    g = torch.Generator().manual_seed(5)
    names = ["model.norm.weight", "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight"]
    params = dict(trained.model.named_parameters())
    trained.extra = {n: params[n].detach().float() + 0.05 * torch.randn(params[n].shape, generator=g) for n in names}
    set_parameters(trained.model, trained.extra, dtype=torch.float32)
    meta = export_wct(trained, tmp_path / "out")
    reloaded, _ = load_quantized(tmp_path / "out")
    got = dict(reloaded.named_parameters())
    stored = stored_dtypes(base_dir, names)  # the base file keeps the norms in fp16, the random embedding in fp32
    assert stored["model.norm.weight"] == torch.float16 and stored["model.embed_tokens.weight"] == torch.float32
    for n in names:  # rounded to the dtype the base file stores them in, as the weak columns are
        assert torch.equal(got[n], trained.extra[n].to(stored[n]).to(got[n].dtype))
    assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight  # still tied
    assert meta["max_abs_diff"] == 0.0 and meta["bytes"] == meta["base_bytes"]
    assert meta["trained_parameters"] == sorted(names)
    assert meta["trainable_params"] == sum(t.numel() for t in [*trained.trained.values(), *trained.extra.values()])
    with pytest.raises(WCTError, match="model.norm.weight .* does not fit this base"):
        set_parameters(reloaded, {"model.norm.weight": torch.zeros(3)})


def test_layers_without_weak_columns_train_nothing_and_export(tmp_path):
    """A target_bit base leaves some layers with n_o = 0 (here gate/up/down): training has no tensor for them,
    and the export still writes the others and reloads with equal logits."""
    model, tok = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, bits=4, target_rank=2, layers=["q", "k", "v", "o"], progress=False)
    base = save_quantized(model, tok, tmp_path / "base")
    trained = trained_from(base)
    trained.trained = {n: w for n, w in trained.trained.items() if w.shape[0]}  # what a checkpoint holds
    assert len(trained.trained) == 8 and len(owq_layers(trained.model)) == 14
    meta = export_wct(trained, tmp_path / "out")
    reloaded, _ = load_quantized(tmp_path / "out")
    for name, w in trained.trained.items():
        assert torch.equal(owq_layers(reloaded)[name].weak_weight, w.half())
    assert meta["max_abs_diff"] == 0.0
    with pytest.raises(WCTError, match=r"missing \['model.layers.0.self_attn.k_proj'\]"):
        set_weak_columns(reloaded, {n: w for n, w in trained.trained.items() if "0.self_attn.k_proj" not in n})


def test_failed_check_leaves_no_folder(base_dir, tmp_path, monkeypatch):
    """A reload that does not reproduce the logits aborts the export: no folder, no temporary left behind."""
    trained = trained_from(base_dir)

    def corrupted_reload(path, dtype=None):
        model, tok = load_quantized(path, dtype=dtype)
        if path != base_dir:  # the export being checked, not the base
            next(iter(owq_layers(model).values())).weak_weight.data += 1
        return model, tok

    monkeypatch.setattr(export, "load_quantized", corrupted_reload)
    with pytest.raises(WCTError, match="differ"):
        export_wct(trained, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_alpaca_chat_template_is_byte_exact():
    from wct.data.instruct import PROMPT_NO_INPUT

    _, tok = load_model("tiny-llama")
    tok.chat_template = "{{ messages[0]['content'] }}"  # a base template of its own is replaced by the trained one
    tok, name = export.with_chat_template(tok)
    assert name == "alpaca"
    chat = [{"role": "user", "content": "Name a colour."}]
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == PROMPT_NO_INPUT.format(
        instruction="Name a colour.")
    full = tok.apply_chat_template(chat + [{"role": "assistant", "content": "Red."}], tokenize=False)
    assert full == PROMPT_NO_INPUT.format(instruction="Name a colour.") + "Red." + tok.eos_token


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_export_reloads_with_equal_logits(method, tmp_path):
    from peft import PeftModel

    from wct.baselines import prepare_lora_model

    pytest.importorskip("bitsandbytes")
    model, tok = load_model("tiny-llama")
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    peft_model = prepare_lora_model(model, method, **lora)
    trained = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data += 0.05 * torch.randn_like(p)  # 'training': B is no longer zero
            trained[name] = p.detach().clone()
    config = {"model": {"name": "tiny-llama", "dtype": "float32"}, "method": {"name": method, **lora}}
    meta = export.export_adapter(Trained(peft_model, tok, method, config, "tiny-llama", None, trained), tmp_path / "a")
    out = tmp_path / "a"
    assert {"adapter_config.json", "adapter_model.safetensors", "wct_export.json", "README.md"} <= {
        p.name for p in out.iterdir()}
    assert meta["max_abs_diff"] == 0.0 and meta["trainable_params"] == sum(t.numel() for t in trained.values())
    base = runs.load_base_for_adapter("tiny-llama", method, config)
    ids = check_batch(base.config.vocab_size)
    plain = logits(base, ids)
    reloaded = PeftModel.from_pretrained(base, out)
    assert torch.equal(logits(reloaded, ids), logits(peft_model, ids))
    assert not torch.equal(logits(reloaded, ids), plain)


def test_cli_export_of_a_training_checkpoint(wct_run, base_dir, tmp_path, capsys):
    from wct.export import run
    from wct.runs import load_trained

    meta = run(export_config(f"ckpt_path={wct_run}", f"out={tmp_path / 'exp'}"))
    assert "max abs diff 0.0" in capsys.readouterr().out
    trained = load_trained(wct_run)  # the in-training model: base + fp32 masters from the checkpoint
    ckpt = torch.load(wct_run, weights_only=True)
    for name, m in owq_layers(trained.model).items():
        assert torch.equal(m.weak_weight, ckpt["state_dict"][f"model.{name}.weak_weight"])
    reloaded, tok = load_quantized(tmp_path / "exp")
    for m in owq_layers(trained.model).values():
        m.weak_weight.data = m.weak_weight.data.half().float()  # the stored rounding, nothing else
    ids = check_batch(reloaded.config.vocab_size)
    assert torch.equal(logits(reloaded, ids), logits(trained.model, ids))
    assert meta["bytes"] == (base_dir / WEIGHTS).stat().st_size
    assert (tmp_path / "exp" / "training_config.yaml").read_text().count("quantized") >= 1
    card = (tmp_path / "exp" / "README.md").read_text()  # the model card states the run's steps and loss
    assert f"| training steps | {ckpt['global_step']} |" in card
    best = trained.metrics["val/loss_best"]  # the run's summary, else the checkpoint's best_val
    assert abs(best - ckpt["wct"]["best_val"]) < 1e-5 and f"; {best:.4g} |" in card


def test_cli_export_of_a_run_that_trained_norms_and_head(base_dir, tmp_path):
    """tuning.norms + tuning.lm_head: the export holds every trained tensor and reloads to the trained logits."""
    from wct.export import run
    from wct.runs import load_trained
    from wct.train import fit

    fit(train_config(tmp_path / "run", f"model.quantized={base_dir}", "tuning=weak_norms", "tuning.lm_head=true",
                     "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.validate_first=false",
                     "optim.lr=1e-2"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    meta = run(export_config(f"ckpt_path={ckpt}", f"out={tmp_path / 'exp'}"))
    assert "model.embed_tokens.weight" in meta["trained_parameters"] and meta["max_abs_diff"] == 0.0
    trained, (reloaded, _) = load_trained(ckpt), load_quantized(tmp_path / "exp")
    base, _ = load_quantized(base_dir)
    stored = runs.stored_dtypes(base_dir, list(trained.extra))
    for name, t in trained.extra.items():
        got = reloaded.get_parameter(name)
        assert torch.equal(got, t.to(stored[name]).to(got.dtype))
        assert not torch.equal(got, base.get_parameter(name))  # training changed it and the export kept it
    assert meta["bytes"] == (base_dir / WEIGHTS).stat().st_size


def test_cli_refuses_a_checkpoint_for_another_base(wct_run, tmp_path):
    """The checkpoint's base folder replaced by another quantization of the same shapes: fingerprint mismatch."""
    from wct.export import run

    other, tok = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(7))
    quantize_model(other, calib, bits=4, target_rank=4, progress=False)  # same shapes, other codes
    other_dir = save_quantized(other, tok, tmp_path / "other")
    ckpt = torch.load(wct_run, weights_only=True)
    ckpt["wct"]["base_dir"] = str(other_dir)
    torch.save(ckpt, tmp_path / "moved.ckpt")
    with pytest.raises(WCTError, match="not the one this checkpoint was trained on"):
        runs.load_trained(tmp_path / "moved.ckpt")
    with pytest.raises(SystemExit) as e:
        run(export_config(f"ckpt_path={tmp_path / 'moved.ckpt'}", f"out={tmp_path / 'exp'}"))
    assert e.value.code == 2 and not (tmp_path / "exp").exists()
    with pytest.raises(SystemExit):
        run(export_config(f"ckpt_path={tmp_path / 'missing.ckpt'}"))


def test_generate_from_a_training_checkpoint(wct_run):
    from wct.generate import run
    from wct.generation import render

    trained = runs.load_trained(wct_run)
    expected = greedy_reference(trained.model, trained.tokenizer, render(trained.tokenizer, "Hi.", "", "alpaca"), 4)
    assert run(generate_config(f"ckpt_path={wct_run}", "prompt=Hi.", "max_new_tokens=4")) == expected


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_export_of_an_adapter_checkpoint(method, tmp_path, capsys):
    from wct.export import run
    from wct.train import fit

    _, module = fit(train_config(tmp_path / "run", f"method={method}", "method.r=2", "trainer.max_steps=2",
                                 "trainer.val_check_interval=2", "trainer.validate_first=false"))
    meta = run(export_config(f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}", f"out={tmp_path / 'a'}"))
    assert "peft adapter, not a merged model" in capsys.readouterr().out
    assert meta["max_abs_diff"] == 0.0 and (tmp_path / "a" / "adapter_model.safetensors").is_file()
    trained = runs.load_trained(tmp_path / "run" / "checkpoints" / "last.ckpt")
    ids = check_batch(trained.model.config.vocab_size)
    assert torch.equal(logits(trained.model, ids), logits(module.model, ids))
