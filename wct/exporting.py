"""Exports of trained runs, reloaded and checked before they are declared written.

WCT (docs/architecture.md §4): the base named in the checkpoint is loaded (its fingerprint
must match), each trained fp32 master ``weak_weight`` is cast to the dtype the base stores it in (fp16) and written
into the packed model (norms / output head trained with ``tuning.norms`` / ``tuning.lm_head`` likewise, in their
stored dtype), and the result is saved with :func:`wct.checkpoint.save_quantized`: same tensors,
shapes and dtypes as the base, hence the same size. Then the folder is reloaded and its logits on a fixed batch
are compared with the in-training model *with its weak columns rounded to the stored dtype*; they must be bitwise
equal (max |diff| = 0). The difference to the fp32-master model (the rounding of the stored weak columns) is
reported too. Only then does the folder appear under its final name (``wct.io.atomic_dir``).

LoRA / QLoRA: the adapter is written in peft format (``adapter_config.json`` + ``adapter_model.safetensors``) and
checked the same way (base + reloaded adapter vs the in-training model). It is not merged: merging into an NF4
base rounds the update into 4 bits and changes the model.

Every export also holds the tokenizer (with the chat template the run trained with: ``task=chat``'s, else Alpaca), the
generation config, the resolved training config (``training_config.yaml``), ``wct_export.json`` (method, base,
template, checks) and a model card ``README.md``: YAML front matter as model hubs read it (``base_model``,
``library_name``, ``license``, ``tags``, ``datasets``, ``pipeline_tag``), the base named portably (built-in name or
hub id, recipe, fingerprint; never a path of this machine), figures to 4 significant digits, the rows trained on
and dropped (``task.too_long``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from wct.data.chat import with_chat_template
from wct.errors import WCTError
from wct.io import atomic_dir
from wct.loading import EXPORT_META
from wct.models import ORIGINS
from wct.nn.modes import eval_mode
from wct.checkpoint import load_quantized, owq_layers, weak_by_type, write_quantized
from wct.quant.config import recipe_name
from wct.format.shards import payload_bytes, weights_bytes
from wct.runs import Trained, load_base_for_adapter, set_parameters, set_weak_columns, stored_dtypes

CHECK_TOKENS = 32  # tokens per row of the logits check batch


def check_batch(vocab_size: int, seed: int = 0) -> torch.Tensor:
    """The fixed token batch [2, CHECK_TOKENS] the exported and the in-training model are compared on."""
    return torch.randint(0, vocab_size, (2, CHECK_TOKENS), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with eval_mode(model):
        return model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits.float().cpu()


def calibration_text(calibration: dict | None) -> str:
    """One line for the model card: how the base's calibration windows were made (``quantization_config``)."""
    if not calibration:
        return "n/a"
    c = calibration
    return (f"{c.get('n_samples')} x {c.get('seqlen')} tokens of {portable(c.get('source'))} (seed {c.get('seed')}), "
            f"BOS {c.get('bos', 'never')}")


def bits_text(meta: dict) -> str:
    """The card's bits: the codes' width and, for an owq-pack export, the true bits per weight counting every FP16
    column (the recipe's weak ones and the ``tuning.k`` ones alike; docs/owq-pack.md §2.1)."""
    if "paper_bits" not in meta:
        return str(meta.get("bits", "full precision"))
    extra = f"; {meta['tuning_k']} of them per layer added for tuning (tuning.k)" if meta.get("tuning_k") else ""
    return (f"{meta['bits']}-bit codes; {meta['paper_bits']:.4f} bits per weight with the FP16 columns (paper "
            f"count), {meta['stored_bits']:.4f} stored{extra}")


