"""transformers integration: from_pretrained / pipeline / save_pretrained on owq-pack v1 folders (docs/interop.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from helpers import logits
from transformers import AutoModelForCausalLM, pipeline

import wct
from wct.errors import WCTError
from wct.generation import generate
from wct.models import tiny_llama
from wct.nn.owq_linear import OWQLinear
from wct.checkpoint import WEIGHTS, load_quantized, owq_layers, save_quantized

REPO = Path(__file__).resolve().parents[1]


def packed_folder(tmp_path: Path, rtn_pack, bits: int, group: int, name: str = "ckpt"):
    """A tiny-llama owq-pack folder (weak columns 0, 2 and 4 per layer) and its in-memory model."""
    model, tok = tiny_llama()
    rtn_pack(model, bits, group)
    return save_quantized(model, tok, tmp_path / name), model.eval(), tok


def stored_dtypes(folder: Path) -> dict[str, torch.dtype]:
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


@pytest.mark.parametrize("bits,group", [(3, -1), (4, -1), (3, 32), (4, 64)])
def test_from_pretrained_equals_load_quantized_bitwise(tmp_path, rtn_pack, bits, group):
    folder, model, _ = packed_folder(tmp_path, rtn_pack, bits, group)
    expected = logits(model)  # the model that was saved: both loaders must reproduce it bit for bit
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours, _ = load_quantized(folder)
    assert type(hf) is type(model)
    assert torch.equal(logits(hf), expected) and torch.equal(logits(ours), expected)
    layers = owq_layers(hf)
    assert set(layers) == set(owq_layers(model)) and {m.n_weak for m in layers.values()} == {0, 2, 4}
    assert not any(isinstance(m, torch.nn.Linear) for n, m in hf.named_modules() if ".layers." in n)
    stored = stored_dtypes(folder)
    for name, layer in layers.items():  # OWQ tensors keep their stored dtypes; nothing left on the meta device
        for key, t in layer.state_dict().items():
            assert t.dtype == stored[f"{name}.{key}"] and t.device.type == "cpu"
    assert hf.model.norm.weight.dtype == torch.float32
    assert hf.lm_head.weight is hf.model.embed_tokens.weight
    assert hf.config.quantization_config["bits"] == bits and hf.config.quantization_config.get("method") == "rtn"


def test_dtype_and_device_map_as_usual(tmp_path, rtn_pack):
    folder, model, _ = packed_folder(tmp_path, rtn_pack, 4, -1)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu")
    ours, _ = load_quantized(folder, dtype=torch.bfloat16, device="cpu")
    assert hf.model.norm.weight.dtype == torch.bfloat16 and hf.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    x = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ours(x).logits)
    auto = AutoModelForCausalLM.from_pretrained(folder)  # dtype="auto": the dtype config.json records
    kept, _ = load_quantized(folder, dtype=None)
    recorded = getattr(torch, json.loads((folder / "config.json").read_text())["dtype"])
    assert auto.model.embed_tokens.weight.dtype == kept.model.embed_tokens.weight.dtype == recorded


def test_generate_and_pipeline_equal_wct_generate(tmp_path, rtn_pack):
    folder, model, tok = packed_folder(tmp_path, rtn_pack, 3, 32)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = generate(model, tok, "Once upon", max_new_tokens=8, add_special_tokens=False)
    ids = tok("Once upon", return_tensors="pt", add_special_tokens=False).input_ids
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                      pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, 9:], skip_special_tokens=True) == expected
    pipe = pipeline("text-generation", model=str(folder), dtype=torch.float32)
    assert isinstance(pipe.model.model.layers[1].self_attn.o_proj, OWQLinear)
    text = pipe("Once upon", max_new_tokens=8, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == expected


def test_save_pretrained_round_trip(tmp_path, rtn_pack):
    folder, model, tok = packed_folder(tmp_path, rtn_pack, 3, -1)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():  # a changed weak column must survive the round trip
        hf.model.layers[0].self_attn.q_proj.weak_weight.add_(0.5)
    expected = logits(hf)
    hf.save_pretrained(tmp_path / "resaved")
    tok.save_pretrained(tmp_path / "resaved")
    qc = json.loads((tmp_path / "resaved" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "owq" and qc["format_version"] == 1 and qc["n_weak"] == {
        n: m.n_weak for n, m in owq_layers(model).items()}
    assert torch.equal(logits(load_quantized(tmp_path / "resaved")[0]), expected)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", dtype=torch.float32)),
                       expected)


def test_weak_columns_train_after_from_pretrained(tmp_path, rtn_pack):
    folder, _, _ = packed_folder(tmp_path, rtn_pack, 4, -1)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    layer = next(m for m in owq_layers(hf).values() if m.n_weak)
    assert layer.weak_weight.requires_grad and hf.hf_quantizer.is_trainable
    hf(torch.randint(0, 256, (1, 8)), labels=torch.randint(0, 256, (1, 8))).loss.backward()
    assert layer.weak_weight.grad is not None and layer.weak_weight.grad.abs().sum() > 0


def test_plain_transformers_without_wct_refuses(tmp_path, rtn_pack):
    folder, _, _ = packed_folder(tmp_path, rtn_pack, 4, -1)
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"AutoModelForCausalLM.from_pretrained({str(folder)!r})\n"
            "print('LOADED', 'wct' in sys.modules)\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0 and "LOADED" not in r.stdout
    assert "model type `wct_owq`" in r.stderr
    # the same fresh Python with `import wct` first loads it
    r = subprocess.run([sys.executable, "-c", "import wct\n" + code], capture_output=True, text=True,
                       env={**env, "PYTHONPATH": str(REPO)}, timeout=300, cwd=tmp_path)
    assert r.returncode == 0 and "LOADED True" in r.stdout, r.stderr[-2000:]


def test_broken_folders_fail_with_one_line(tmp_path, rtn_pack):
    folder, _, _ = packed_folder(tmp_path, rtn_pack, 4, -1)
    with safe_open(str(folder / WEIGHTS), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    del tensors["model.layers.1.mlp.up_proj.scales"]
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    for load in (lambda: AutoModelForCausalLM.from_pretrained(folder), lambda: load_quantized(folder)):
        with pytest.raises(WCTError, match="model.layers.1.mlp.up_proj"):
            load()
    del tensors["model.norm.weight"]
    tensors["model.layers.1.mlp.up_proj.scales"] = torch.ones(1, 128, dtype=torch.float16)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    with pytest.raises(WCTError, match="missing.*model.norm.weight"):
        load_quantized(folder)


def test_registration_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    wct.hf.register()
    wct.hf.register()
    assert AUTO_QUANTIZER_MAPPING["owq"] is wct.hf.quantizer.OWQHfQuantizer
