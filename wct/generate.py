"""Answer a prompt with any model wct can load: a base, an owq-pack folder, an export, or a training checkpoint.

    python -m wct.generate model=smollm2-135m prompt="Name three primary colors."
    python -m wct.generate model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01 prompt="..."
    python -m wct.generate model.name=outputs/train/.../export-last prompt="..."      # WCT or LoRA export
    python -m wct.generate ckpt_path=outputs/train/.../checkpoints/last.ckpt prompt="..." input="..."

``template``: ``alpaca`` (the training template, with ``input`` when given), ``chat`` (the tokenizer's chat
template), ``none`` (the prompt as is), or ``auto``: alpaca for a training checkpoint or an export of one (that is
what the model was tuned on), else the tokenizer's chat template when it has one, else alpaca. Greedy unless
``do_sample=true``; stops at EOS or after ``max_new_tokens``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, ModelConfig, PathsConfig, check_keys
from wct.errors import WCTError, cli_errors

TEMPLATES = ("auto", "alpaca", "chat", "none")


@dataclass
class GenerateApp:
    """``python -m wct.generate`` (conf/generate.yaml)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None  # a training checkpoint (.ckpt): its base + its trained tensors
    prompt: str = ""
    input: str = ""  # the Alpaca "input" field (template=alpaca)
    template: str = "auto"
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0


ConfigStore.instance().store(name="generate_schema", node=GenerateApp)


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
    was_training = model.training
    model.eval()
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=add_special_tokens).input_ids
    ids = ids.to(next(model.parameters()).device)
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {
        "do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **sampling,
    )
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def load_export(path: Path):
    """(model, tokenizer) of a peft adapter folder written by wct.export: its base (NF4 for QLoRA) + the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from wct.export import EXPORT_META, load_base_for_adapter

    if not (path / EXPORT_META).is_file():
        raise WCTError(f"{path} is a peft adapter without {EXPORT_META} (not written by wct.export); its base is "
                       "unknown. Export it with python -m wct.export, or load it with peft yourself")
    meta = json.loads((path / EXPORT_META).read_text())
    config = OmegaConf.to_container(OmegaConf.load(path / "training_config.yaml"), resolve=True)
    base = load_base_for_adapter(meta["base"], meta["method"], config)
    return PeftModel.from_pretrained(base, path), AutoTokenizer.from_pretrained(path)


def load_for_generation(cfg: DictConfig):
    """(model, tokenizer, tuned) from ``ckpt_path``, ``model.quantized`` or ``model.name``; ``tuned``: trained by
    wct (a checkpoint or an export), so the Alpaca template it was trained with is the right default."""
    from wct.export import EXPORT_META, load_trained
    from wct.models import load_model

    if cfg.ckpt_path:
        trained = load_trained(cfg.ckpt_path)
        return trained.model, trained.tokenizer, True
    path = Path(cfg.model.quantized or cfg.model.name)
    tuned = (path / EXPORT_META).is_file()
    if cfg.model.quantized:
        from wct.quant.checkpoint import load_quantized

        return (*load_quantized(path, dtype=cfg.model.dtype), tuned)
    if (path / "adapter_config.json").is_file():
        return (*load_export(path), tuned)
    return (*load_model(cfg.model.name, dtype=cfg.model.dtype), tuned)


@cli_errors
def run(cfg: DictConfig) -> str:
    check_keys(cfg, GenerateApp)
    if not cfg.prompt:
        raise WCTError('prompt is required: python -m wct.generate prompt="Name three primary colors."')
    if cfg.template not in TEMPLATES:
        raise WCTError(f"template={cfg.template!r} is unknown; use one of {', '.join(TEMPLATES)}")
    model, tok, tuned = load_for_generation(cfg)
    template = cfg.template
    if template == "auto":
        template = "alpaca" if tuned or cfg.input or not getattr(tok, "chat_template", None) else "chat"
    text = render(tok, cfg.prompt, cfg.input or "", template)
    answer = generate(model, tok, text, cfg.max_new_tokens, cfg.do_sample, cfg.temperature, cfg.top_p, cfg.seed,
                      add_special_tokens=template != "chat")
    print(answer)
    return answer


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="generate")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