def figure(value) -> str:
    """A number as the card shows it: integers with thousands separators, other numbers to 4 significant digits
    (a loss of 2.3456789 is 2.346; 15,780.4 tokens/s is 15,780); anything else as it is; None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int) or value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.0f}" if 1e4 <= abs(value) < 1e15 else f"{value:.4g}"


def portable(name: str | None) -> str | None:
    """``name`` without the machine's folders: a path becomes its last component (a file or folder name), a
    built-in name or hub id stays."""
    if not name:
        return name
    return Path(name).name if Path(name).is_absolute() or name.startswith(("~", ".")) else name


def base_identity(trained: Trained) -> dict:
    """The base named portably, for the card (no local paths): ``model`` (built-in name, hub id or folder name),
    ``hub`` (its hub repository, when known), ``license`` (the base's, when known; else ``other``), ``recipe``
    (the quantization recipe a WCT base was made with) and ``fingerprint`` (of the base's tensors)."""
    model = trained.config.get("model") or {}
    name = str(model.get("quantized") or model.get("name") or trained.base)
    hub, license = ORIGINS.get(name, (None, None))
    if name not in ORIGINS and name.count("/") == 1 and not name.startswith((".", "/", "~")) \
            and not Path(name).exists():
        hub = name  # a hub id
    q = trained.config.get("quant") or {}
    recipe = q.get("name") or (recipe_name(q["method"], q["bits"], q.get("target_bit"), q.get("target_rank"),
                                           q.get("group_size", -1), q.get("budget", "layer")) if "method" in q else None)
    return {"model": portable(name), "hub": hub, "license": license or "other",
            "recipe": recipe if trained.method == "wct" else None, "fingerprint": trained.fingerprint}


def datasets(config: dict) -> list[str]:
    """The training data named portably: a hub id or embedded set as ``task.data.source`` names it, a local file
    by its name."""
    data = (config.get("task") or {}).get("data") or {}
    name = data.get("path") or data.get("source")
    return [portable(str(name))] if name else []


def rows_text(rows: dict | None) -> str:
    """One line for the card: the rows trained on and what ``task.too_long`` left out or cut."""
    if not rows:
        return "n/a"
    text = (f"{rows['rows'] - rows['rows_dropped']:,} of {rows['rows']:,} used; {rows['rows_dropped']:,} dropped as "
            f"too long (task.too_long={rows['too_long']})")
    if rows.get("rows_prompt_truncated"):
        text += f", {rows['rows_prompt_truncated']:,} with their prompt cut from the left"
    if "rows_response_cut" in rows:
        text += f", {rows['rows_response_cut']:,} responses cut at task.max_length"
    return text


def front_matter(meta: dict) -> dict:
    """The YAML metadata model hubs read from a card (the Hugging Face model card conventions)."""
    base, method = meta["base_model"], meta["method"]
    tags = ["wct", *(["owq", "quantized", f"{meta.get('bits')}-bit"] if method == "wct" else
                     ["peft", method, *(["quantized", "4-bit", "nf4"] if method == "qlora" else [])])]
    return {"base_model": base["hub"] or base["model"], "library_name": "wct" if method == "wct" else "peft",
            "license": base["license"], "tags": tags, "datasets": meta.get("datasets") or [],
            "pipeline_tag": "text-generation"}


def model_card(meta: dict) -> str:
    """The export's ``README.md``: YAML front matter (:func:`front_matter`), then the run's facts, rounded
    (:func:`figure`), with no path of the machine that trained it."""
    rows = "\n".join(f"| {k} | {figure(v)} |" for k, v in meta["metrics"].items()) or "| (none recorded) | |"
    folder, base, m = meta["name"], meta["base_model"], meta["metrics"]
    usage = (
        f"import wct  # pip install wct; registers the owq quantizer with transformers\n"
        f"model, tok = wct.load_quantized('{folder}')  # this folder\n"
        f"# or, the same model bit for bit, through transformers (after `import wct`):\n"
        f"import torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained('{folder}', dtype=torch.float32)\n"
        f"tok = AutoTokenizer.from_pretrained('{folder}')\n"
        f"# without `import wct`, transformers refuses this folder (model type wct_owq)"
        if meta["method"] == "wct"
        else f"from wct.loading import load_adapter_export  # base {base['hub'] or base['model']} + this adapter\n"
        f"model, tok = load_adapter_export('{folder}')"
    )
    named = base["model"] + (f" ({base['hub']})" if base["hub"] and base["hub"] != base["model"] else "")
    recipe = f", quantized with the recipe {base['recipe']}" if base["recipe"] else ""
    loss = f"{figure(m.get('val/loss_before'))} → {figure(m.get('val/loss'))}; {figure(m.get('val/loss_best'))}"
    diff = meta["max_abs_diff"]
    return f"""---
{OmegaConf.to_yaml(OmegaConf.create(front_matter(meta))).strip()}
---

# {meta['name']}

Fine-tuned with **{meta['method']}** (wct) on the base `{named}`{recipe}.

| item | value |
| --- | --- |
| method | {meta['method']} |
| base | {named} |
| base recipe | {base['recipe'] or 'n/a'} |
| base fingerprint | {base['fingerprint'][:16] or 'n/a'} |
| license (of the base) | {base['license']} |
| bits | {bits_text(meta)} |
| weak columns per layer (by type) | {meta.get('weak_by_type', 'n/a')} |
| quantization calibration | {calibration_text(meta.get('calibration'))} |
| training data | {meta.get('training_data') or 'n/a'} |
| training rows | {rows_text(meta.get('data_rows'))} |
| training steps | {figure(m.get('steps'))} |
| held-out loss (val/loss: before training → at this checkpoint; best) | {loss} |
| trainable parameters | {meta['trainable_params']:,} |
| chat template | {meta['template']} |
| export check: max abs logit diff vs in-training model (stored dtype) | {figure(diff)}{' (bitwise equal)' if diff == 0 else ''} |
| max abs logit diff vs fp32 master weights (storage rounding) | {figure(meta.get('max_abs_diff_fp32_master'))} |

## Training metrics

| metric | value |
| --- | --- |
{rows}

## Use

```python
{usage}
```

Or: `python -m wct.generate model.name={folder} prompt="..."`. Training config: `training_config.yaml`.
"""


def export_meta(trained: Trained, out: Path, template: str) -> dict:
    """The ``wct_export.json`` fields every export has; each method adds its own. ``base`` and ``path`` are this
    machine's; ``base_model`` (:func:`base_identity`), ``training_data`` and ``datasets`` are portable (the card's)."""
    return {
        "name": out.name,
        "path": str(out.resolve()),
        "method": trained.method,
        "base": trained.base,
        "base_model": base_identity(trained),
        "trainable_params": sum(t.numel() for t in [*trained.trained.values(), *trained.extra.values()]),
        "template": template,
        "training_data": portable(trained.config.get("data_origin") or (trained.config.get("task") or {}).get("name")),
        "datasets": datasets(trained.config),
        "data_rows": trained.config.get("data_rows"),
        "metrics": trained.metrics,
    }


def _write_common(tmp: Path, trained: Trained, meta: dict) -> None:
    (tmp / "training_config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(trained.config)))
    (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    (tmp / "README.md").write_text(model_card(meta))


def export_wct(trained: Trained, out: Path, overwrite: bool = False) -> dict:
    """Write the merged owq-pack folder at ``out`` (module docstring; an earlier export there is replaced only
    with ``overwrite``, see ``wct.io.atomic_dir``); returns the export metadata."""
    if trained.base_dir is None:
        raise WCTError("this checkpoint names no owq-pack base folder; WCT export writes the trained columns into it")
    ids = check_batch(trained.model.config.vocab_size)
    fp32_master = logits(trained.model, ids)
    model, _ = load_quantized(trained.base_dir, dtype=next(trained.model.parameters()).dtype)
    set_weak_columns(model, trained.trained)  # cast to the base's stored dtype: what the file will hold
    stored = stored_dtypes(trained.base_dir, list(trained.extra))
    set_parameters(model, {n: t.to(stored[n]) for n, t in trained.extra.items()})  # norms / head, likewise
    reference = logits(model, ids)
    tokenizer, template = with_chat_template(trained.tokenizer, trained.config)
    layers = owq_layers(model)
    meta = export_meta(trained, out, template) | {
        "bits": model.config.quantization_config.get("bits"),
        **{k: model.config.quantization_config[k] for k in ("paper_bits", "stored_bits", "tuning_k")
           if k in model.config.quantization_config},  # the true bits, every FP16 column counted
        "calibration": model.config.quantization_config.get("calibration"),  # the base's (source, windows, bos)
        "trained_parameters": sorted(trained.extra),
        "weak_dtype": str(next(iter(layers.values())).weak_weight.dtype).removeprefix("torch."),
        "weak_by_type": weak_by_type({n: m.n_weak for n, m in layers.items()}),
        "max_abs_diff_fp32_master": (reference - fp32_master).abs().max().item(),
    }
    with atomic_dir(out, "export", overwrite, needs=weights_bytes(trained.base_dir)) as tmp:
        write_quantized(model, tokenizer, tmp)
        reloaded, _ = load_quantized(tmp, dtype=next(model.parameters()).dtype)
        diff = (logits(reloaded, ids) - reference).abs().max().item()
        if diff != 0:
            raise WCTError(f"the exported model's logits differ from the in-training model's by {diff:g} (must be 0); "
                           "nothing was written. Report this as a bug")
        meta["max_abs_diff"] = diff
        meta["bytes"], meta["base_bytes"] = weights_bytes(tmp), weights_bytes(trained.base_dir)
        ours, base = payload_bytes(tmp), payload_bytes(trained.base_dir)  # the base may be sharded (stream=true)
        if ours != base:
            raise WCTError(f"the export's weights hold {ours} bytes of tensors, the base's {base}; they "
                           "must hold the same tensors. Report this as a bug")
        _write_common(tmp, trained, meta)
    return meta


def export_delta(trained: Trained, out: Path, overwrite: bool = False) -> dict:
    """Write the weak-column delta of a WCT run at ``out`` (wct/delta.py); returns what was written.

    Before the file is renamed into place it is applied to a freshly loaded base, and every tensor the base then
    holds must equal the trained tensor rounded to the base's stored dtype, bit for bit."""
    from wct.delta import apply_delta, delta_tensors, packed_fingerprint, read_delta, write_delta

    if trained.base_dir is None:
        raise WCTError("format=delta is for WCT runs on an owq-pack base; a LoRA/QLoRA export is already an adapter "
                       "(use the default format)")
    if out.exists():
        if not overwrite:
            raise WCTError(f"{out} exists; choose another out=, or overwrite=true to replace an earlier delta")
        read_delta(out)  # only a wct delta is ever replaced
    base, _ = load_quantized(trained.base_dir, dtype=next(trained.model.parameters()).dtype)
    tensors = delta_tensors(base, trained.trained, trained.extra, stored_dtypes(trained.base_dir, list(trained.extra)))
    tmp = out.with_name(f".{out.name}.check")
    try:
        write_delta(tmp, tensors, packed_fingerprint(base), str(trained.base), trained.config, trained.metrics)
        apply_delta(base, tmp)
        own = dict(base.named_parameters())
        for name, t in tensors.items():
            if not torch.equal(own[name], t.to(own[name].dtype)):
                raise WCTError(f"the delta's {name} does not read back as written; nothing was written. Report this "
                               "as a bug")
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(out), "bytes": out.stat().st_size, "tensors": len(tensors),
            "trained_params": sum(t.numel() for t in tensors.values()),
            "base_bytes": weights_bytes(trained.base_dir)}


def export_adapter(trained: Trained, out: Path, overwrite: bool = False) -> dict:
    """Write the peft adapter folder at ``out`` (not merged: module docstring; ``overwrite`` as in
    :func:`export_wct`); returns the export metadata."""
    from peft import PeftModel

    model, ids = trained.model, check_batch(trained.model.config.vocab_size)
    reference = logits(model, ids)
    tokenizer, template = with_chat_template(trained.tokenizer, trained.config)
    meta = export_meta(trained, out, template) | {
        "bits": "nf4" if trained.method == "qlora" else None,
        "lora": {k: trained.config["method"][k] for k in ("r", "alpha", "dropout", "target_modules")},
    }
    with atomic_dir(out, "adapter", overwrite) as tmp:
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
