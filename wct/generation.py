"""Prompt rendering and generation for any loaded causal LM (base, owq-pack folder, export, training checkpoint)."""

from __future__ import annotations

import logging

import torch

from wct.config import TEMPLATES
from wct.errors import WCTError
from wct.nn.modes import eval_mode

log = logging.getLogger("wct.generation")
# generation-config settings the wct decode loop does not apply: a model that sets them decodes with model.generate
_PROCESSORS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_p": None,
               "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
               "suppress_tokens": None, "begin_suppress_tokens": None, "forced_bos_token_id": None,
               "forced_eos_token_id": None, "sequence_bias": None}
_announced: set = set()


def render(tokenizer, prompt: str, input: str = "", template: str = "alpaca") -> str:
    """The text fed to the model for ``prompt`` (and the Alpaca ``input`` field) under ``template``."""
    from wct.data.instruct import format_prompt

    if template == "alpaca":
        return format_prompt(prompt, input)
    if input:
        raise WCTError(f"input=... is only used by template=alpaca (got template={template}); fold it into the prompt")
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise WCTError("this tokenizer has no chat template; use template=alpaca or template=none")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if template == "none":
        return prompt
    raise WCTError(f"template={template!r} is unknown; use one of {', '.join(TEMPLATES)}")


def resolve_template(template: str, tokenizer, tuned: str | None, has_input: bool) -> str:
    """``auto`` → for a model wct trained, the template it was tuned with (``tuned``: alpaca, or ``chat (...)`` for a
    ``task=chat`` run, whose template the tokenizer carries); alpaca when an Alpaca ``input`` is given; else the
    tokenizer's chat template when it has one, else alpaca. Other names pass through."""
    if template != "auto":
        return template
    if has_input:
        return "alpaca"
    if tuned:
        return "chat" if tuned.startswith("chat") else "alpaca"
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def sampling_kwargs(do_sample: bool, temperature: float, top_p: float) -> dict:
    """``model.generate`` arguments: sampling with ``temperature`` and ``top_p``, or greedy (the generation config's
    sampling defaults cleared)."""
    if do_sample:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def decode_loop_reason(model, length: int) -> str | None:
    """Why ``model`` decodes through ``model.generate`` and not the wct decode loop (:mod:`wct.decoding`); None when
    the loop runs it."""
    from wct.decoding import unsupported_reason

    reason = unsupported_reason(model, length)
    if reason is None and getattr(model, "generation_config", None) is not None:
        cfg = model.generation_config
        for name, neutral in _PROCESSORS.items():
            value = getattr(cfg, name, None)
            if value is not None and value != neutral:
                return f"its generation config sets {name}={value!r}"
    return reason


def _announce(path: str) -> None:
    if path not in _announced:
        _announced.add(path)
        log.info("decoding with %s", path)


@torch.no_grad()
def generate(model, tokenizer, text: str, max_new_tokens: int = 128, do_sample: bool = False,
             temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, add_special_tokens: bool = True) -> str:
    """The continuation of ``text`` (special tokens dropped), greedy unless ``do_sample`` (then seeded by
    ``seed``; greedy decoding leaves the global RNG alone, so it can run inside training). ``model`` is put back
    in the train/eval mode it came in.

    ``add_special_tokens``: as training tokenized the prompt (``wct.data.instruct.encode``); False for text
    rendered by a chat template, which already holds its special tokens."""
    if max_new_tokens < 1:
        raise WCTError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if do_sample:
        torch.manual_seed(seed)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    ids = ids.to(next(model.parameters()).device)
    reason = decode_loop_reason(model, ids.shape[1] + max_new_tokens)
    if reason is None:
        from wct.decoding import LlamaDecoder

        _announce("the wct decode loop (wct/decoding.py)")
        gen = torch.Generator().manual_seed(seed) if do_sample else None
        out = LlamaDecoder(model, 1, ids.shape[1] + max_new_tokens).generate(
            ids, max_new_tokens, tokenizer.eos_token_id, do_sample=do_sample, temperature=temperature, top_p=top_p,
            top_k=getattr(model.generation_config, "top_k", None), generator=gen)
        return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    _announce(f"model.generate ({reason})")
    with eval_mode(model):
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            **sampling_kwargs(do_sample, temperature, top_p),
        )
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
