"""The transformers ``HfQuantizer`` of ``quant_method="owq"``: ``from_pretrained`` on an owq-pack v1 folder.

Before any weight is read, every linear that ``quantization_config.n_weak`` names is replaced, on the meta device,
by an :class:`~wct.nn.owq_linear.OWQLinear` whose tensors have the shapes and dtypes of the file's own tensors
(read from the safetensors header only). transformers then streams the stored planes, scales, zeros, indices,
weak columns and biases straight into those modules: no dense copy of a quantized weight is ever made, and the
OWQ tensors keep their stored dtypes whatever ``dtype=`` asks for the rest of the model (docs/interop.md).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers.quantizers.base import HfQuantizer

from wct.errors import WCTError
from wct.format.config import OWQConfig, check_quantization_config
from wct.nn.owq_linear import OWQLinear
from wct.format.shards import SAFETENSORS_DTYPES, weight_map


Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a local checkpoint folder (one file, or the shards its index names), each checked
    to hold what the index places in it (:func:`wct.format.shards.weight_map`)."""
    return sorted(set(weight_map(Path(folder)).values()))


def read_header(files: list[str | os.PathLike]) -> Header:
    """Name → (shape, dtype) of every tensor in ``files``, from the safetensors headers only."""
    header: Header = {}
    for file in map(Path, files):
        if not file.is_file():
            raise WCTError(f"{file} is missing; the checkpoint is incomplete, re-create it")
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    s = f.get_slice(name)
                    header[name] = (tuple(s.get_shape()), SAFETENSORS_DTYPES[s.get_dtype()])
        except (SafetensorError, OSError, KeyError) as e:
            raise WCTError(f"{file} is corrupt ({e}); re-create the checkpoint") from None
    return header


def meta_owq_layer(name: str, linear: nn.Module | None, bits: int, n_weak: int, header: Header) -> OWQLinear:
    """An OWQLinear on the meta device replacing ``linear`` (module ``name``), every tensor shaped and typed as
    the file stores it; a layer the file lacks tensors for, or whose shapes disagree, is refused."""
    scales = header.get(f"{name}.scales")
    if not isinstance(linear, nn.Linear) or scales is None or len(scales[0]) != 2 or linear.in_features % scales[0][0]:
        raise WCTError(f"quantized layer {name} is missing from the model or has no valid scales in the checkpoint; "
                       "the checkpoint is corrupt or belongs to another model")
    layer = OWQLinear(linear.in_features, linear.out_features, bits, linear.in_features // scales[0][0], n_weak,
                      bias=f"{name}.bias" in header, device="meta")
    for key, t in layer.state_dict().items():
        stored = header.get(f"{name}.{key}")
        if stored is None or stored[0] != tuple(t.shape):
            raise WCTError(f"the checkpoint's {name}.{key} is {'missing' if stored is None else stored[0]} where "
                           f"its config needs shape {tuple(t.shape)}; the checkpoint is corrupt, re-create it")
        layer.set_tensor(key, torch.empty(stored[0], dtype=stored[1], device="meta"))
    return layer


def replace_with_owq(model: nn.Module, qc: OWQConfig, header: Header) -> None:
    """Swap in :func:`meta_owq_layer` for every layer ``qc.n_weak`` names."""
    for name, n_weak in qc.n_weak.items():
        parent, _, leaf = name.rpartition(".")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        layer = meta_owq_layer(name, linear, qc.bits, n_weak, header)
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)


class OWQHfQuantizer(HfQuantizer):
    """Loads pre-quantized owq-pack v1 folders; the weak columns stay trainable and the model saves back to
    owq-pack v1 with ``save_pretrained``."""

    requires_calibration = True  # wct quantizes (python -m wct.quantize); transformers only loads
    quantization_config: OWQConfig

    def validate_environment(self, *args, **kwargs) -> None:
        check_quantization_config(self.quantization_config, "this model's config.json")

    def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
        if not checkpoint_files:  # transformers 4.x does not pass them: the model was read from a local folder
            checkpoint_files = weight_files(model.config._name_or_path)
        self._files, self._header = list(checkpoint_files), read_header(checkpoint_files)
        replace_with_owq(model, self.quantization_config, self._header)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        """transformers 4.x casts every floating tensor of a quantized model to the model's dtype while loading;
        the OWQ tensors it cast are read again, as stored (a no-op on 5.x, which loads them as stored)."""
        cast = {f"{n}.{k}" for n in self.quantization_config.n_weak
                for k, t in model.get_submodule(n).state_dict().items() if t.dtype != self._header[f"{n}.{k}"][1]}
        for file in self._files:
            with safe_open(str(file), framework="pt") as f:
                for key in cast.intersection(f.keys()):
                    module_name, _, leaf = key.rpartition(".")
                    module, stored = model.get_submodule(module_name), f.get_tensor(key)
                    module.set_tensor(leaf, stored.to(getattr(module, leaf).device))
        return model

    def is_serializable(self, safe_serialization: bool | None = None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True
