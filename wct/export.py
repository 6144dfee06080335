"""Export a training checkpoint as a deployable model, reloaded and checked before it is declared written.

    python -m wct.export ckpt_path=outputs/train/.../checkpoints/last.ckpt [out=DIR]

WCT (ARCHITECTURE "Training contract", spec §8.14): the base named in the checkpoint is loaded (its fingerprint
must match), each trained fp32 master ``weak_weight`` is cast to the dtype the base stores it in (fp16) and written
into the packed model (norms / output head trained with ``tuning.norms`` / ``tuning.lm_head`` likewise, in their
stored dtype), and the result is saved with :func:`wct.quant.checkpoint.save_quantized`: same tensors,
shapes and dtypes as the base, hence the same size. Then the folder is reloaded and its logits on a fixed batch
are compared with the in-training model *with its weak columns rounded to the stored dtype*; they must be bitwise
equal (max |diff| = 0). The difference to the fp32-master model (the rounding of the stored weak columns) is
reported too. Only then does the folder appear under its final name (``wct.io.atomic_dir``).

LoRA / QLoRA: the adapter is written in peft format (``adapter_config.json`` + ``adapter_model.safetensors``) and
checked the same way (base + reloaded adapter vs the in-training model). It is not merged: merging into an NF4
base rounds the update into 4 bits and changes the model.

Every export also holds the tokenizer (with a chat template: the tokenizer's own, else the Alpaca template), the
generation config, the resolved training config (``training_config.yaml``), ``wct_export.json`` (method, base,
template, checks) and a model card ``README.md``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from torch import nn

from wct.config import CONF_DIR, PathsConfig, check_keys
from wct.errors import WCTError, cli_errors
from wct.io import atomic_dir
from wct.quant.checkpoint import WEIGHTS, load_quantized, owq_layers, save_quantized

EXPORT_META = "wct_export.json"
CHECK_TOKENS = 32  # tokens per row of the logits check batch


@dataclass
class ExportApp:
    """``python -m wct.export`` (conf/export.yaml)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None
    out: Optional[str] = None  # None: <run>/export-<checkpoint name>


ConfigStore.instance().store(name="export_schema", node=ExportApp)


@dataclass
class Trained:
    """A training checkpoint turned back into the model it trained.

    ``model``: the in-training model (WCT: base with the fp32 master weak columns; LoRA: the peft model).
    ``trained``: the trained tensors by module-qualified name (WCT: the weak columns by layer name).
    ``extra``: WCT only, other trained parameters by parameter name (``tuning.norms`` / ``tuning.lm_head``).
    ``config``: the resolved training config.
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


def read_checkpoint(ckpt_path: str | Path) -> dict:
    """A wct training checkpoint (Lightning .ckpt with a ``wct`` section), read with ``weights_only=True``."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise WCTError(f"ckpt_path={path} does not exist; pass a .ckpt from a wct.train run (<run>/checkpoints/)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a readable checkpoint"
        raise WCTError(f"{path} is not a readable training checkpoint ({str(e).splitlines()[0]})") from None
    if not isinstance(ckpt, dict) or "wct" not in ckpt or "state_dict" not in ckpt:
        raise WCTError(f"{path} was not written by wct.train (no 'wct' section); export a checkpoint of a wct run")
    return ckpt


def load_trained(ckpt_path: str | Path) -> Trained:
    """The model a checkpoint trained: its base (fingerprint checked) with the trained tensors put back.

    WCT: the owq-pack base folder recorded in the checkpoint, weak columns as fp32 masters (as trained).
    LoRA / QLoRA: the base model, NF4-quantized for QLoRA, with the peft adapter of the checkpoint.
    """
    from wct.baselines.lora import prepare_lora_model
    from wct.models import load_model
    from wct.training.module import fingerprint

    ckpt = read_checkpoint(ckpt_path)
    meta, config = ckpt["wct"], ckpt["wct"]["config"]
    method = config["method"]["name"]
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    dtype = config["model"].get("dtype", "float32")
    if method == "wct":
        base_dir = Path(meta["base_dir"])
        if not (base_dir / WEIGHTS).is_file():
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
    metrics = {k: v for k, v in (("val/loss_best", meta.get("best_val")), ("tokens_seen", meta.get("tokens_seen")))
               if v is not None}
    results = Path(ckpt_path).parent.parent / "results.json"  # the run's summary, if this is its final checkpoint
    summary = json.loads(results.read_text()) if results.is_file() else {}
    if Path(summary.get("checkpoint", "")).resolve() == Path(ckpt_path).resolve():
        metrics |= {"val/loss_before": summary.get("val_loss_before"), "steps": summary.get("steps")}
        metrics |= {k: v for k, v in summary.get("metrics", {}).items() if k.startswith(("val/", "perf/"))}
    base_dir = Path(meta["base_dir"]) if method == "wct" else None
    return Trained(model, tok, method, config, str(meta.get("base_dir") or meta["base"]), base_dir, trained, metrics,
                   extra)


