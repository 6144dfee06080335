"""transformers integration: after ``import wct``, ``AutoModelForCausalLM.from_pretrained(owq_folder)`` builds the
OWQ model on the meta device and loads the packed tensors (docs/interop.md).

:func:`register` adds ``quant_method="owq"`` through transformers' public API (``register_quantization_config``,
``register_quantizer``); ``import wct`` calls it. :func:`load_packed` is wct's own loader on top of it.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from wct.errors import WCTError
from wct.format.config import GUARD_MODEL_TYPE, QUANT_METHOD, GuardedConfig, OWQConfig


def register() -> None:
    """Register the owq config and quantizer, and the ``wct_owq`` model type of the folders' config.json guard
    (:func:`wct.format.config.guard_config`), with transformers (idempotent)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.quantizers.auto import (
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    from wct.hf.quantizer import OWQHfQuantizer

    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(OWQConfig)
        register_quantizer(QUANT_METHOD)(OWQHfQuantizer)
    if GUARD_MODEL_TYPE not in CONFIG_MAPPING:
        AutoConfig.register(GUARD_MODEL_TYPE, GuardedConfig)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def load_packed(path: str | os.PathLike, dtype: torch.dtype | None, device: torch.device | str | None = None):
    """The model of an owq-pack v1 folder through ``from_pretrained`` (meta device, packed tensors loaded as
    stored). ``dtype`` casts the unquantized floating tensors (None: the config's ``dtype``); any tensor the
    file lacks or has in excess is an error rather than a random initialization."""
    from transformers import AutoModelForCausalLM

    register()
    kwargs = {dtype_kwarg(): dtype if dtype is not None else "auto"}
    if device is not None:
        kwargs["device_map"] = str(torch.device(device))
    with _no_progress_bar():
        try:
            model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
        except RuntimeError as e:  # transformers' report of tensors whose shapes disagree with the config
            raise WCTError(f"{path} does not fit its own config ({str(e).strip().splitlines()[-1]}); the checkpoint "
                           "is corrupt or belongs to another model") from None
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    mismatched = sorted(str(m[0]) for m in info.get("mismatched_keys", ()))
    if missing or unexpected or mismatched:
        raise WCTError(f"{path} does not match its model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                       f"mismatched {mismatched[:5]}; the checkpoint is corrupt or belongs to another model")
    model.config.quantization_config = model.config.quantization_config.to_dict()  # the plain dict wct records
    return model.eval()


__all__ = ["OWQConfig", "QUANT_METHOD", "load_packed", "register"]
