"""The one loader of the verbs: whatever ``model.*`` (and ``ckpt_path``) name, as ``(model, tokenizer)``.

An owq-pack folder (a quantized base or a WCT export) loads with :func:`wct.checkpoint.load_quantized`, a
peft adapter folder written by ``python -m wct.export`` with its base (:func:`load_adapter_export`), a training
checkpoint with :func:`wct.runs.load_trained`, anything else (built-in name, HF folder, GGUF, hub id) with
:func:`wct.models.load_model`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from wct.errors import WCTError
from wct.models import is_owq_checkpoint, load_model
from wct.checkpoint import load_quantized

EXPORT_META = "wct_export.json"  # written by wct.exporting into every export


@dataclass
class Loaded:
    """A model ready to use. ``label``: a short name for tables; ``tuned``: for a model trained by wct (a checkpoint
    or an export) the template it was trained with, ``alpaca`` or ``chat (...)`` (the tokenizer then carries it as
    its chat template), the right default for prompting it; None for other models."""

    model: nn.Module
    tokenizer: Any
    label: str
    tuned: str | None


def load_adapter_export(path: str | os.PathLike):
    """(model, tokenizer) of a peft adapter folder written by wct.export: its base (NF4 for QLoRA) + the adapter."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from wct.runs import load_base_for_adapter

    path = Path(path)
    if not (path / EXPORT_META).is_file():
        raise WCTError(f"{path} is a peft adapter without {EXPORT_META} (not written by wct.export); its base is "
                       "unknown. Export it with python -m wct.export, or load it with peft yourself")
    meta = json.loads((path / EXPORT_META).read_text())
    config = OmegaConf.to_container(OmegaConf.load(path / "training_config.yaml"), resolve=True)
    base = load_base_for_adapter(meta["base"], meta["method"], config)
    return PeftModel.from_pretrained(base, path), AutoTokenizer.from_pretrained(path)


def load_any(name_or_path: str | os.PathLike, dtype: torch.dtype | str | None = torch.float32,
             device: torch.device | str | None = None):
    """``(model, tokenizer)`` of an owq-pack folder, a wct adapter export, or anything :func:`load_model` takes."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and is_owq_checkpoint(path):
        return load_quantized(path, dtype=dtype, device=device)
    if path.is_dir() and (path / "adapter_config.json").is_file():
        model, tok = load_adapter_export(path)
        return (model.to(device) if device is not None else model), tok
    return load_model(name_or_path, dtype=dtype, device=device)


def load_for_use(model_cfg, ckpt_path: str | None = None, device: str | torch.device | None = "cpu") -> Loaded:
    """The model a verb runs, on ``device`` (``auto|cpu|cuda|cuda:N``, :mod:`wct.device`, checked before any
    loading): ``ckpt_path`` (a training checkpoint: base + trained tensors, in its own dtype), else
    ``model.quantized`` (an owq-pack folder), else ``model.name``, in ``model.dtype`` (``auto``: fp32 on a CPU,
    bf16/fp16 on a GPU)."""
    from wct.device import place, resolve_device

    if ckpt_path:
        from wct.data.chat import with_chat_template
        from wct.runs import load_trained

        where = resolve_device(device)
        trained = load_trained(ckpt_path)
        tok, template = with_chat_template(trained.tokenizer, trained.config)
        return Loaded(trained.model.to(where), tok, Path(ckpt_path).parent.parent.name, template)
    where, dtype = place(device, model_cfg.dtype)
    if model_cfg.quantized:
        path = Path(model_cfg.quantized)
        model, tok = load_quantized(path, dtype=dtype, device=where)
    else:
        path = Path(model_cfg.name)
        model, tok = load_any(model_cfg.name, dtype=dtype, device=where)
    meta = path / EXPORT_META
    return Loaded(model, tok, path.name, json.loads(meta.read_text())["template"] if meta.is_file() else None)
