"""owq-pack v1 checkpoint folders (bit-exact reloads, clear errors) and the reference-OWQ importer."""

from __future__ import annotations

import json
import types

import pytest
import torch
from safetensors import safe_open

from wct.errors import WCTError
from wct.models import tiny_llama
from wct.checkpoint import (
    bit_summary,
    import_reference,
    load_quantized,
    owq_layers,
    save_quantized,
)
from wct.format.layout import unpack_codes
from wct.format.reference import unpack_reference_codes

from helpers import logits


@pytest.mark.parametrize("bits,group", [(3, -1), (4, -1), (3, 32), (4, 64)])
def test_roundtrip_bit_exact(tmp_path, bits, group, rtn_pack):
    model, tok = tiny_llama()
    rtn_pack(model, bits, group)
    before = logits(model)
    out = save_quantized(model, tok, tmp_path / "ckpt")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("tokenizer")) == [
        ".wct-output", "config.json", "generation_config.json", "model.safetensors"
    ]
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt*"))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "owq" and qc["format_version"] == 1 and qc["bits"] == bits
    assert qc["group_size"] == group and qc["method"] == "rtn"
    assert qc["n_weak"] == {n: m.n_weak for n, m in owq_layers(model).items()}
    assert len(qc["n_weak"]) == 14 and set(qc["n_weak"].values()) == {0, 2, 4}

    model2, tok2 = load_quantized(out)
    assert torch.equal(logits(model2), before)
    assert set(owq_layers(model2)) == set(owq_layers(model))
    for name, m in owq_layers(model).items():
        m2 = owq_layers(model2)[name]
        for key, t in m.state_dict().items():
            assert torch.equal(t, m2.state_dict()[key]) and t.dtype == m2.state_dict()[key].dtype, key
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # ties restored
    assert tok2("abc").input_ids == tok("abc").input_ids


def test_a_model_holding_3bit_kernel_words_saves_owq_pack_v1_bit_for_bit(tmp_path, rtn_pack):
    """Layers converted to the triton/cuda kernel words (wct.kernels.hold_kernel_layouts) compute the same logits and
    save the same model.safetensors, byte for byte, as the v1 planes they came from; loading it into the converted
    model goes back to the planes."""
    from wct.kernels import hold_kernel_layouts, use_kernel

    model, tok = tiny_llama()
    rtn_pack(model, 3, 32)
    first = save_quantized(model, tok, tmp_path / "planes")
    with use_kernel("torch"):  # the torch backend reads either layout and converts nothing
        before = logits(model)
        assert hold_kernel_layouts(model, "triton") == 14
        assert {m.layout for m in owq_layers(model).values()} == {"words3"}
        assert torch.equal(logits(model), before)
    second = save_quantized(model, tok, tmp_path / "words")
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    reloaded, _ = load_quantized(second)
    model.load_state_dict(reloaded.state_dict())
    assert {m.layout for m in owq_layers(model).values()} == {"v1"}
    with use_kernel("torch"):
        assert torch.equal(logits(model), before)


def test_fp16_storage_when_lossless(tmp_path, rtn_pack):
    model, tok = tiny_llama()
    rtn_pack(model, 4)
    with torch.no_grad():  # fp16-representable embeddings and norms, like the SmolLM2 cache
        for name, p in model.named_parameters():
            if "weak_weight" not in name:
                p.copy_(p.half().float())
    model.model.norm.weight.data[0] = 1 + 2**-20  # not representable in fp16: must stay fp32
    before = logits(model)
    out = save_quantized(model, tok, tmp_path / "c")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
        assert f.get_tensor("model.norm.weight").dtype == torch.float32
        assert "lm_head.weight" not in f.keys()
    assert torch.equal(logits(load_quantized(out)[0]), before)


def test_bit_summary_matches_hand_count(rtn_pack):
    model, _ = tiny_llama()
    rtn_pack(model, 3, n_weak={"q_proj": 4, "k_proj": 2, "v_proj": 0, "o_proj": 0, "gate_proj": 2, "up_proj": 0,
                               "down_proj": 8})
    layers = owq_layers(model)
    weights = 2 * (64 * 64 * 2 + 32 * 64 * 2 + 128 * 64 * 3)
    weak = 2 * (4 * 64 + 2 * 32 + 2 * 128 + 8 * 64)
    s = bit_summary(layers)
    assert s["paper_bits"] == pytest.approx(3 + 13 * weak / weights)
    stored = sum(m.in_features * m.out_features * 3 + m.out_features * 24 + m.n_weak * (32 + 16 * m.out_features)
                 for m in layers.values())
    assert s["stored_bits"] == pytest.approx(stored / weights)
    assert s["low_bit_fraction"] == pytest.approx(1 - weak / weights)


