"""LoRA and QLoRA baselines: a peft LoRA adapter on a full-precision or a bitsandbytes NF4 base.

QLoRA (Dettmers et al., 2023; docs/algorithm.md §3): NF4 weights with double quantization, LoRA on every linear layer,
r = 64, alpha = 16, dropout 0.1. The NF4 base is built in memory by swapping each ``nn.Linear`` of the decoder
(the output embedding stays as loaded) for a ``bnb.nn.Linear4bit``, so any base :func:`wct.models.load_model` can
read (hub id, local dir, GGUF) works; ``is_loaded_in_4bit`` is then set as transformers' bnb loader sets it, so peft
wraps the layers with its bitsandbytes LoRA layer.

CPU note (bitsandbytes 0.50, CPUs with AVX512-BF16): the first forward of a ``Linear4bit`` in eval mode without
grad irreversibly repacks its weight into an inference layout whose absmax statistics are rounded to bf16. Later
eval outputs then differ from the training forward (~6e-3 on a 64x64 layer) and the next training forward fails
("a view of a leaf Variable that requires grad is being used in an in-place operation"). :func:`quantize_nf4` turns
that repacking off, so training, validation and export all use the same dequantized weight.
"""

from __future__ import annotations

import torch
from torch import nn

from wct.errors import WCTError

METHODS = ("lora", "qlora")


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype | None = None) -> int:
    """Replace every ``nn.Linear`` but the output embedding by an NF4 double-quantized ``bnb.nn.Linear4bit``.

    Returns the number of replaced layers. ``compute_dtype`` defaults to the dtype of each original weight.
    """
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise WCTError(f"method=qlora needs bitsandbytes ({e}); install it with `pip install bitsandbytes`") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    for name, lin in targets:
        q = bnb.nn.Linear4bit(
            lin.in_features,
            lin.out_features,
            bias=lin.bias is not None,
            compute_dtype=compute_dtype or lin.weight.dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        q.weight = bnb.nn.Params4bit(
            lin.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4", module=q
        )
        q.bias = None if lin.bias is None else nn.Parameter(lin.bias.data, requires_grad=False)
        q.support_avx512bf16_for_cpu = False  # keep the training layout in eval too (module docstring)
        model.set_submodule(name, q.to(lin.weight.device))  # .to() quantizes
    model.is_loaded_in_4bit = True
    return len(targets)


def prepare_lora_model(
    model: nn.Module,
    name: str,
    r: int = 64,
    alpha: float = 16,
    dropout: float = 0.1,
    target_modules: list[str] | str = "all-linear",
) -> nn.Module:
    """Freeze ``model``, (for ``name="qlora"``) quantize it to NF4, and add LoRA adapters; returns the peft model.

    Only the ``lora_A`` / ``lora_B`` matrices are trainable; this is checked before returning.
    """
    from peft import LoraConfig, get_peft_model

    if name not in METHODS:
        raise WCTError(f"method.name={name!r} is not a LoRA baseline; use one of {METHODS} (or method=wct)")
    if r < 1:
        raise WCTError(f"method.r={r} must be a positive LoRA rank, e.g. method.r=64")
    model.requires_grad_(False)
    if name == "qlora":
        quantize_nf4(model)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        raise WCTError(f"method.target_modules={targets!r} matched no layer of this model ({e})") from None
    stray = [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    if stray:
        raise WCTError(f"LoRA setup left non-adapter parameters trainable: {stray[:5]}; report this as a bug")
    return peft_model