def check_batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """The fixed token batch [2, CHECK_TOKENS] the exported and the in-training model are compared on."""
    return torch.randint(0, vocab_size, (2, CHECK_TOKENS), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    was_training = model.training
    model.eval()
    out = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()
    model.train(was_training)
    return out


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
    """The dtype each named tensor has in ``folder``'s weights file (an fp32-loaded base may store fp16)."""
    from safetensors import safe_open

    codes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
    with safe_open(str(folder / WEIGHTS), "pt") as f:
        return {n: codes[f.get_slice(n).get_dtype()] for n in names}


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


def alpaca_chat_template() -> str:
    """Jinja chat template that renders [user] + generation prompt byte-exactly as the Alpaca no-input prompt
    (``wct.data.instruct.PROMPT_NO_INPUT``) and an assistant turn as its response + EOS, as training saw them."""
    from wct.data.instruct import PROMPT_NO_INPUT

    head, _, tail = PROMPT_NO_INPUT.partition("{instruction}")
    cut = tail.index("### Response:")
    q = json.dumps  # JSON string literals are valid Jinja string literals
    return (
        "{% for m in messages %}"
        f"{{% if m['role'] == 'user' %}}{{{{ {q(head)} + m['content'] + {q(tail[:cut])} }}}}"
        f"{{% elif m['role'] == 'assistant' %}}{{{{ {q(tail[cut:])} + m['content'] + eos_token }}}}{{% endif %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {q(tail[cut:])} }}}}{{% endif %}}"
    )


def with_chat_template(tokenizer):
    """The tokenizer with the Alpaca chat template the model was trained on (returns the template name).

    It replaces any template the base tokenizer had: ``apply_chat_template`` on the export must render the prompts
    the weak columns were tuned on, not the base model's chat format."""
    tokenizer.chat_template = alpaca_chat_template()
    return tokenizer, "alpaca"


def model_card(meta: dict) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in meta["metrics"].items()) or "| (none recorded) | |"
    usage = (
        f"import wct\nmodel, tok = wct.load_quantized('{meta['path']}')"
        if meta["method"] == "wct"
        else f"from pathlib import Path\nfrom wct.generate import load_export  # base {meta['base']} + this adapter\n"
        f"model, tok, _ = load_export(Path('{meta['path']}'))"
    )
    return f"""# {meta['name']}

Fine-tuned with **{meta['method']}** (wct) on the base `{meta['base']}`.

| item | value |
| --- | --- |
| method | {meta['method']} |
| base | {meta['base']} |
| bits | {meta.get('bits', 'full precision')} |
| trainable parameters | {meta['trainable_params']:,} |
| chat template | {meta['template']} |
| export check: max abs logit diff vs in-training model (stored dtype) | {meta['max_abs_diff']} |
| max abs logit diff vs fp32 master weights (storage rounding) | {meta.get('max_abs_diff_fp32_master', 'n/a')} |

## Training metrics

| metric | value |
| --- | --- |
{rows}

## Use

```python
{usage}
```

Or: `python -m wct.generate model.name={meta['path']} prompt="..."`. Training config: `training_config.yaml`.
"""


def export_meta(trained: Trained, out: Path, template: str) -> dict:
    """The ``wct_export.json`` fields every export has; each method adds its own."""
    return {
        "name": out.name,
        "path": str(out.resolve()),
        "method": trained.method,
        "base": trained.base,
        "trainable_params": sum(t.numel() for t in [*trained.trained.values(), *trained.extra.values()]),
        "template": template,
        "metrics": trained.metrics,
    }


def _write_common(tmp: Path, trained: Trained, meta: dict) -> None:
    (tmp / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(trained.config)))
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(model_card(meta))


