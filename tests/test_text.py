"""wct.data.text (calibration windows, evaluation tokens) and wct.evaluate.perplexity against float64."""

from __future__ import annotations

import math
import random

import pytest
import torch

from wct.data.text import calibration_windows, eval_tokens, load_text, tokenize
from wct.errors import WCTError
from wct.evaluation.perplexity import perplexity
from wct.models import tiny_llama

TEXT = "".join(f"Chapter {i}. It is a truth universally acknowledged, number {i * 7 % 13}.\n" for i in range(60))


@pytest.fixture
def book(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def test_calibration_windows_protocol(book):
    _, tok = tiny_llama()
    ids = tokenize(tok, TEXT)
    w = calibration_windows(tok, book, n_samples=5, seqlen=32, seed=0)
    assert w.shape == (5, 32) and w.dtype == torch.long
    rng = random.Random(0)  # docs/algorithm.md §1.2: window starts from random.randint(0, T - seqlen - 1), seed 0
    for row in w:
        i = rng.randint(0, ids.numel() - 33)
        assert torch.equal(row, ids[i : i + 32])
    assert torch.equal(w, calibration_windows(tok, str(book), 5, 32, 0))
    assert not torch.equal(w, calibration_windows(tok, book, 5, 32, 1))


def test_folder_source(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "skip.md").write_text("not text", encoding="utf-8")
    assert load_text(tmp_path) == "first\n\nsecond"
    (tmp_path / "empty").mkdir()
    with pytest.raises(WCTError, match="no .txt files"):
        load_text(tmp_path / "empty")


def test_eval_tokens_whole_windows(book):
    _, tok = tiny_llama()
    ids = tokenize(tok, TEXT)
    t = eval_tokens(tok, book, seqlen=100)
    assert t.numel() == ids.numel() // 100 * 100 and torch.equal(t, ids[: t.numel()])
    assert torch.equal(eval_tokens(tok, book, seqlen=100, max_windows=3), ids[:300])


def test_short_and_unknown_sources(book, tmp_path):
    _, tok = tiny_llama()
    n = len(TEXT.encode())
    with pytest.raises(WCTError, match=f"has {n} tokens, too few for one calibration window of seqlen={n}"):
        calibration_windows(tok, book, 2, seqlen=n)
    with pytest.raises(WCTError, match="too few for one evaluation window"):
        eval_tokens(tok, book, seqlen=n + 1)
    with pytest.raises(WCTError, match="neither a corpus name .*wikitext2"):
        calibration_windows(tok, tmp_path / "nope.txt", 2, 16)


def test_hub_corpus_offline_names_local_alternative():
    _, tok = tiny_llama()  # conftest sets HF_DATASETS_OFFLINE=1; nothing is cached in CI
    with pytest.raises(WCTError, match=r"wikitext2 corpus.*local text.*calib.source=/path"):
        eval_tokens(tok, "wikitext2", 128)


def test_perplexity_matches_float64(book):
    model, tok = tiny_llama()
    tokens = eval_tokens(tok, book, seqlen=64, max_windows=4)
    ref = model.double()
    nll = []
    with torch.no_grad():
        for i in range(4):
            x = tokens[i * 64 : (i + 1) * 64]
            logp = torch.log_softmax(ref(x[None]).logits[0, :-1], -1)
            nll.append(-logp.gather(1, x[1:, None]).mean().item())
    expected = math.exp(sum(nll) / 4)
    model.float()
    assert perplexity(model, tokens, 64, progress=False) == pytest.approx(expected, rel=1e-5)
    # a partial trailing window is ignored
    assert perplexity(model, torch.cat([tokens, tokens[:10]]), 64, progress=False) == pytest.approx(expected, rel=1e-5)


def test_perplexity_uniform_model_is_vocab_size(book):
    model, tok = tiny_llama()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: every logit is 0, every token has probability 1/V
    assert perplexity(model, eval_tokens(tok, book, 32, 3), 32, progress=False) == pytest.approx(259, rel=1e-6)
    with pytest.raises(WCTError, match="fewer than one window"):
        perplexity(model, torch.arange(10), 32, progress=False)
