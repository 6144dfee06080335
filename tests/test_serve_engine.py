"""The serving engine's decode loop against the installed transformers (5.x here; 4.5x in
scripts/interop_transformers4.sh): the KV cache the engine keeps is the one the model fills, so each decoding step
reads the whole past. transformers 4.x names the cache ``past_key_values`` and 5.x ``cache``; under the other name
the model silently started a fresh cache every step."""

from __future__ import annotations

import torch

from wct.models import tiny_llama
from wct.serving.bank import DeltaBank
from wct.serving.engine import Engine, Job


def test_each_decoding_step_extends_the_engines_kv_cache():
    model, tok = tiny_llama()
    engine = Engine(model.eval(), tok, DeltaBank(model, "base"))
    prompts = [list(range(5, 17)), list(range(30, 37))]
    jobs = [Job(p, 0, 8, []) for p in prompts]
    running = engine._prefill(jobs)
    assert running.cache.get_seq_length() == 12  # the longer prompt; the shorter one is left-padded
    running = engine._step(running)
    assert running.cache.get_seq_length() == 13
    past = torch.tensor([prompts[0] + [jobs[0].tokens[0]]])
    with torch.no_grad():
        ref = model(past).logits[0, -1].argmax().item()  # the second token from the whole context, no cache
    assert jobs[0].tokens[1] == ref
