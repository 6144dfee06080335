"""wct.generate: prompt rendering, greedy decoding, every kind of model source through the Hydra entry point."""

from __future__ import annotations

import pytest
import torch

from wct.errors import WCTError
from wct.generate import run
from wct.generation import generate, render
from wct.models import load_model
from wct.checkpoint import save_quantized
from wct.quant.owq import quantize_model

from helpers import generate_config, greedy_reference


def test_render_templates():
    from wct.data.instruct import format_prompt

    _, tok = load_model("tiny-llama")
    assert render(tok, "Add 2 and 3.", "", "alpaca") == format_prompt("Add 2 and 3.", "")
    assert render(tok, "Add.", "2 and 3", "alpaca") == format_prompt("Add.", "2 and 3")
    assert render(tok, "hi", "", "none") == "hi"
    with pytest.raises(WCTError, match="no chat template"):
        render(tok, "hi", "", "chat")
    with pytest.raises(WCTError, match="only used by template=alpaca"):
        render(tok, "hi", "x", "none")


def test_greedy_generation_matches_argmax_loop():
    model, tok = load_model("tiny-llama")
    text = render(tok, "Say something.", "", "alpaca")
    assert generate(model, tok, text, max_new_tokens=6) == greedy_reference(model, tok, text, 6)


def test_cli_base_and_quantized_folder(tmp_path, capsys):
    model, tok = load_model("tiny-llama")
    expected = greedy_reference(model, tok, render(tok, "Name a fruit.", "", "alpaca"), 5)
    assert run(generate_config("prompt=Name a fruit.", "max_new_tokens=5")) == expected
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, bits=4, target_rank=2, progress=False)
    save_quantized(model, tok, tmp_path / "q")
    expected = greedy_reference(model, tok, "Once", 5)
    out = run(generate_config("prompt=Once", "template=none", "max_new_tokens=5", f"model.quantized={tmp_path / 'q'}"))
    assert out == expected
    assert expected in capsys.readouterr().out


def test_cli_errors():
    with pytest.raises(SystemExit) as e:
        run(generate_config())  # no prompt
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        run(generate_config("prompt=x", "template=jinja"))


def test_cli_adapter_export_folder(tmp_path):
    """An exported LoRA adapter folder: base + adapter are rebuilt, the Alpaca template is used (tuned model)."""
    from wct.baselines import prepare_lora_model
    from wct.exporting import export_adapter
    from wct.runs import Trained

    model, tok = load_model("tiny-llama")
    lora = {"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"}
    peft_model = prepare_lora_model(model, "lora", **lora)
    trained = {}
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data += 0.5 * torch.randn_like(p)
            trained[name] = p.detach()
    config_ = {"model": {"name": "tiny-llama", "dtype": "float32"}, "method": {"name": "lora", **lora}}
    export_adapter(Trained(peft_model, tok, "lora", config_, "tiny-llama", None, trained), tmp_path / "a")
    expected = greedy_reference(peft_model, tok, render(tok, "Name a fruit.", "", "alpaca"), 5)
    assert run(generate_config("prompt=Name a fruit.", "max_new_tokens=5", f"model.name={tmp_path / 'a'}")) == expected
