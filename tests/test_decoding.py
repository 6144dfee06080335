"""The wct decode loop (wct/decoding.py, kernels/decode_cpu.cpp) against transformers: the same greedy tokens, the
same logits at every step, for OWQ (3/4-bit, per-row and grouped, weak columns) and dense models, fp32 and fp16
embeddings, GQA, biases and untied heads; the compiled head GEMV against float64; what falls back and why."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import wct.kernels.cpu_backend as cpu
from wct.decoding import LlamaDecoder, unsupported_reason
from wct.generation import decode_loop_reason, generate
from wct.models import load_model

pytestmark = pytest.mark.skipif(cpu.extension() is None, reason="the CPU extension cannot be built here")


def _owq_tiny(rtn_pack, bits: int, group: int = -1, half_embed: bool = False):
    model, tok = load_model("tiny-llama")
    rtn_pack(model, bits, group)
    if half_embed:  # an export loaded in its stored dtype keeps the (tied) embedding in fp16
        model.model.embed_tokens.weight.data = model.model.embed_tokens.weight.data.half()
    return model.eval(), tok


def _hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of every position from transformers' forward in fp32 (an fp16 embedding read as fp32)."""
    emb = model.model.embed_tokens.weight
    with torch.no_grad():
        if emb.dtype != torch.float32:
            return torch.nn.functional.linear(model.model(inputs_embeds=emb[ids].float()).last_hidden_state,
                                              emb.float())
        return model(ids).logits


def _steps(dec: LlamaDecoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """The decoder's logits for positions prompt-1 .. T-1 (prefill, then one step per token)."""
    dec.pos = 0
    out = [dec.forward(ids[:, :prompt])]
    for t in range(prompt, ids.shape[1]):
        out.append(dec.forward(ids[:, t:t + 1]))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("bits,group,half", [(4, -1, False), (3, -1, False), (4, 16, True), (3, 32, True)])
def test_logits_match_transformers_at_every_step(rtn_pack, bits, group, half):
    model, _ = _owq_tiny(rtn_pack, bits, group, half)
    ids = torch.randint(0, 256, (2, 24))
    ref = _hf_logits(model, ids)[:, 9:]
    dec = LlamaDecoder(model, 2, 24)
    assert dec.stack is not None  # the compiled step runs the single-token positions
    got = _steps(dec, ids, 10)
    assert got.shape == ref.shape
    assert (got - ref).abs().max() < 1e-4
    dec.stack = None  # the torch step computes the same
    assert (_steps(dec, ids, 10) - ref).abs().max() < 1e-4


def test_greedy_tokens_equal_model_generate(rtn_pack):
    model, tok = _owq_tiny(rtn_pack, 4)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, min_new_tokens=30,
                             do_sample=False, pad_token_id=0)
    dec = LlamaDecoder(model, 1, 42)
    assert torch.equal(dec.generate(ids, 30, eos_token_id=tok.eos_token_id, min_new_tokens=30), ref)
    dec.prefill_rows = 5  # the prompt in chunks of 5, 5 and 2 positions (each chunk masked causally past the cache)
    assert torch.equal(dec.generate(ids, 30, eos_token_id=tok.eos_token_id, min_new_tokens=30), ref)


def test_dense_qwen2_with_biases_and_untied_head():
    cfg = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    for p in model.parameters():  # non-zero biases, so that a dropped bias shows
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 300, (1, 16))
    dec = LlamaDecoder(model, 1, 16)
    assert (_steps(dec, ids, 6) - _hf_logits(model, ids)[:, 5:]).abs().max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k", [(1, 257, 64), (3, 100, 37), (2, 4, 600)])
def test_dense_gemv_matches_float64(dtype, m, n, k):
    x = torch.randn(m, k)
    w = torch.randn(n, k).to(dtype)
    ref = x.double() @ w.double().t()
    got = cpu.dense_gemv(x, w)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    assert (got.double() - ref).abs().max() < 1e-5 * k ** 0.5 * ref.abs().max()


def test_eos_stops_and_min_new_tokens_holds(rtn_pack):
    model, _ = _owq_tiny(rtn_pack, 4)
    ids = torch.randint(0, 256, (1, 8))
    dec = LlamaDecoder(model, 1, 40)
    free = dec.generate(ids, 20)[0, 8:].tolist()
    j = max(i for i, t in enumerate(free) if t not in free[:i])  # the last token not seen before plays EOS
    eos = free[j]
    assert dec.generate(ids, 20, eos_token_id=eos)[0, 8:].tolist() == free[:j + 1]
    held = dec.generate(ids, 20, eos_token_id=eos, min_new_tokens=20)
    assert held.shape[1] == 28 and eos not in held[0, 8:].tolist()


