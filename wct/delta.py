"""Weak-column deltas: a fine-tune shared as the few MB it trained, on top of a packed base (docs/interop.md).

A delta is one safetensors file holding only the trained tensors of a WCT run, each in the dtype the base stores
it in: ``<layer>.weak_weight`` [n_o, N] (fp16) for every layer with weak columns, and the norms / output head by
parameter name when the run trained them. Its metadata (all strings) holds ``format="wct-delta"``,
``delta_version``, ``base_fingerprint`` (:func:`packed_fingerprint` of the base), ``base`` (the base folder the
run used), ``training_config`` and ``metrics`` (JSON).

:func:`apply_delta` writes a delta into a loaded base in place (``wct.load_quantized(base)`` or
``AutoModelForCausalLM.from_pretrained(base)`` after ``import wct``); the result is bitwise the merged export.
Deltas swap in place: the base values of norms / head a delta overwrote are kept and restored before the next
delta is applied, and every delta replaces every weak column.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from wct.errors import WCTError
from wct.format.shards import safetensors_header
from wct.io import atomic_file
from wct.nn.owq_linear import OWQLinear

FORMAT = "wct-delta"
VERSION = "1"
WEAK = ".weak_weight"

# model -> {parameter name: base value} of the norms / head the applied delta overwrote
_base_values: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, torch.Tensor]]" = weakref.WeakKeyDictionary()


def owq_layers(model: torch.nn.Module) -> dict[str, OWQLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, OWQLinear)}


def packed_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the frozen packed tensors of every OWQLinear (planes, scales, zeros, weak_idx, bias: name,
    dtype, shape, bytes) and the weak columns' shapes. It identifies the quantized base whatever ``dtype`` the
    rest of the model was loaded in and whichever delta is applied (weak columns, norms and head are left out)."""
    h = hashlib.sha256()
    for name, layer in owq_layers(model).items():
        for key, t in layer.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{name}.{key}|{t.dtype}|{tuple(t.shape)}".encode())
            if key != WEAK.lstrip(".") and t.numel():
                h.update(t.view(torch.uint8).numpy().data)
    return h.hexdigest()


def delta_tensors(model: torch.nn.Module, weak: dict[str, torch.Tensor], params: dict[str, torch.Tensor],
                  stored: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """The tensors of a delta for base ``model``: trained weak columns {layer: [n_o, N]} in each layer's dtype,
    trained parameters {name: tensor} in ``stored[name]`` (the dtype the base file holds them in)."""
    layers = owq_layers(model)
    out = {f"{n}{WEAK}": w.detach().to(layers[n].weak_weight.dtype).contiguous().cpu()
           for n, w in weak.items() if layers[n].n_weak}
    out.update({n: t.detach().to(stored[n]).contiguous().cpu() for n, t in params.items()})
    return out


def write_delta(path: str | os.PathLike, tensors: dict[str, torch.Tensor], base_fingerprint: str, base: str,
                training_config: dict, metrics: dict[str, Any]) -> Path:
    """Write a delta file atomically (module docstring); returns its path."""
    meta = {"format": FORMAT, "delta_version": VERSION, "base_fingerprint": base_fingerprint, "base": base,
            "training_config": json.dumps(training_config, sort_keys=True, default=str),
            "metrics": json.dumps(metrics, sort_keys=True, default=str)}
    with atomic_file(path) as fh:
        fh.write(save(tensors, metadata=meta))
    return Path(path)


def read_delta(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a delta file; anything else (missing, truncated, another kind of file) is refused."""
    path = Path(path)
    if not path.is_file():
        raise WCTError(f"delta {path} does not exist; pass the .safetensors written by python -m wct.export "
                       "ckpt_path=... format=delta")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise WCTError(f"delta {path} is truncated or corrupt ({e}); export it again") from None
    check_format(path, meta)
    return tensors, meta


def check_format(path: Path, meta: dict[str, str]) -> None:
    """WCTError unless the metadata ``meta`` of the file at ``path`` is a delta's of the version this wct reads."""
    if meta.get("format") != FORMAT or meta.get("delta_version") != VERSION:
        raise WCTError(f"{path} is not a wct delta (format={meta.get('format')!r}, delta_version="
                       f"{meta.get('delta_version')!r}; this wct reads {FORMAT} version {VERSION})")


def read_delta_header(path: str | os.PathLike) -> tuple[dict[str, dict[str, Any]], dict[str, str], int]:
    """(entries, metadata, data start) of a delta file, reading only its safetensors header: ``entries`` maps each
    tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (bytes from the data start), so a reader can
    put each tensor's bytes where it wants them (wct.serving.bank). Refused like :func:`read_delta` when the file is
    missing, not a delta, or shorter than its header says."""
    path = Path(path)
    if not path.is_file():
        raise WCTError(f"delta {path} does not exist; pass the .safetensors written by python -m wct.export "
                       "ckpt_path=... format=delta")
    found = safetensors_header(path)
    if found is None:
        raise WCTError(f"delta {path} is truncated or corrupt (no safetensors header); export it again")
    start, header = found
    meta = header.pop("__metadata__", None) or {}
    check_format(path, meta)
    size = path.stat().st_size - start
    if any(not isinstance(e, dict) or e.get("data_offsets", [0, size + 1])[1] > size for e in header.values()):
        raise WCTError(f"delta {path} is truncated or corrupt (its header describes more bytes than it holds); "
                       "export it again")
    return header, meta, start


def check_fits(model: torch.nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> dict[str, torch.nn.Parameter]:
    """The parameters of ``model`` the delta writes, once every tensor has been checked against them."""
    layers, params = owq_layers(model), dict(model.named_parameters())
    weak = {n.removesuffix(WEAK) for n in tensors if n.endswith(WEAK) and n.removesuffix(WEAK) in layers}
    missing = sorted(n for n, m in layers.items() if m.n_weak and n not in weak)
    unknown = sorted(n for n in tensors if n not in params)
    if missing or unknown:
        raise WCTError(f"delta {path} does not fit this base (weak columns missing for {missing[:3]}, unknown tensors "
                       f"{unknown[:3]}); apply it to the base it was exported from")
    for n, t in tensors.items():
        if t.shape != params[n].shape:
            raise WCTError(f"delta {path}: {n} has shape {tuple(t.shape)}, the base's is {tuple(params[n].shape)}; "
                           "apply it to the base it was exported from")
    return {n: params[n] for n in tensors}


@torch.no_grad()
def apply_delta(model: torch.nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Write the delta at ``path`` into ``model`` in place (module docstring); returns the delta's metadata.

    Refused, with the model untouched, when the delta was exported for another base (fingerprint), is truncated,
    or its tensors disagree with the base's weak columns."""
    path = Path(path)
    tensors, meta = read_delta(path)
    found = packed_fingerprint(model)
    if found != meta.get("base_fingerprint"):
        raise WCTError(f"delta {path} was exported for another base (base {meta.get('base')!r}, fingerprint "
                       f"{str(meta.get('base_fingerprint'))[:12]} vs this model's {found[:12]}); load that base")
    targets = check_fits(model, tensors, path)
    own = dict(model.named_parameters())
    saved = _base_values.setdefault(model, {})
    for name in list(saved):  # undo the previous delta's norms / head
        own[name].copy_(saved.pop(name))
    for name, t in tensors.items():
        if not name.endswith(WEAK):
            saved[name] = targets[name].detach().clone()
        targets[name].copy_(t)
    return meta