def test_load_errors(tmp_path, rtn_pack):
    model, tok = tiny_llama()
    with pytest.raises(WCTError, match="no OWQLinear"):
        save_quantized(model, tok, tmp_path / "plain")
    assert not (tmp_path / "plain").exists() and not list(tmp_path.iterdir())
    rtn_pack(model, 4)
    good = save_quantized(model, tok, tmp_path / "good")

    with pytest.raises(WCTError, match="does not exist"):
        load_quantized(tmp_path / "nope")
    cfg = json.loads((good / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = 99
    bad = tmp_path / "v99"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WCTError, match="format_version=99"):
        load_quantized(bad)
    cfg["quantization_config"]["format_version"] = 1
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WCTError, match="model.safetensors is missing"):
        load_quantized(bad)
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(WCTError, match="corrupt"):
        load_quantized(bad)
    cfg["quantization_config"]["n_weak"]["model.layers.0.mlp.up_proj"] += 2  # metadata disagrees with tensors
    (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WCTError, match="another model|corrupt"):
        load_quantized(bad)
    cfg["quantization_config"]["bits"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WCTError, match="lacks valid bits"):
        load_quantized(bad)
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WCTError, match="not an OWQ checkpoint"):
        load_quantized(bad)


# ----------------------------------------------------------------------------- reference OWQ format (docs/owq-pack.md §2.2)


def encode_reference_qweight(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Reference QuantLinear.qweight [K/32·b, N] from codes [K, N], written word by word as docs/owq-pack.md §2.2 describes."""
    k, n = codes.shape
    c = codes.to(torch.int64)
    words = torch.zeros(k // 32 * bits, n, dtype=torch.int64)
    for r in range(k // 32):
        base = 32 * r
        if bits == 4:
            for j in range(8):
                for w in range(4):
                    words[4 * r + w] |= c[base + 8 * w + j] << (4 * j)
            continue
        w0, w1, w2 = 3 * r, 3 * r + 1, 3 * r + 2
        for j in range(10):
            words[w0] |= c[base + j] << (3 * j)
            words[w1] |= c[base + 11 + j] << (3 * j + 1)
            words[w2] |= c[base + 22 + j] << (3 * j + 2)
        words[w0] |= (c[base + 10] & 0x3) << 30
        words[w1] |= c[base + 10] >> 2
        words[w1] |= (c[base + 21] & 0x1) << 31
        words[w2] |= c[base + 21] >> 1
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def reference_checkpoint(model, bits: int, path, old_layout: bool = False):
    """Write ``model`` (OWQLinear layers, per-row) as the reference code's packed torch.save dict."""
    sd = {k: v for k, v in model.state_dict().items()}
    n_out = {}
    for name, m in owq_layers(model).items():
        for key in list(sd):
            if key.startswith(name + "."):
                del sd[key]
        codes = unpack_codes(m.planes, bits, m.in_features)
        z = m.zeros[0].to(torch.int64)
        idx, weak = m.weak_idx, m.weak_weight.detach()
        if old_layout:  # June 2023: sensitivity order, oweight as (out, n_out)
            perm = torch.randperm(idx.numel())
            idx, weak = idx[perm], weak[perm].t().contiguous()
        sd[f"{name}.qweight"] = encode_reference_qweight(codes, bits)
        sd[f"{name}.scales"] = m.scales[0].reshape(-1, 1).clone()
        sd[f"{name}.zeros"] = (z[0::2] | (z[1::2] << 4)).to(torch.uint8).reshape(-1, 1)
        sd[f"{name}.bias"] = torch.zeros(m.out_features)
        sd[f"{name}.oweight"] = weak
        sd[f"{name}.outlieridx"] = idx.clone()
        n_out[name] = types.SimpleNamespace(n_out=m.n_weak)
    torch.save({"model_state_dict": sd, "n_out_dict": n_out, "packing": True, "dtype": torch.float32,
                "bits": bits}, path)


@pytest.mark.parametrize("bits", [3, 4])
def test_reference_codes_decode(bits):
    codes = torch.randint(0, 2**bits, (96, 5))
    assert torch.equal(unpack_reference_codes(encode_reference_qweight(codes, bits), bits, 96), codes)


@pytest.mark.parametrize("bits,old", [(3, False), (4, False), (3, True)])
def test_import_reference_roundtrip(tmp_path, bits, old, rtn_pack):
    model, tok = tiny_llama()
    with torch.no_grad():  # the checkpoint's unquantized tensors must win over the base model's
        model.model.embed_tokens.weight.mul_(1.5)
        model.model.norm.weight.add_(0.25)
    rtn_pack(model, bits)
    before = logits(model)
    reference_checkpoint(model, bits, tmp_path / "ref.pth", old_layout=old)
    imported, _ = import_reference(tmp_path / "ref.pth", base="tiny-llama")
    assert torch.equal(logits(imported), before)
    out = save_quantized(imported, tok, tmp_path / "pack")
    assert torch.equal(logits(load_quantized(out)[0]), before)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits


def test_import_reference_other_model(tmp_path, rtn_pack):
    model, _ = tiny_llama()
    rtn_pack(model, 4)
    reference_checkpoint(model, 4, tmp_path / "ref.pth")
    ck = torch.load(tmp_path / "ref.pth", weights_only=False)
    name = "model.layers.0.mlp.down_proj"
    ck["model_state_dict"][f"{name}.qweight"] = ck["model_state_dict"][f"{name}.qweight"][:8]
    torch.save(ck, tmp_path / "other.pth")
    with pytest.raises(WCTError, match="another model"):
        import_reference(tmp_path / "other.pth", base="tiny-llama")
    torch.save({"model_state_dict": {}, "evil": torch.nn.Linear(2, 2)}, tmp_path / "pickle.pth")
    with pytest.raises(WCTError, match="not a readable"):
        import_reference(tmp_path / "pickle.pth", base="tiny-llama")