def test_sampling_is_seeded_and_top_k_1_is_greedy(rtn_pack):
    model, _ = _owq_tiny(rtn_pack, 4)
    ids = torch.randint(0, 256, (1, 8))
    dec = LlamaDecoder(model, 1, 40)
    draw = lambda seed, **kw: dec.generate(ids, 16, do_sample=True, generator=torch.Generator().manual_seed(seed), **kw)  # noqa: E731
    assert torch.equal(draw(3, temperature=1.5), draw(3, temperature=1.5))
    assert not torch.equal(draw(3, temperature=1.5), draw(4, temperature=1.5))
    assert torch.equal(draw(5, top_k=1), dec.generate(ids, 16))
    assert torch.equal(draw(6, top_p=1e-6), dec.generate(ids, 16))


def test_what_falls_back_says_why(rtn_pack, caplog):
    model, tok = _owq_tiny(rtn_pack, 4)
    assert unsupported_reason(model, 100) is None
    gemma, _ = load_model("tiny-llama")
    gemma.config.model_type = "gemma3_text"
    assert "gemma3_text" in unsupported_reason(gemma, 100)
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(load_model("tiny-llama")[0], LoraConfig(r=2, target_modules=["q_proj"]))
    assert "plain" in unsupported_reason(lora, 100)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, hidden_act="gelu")
    assert "gelu" in unsupported_reason(LlamaForCausalLM(cfg), 10)
    model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty" in decode_loop_reason(model, 100)
    with caplog.at_level(logging.INFO, logger="wct.generation"):  # the path used is logged, and still answers
        assert isinstance(generate(model, tok, "hello", max_new_tokens=4), str)
    assert any("model.generate" in r.getMessage() and "repetition_penalty" in r.getMessage() for r in caplog.records)


def test_generate_uses_the_loop_and_matches_model_generate(rtn_pack):
    from helpers import greedy_reference

    model, tok = _owq_tiny(rtn_pack, 3)
    assert decode_loop_reason(model, 64) is None
    assert generate(model, tok, "The colour of", max_new_tokens=24) == greedy_reference(model, tok, "The colour of", 24)


def test_a_loaded_export_decodes_from_process_memory_with_the_same_values(base_dir):
    """load_quantized maps the safetensors file; the decoder moves the weights off the mapping (their mapped pages
    released) without changing a value or the tokens."""
    from wct.checkpoint import load_quantized
    from wct.heap import _file_mappings

    model, tok = load_quantized(base_dir, dtype=None)
    inside = lambda t: any(lo <= t.data_ptr() < hi for lo, hi in _file_mappings(".safetensors"))  # noqa: E731
    assert any(inside(t) for t in model.state_dict().values())  # transformers left the weights as views of the file
    before = {k: t.clone() for k, t in model.state_dict().items()}
    mapped = [k for k, t in model.state_dict().items() if inside(t)]
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=0)
    dec = LlamaDecoder(model, 1, 22)
    after = model.state_dict()
    assert not any(inside(t) for t in after.values())
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives
    assert torch.equal(dec.generate(ids, 12, min_new_tokens=12), ref)
    moved = [after[k] for k in mapped]
    assert all(t.data_ptr() % 64 == 0 for t in moved)
    assert {_mapping_flags(t.data_ptr()) for t in moved} == {_mapping_flags(moved[0].data_ptr())}  # one arena


def _mapping_flags(ptr: int) -> tuple[int, frozenset]:
    """(start address, VmFlags) of the mapping of this process that holds ``ptr`` (/proc/self/smaps)."""
    start = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(v, 16) for v in head.split("-"))
            start = lo if lo <= ptr < hi else None
        elif head == "VmFlags:" and start is not None:
            return start, frozenset(line.split()[1:])
    raise AssertionError(f"no mapping holds {ptr:#x}")


def test_the_huge_page_arena_is_aligned_private_and_asks_for_huge_pages():
    from wct.heap import HUGE_PAGE, huge_page_arena

    arena = huge_page_arena(3 * HUGE_PAGE + 100)
    assert arena.numel() == 3 * HUGE_PAGE + 100 and arena.data_ptr() % HUGE_PAGE == 0
    start, flags = _mapping_flags(arena.data_ptr())
    assert "hg" in flags and "sh" not in flags  # madvise(MADV_HUGEPAGE) on a private mapping (shared: shmem, no THP)
    view = arena[HUGE_PAGE:HUGE_PAGE + 8].view(torch.float64)
    view.fill_(2.5)
    del arena  # a view keeps the mapping alive
    assert view.sum().item() == 2.5 and _mapping_flags(view.data_ptr())[0] == start