def export_wct(trained: Trained, out: Path) -> dict:
    """Write the merged owq-pack folder at ``out`` (module docstring); returns the export metadata."""
    if trained.base_dir is None:
        raise WCTError("this checkpoint names no owq-pack base folder; WCT export writes the trained columns into it")
    ids = check_batch(trained.model.config.vocab_size)
    fp32_master = logits(trained.model, ids)
    model, _ = load_quantized(trained.base_dir, dtype=next(trained.model.parameters()).dtype)
    set_weak_columns(model, trained.trained)  # cast to the base's stored dtype: what the file will hold
    stored = stored_dtypes(trained.base_dir, list(trained.extra))
    set_parameters(model, {n: t.to(stored[n]) for n, t in trained.extra.items()})  # norms / head, likewise
    reference = logits(model, ids)
    tokenizer, template = with_chat_template(trained.tokenizer)
    layers = owq_layers(model)
    meta = export_meta(trained, out, template) | {
        "bits": model.config.quantization_config.get("bits"),
        "trained_parameters": sorted(trained.extra),
        "weak_dtype": str(next(iter(layers.values())).weak_weight.dtype).removeprefix("torch."),
        "max_abs_diff_fp32_master": (reference - fp32_master).abs().max().item(),
    }
    with atomic_dir(out) as tmp:
        save_quantized(model, tokenizer, tmp)
        reloaded, _ = load_quantized(tmp, dtype=next(model.parameters()).dtype)
        diff = (logits(reloaded, ids) - reference).abs().max().item()
        if diff != 0:
            raise WCTError(f"the exported model's logits differ from the in-training model's by {diff:g} (must be 0); "
                           "nothing was written. Report this as a bug")
        meta["max_abs_diff"] = diff
        meta["bytes"] = (tmp / WEIGHTS).stat().st_size
        meta["base_bytes"] = (trained.base_dir / WEIGHTS).stat().st_size
        if meta["bytes"] != meta["base_bytes"]:
            raise WCTError(f"the export's {WEIGHTS} has {meta['bytes']} bytes, the base's {meta['base_bytes']}; they "
                           "must hold the same tensors. Report this as a bug")
        _write_common(tmp, trained, meta)
    return meta


def export_adapter(trained: Trained, out: Path) -> dict:
    """Write the peft adapter folder at ``out`` (not merged: module docstring); returns the export metadata."""
    from peft import PeftModel

    model, ids = trained.model, check_batch(trained.model.config.vocab_size)
    reference = logits(model, ids)
    tokenizer, template = with_chat_template(trained.tokenizer)
    meta = export_meta(trained, out, template) | {
        "bits": "nf4" if trained.method == "qlora" else None,
        "lora": {k: trained.config["method"][k] for k in ("r", "alpha", "dropout", "target_modules")},
    }
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        base_model = load_base_for_adapter(trained.base, trained.method, trained.config)
        diff = (logits(PeftModel.from_pretrained(base_model, tmp), ids) - reference).abs().max().item()
        if diff != 0:
            raise WCTError(f"base + reloaded adapter differ from the in-training model by {diff:g} (must be 0); "
                           "nothing was written. Report this as a bug")
        meta["max_abs_diff"] = diff
        meta["bytes"] = sum(f.stat().st_size for f in tmp.glob("adapter_model.*"))
        _write_common(tmp, trained, meta)
    return meta


def load_base_for_adapter(base: str, method: str, config: dict) -> nn.Module:
    """The frozen base a LoRA adapter was trained on: full precision, or NF4 for QLoRA."""
    from wct.baselines.lora import quantize_nf4
    from wct.models import load_model

    model, _ = load_model(base, dtype=config["model"].get("dtype", "float32"))
    if method == "qlora":
        quantize_nf4(model)
    return model


@cli_errors
def run(cfg: DictConfig) -> dict:
    check_keys(cfg, ExportApp)
    if not cfg.ckpt_path:
        raise WCTError("ckpt_path is required: python -m wct.export ckpt_path=<run>/checkpoints/last.ckpt")
    start = time.time()
    trained = load_trained(cfg.ckpt_path)
    ckpt = Path(cfg.ckpt_path)
    out = Path(cfg.out) if cfg.out else ckpt.parent.parent / f"export-{ckpt.stem}"
    if trained.method == "wct":
        meta = export_wct(trained, out)
    else:
        print(f"{trained.method}: saving the peft adapter, not a merged model (merging into a quantized base rounds "
              "the LoRA update into the base's 4-bit grid and changes the model)")
        meta = export_adapter(trained, out)
    size = f"{meta['bytes']:,} bytes" + (f" (base {meta['base_bytes']:,})" if "base_bytes" in meta else "")
    print(f"exported {trained.method} model to {out}: {size}, {meta['trainable_params']:,} trained parameters; "
          f"reloaded logits equal the in-training model's (max abs diff {meta['max_abs_diff']}); "
          f"{time.time() - start:.1f} s")
    return meta


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
