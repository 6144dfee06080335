"""Hydra structured configs: typed schemas of the config groups, registered in Hydra's ConfigStore.

Each group has a dataclass schema (``model``, ``calib``, ``eval``, ``paths``; ``quant`` is
:class:`wct.quant.config.QuantConfig`). The primary configs ``conf/quantize.yaml`` and ``conf/evaluate.yaml``
start their defaults list with ``quantize_schema`` / ``evaluate_schema``, so an unknown key or a value of the wrong
type fails at composition, naming the key. Other entry points (``train``) build their own app schema from these
group dataclasses and call :func:`register`.

Value checks that types cannot express (bits=5, target_bit below bits, ...) run when the entry point builds
``QuantConfig(**cfg.quant)``: one WCTError before anything is written.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from wct.errors import WCTError
from wct.quant.config import QuantConfig

_PACKAGE = Path(__file__).resolve().parent
# a checkout (or editable install) reads the top-level conf/; a wheel ships it as wct/conf
CONF_DIR = str(_PACKAGE / "conf" if (_PACKAGE / "conf" / "quantize.yaml").is_file() else _PACKAGE.parent / "conf")
REPO_ROOT = str(_PACKAGE.parent)


@dataclass
class ModelConfig:
    """The base model: a built-in name (smollm2-135m, tiny-llama), a local folder, a .gguf file or a hub id."""

    name: str = "smollm2-135m"
    dtype: str = "float32"  # compute dtype of unquantized tensors (fp32 or bf16 on CPU; never fp16 there)
    quantized: Optional[str] = None  # an owq-pack checkpoint folder to use instead of quantizing ``name``


@dataclass
class CalibConfig:
    """Calibration windows (owq-spec §1.2): ``source`` is wikitext2 / ptb / c4 or a local text file or folder."""

    source: str = "c4"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    fallback: str = "error"  # a local ``source`` that is missing: "error", or "task" (training: the task's text)


@dataclass
class EvalConfig:
    """Perplexity (owq-spec §1.10) on each corpus: a corpus name or a local text file or folder."""

    corpora: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seqlen: int = 2048
    max_windows: Optional[int] = None  # only the first windows of each corpus (None: all)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    quantized_dir: str = "outputs/quantized"
    run_dir: str = "."


def quant_schema() -> QuantConfig:
    """QuantConfig defaults with an empty ``name`` (filled from the final fields by :func:`quant_config`)."""
    q = QuantConfig()
    q.name = ""
    return q


@dataclass
class QuantizeApp:
    """``python -m wct.quantize``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=quant_schema)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    out: Optional[str] = None  # checkpoint folder (None: <paths.quantized_dir>/<model>-<quant.name>)
    progress: bool = True


@dataclass
class EvaluateApp:
    """``python -m wct.evaluate``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    progress: bool = True


GROUPS = {"model": ModelConfig, "quant": QuantConfig, "calib": CalibConfig, "eval": EvalConfig, "paths": PathsConfig}


def register() -> None:
    """Store the group schemas (``<group>/schema``) and the app schemas in Hydra's ConfigStore, and the
    ``${wct.repo_root:}`` resolver (the folder holding conf/ and wct/); idempotent."""
    OmegaConf.register_new_resolver("wct.repo_root", lambda: REPO_ROOT, replace=True)
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=quant_schema() if node is QuantConfig else node)
    cs.store(name="quantize_schema", node=QuantizeApp)
    cs.store(name="evaluate_schema", node=EvaluateApp)


def check_keys(cfg: DictConfig, schema: type, prefix: str = "") -> None:
    """WCTError naming any key that ``schema`` (an app or group dataclass) does not define: keys appended with
    ``+key=value`` bypass Hydra's struct check; ``hydra`` is Hydra's own node."""
    known = typing.get_type_hints(schema)
    for key in cfg:
        if key == "hydra" and not prefix:
            continue
        if key not in known:
            raise WCTError(f"unknown config key {prefix}{key}; valid keys here: {', '.join(known)}")
        if is_dataclass(known[key]) and isinstance(cfg[key], DictConfig):
            check_keys(cfg[key], known[key], f"{prefix}{key}.")


def quant_config(node: DictConfig | dict[str, Any]) -> QuantConfig:
    """The validated :class:`QuantConfig` of a composed ``quant`` node (raises WCTError on bad values)."""
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    return QuantConfig(**values)


register()
