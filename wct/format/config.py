"""``quantization_config`` of an owq-pack v1 folder as a transformers ``QuantizationConfigMixin`` (docs/interop.md).

The JSON object under ``config.json["quantization_config"]`` (docs/owq-pack.md) is kept key for key: the layer
facts every loader needs (``quant_method="owq"``, ``format_version``, ``bits``, ``group_size``, per-layer
``n_weak``) and whatever recipe the quantizer recorded (``method``, ``target_bit``, ``paper_bits`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from transformers import PretrainedConfig
from transformers.utils.quantization_config import QuantizationConfigMixin

from wct.errors import WCTError
from wct.format.layout import FORMAT_VERSION, SUPPORTED_BITS

QUANT_METHOD = "owq"


def check_quantization_config(qc: Mapping | None, where: str) -> None:
    """Refuse a ``quantization_config`` this wct cannot load, naming ``where`` it came from and the fix."""
    qc = qc or {}
    if qc.get("quant_method") != QUANT_METHOD:
        raise WCTError(f"{where} is not an OWQ checkpoint (quant_method={qc.get('quant_method')!r}); "
                       "load a plain model with wct.models.load_model")
    if qc.get("format_version") != FORMAT_VERSION:
        raise WCTError(f"{where} uses owq-pack format_version={qc.get('format_version')!r}; this wct reads version "
                       f"{FORMAT_VERSION}. Upgrade wct or re-create the checkpoint")
    if not isinstance(qc.get("n_weak"), dict) or qc.get("bits") not in SUPPORTED_BITS:
        raise WCTError(f"{where}: quantization_config lacks valid bits / n_weak; re-create the checkpoint")


class OWQConfig(QuantizationConfigMixin):
    """The owq-pack v1 ``quantization_config``; also readable like the plain dict wct used before
    (``qc["bits"]``, ``qc.get("target_bit")``, ``dict(qc)``)."""

    def __init__(
        self,
        bits: int = 4,
        group_size: int = -1,
        n_weak: dict[str, int] | None = None,
        format_version: int = FORMAT_VERSION,
        **recipe: Any,
    ) -> None:
        recipe.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format_version, self.bits, self.group_size = format_version, bits, group_size
        self.n_weak = dict(n_weak or {})
        self.__dict__.update(recipe)

    def __getitem__(self, key: str) -> Any:
        try:
            return self.__dict__[key]
        except KeyError:
            raise KeyError(key) from None

    def __setitem__(self, key: str, value: Any) -> None:
        self.__dict__[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self.__dict__

    def get(self, key: str, default: Any = None) -> Any:
        return self.__dict__.get(key, default)

    def keys(self):
        return self.__dict__.keys()


# ------------------------------------------------------------------ config.json guard (docs/interop.md, "without wct")

GUARD_MODEL_TYPE = "wct_owq"
BASE_MODEL_TYPE = "wct_base_model_type"


def guard_config(config: dict) -> dict:
    """``config.json`` of an owq-pack folder: ``model_type`` becomes ``wct_owq`` (the real one moves to
    ``wct_base_model_type``), so transformers without wct refuses the folder, naming the model type, instead of
    building plain linears and initializing them randomly."""
    config = dict(config)
    if config.get("model_type") != GUARD_MODEL_TYPE:
        config[BASE_MODEL_TYPE] = config.get("model_type")
    config["model_type"] = GUARD_MODEL_TYPE
    return config


def unguard_config(config: dict) -> dict:
    """The inverse of :func:`guard_config`: ``model_type`` back to the base architecture's (a config without the
    guard is returned as it is)."""
    config = dict(config)
    if config.get("model_type") == GUARD_MODEL_TYPE:
        config["model_type"] = config.pop(BASE_MODEL_TYPE, None)
    return config


class GuardedConfig(PretrainedConfig):
    """Registered for ``model_type="wct_owq"``: reading such a config gives the base architecture's own config
    (e.g. ``LlamaConfig``), so the model is the architecture's usual class with OWQLinear layers."""

    model_type = GUARD_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs: Any):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        config_dict = unguard_config({**config_dict, "model_type": GUARD_MODEL_TYPE})
        base = config_dict["model_type"]
        if base not in CONFIG_MAPPING:
            raise WCTError(f"config.json has model_type={GUARD_MODEL_TYPE!r} but its {BASE_MODEL_TYPE}={base!r} is "
                           "not an architecture this transformers knows; re-create the checkpoint or upgrade transformers")
        return CONFIG_MAPPING[base].from_dict(config_dict, **kwargs)
