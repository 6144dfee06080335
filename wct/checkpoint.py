"""owq-pack v1 checkpoint folders, and the importer of checkpoints saved by the reference OWQ code.

A checkpoint folder holds ``model.safetensors`` (every tensor of the model once: OWQLinear planes, scales, zeros,
weak_idx, weak_weight, bias, plus the unquantized embeddings, norms and head), ``config.json`` (the Hugging Face
config with ``quantization_config``, see :func:`describe_quantization`), the tokenizer files and
``generation_config.json``. Only safetensors is ever read from it.

Unquantized floating tensors are stored in fp16 when that is lossless (a model loaded from an fp16 checkpoint),
otherwise in their own dtype, so a reload is always bit-exact. OWQLinear tensors keep their own dtypes.
"""

from __future__ import annotations

import json
import os
import pickle
import types
from pathlib import Path

import torch
from torch import nn

from wct.device import as_dtype
from wct.heap import release_freed_memory
from wct.errors import WCTError
from wct.format.config import QUANT_METHOD, check_quantization_config, guard_config
from wct.format.layout import FORMAT_VERSION, pack_codes, stored_bits
from wct.format.reference import unpack_reference_codes
from wct.format.shards import ShardWriter
from wct.io import atomic_dir
from wct.models import load_model
from wct.nn.owq_linear import OWQLinear

WEIGHTS = "model.safetensors"
SAFETENSORS_META = {"format": "pt", "owq_format_version": str(FORMAT_VERSION)}


def owq_layers(model: nn.Module) -> dict[str, OWQLinear]:
    """Every OWQLinear of ``model`` by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, OWQLinear)}


def bit_summary(layers: dict[str, OWQLinear]) -> dict[str, float]:
    """Bits per weight of the quantized linears (docs/owq-pack.md §2.1).

    ``paper_bits`` = b + (16 − b) · (FP16 weak weights / weights); ``stored_bits`` = what the packed tensors cost
    (codes incl. weak placeholders and K padding, scales, zeros, indices, FP16 weak columns) per weight;
    ``weak_fraction`` = FP16 weak weights / weights; ``low_bit_fraction`` = 1 − weak_fraction.
    """
    weights = sum(m.in_features * m.out_features for m in layers.values())
    if not weights:
        return {"paper_bits": 16.0, "stored_bits": 16.0, "weak_fraction": 1.0, "low_bit_fraction": 0.0}
    weak = sum(m.n_weak * m.out_features for m in layers.values())
    stored = sum(
        stored_bits(m.out_features, m.in_features, m.bits, m.scales.shape[0], m.n_weak) * m.in_features * m.out_features
        for m in layers.values()
    )
    bits = next(iter(layers.values())).bits
    return {
        "paper_bits": bits + (16 - bits) * weak / weights,
        "stored_bits": stored / weights,
        "weak_fraction": weak / weights,
        "low_bit_fraction": 1 - weak / weights,
    }


def weak_by_type(n_weak: dict[str, int]) -> dict[str, list[int]]:
    """The distinct weak-column counts of each layer type (the last name component), in first-seen order."""
    out: dict[str, set[int]] = {}
    for name, n in n_weak.items():
        out.setdefault(name.rsplit(".", 1)[-1], set()).add(n)
    return {t: sorted(v) for t, v in out.items()}


def describe_quantization(model: nn.Module, recipe: dict | None = None) -> dict:
    """``config.json["quantization_config"]`` of ``model``, the one place it is composed: ``recipe`` (default: what
    ``model.config.quantization_config`` holds, kept as is) with the layer facts read from the modules themselves
    (quant_method, format_version, bits, group_size (-1 = per row), per-layer n_weak) and :func:`bit_summary`."""
    layers = owq_layers(model)
    if not layers:
        raise WCTError("the model has no OWQLinear layers; quantize it first (wct.quantize_model)")
    bits = {m.bits for m in layers.values()}
    groups = {m.group_size for m in layers.values() if m.group_size < m.in_features}  # layers with > 1 group
    if len(bits) > 1 or len(groups) > 1:
        raise WCTError(f"owq-pack v1 stores one bits and group size per checkpoint; the model mixes bits {bits} "
                       f"and group sizes {groups}")
    bits, group_size = bits.pop(), groups.pop() if groups else -1
    meta = dict(recipe if recipe is not None else getattr(model.config, "quantization_config", None) or {})
    meta.update(
        quant_method=QUANT_METHOD,
        format_version=FORMAT_VERSION,
        bits=bits,
        group_size=group_size,
        n_weak={name: m.n_weak for name, m in layers.items()},
        **bit_summary(layers),
    )
    meta.setdefault("sym", False)
    return meta


def _described(model: nn.Module) -> bool:
    """Whether ``model.config.quantization_config`` already describes the model's OWQ layers (set by
    :func:`describe_quantization` through quantize_model or by a load), so saving can reuse it."""
    qc = getattr(model.config, "quantization_config", None) or {}
    layers = owq_layers(model)
    return (qc.get("quant_method") == QUANT_METHOD and "stored_bits" in qc and bool(layers)
            and qc.get("n_weak") == {n: m.n_weak for n, m in layers.items()}
            and {qc.get("bits")} == {m.bits for m in layers.values()})


def _tensor_key(t: torch.Tensor) -> tuple | None:
    return None if t.numel() == 0 else (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _unique_state(model: nn.Module, skip: str | None = None) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The state dict with tied tensors kept once (first name wins), and the names of the dropped duplicates;
    names starting with ``skip`` (e.g. the decoder blocks' prefix) are left out."""
    seen, state, tied = set(), {}, set()
    for name, t in model.state_dict().items():
        if skip is not None and name.startswith(skip):
            continue
        key = _tensor_key(t)
        if key is not None and key in seen:
            tied.add(name)
            continue
        seen.add(key)
        state[name] = t
    return state, tied


