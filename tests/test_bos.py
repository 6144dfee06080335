"""bos=auto|always|never: resolution per tokenizer, calibration and evaluation windows, the scored positions
(docs/algorithm.md §1.2, §1.10)."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F
from tokenizers import processors

from wct.data.text import calibration_windows, eval_tokens, resolve_bos, tokenize, tokenizer_adds_bos
from wct.errors import WCTError
from wct.evaluation.perplexity import perplexity
from wct.models import byte_tokenizer, tiny_llama

TEXT = "".join(f"Letter {i}: the carriage came at {i * 13 % 24} o'clock, and nobody was ready.\n" for i in range(40))


def bos_adding_tokenizer():
    """The byte tokenizer with a post-processor that puts <s> first, as Llama-2's and Gemma's tokenizers do."""
    tok = byte_tokenizer()
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    return tok


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_resolution_follows_the_tokenizer():
    plain, adding = byte_tokenizer(), bos_adding_tokenizer()
    text = tokenize(plain, "ab").tolist()
    assert len(text) == 2 and plain.bos_token_id not in text
    assert tokenize(adding, "ab").tolist() == [adding.bos_token_id, *text]  # the fixture does add BOS
    assert not tokenizer_adds_bos(plain) and tokenizer_adds_bos(adding)
    assert [resolve_bos(plain, m) for m in ("auto", "always", "never")] == [False, True, False]
    assert [resolve_bos(adding, m) for m in ("auto", "always", "never")] == [True, True, False]
    with pytest.raises(WCTError, match="eval.bos='sometimes' is unknown; use one of auto, always, never"):
        resolve_bos(plain, "sometimes", "eval.bos")
    no_bos = byte_tokenizer()
    no_bos.bos_token = None
    assert not tokenizer_adds_bos(no_bos) and not resolve_bos(no_bos, "auto")
    with pytest.raises(WCTError, match="calib.bos=always but the tokenizer has no BOS token"):
        resolve_bos(no_bos, "always", "calib.bos")


@pytest.mark.parametrize("make", [byte_tokenizer, bos_adding_tokenizer])
def test_calibration_windows_with_and_without_bos(book, make):
    tok = make()
    bos = tok.bos_token_id
    text_ids = tokenize(tok, TEXT, add_special_tokens=False)
    default_ids = tokenize(tok, TEXT)  # the papers' protocol: the tokenizer's defaults on the whole text
    always = calibration_windows(tok, book, n_samples=6, seqlen=32, seed=3, bos=True)
    never = calibration_windows(tok, book, n_samples=6, seqlen=32, seed=3, bos=False)
    assert always.shape == never.shape == (6, 32)
    assert (always[:, 0] == bos).all() and (always[:, 1:] != bos).all()
    rng = random.Random(3)
    for row in always:  # BOS + 31 text tokens from a uniform offset of the text without special tokens
        i = rng.randint(0, text_ids.numel() - 31 - 1)
        assert torch.equal(row[1:], text_ids[i : i + 31])
    rng = random.Random(3)
    for row in never:  # unchanged: 32 tokens of the default tokenization
        i = rng.randint(0, default_ids.numel() - 32 - 1)
        assert torch.equal(row, default_ids[i : i + 32])


@pytest.mark.parametrize("make", [byte_tokenizer, bos_adding_tokenizer])
def test_eval_windows_with_and_without_bos(book, make):
    tok = make()
    text_ids = tokenize(tok, TEXT, add_special_tokens=False)
    t = eval_tokens(tok, book, seqlen=50, bos=True)
    n = text_ids.numel() // 49
    assert t.numel() == n * 50
    w = t.view(n, 50)
    assert (w[:, 0] == tok.bos_token_id).all()
    assert torch.equal(w[:, 1:].flatten(), text_ids[: n * 49])  # consecutive text, nothing skipped or repeated
    assert eval_tokens(tok, book, seqlen=50, max_windows=2, bos=True).numel() == 100
    default_ids = tokenize(tok, TEXT)
    assert torch.equal(eval_tokens(tok, book, seqlen=50), default_ids[: default_ids.numel() // 50 * 50])


def test_bos_windows_score_tokens_after_the_first_text_token(book):
    """Loss on positions 2..L-1 of [BOS, t1, ..., t_{L-1}]: t1 (predicted from BOS alone) is not scored."""
    model, tok = tiny_llama()
    tokens = eval_tokens(tok, book, seqlen=40, max_windows=3, bos=True)
    ref = model.double()
    scored, with_first = [], []
    with torch.no_grad():
        for x in tokens.view(3, 40):
            logp = F.log_softmax(ref(x[None]).logits[0], dim=-1)
            nll = -logp[:-1].gather(1, x[1:, None])[:, 0]  # nll[p] = -log P(x[p+1] | x[..p])
            scored.append(nll[1:].mean().item())
            with_first.append(nll.mean().item())
    want = math.exp(sum(scored) / 3)
    got = perplexity(model.float(), tokens, 40, progress=False, bos=True)
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(math.exp(sum(with_first) / 3), rel=1e-5)  # the excluded position matters here


def test_never_is_the_previous_protocol_bitwise(book):
    """bos=False: the windows and the number are those of the protocol before bos existed (every token of the
    default tokenization in consecutive windows, tokens 1..L-1 scored), computed here independently in fp32."""
    model, tok = tiny_llama()
    ids = tok(TEXT)["input_ids"]
    n = len(ids) // 40
    total = 0.0
    with torch.no_grad():
        for i in range(n):
            x = torch.tensor(ids[i * 40 : (i + 1) * 40])[None]
            logits = model(x, use_cache=False).logits[0, :-1].float()
            total += F.cross_entropy(logits, x[0, 1:]).item()
    tokens = eval_tokens(tok, book, seqlen=40)
    assert tokens.tolist() == ids[: n * 40]
    assert perplexity(model, tokens, 40, progress=False) == math.exp(total / n)
    assert perplexity(model, tokens, 40, progress=False, bos=False) == math.exp(total / n)


def test_model_card_states_the_calibration():
    from wct.exporting import calibration_text

    calibration = {"source": "emma", "n_samples": 128, "seqlen": 512, "seed": 0, "fallback": "error", "bos": "always"}
    assert calibration_text(calibration) == "128 x 512 tokens of emma (seed 0), BOS always"
    assert calibration_text(None) == "n/a"  # a base quantized before the calibration was recorded
