"""Training runs turned back into models: read a wct checkpoint (``weights_only``), rebuild the base it was trained
on (fingerprint checked) and put the trained tensors back (docs/architecture.md §3)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wct.errors import WCTError
from wct.checkpoint import load_quantized, owq_layers
from wct.format.shards import ShardReader, weights_present
from wct.training.module import fingerprint


@dataclass
class Trained:
    """A training checkpoint turned back into the model it trained.

    ``model``: the in-training model (WCT: base with the fp32 master weak columns; LoRA: the peft model).
    ``trained``: the trained tensors by module-qualified name (WCT: the weak columns by layer name).
    ``extra``: WCT only, other trained parameters by parameter name (``tuning.norms`` / ``tuning.lm_head``).
    ``config``: the resolved training config. ``fingerprint``: the base's (wct.training.module.fingerprint).
    """

    model: nn.Module
    tokenizer: Any
    method: str
    config: dict
    base: str
    base_dir: Path | None
    trained: dict[str, torch.Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    fingerprint: str = ""


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A wct training checkpoint (Lightning .ckpt with a ``wct`` section), read with ``weights_only=True``."""
    from wct.training.resume import load_checkpoint

    path = Path(ckpt_path)
    if not path.is_file():
        raise WCTError(f"ckpt_path={path} does not exist; pass a .ckpt from a wct.train run (<run>/checkpoints/)")
    return load_checkpoint(path)


def load_trained(ckpt_path: str | Path) -> Trained:
    """The model a checkpoint trained: its base (fingerprint checked) with the trained tensors put back.

    WCT: the owq-pack base folder recorded in the checkpoint, weak columns as fp32 masters (as trained).
    LoRA / QLoRA: the base model, NF4-quantized for QLoRA, with the peft adapter of the checkpoint.
    """
    from wct.baselines.lora import prepare_lora_model
    from wct.models import load_model

    ckpt = read_checkpoint(ckpt_path)
    meta, config = ckpt["wct"], ckpt["wct"]["config"]
    method = config["method"]["name"]
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    dtype = config["model"].get("dtype", "float32")
    if method == "wct":
        base_dir = Path(meta["base_dir"])
        if not weights_present(base_dir):
            raise WCTError(f"the checkpoint's base folder {base_dir} is missing; re-create it with the run's "
                           f"model/quant/calib settings (python -m wct.quantize ... out={base_dir})")
        model, tok = load_quantized(base_dir, dtype=dtype)
    else:
        model, tok = load_model(meta["base"], dtype=dtype)
    found = fingerprint(model)
    if found != meta["fingerprint"]:
        raise WCTError(
            f"the base {meta.get('base_dir') or meta['base']} is not the one this checkpoint was trained on "
            f"(fingerprint {found[:12]} vs {meta['fingerprint'][:12]}); export with the exact base "
            "of the run (same model / quant / calib)"
        )
    extra: dict[str, torch.Tensor] = {}
    if method == "wct":
        trained = {n.removesuffix(".weak_weight"): t for n, t in state.items() if n.endswith(".weak_weight")}
        extra = {n: t for n, t in state.items() if not n.endswith(".weak_weight")}
        set_weak_columns(model, trained, dtype=torch.float32)
        set_parameters(model, extra, dtype=torch.float32)
    else:
        model = prepare_lora_model(model, method, **{k: v for k, v in config["method"].items() if k != "name"})
        mismatch = {n for n, p in model.named_parameters() if p.requires_grad} ^ set(state)
        if mismatch:
            raise WCTError(f"the checkpoint's adapter tensors do not match method={method} with its config "
                           f"({sorted(mismatch)[:3]}); the checkpoint is corrupt")
        model.load_state_dict(state, strict=False)
        trained = state
    metrics = {k: v for k, v in (("steps", ckpt.get("global_step")), ("val/loss_best", meta.get("best_val")),
                                 ("tokens_seen", meta.get("tokens_seen")))
               if v is not None}
    results = Path(ckpt_path).parent.parent / "results.json"  # the run's summary, if this is its final checkpoint
    summary = json.loads(results.read_text()) if results.is_file() else {}
    if Path(summary.get("checkpoint", "")).resolve() == Path(ckpt_path).resolve():
        metrics |= {"val/loss_before": summary.get("val_loss_before"), "steps": summary.get("steps")}
        metrics |= {k: v for k, v in summary.get("metrics", {}).items() if k.startswith(("val/", "perf/"))}
    base_dir = Path(meta["base_dir"]) if method == "wct" else None
    return Trained(model, tok, method, config, str(meta.get("base_dir") or meta["base"]), base_dir, trained, metrics,
                   extra, found)


def set_weak_columns(model: nn.Module, weak: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Write trained ``weak_weight`` tensors {layer name: [n_o, N]} into the OWQLinear layers of ``model``.

    ``dtype`` None keeps each layer's current dtype (the stored one for a loaded base); the values are cast.
    Layers without weak columns (n_o = 0, e.g. gate/up at 4.01 bits) train nothing and may be absent. A layer with
    weak columns missing, an unknown layer or another shape means the tensors belong to another base: WCTError.
    """
    layers = owq_layers(model)
    missing = sorted(n for n, layer in layers.items() if layer.n_weak and n not in weak)
    extra = sorted(set(weak) - set(layers))
    if missing or extra:
        raise WCTError(f"the trained weak columns do not fit this base (missing {missing[:3]}, unknown {extra[:3]}); "
                       "export with the base the checkpoint was trained on")
    for name, w in weak.items():
        layer = layers[name]
        if w.shape != layer.weak_weight.shape:
            raise WCTError(f"{name}: trained weak_weight {tuple(w.shape)} vs base {tuple(layer.weak_weight.shape)}; "
                           "the checkpoint was trained on another base")
        layer.weak_weight = nn.Parameter(w.detach().to(dtype or layer.weak_weight.dtype).clone(), requires_grad=False)


def stored_dtypes(folder: Path, names: list[str]) -> dict[str, torch.dtype]:
    """The dtype each named tensor has in ``folder``'s weights (one file or shards; an fp32-loaded base may store
    fp16)."""
    from safetensors import safe_open

    codes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    files = ShardReader(folder).map
    out = {}
    for n in names:
        with safe_open(str(files[n]), "pt") as f:
            out[n] = codes[f.get_slice(n).get_dtype()]
    return out


def set_parameters(model: nn.Module, params: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Write trained parameters {parameter name: tensor} (norms, output head) into ``model``, cast to ``dtype``
    (None: each parameter's current dtype, the stored one for a loaded base). A tied output head is written once,
    through the shared parameter. An unknown name or another shape: WCTError (tensors of another model)."""
    own = dict(model.named_parameters())
    for name, t in params.items():
        if name not in own or own[name].shape != t.shape:
            found = tuple(own[name].shape) if name in own else "no such parameter"
            raise WCTError(f"trained parameter {name} {tuple(t.shape)} does not fit this base ({found}); export with "
                           "the base the checkpoint was trained on")
        own[name].data = t.detach().to(dtype or own[name].dtype).clone()


def load_base_for_adapter(base: str, method: str, config: dict) -> nn.Module:
    """The frozen base a LoRA adapter was trained on: full precision, or NF4 for QLoRA."""
    from wct.baselines.lora import quantize_nf4
    from wct.models import load_model

    model, _ = load_model(base, dtype=config["model"].get("dtype", "float32"))
    if method == "qlora":
        quantize_nf4(model)
    return model