def _storage_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` if that round-trips exactly, else ``t`` unchanged."""
    if not t.is_floating_point() or t.dtype == dtype:
        return t
    c = t.to(dtype)
    return c if torch.equal(c.to(t.dtype), t) else t


def storage_form(t: torch.Tensor, owq: bool, dtype: torch.dtype) -> torch.Tensor:
    """A tensor as the checkpoint stores it: OWQLinear tensors as they are, others in ``dtype`` when lossless."""
    return (t if owq else _storage_dtype(t, dtype)).detach().cpu().contiguous()


def packed_config(model: nn.Module, float_dtypes: set[torch.dtype]) -> dict:
    """``config.json`` of a packed checkpoint: the model's config with ``quantization_config``
    (:func:`describe_quantization`, reused when it is current), and ``dtype`` the one storage dtype of its
    unquantized floating tensors (fp32 when they mix)."""
    config = model.config.to_dict()
    config["quantization_config"] = dict(model.config.quantization_config if _described(model) else
                                         describe_quantization(model))
    config["dtype"] = str(next(iter(float_dtypes)) if len(float_dtypes) == 1 else torch.float32).removeprefix("torch.")
    return guard_config(config)


def write_side_files(model: nn.Module, tokenizer, folder: Path, config: dict) -> None:
    """config.json, generation_config.json and the tokenizer files of a checkpoint folder."""
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_quantized(model: nn.Module, tokenizer, path: str | os.PathLike, dtype: torch.dtype = torch.float16,
                   overwrite: bool = False, max_shard_bytes: int | None = None) -> Path:
    """Write an owq-pack v1 folder at ``path`` atomically (complete under its final name or absent). An existing
    ``path`` is refused unless it is an earlier ``save_quantized`` output and ``overwrite`` (``wct.io.atomic_dir``).

    ``dtype``: storage dtype of unquantized floating tensors wherever it is lossless (module docstring). The
    written file is read back and compared tensor by tensor before the folder is renamed into place.
    ``max_shard_bytes``: cut the weights into ``model-0000x-of-0000y.safetensors`` shards of at most this size
    with an index, as transformers does (None: one ``model.safetensors``).
    """
    with atomic_dir(path, "quantized", overwrite) as tmp:
        write_quantized(model, tokenizer, tmp, dtype, max_shard_bytes)
    return Path(path)


def write_quantized(model: nn.Module, tokenizer, folder: Path, dtype: torch.dtype = torch.float16,
                    max_shard_bytes: int | None = None) -> None:
    """The files of :func:`save_quantized` written into the existing (temporary) folder ``folder``."""
    owq_prefixes = tuple(f"{name}." for name in owq_layers(model))
    state, _ = _unique_state(model)
    tensors = {name: storage_form(t, name.startswith(owq_prefixes), dtype) for name, t in state.items()}
    floats = {t.dtype for n, t in tensors.items() if t.is_floating_point() and not n.startswith(owq_prefixes)}
    config = packed_config(model, floats)  # refuses a model without OWQ layers before anything is written
    writer = ShardWriter(folder, max_shard_bytes or 2**62, SAFETENSORS_META)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.close()
    write_side_files(model, tokenizer, folder, config)


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise WCTError(f"quantized checkpoint {path} does not exist or is not a folder; pass the folder written by "
                       "save_quantized / python -m wct.quantize")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise WCTError(f"{path} has no config.json; it is not an owq-pack checkpoint folder") from None
    except json.JSONDecodeError as e:
        raise WCTError(f"{path / 'config.json'} is corrupt ({e}); re-create the checkpoint") from None
    check_quantization_config(config.get("quantization_config"), str(path))
    return config


def _load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Load every tensor of the model (tied duplicates excepted) by assignment; anything else is an error."""
    _, tied = _unique_state(model)
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise WCTError(f"{source} does not fit its own config ({str(e).splitlines()[-1].strip()}); "
                       "the checkpoint is corrupt or belongs to another model") from None
    missing = sorted(set(missing) - tied)
    if missing or unexpected:
        raise WCTError(f"{source} does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                       "the checkpoint is corrupt or belongs to another model")
    model.tie_weights()


def load_quantized(
    path: str | os.PathLike,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str | None = None,
    delta: str | os.PathLike | None = None,
):
    """``(model, tokenizer)`` from an owq-pack v1 folder; ``dtype`` casts the unquantized floating tensors
    (None keeps the dtype the config records), OWQLinear tensors keep their stored dtypes. Reloads are bit-exact.
    ``delta``: a weak-column delta of this base to apply (:func:`wct.delta.apply_delta`).

    The model comes from :func:`wct.hf.load_packed`, i.e. transformers' ``from_pretrained`` with the owq quantizer:
    OWQLinear modules built on the meta device, packed tensors read straight into them (docs/interop.md)."""
    from transformers import AutoTokenizer

    from wct.hf import load_packed
    from wct.hf.quantizer import read_header, weight_files

    path = Path(path)
    _read_config(path)
    read_header(weight_files(path))  # a missing or corrupt file is named before transformers reads it
    model = load_packed(path, as_dtype(dtype), device)
    if not (path / "tokenizer_config.json").is_file():
        raise WCTError(f"{path} has no tokenizer files (tokenizer_config.json); copy the base model's tokenizer into "
                       "it (AutoTokenizer.from_pretrained(BASE).save_pretrained(FOLDER)) or re-export the run")
    if delta is not None:
        from wct.delta import apply_delta

        apply_delta(model, delta)
    from wct.kernels import hold_kernel_layouts

    hold_kernel_layouts(model)  # 3-bit layers in the layout their backend reads (on a GPU the kernel words)
    tokenizer = AutoTokenizer.from_pretrained(path)
    release_freed_memory()  # loading leaves ~30 MiB of freed heap (the tokenizer's); docs/kernels.md "Decode loop"
    return model, tokenizer


# --------------------------------------------------------------------------- reference OWQ checkpoints (docs/owq-pack.md §2.2)


def _reference_layer(sd: dict, name: str, linear: nn.Module, bits: int, source: Path) -> OWQLinear:
    """One reference QuantLinear's buffers -> OWQLinear (owq-pack v1); shape mismatches name the other model."""
    k, n = linear.in_features, linear.out_features
    qweight, scales, zeros = sd[f"{name}.qweight"], sd[f"{name}.scales"], sd[f"{name}.zeros"]
    idx, weak = sd[f"{name}.outlieridx"].to(torch.int64), sd[f"{name}.oweight"]
    n_o = idx.numel()
    if weak.shape == (n, n_o) and n != n_o:  # old checkpoints store oweight as (out, n_out)
        weak = weak.t()
    expected = {"qweight": (k // 32 * bits, n), "scales": (n, 1), "zeros": (n // 2, 1), "oweight": (n_o, n)}
    got = {"qweight": tuple(qweight.shape), "scales": tuple(scales.shape), "zeros": tuple(zeros.shape),
           "oweight": tuple(weak.shape)}
    if k % 32 or got != expected:
        raise WCTError(f"{source}: layer {name} has shapes {got} but the target model needs {expected} "
                       f"(in={k}, out={n}); this is a checkpoint of another model, pass its base model")
    order = idx.argsort()  # June-2023 checkpoints list the weak columns in sensitivity order
    z = torch.stack([zeros[:, 0] & 0xF, zeros[:, 0] >> 4], dim=1).reshape(n)
    packed = pack_codes(unpack_reference_codes(qweight, bits, k), bits)
    packed.update(
        scales=scales.reshape(1, n),
        zeros=z.reshape(1, n).to(torch.uint8),
        weak_idx=idx[order].to(torch.int32),
        weak_weight=weak[order].contiguous(),
    )
    bias = sd.get(f"{name}.bias")
    if bias is not None and (linear.bias is not None or bool(bias.any())):
        packed["bias"] = bias
    return OWQLinear.from_packed(packed, bits, k)


def import_reference(path: str | os.PathLike, base: str, dtype: torch.dtype | str | None = torch.float32):
    """``(model, tokenizer)`` from a packed checkpoint of the reference OWQ code (``--save X.pth --packing``).

    ``base`` is what :func:`wct.models.load_model` accepts, naming the model that was quantized (it provides
    the architecture and tokenizer). The file is read with ``torch.load(weights_only=True)``: tensors, dicts and
    ``SimpleNamespace(n_out=...)`` only. Save the result with :func:`save_quantized` to get owq-pack v1.
    """
    path = Path(path)
    if not path.is_file():
        raise WCTError(f"reference OWQ checkpoint {path} not found; pass the .pth written by its main.py --save")
    try:
        with torch.serialization.safe_globals([types.SimpleNamespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise WCTError(f"{path} is not a readable reference OWQ checkpoint ({str(e).splitlines()[0]}); "
                       "only files of tensors and plain containers are loaded") from None
    if not isinstance(ckpt, dict) or "model_state_dict" not in ckpt:
        raise WCTError(f"{path} has no model_state_dict; it is not a checkpoint of the reference OWQ code")
    if not ckpt.get("packing", False):
        raise WCTError(f"{path} is a fake-quantized (--fake) checkpoint; re-save it with --packing, or load its "
                       "model_state_dict as plain weights and quantize with wct")
    bits = int(ckpt["bits"])
    if bits not in (3, 4):
        raise WCTError(f"{path} has bits={bits}; reference packed checkpoints are 3- or 4-bit")
    model, tok = load_model(base, dtype=dtype)
    sd = dict(ckpt["model_state_dict"])
    names = [key.removesuffix(".qweight") for key in sd if key.endswith(".qweight")]
    for name in names:
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise WCTError(f"{path}: layer {name} does not exist in {base}; this is a checkpoint of another model"
                           ) from None
        model.set_submodule(name, _reference_layer(sd, name, linear, bits, path))
        for buf in ("qweight", "scales", "zeros", "bias", "oweight", "outlieridx"):
            sd.pop(f"{name}.{buf}", None)
    dtype = as_dtype(dtype)
    rest = {key: t.to(dtype) if dtype is not None and t.is_floating_point() else t for key, t in sd.items()}
    rest.update({f"{name}.{k}": v for name, m in owq_layers(model).items() for k, v in m.state_dict().items()})
    _load_state(model, rest, path)
    model.config.quantization_config = describe_quantization(
        model, {"method": "owq", "sym": False, "imported_from": f"reference OWQ checkpoint {path.name}"})
    return model.eval(), tok
