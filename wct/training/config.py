"""Structured configs of ``python -m wct.train``: the task, tuning, optim, trainer, logger, callbacks and method
groups, and the app schema ``train_schema`` that ``conf/train.yaml`` starts from (unknown keys and wrong types
fail at composition, naming the key)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from wct.config import CalibConfig, ModelConfig, PathsConfig, quant_schema
from wct.quant.config import QuantConfig


@dataclass
class DataConfig:
    """Where the rows come from: ``path`` (local .json/.jsonl/.parquet) wins over the hub dataset ``source``."""

    source: str = "tatsu-lab/alpaca"  # hub dataset id, or "builtin" (the generated offline set)
    path: Optional[str] = None
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)  # our name (instruction/input/output) -> the file's name
    fallback: str = "builtin"  # hub unreachable and uncached: "builtin" (with a WARNING) or "error"
    max_rows: Optional[int] = None  # use only the first rows (after loading, before the split)


@dataclass
class TaskConfig:
    """The data side of a run: source, template, lengths, split, batch sizes, sample prompts."""

    name: str = "alpaca"
    data: DataConfig = field(default_factory=DataConfig)
    template: str = "alpaca"
    max_length: int = 256
    val_fraction: float = 0.05
    val_size: Optional[int] = None  # overrides val_fraction
    global_batch_size: int = 16  # sequences per optimizer step over all devices
    micro_batch_size: int = 4  # sequences per forward; accumulation = global / (micro * devices)
    seed: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["What is the capital of France?"])


@dataclass
class TuningConfig:
    """What trains: every OWQ ``weak_weight`` (fp32 master copies), plus norms and/or the output head.

    ``select``: which inputs' Hessians choose the weak columns when the base is quantized on the fly: ``calib``
    (OWQ: the calibration text) or ``task`` (the task's training rows, rendered with its template; GPTQ still
    compensates on the calibration Hessian)."""

    name: str = "weak"
    norms: bool = False
    lm_head: bool = False
    master_dtype: str = "float32"
    select: str = "calib"


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``name``: adamw | adamw8bit | paged_adamw8bit (bitsandbytes).
    ``scheduler``: constant | cosine | linear, after ``warmup_steps`` (or ``warmup_ratio`` of max_steps)."""

    name: str = "adamw"
    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # cosine / linear decay floor, as a fraction of lr
    grad_clip: float = 0.3  # max global grad norm (0: off)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings wct uses (``trainer=ddp|fsdp`` change strategy and devices)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "bf16-mixed"
    max_steps: int = 30
    max_epochs: Optional[float] = None  # epochs of the training split instead of max_steps
    val_check_interval: int = 10  # optimizer steps between validations
    limit_val_batches: Optional[int] = None
    log_every_n_steps: int = 1
    gradient_checkpointing: bool = False
    validate_first: bool = True  # validation before training (the "loss before" figure)
    deterministic: bool = False
    enable_progress_bar: bool = True
    kernel: str = "auto"  # OWQLinear backend (wct.kernels): auto | torch | triton | cuda


@dataclass
class LoggerConfig:
    """``wandb`` (offline automatically without WANDB_API_KEY), ``csv`` or both."""

    wandb: bool = True
    csv: bool = True
    project: str = "wct"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the sweep folder's name in a -m run, else none
    tags: list[str] = field(default_factory=list)
    offline: Optional[bool] = None  # None: offline exactly when WANDB_API_KEY is unset


@dataclass
class CallbacksConfig:
    """Checkpoints, sample generations, weak-column statistics, the loss guard and the loss plot."""

    checkpoint_every_n_steps: int = 10
    save_top_k: int = 1  # best checkpoints by val/loss, besides last.ckpt
    samples: bool = True
    sample_max_new_tokens: int = 32
    weak_stats: bool = True
    loss_guard: bool = True
    max_loss_ratio: float = 5.0  # stop when the step loss exceeds this times the first step's loss
    plot: bool = True


@dataclass
class MethodConfig:
    """``wct`` (train the weak columns of the OWQ base) or a LoRA baseline (``lora`` / ``qlora``, peft)."""

    name: str = "wct"
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: Any = "all-linear"


@dataclass
class TrainApp:
    """``python -m wct.train`` (conf/train.yaml)."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=quant_schema)
    calib: CalibConfig = field(default_factory=CalibConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "run"
    seed: int = 0
    ckpt_path: Optional[str] = None  # a .ckpt to resume, or "last" (newest last.ckpt of this run name)
    cache_dir: Optional[str] = None  # on-the-fly quantized bases (None: wct.models.cache_dir()/quantized)
    optimized_metric: str = "val/loss"  # returned to sweepers
    progress: bool = True


GROUPS = {
    "task": TaskConfig, "tuning": TuningConfig, "optim": OptimConfig, "trainer": TrainerConfig,
    "logger": LoggerConfig, "callbacks": CallbacksConfig, "method": MethodConfig,
}


def register() -> None:
    """Store the group schemas (``<group>/schema``) and ``train_schema`` in Hydra's ConfigStore; idempotent."""
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=node)
    cs.store(name="train_schema", node=TrainApp)


register()
