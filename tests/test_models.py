"""wct.models: built-in tiny model and byte tokenizer, local folders, owq folders, clear errors."""

from __future__ import annotations

import pytest
import torch

from wct.errors import WCTError
from wct.device import as_dtype
from wct.models import BUILTIN, cache_dir, load_model


def test_tiny_llama_is_deterministic():
    m1, tok = load_model("tiny-llama")
    m2, _ = load_model("tiny-llama")
    torch.manual_seed(123)  # the global RNG must not matter
    m3, _ = load_model("tiny-llama", dtype="bf16")
    for (n, a), b, c in zip(m1.state_dict().items(), m2.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b), n
        assert torch.equal(a.to(torch.bfloat16), c), n
    assert m3.dtype == torch.bfloat16 and not m1.training
    assert m1.config.vocab_size == len(tok) == 259
    assert m1.lm_head.weight is m1.model.embed_tokens.weight


def test_byte_tokenizer_roundtrip():
    _, tok = load_model("tiny-llama")
    text = "Emma Woodhouse, handsome — clever & rich.\n\tÇa va? 日本"
    ids = tok(text).input_ids
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)


def test_local_folder_and_owq_folder(tmp_path, rtn_pack):
    model, tok = load_model("tiny-llama")
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    x = torch.randint(0, 256, (1, 16))
    loaded, tok2 = load_model(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert tok2("abc").input_ids == tok("abc").input_ids

    from wct.loading import load_any
    from wct.checkpoint import owq_layers, save_quantized

    rtn_pack(model, 4)
    save_quantized(model, tok, tmp_path / "owq")
    with pytest.raises(WCTError, match="owq-pack folder"):  # the full-precision loader would build random weights
        load_model(tmp_path / "owq")
    q, _ = load_any(tmp_path / "owq")
    assert len(owq_layers(q)) == 14
    with torch.no_grad():
        assert torch.equal(q(x).logits, model(x).logits)


def test_errors(tmp_path):
    with pytest.raises(WCTError, match="unknown.*tiny-llama"):
        load_model("no-such-model")
    with pytest.raises(WCTError, match="unknown"):
        load_model(str(tmp_path / "missing" / "folder"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(WCTError, match="neither a model folder nor a .gguf"):
        load_model(tmp_path / "weights.bin")
    with pytest.raises(WCTError, match="hub.*local folder"):
        load_model("someone/not-cached-model")  # conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(WCTError, match="dtype"):
        as_dtype("int8")
    assert set(BUILTIN) == {"smollm2-135m", "gemma-3-270m", "tiny-llama"}


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("WCT_CACHE_DIR", raising=False)
    assert cache_dir() == tmp_path / "xdg" / "wct"
    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
