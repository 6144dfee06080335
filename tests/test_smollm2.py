"""End to end on the real SmolLM2-135M-Instruct (slow): conversion cache, OWQ quality ordering, bit-exact reload.

Small settings so it stays within a few minutes on 2 CPU cores: 8 calibration windows of 256 tokens from Emma,
perplexity on the first 4 windows of 512 tokens of Pride and Prejudice.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open

from wct.data.text import calibration_windows, eval_tokens
from wct.evaluation.perplexity import perplexity
from wct.models import load_model, smollm2_dir
from wct.checkpoint import load_quantized
from wct.quant.config import QuantConfig
from wct.quant.owq import quantize_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("smollm2")]


@pytest.fixture(scope="module")
def texts(shared_data):
    _, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, shared_data / "janeausten" / "emma.txt", n_samples=8, seqlen=256, seed=0)
    tokens = eval_tokens(tok, shared_data / "janeausten" / "prideprejudice.txt", seqlen=512, max_windows=4)
    return calib, tokens


def test_conversion_cache(tmp_path, monkeypatch, shared_data):
    monkeypatch.setenv("WCT_CACHE_DIR", str(tmp_path))
    folder = smollm2_dir()  # converts the GGUF of the wheel (~20 s)
    assert folder.parent == tmp_path
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    start = time.time()
    model, tok = load_model("smollm2-135m")
    assert time.time() - start < 15  # the cached folder, not the GGUF
    assert getattr(model, "hf_quantizer", None) is None and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.decode(tok("Mr. Darcy").input_ids) == "Mr. Darcy"


def test_owq_beats_rtn_and_reloads_exactly(texts, smollm2_owq):
    calib, tokens = texts
    fp_model, _ = load_model("smollm2-135m")
    ppl_fp = perplexity(fp_model, tokens, 512, progress=False)
    del fp_model

    rtn, _ = load_model("smollm2-135m")
    quantize_model(rtn, calib, QuantConfig(method="rtn", bits=4, tuning="minmax"), progress=False)
    ppl_rtn = perplexity(rtn, tokens, 512, progress=False)
    del rtn

    owq, report, tok, out = smollm2_owq  # the same calibration windows as ``texts`` (conftest.py)
    ppl_owq = perplexity(owq, tokens, 512, progress=False)
    assert ppl_fp < ppl_owq < ppl_rtn, (ppl_fp, ppl_owq, ppl_rtn)
    assert report.weak_by_role["q"] > 0 and 4.0 < report.paper_bits < 4.02

    reloaded, _ = load_quantized(out)
    x = tokens[:512].unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, owq(x).logits)
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # the fp16 embeddings are stored as fp16
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float16
    assert sum(p.stat().st_size for p in out.iterdir()) < 130 * 2**20
