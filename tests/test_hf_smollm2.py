"""transformers integration on the real SmolLM2-135M-Instruct (slow): from_pretrained, pipeline, delta."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import wct
from wct.delta import delta_tensors, packed_fingerprint, write_delta
from wct.generation import generate
from wct.checkpoint import load_quantized, owq_layers

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


@pytest.fixture
def export(smollm2_owq):
    """The SmolLM2 OWQ-4.01 owq-pack folder shared by the real-model tests (conftest.py)."""
    return smollm2_owq[3]


def test_from_pretrained_equals_load_quantized_on_smollm2(export, shared_data):
    ours, tok = load_quantized(export)
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    x = tok((shared_data / "janeausten" / "prideprejudice.txt").read_text()[:3000], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(hf(x[:, :256]).logits, ours(x[:, :256]).logits)
    assert {m.n_weak for m in owq_layers(hf).values()} > {0}
    text = "The capital of France is"
    expected = generate(ours, tok, text, max_new_tokens=12, add_special_tokens=False)
    pipe = pipeline("text-generation", model=str(export), dtype=torch.float32)
    assert pipe(text, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"] == expected


def test_delta_on_smollm2(export, tmp_path):
    model, _ = load_quantized(export)
    g = torch.Generator().manual_seed(0)
    weak = {n: m.weak_weight.float() + 0.01 * torch.randn(m.weak_weight.shape, generator=g)
            for n, m in owq_layers(model).items() if m.n_weak}
    path = write_delta(tmp_path / "d.safetensors", delta_tensors(model, weak, {}, {}), packed_fingerprint(model),
                       str(export), {}, {})
    hf = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    wct.apply_delta(hf, path)
    for name, w in weak.items():
        model.get_submodule(name).weak_weight.data = w.half()
    x = torch.arange(100, 164).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x).logits)
    assert path.stat().st_size < (export / "model.safetensors").stat().st_size / 20
