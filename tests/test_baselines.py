"""LoRA / QLoRA baselines on the tiny model: NF4 base, adapters, only LoRA parameters train."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from wct.baselines import prepare_lora_model, quantize_nf4
from wct.errors import WCTError
from wct.models import load_model

from helpers import train_config

bnb = pytest.importorskip("bitsandbytes")


def _batch() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def test_nf4_layers_match_bnb_dequantized_reference():
    """Every decoder linear becomes NF4; its forward equals x·deq(W)ᵀ computed in float64."""
    model, _ = load_model("tiny-llama")
    head = model.lm_head.weight.clone()
    n = quantize_nf4(model)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert n == len(layers) == 2 * 7 and model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, head)
    x = torch.randn(3, 64)
    for layer in layers[:3]:
        w = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).double()
        torch.testing.assert_close(layer(x).double(), x.double() @ w.t(), rtol=1e-5, atol=1e-5)


def test_nf4_eval_forward_keeps_training_layout():
    """bnb's CPU eval repacking (bf16 absmax) is off: eval and train forwards agree and training still runs."""
    model, _ = load_model("tiny-llama")
    quantize_nf4(model)
    ids = _batch()
    model.train()
    train_logits = model(ids).logits.detach()
    model.eval()
    with torch.no_grad():
        eval_logits = model(ids).logits
    assert torch.equal(train_logits, eval_logits)
    model.train()
    model.model.embed_tokens.weight.requires_grad_(True)
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_only_lora_parameters_train(method):
    model, _ = load_model("tiny-llama")
    ids = _batch()
    with torch.no_grad():
        fp_logits = model(ids).logits
    peft_model = prepare_lora_model(model, method, r=4, alpha=8, dropout=0.0)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 7  # A and B on all 7 linears of both blocks
    with torch.no_grad():  # B starts at zero: the adapter does not change the base at first
        start = peft_model(ids).logits
    if method == "lora":
        assert torch.equal(start, fp_logits)
    else:
        assert 0 < (start - fp_logits).abs().max() < 0.5  # NF4 rounding only
    frozen = {n: t.detach().clone() for n, t in peft_model.state_dict().items() if n not in trainable}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    peft_model.train()
    losses = []
    for _ in range(4):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(before[n], p) for n, p in trainable.items())
    after = peft_model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in frozen.items())


def test_qlora_targets_default_to_every_linear():
    model, _ = load_model("tiny-llama")
    peft_model = prepare_lora_model(model, "qlora")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and isinstance(
        m.get_base_layer(), nn.Linear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert peft_model.peft_config["default"].r == 64 and peft_model.peft_config["default"].lora_alpha == 16


def test_bad_method_and_targets_are_clear_errors():
    model, _ = load_model("tiny-llama")
    with pytest.raises(WCTError, match="not a LoRA baseline"):
        prepare_lora_model(model, "wct")
    with pytest.raises(WCTError, match="matched no layer"):
        prepare_lora_model(model, "lora", target_modules=["no_such_proj"])


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_pipeline_trains_only_the_adapters(method, tmp_path):
    """``python -m wct.train method=...`` on tiny-llama: the loss falls, only LoRA tensors change and are saved."""
    from wct.train import fit

    metric, module = fit(train_config(tmp_path, f"method={method}", "method.r=4", "method.dropout=0.0"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert metric < results["val_loss_before"]
    base, _ = load_model("tiny-llama")
    if method == "qlora":
        quantize_nf4(base)
    lora = sorted(n for n, p in module.model.named_parameters() if p.requires_grad)
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    frozen = {k.replace(".base_layer", ""): v for k, v in module.model.get_base_model().state_dict().items()
              if ".lora_" not in k}
    reference = base.state_dict()  # every base tensor (NF4 codes and statistics included) as loaded
    assert frozen.keys() == reference.keys()
    for name, t in reference.items():
        assert torch.equal(frozen[name], t), f"{name} changed but is frozen"
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert sorted(ckpt["state_dict"]) == sorted(f"model.{n}" for n in lora)
    assert ckpt["wct"]["method"] == method and ckpt["wct"]["base_dir"] is None
