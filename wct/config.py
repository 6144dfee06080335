"""One config home: the typed schema of every config group and of every verb, registered in Hydra's ConfigStore.

Each primary config (``conf/<verb>.yaml``) starts its defaults list with ``<verb>_schema``, so an unknown key or a
value of the wrong type fails at composition, naming the key. :func:`to_app` turns the composed config into the
verb's dataclass: keys appended with ``+key=value`` (which skip Hydra's struct check) are refused by
:func:`check_keys`, and every dataclass checks its values in ``__post_init__`` (bits=5, a negative lr, an
unknown precision, ...), so a bad value ends with one :class:`WCTError` naming the key and the allowed range
before anything is loaded or written. Groups that describe objects (``callbacks``, ``logger``) are maps of
``_target_`` entries built with ``hydra.utils.instantiate``, as in lightning-hydra-template.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from wct.data.text import BOS_MODES
from wct.device import KERNELS
from wct.errors import WCTError
from wct.quant.config import QuantConfig, recipe_name

_PACKAGE = Path(__file__).resolve().parent
# a checkout (or editable install) reads the top-level conf/; a wheel ships it as wct/conf
CONF_DIR = str(_PACKAGE / "conf" if (_PACKAGE / "conf" / "quantize.yaml").is_file() else _PACKAGE.parent / "conf")
REPO_ROOT = str(_PACKAGE.parent)

DTYPES = ("float32", "fp32", "float", "bfloat16", "bf16", "float16", "fp16", "half")
MODEL_DTYPES = (*DTYPES, "auto")  # auto: fp32 on a CPU, bf16/fp16 on a GPU (wct.device); quantize/evaluate/generate
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
SCHEDULERS = ("constant", "cosine", "linear")
PRECISIONS = ("auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true", "64")
METHODS = ("wct", "lora", "qlora")
TEMPLATES = ("auto", "alpaca", "chat", "none")
TASK_SOURCES = ("task", "mix")  # calib.source values that render the task's training rows (wct.train only)


def require(ok: bool, key: str, value: Any, allowed: str, problem: str = "is invalid") -> None:
    """WCTError ``key=value <problem>; <allowed>`` unless ``ok``."""
    if not ok:
        raise WCTError(f"{key}={value!r} {problem}; {allowed}")


def one_of(key: str, value: Any, choices: tuple) -> None:
    require(value in choices, key, value, f"use one of {', '.join(map(str, choices))}", "is unknown")


def at_least(key: str, value: float, low: float) -> None:
    require(value >= low, key, value, f"it must be >= {low:g}")


# --------------------------------------------------------------------------- groups shared by the verbs


@dataclass
class ModelConfig:
    """The base model: a built-in name (smollm2-135m, gemma-3-270m, tiny-llama), a local folder, a .gguf file or a
    hub id."""

    name: str = "smollm2-135m"
    dtype: str = "float32"  # compute dtype of unquantized tensors (fp32 or bf16 on CPU; never fp16 there); auto:
    # fp32 on a CPU, bf16/fp16 on a GPU (wct.device; the verbs with a ``device`` setting)
    quantized: Optional[str] = None  # an owq-pack checkpoint folder to use instead of quantizing ``name``
    estimate_only: bool = False  # wct.train: print the memory estimate from config.json alone, load nothing, exit

    def __post_init__(self) -> None:
        one_of("model.dtype", self.dtype, MODEL_DTYPES)

    def train_only(self) -> None:
        """The verbs other than wct.train refuse ``model.estimate_only``."""
        require(not self.estimate_only, "model.estimate_only", self.estimate_only,
                "the memory estimate is printed by python -m wct.train model.estimate_only=true",
                "is a training setting")


@dataclass
class CalibConfig:
    """Calibration windows (docs/algorithm.md §1.2): ``source`` is wikitext2 / ptb / c4, an embedded text (emma)
    or a local text file or folder; in ``wct.train`` also ``task`` (the task's training rows rendered with its
    template, never its validation split) or ``mix`` (half the windows from the task's rows, half from the
    embedded generic text, *Emma*)."""

    source: str = "c4"
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0
    fallback: str = "error"  # a local ``source`` that is missing: "error", or "task" (training: the task's text)
    bos: str = "auto"  # each window starts with BOS: auto (if the tokenizer adds one), always, never (§1.2)

    def __post_init__(self) -> None:
        at_least("calib.n_samples", self.n_samples, 1)
        at_least("calib.seqlen", self.seqlen, 2)
        one_of("calib.fallback", self.fallback, ("error", "task"))
        one_of("calib.bos", self.bos, BOS_MODES)


@dataclass
class EvalConfig:
    """Perplexity (docs/algorithm.md §1.10) on each corpus: a corpus name or a local text file or folder."""

    corpora: list[str] = field(default_factory=lambda: ["wikitext2", "ptb", "c4"])
    seqlen: int = 2048
    max_windows: Optional[int] = None  # only the first windows of each corpus (None: all)
    bos: str = "auto"  # each window starts with BOS: auto (if the tokenizer adds one), always, never (§1.10)
    # lm-evaluation-harness (eval=lm_eval, python -m wct.evaluate only; wct/evaluation/harness.py)
    tasks: list[str] = field(default_factory=list)
    limit: Optional[float] = None  # examples per task (< 1: a fraction)
    num_fewshot: Optional[int] = None
    include_path: Optional[str] = None  # folder of local task YAMLs
    batch_size: int = 1

    def __post_init__(self) -> None:
        at_least("eval.seqlen", self.seqlen, 2)
        one_of("eval.bos", self.bos, BOS_MODES)
        require(self.bos == "never" or self.seqlen >= 3, "eval.seqlen", self.seqlen,
                "a window with BOS needs >= 3 tokens (BOS, a context token, a scored token); or use eval.bos=never")
        if self.max_windows is not None:
            at_least("eval.max_windows", self.max_windows, 1)


@dataclass
class PathsConfig:
    root_dir: str = "."
    data_dir: str = "data"
    quantized_dir: str = "outputs/quantized"
    run_dir: str = "."


def quant_schema() -> QuantConfig:
    """QuantConfig defaults with an empty ``name`` (filled from the final fields in ``__post_init__``)."""
    q = QuantConfig()
    q.name = ""
    return q


# --------------------------------------------------------------------------- training groups


@dataclass
class DataConfig:
    """Where the rows come from: ``path`` (local .json/.jsonl/.parquet) wins over ``source``: an embedded set
    (``alpaca-libre``), a hub dataset id, or ``builtin`` (the generated set for unit tests)."""

    source: str = "alpaca-libre"
    path: Optional[str] = None
    split: str = "train"
    # our name -> the file's name: instruction/input/output (alpaca); messages/role/content (chat)
    fields: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)  # chat: the file's role name -> system/user/assistant/tool
    fallback: str = "alpaca-libre"  # hub unreachable and uncached: an embedded set (with a WARNING), or "error"
    max_rows: Optional[int] = None  # use only the first rows (after loading, before the split)

    def __post_init__(self) -> None:
        one_of("task.data.fallback", self.fallback, ("alpaca-libre", "builtin", "error"))
        if self.max_rows is not None:
            at_least("task.data.max_rows", self.max_rows, 1)


@dataclass
class TaskConfig:
    """The data side of a run: source, format and template, lengths, split, batching, sample prompts
    (docs/data.md).

    ``format``: ``alpaca`` (instruction rows, Alpaca template) or ``chat`` (conversations, loss on assistant
    turns; ``template``: ``model``, ``alpaca`` or a Jinja file; ``truncation``: ``drop_turns`` or ``error``).
    ``too_long``: a row whose prompt alone fills ``max_length`` (chat: whose first assistant turn alone exceeds
    it) is dropped and counted (``drop``), has its prompt cut from the left (``truncate``, Alpaca only), or stops
    the run (``error``); docs/data.md.
    ``group_by_length``: micro-batches of rows of similar length (within chunks of ``group_size`` micro-batches
    of the seeded order); ``packing``: rows concatenated into ``max_length`` sequences, attention kept inside
    each row."""

    name: str = "alpaca"
    data: DataConfig = field(default_factory=DataConfig)
    format: str = "alpaca"
    template: str = "alpaca"
    truncation: str = "drop_turns"
    too_long: str = "drop"
    max_length: int = 256
    val_fraction: float = 0.05
    val_size: Optional[int] = None  # overrides val_fraction
    global_batch_size: int = 16  # sequences per optimizer step over all devices
    micro_batch_size: int = 4  # sequences per forward; accumulation = global / (micro * devices)
    group_by_length: bool = True
    group_size: int = 50
    packing: bool = False
    seed: int = 0
    sample_prompts: list[str] = field(default_factory=lambda: ["What is the capital of France?"])

    def __post_init__(self) -> None:
        one_of("task.format", self.format, ("alpaca", "chat"))
        one_of("task.truncation", self.truncation, ("drop_turns", "error"))
        one_of("task.too_long", self.too_long, ("drop", "truncate", "error"))
        require(self.format == "alpaca" or self.too_long != "truncate", "task.too_long", self.too_long,
                "chat conversations lose whole turns from the end (task.truncation=drop_turns); use drop or error")
        if self.format == "alpaca":
            require(self.template == "alpaca", "task.template", self.template,
                    "task.format=alpaca renders with the Alpaca template; use task=chat for other templates")
        at_least("task.max_length", self.max_length, 2)
        require(0 <= self.val_fraction < 1, "task.val_fraction", self.val_fraction, "it must lie in [0, 1)")
        if self.val_size is not None:
            at_least("task.val_size", self.val_size, 0)
        at_least("task.micro_batch_size", self.micro_batch_size, 1)
        at_least("task.global_batch_size", self.global_batch_size, 1)
        at_least("task.group_size", self.group_size, 1)


@dataclass
class TuningConfig:
    """What trains: every OWQ ``weak_weight`` (fp32 master copies), plus norms and/or the output head.

    ``select``: which inputs' Hessians choose the weak columns when the base is quantized on the fly: ``calib``
    (OWQ: the calibration text) or ``task`` (the task's training rows, rendered with its template; GPTQ still
    compensates on the calibration Hessian).

    ``k``: the tuning budget, independent of the quantization label: every linear of every block (gate/up
    included) also trains its ``k`` columns of highest sensitivity on the selection Hessians (the task's rows with
    ``select=task`` or ``calib.source=task``), kept as FP16 columns that start from their dequantized values
    (docs/algorithm.md §3.5); None: only the quantization's weak columns train."""

    name: str = "weak"
    norms: bool = False
    lm_head: bool = False
    master_dtype: str = "float32"
    select: str = "calib"
    k: Optional[int] = None

    def __post_init__(self) -> None:
        one_of("tuning.master_dtype", self.master_dtype, DTYPES)
        if self.k is not None:
            at_least("tuning.k", self.k, 1)
        require(self.select in ("calib", "task"), "tuning.select", self.select,
                "use calib (the calibration text's Hessians choose the weak columns) or task (the task's rows "
                "choose them)", "is unknown")


@dataclass
class OptimConfig:
    """Optimizer and schedule. ``name``: adamw | adamw8bit | paged_adamw8bit (bitsandbytes).
    ``scheduler``: constant | cosine | linear, after ``warmup_steps`` (or ``warmup_ratio`` of max_steps)."""

    name: str = "adamw"
    lr: float = 1e-3  # the default run's bracketed sweep (conf/optim/adamw.yaml)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0  # cosine / linear decay floor, as a fraction of lr
    grad_clip: float = 0.3  # max global grad norm (0: off)

    def __post_init__(self) -> None:
        one_of("optim.name", self.name, OPTIMIZERS)
        require(self.lr > 0, "optim.lr", self.lr, "it must be > 0 (WCT: ~1e-5..1e-3)")
        at_least("optim.weight_decay", self.weight_decay, 0)
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", list(self.betas),
                "give two values in [0, 1), e.g. [0.9,0.999]")
        require(self.eps > 0, "optim.eps", self.eps, "it must be > 0")
        one_of("optim.scheduler", self.scheduler, SCHEDULERS)
        at_least("optim.warmup_steps", self.warmup_steps, 0)
        require(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", self.warmup_ratio, "it must lie in [0, 1)")
        require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", self.min_lr_ratio, "it must lie in [0, 1]")
        at_least("optim.grad_clip", self.grad_clip, 0)


@dataclass
class TrainerConfig:
    """Lightning Trainer settings wct uses (``trainer=ddp|fsdp`` change strategy and devices)."""

    accelerator: str = "auto"
    devices: Any = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "auto"  # wct.device.resolve_precision: bf16-mixed where bf16 is native, else 32-true (CPU)
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

    def __post_init__(self) -> None:
        one_of("trainer.precision", self.precision, PRECISIONS)
        one_of("trainer.kernel", self.kernel, KERNELS)
        at_least("trainer.max_steps", self.max_steps, 1)
        if self.max_epochs is not None:
            require(self.max_epochs > 0, "trainer.max_epochs", self.max_epochs, "it must be > 0")
        at_least("trainer.val_check_interval", self.val_check_interval, 1)
        at_least("trainer.log_every_n_steps", self.log_every_n_steps, 1)
        at_least("trainer.num_nodes", self.num_nodes, 1)


@dataclass
class MethodConfig:
    """``wct`` (train the weak columns of the OWQ base) or a LoRA baseline (``lora`` / ``qlora``, peft)."""

    name: str = "wct"
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.1
    target_modules: Any = "all-linear"

    def __post_init__(self) -> None:
        one_of("method.name", self.name, METHODS)
        if self.name != "wct":  # the LoRA fields are unused by wct
            at_least("method.r", self.r, 1)
        require(0 <= self.dropout < 1, "method.dropout", self.dropout, "it must lie in [0, 1)")


# --------------------------------------------------------------------------- the verbs


@dataclass
class QuantizeApp:
    """``python -m wct.quantize``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=quant_schema)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    out: Optional[str] = None  # checkpoint folder (None: <paths.quantized_dir>/<model>-<quant.name>)
    overwrite: bool = False  # replace an earlier wct.quantize output at out (never a folder wct did not write)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (wct.device); blocks are quantized there one at a time
    stream: bool = False  # read one block at a time from the safetensors shards (models larger than memory)
    progress: bool = True
    quiet: bool = False  # scripts: no progress bars, nothing on stdout (warnings and errors on stderr; wct.console)

    def __post_init__(self) -> None:
        self.model.train_only()
        self.progress = self.progress and not self.quiet
        require(self.calib.source not in TASK_SOURCES, "calib.source", self.calib.source,
                "it needs a task's rows, which only python -m wct.train has; pass a text (emma, a file) here",
                "is a training setting")


@dataclass
class EvaluateApp:
    """``python -m wct.evaluate``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (wct.device)
    progress: bool = True
    quiet: bool = False  # scripts: no progress bars, nothing on stdout (warnings and errors on stderr; wct.console)

    def __post_init__(self) -> None:
        self.model.train_only()
        self.progress = self.progress and not self.quiet
        if not self.eval.corpora and not self.eval.tasks:
            raise WCTError("eval.corpora and eval.tasks are empty; name a corpus (eval.corpora=[wikitext2]) or lm-eval "
                           "tasks (eval=lm_eval eval.tasks=[arc_easy])")


@dataclass
class GenerateApp:
    """``python -m wct.generate``."""

    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None  # a training checkpoint (.ckpt): its base + its trained tensors
    prompt: str = ""
    input: str = ""  # the Alpaca "input" field (template=alpaca)
    template: str = "auto"
    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N (wct.device)

    def __post_init__(self) -> None:
        self.model.train_only()
        if not self.prompt:
            raise WCTError('prompt is required: python -m wct.generate prompt="Name three primary colors."')
        one_of("template", self.template, TEMPLATES)
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "it must be >= 1")


@dataclass
class ExportApp:
    """``python -m wct.export``."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    ckpt_path: Optional[str] = None
    out: Optional[str] = None  # None: <run>/export-<checkpoint name>
    overwrite: bool = False  # replace an earlier export at out (never a folder wct did not write)
    format: str = "merged"  # merged | delta (WCT: only the trained tensors, on top of the base; wct/delta.py)

    def __post_init__(self) -> None:
        if not self.ckpt_path:
            raise WCTError("ckpt_path is required: python -m wct.export ckpt_path=<run>/checkpoints/last.ckpt")
        if self.format not in ("merged", "delta"):
            raise WCTError(f"format={self.format!r} is not an export format; use merged or delta")


@dataclass
class ServeApp:
    """``python -m wct.serve`` (docs/serving.md)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    deltas: Optional[str] = None  # folder of *.safetensors weak-column deltas of the base (wct.export format=delta)
    watch_s: float = 2.0  # poll deltas= for new files every watch_s seconds (0: off; POST /v1/deltas/reload still works)
    name: Optional[str] = None  # the base's model id in /v1/models (None: its folder's name)
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (printed)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (wct.device)
    kernel: str = "auto"  # OWQLinear backend (wct.kernels)
    max_batch: int = 8  # rows decoding at once (continuous batching: newcomers join at each step)
    max_wait_ms: float = 10.0  # with nothing running, how long the first queued request waits for others
    max_queue: int = 64  # waiting requests beyond which a request gets 429 + Retry-After
    max_prompt_tokens: int = 2048
    max_tokens: int = 512  # the most new tokens a request may ask for
    default_max_tokens: int = 128  # a request that names no max_tokens
    drain_timeout_s: float = 60.0  # SIGTERM: how long in-flight requests may take to finish
    log_level: str = "warning"  # uvicorn's

    def __post_init__(self) -> None:
        self.model.train_only()
        one_of("kernel", self.kernel, KERNELS)
        require(0 <= self.port < 65536, "port", self.port, "use 0 (any free port) to 65535")
        for key in ("max_batch", "max_queue", "max_prompt_tokens", "max_tokens", "default_max_tokens"):
            at_least(key, getattr(self, key), 1)
        require(self.default_max_tokens <= self.max_tokens, "default_max_tokens", self.default_max_tokens,
                f"it must be <= max_tokens={self.max_tokens}")
        at_least("max_wait_ms", self.max_wait_ms, 0)
        at_least("drain_timeout_s", self.drain_timeout_s, 0)
        at_least("watch_s", self.watch_s, 0)
        one_of("log_level", self.log_level, ("critical", "error", "warning", "info", "debug", "trace"))


@dataclass
class TrainApp:
    """``python -m wct.train``."""

    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=quant_schema)
    calib: CalibConfig = field(default_factory=CalibConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ..., kwargs}
    callbacks: dict[str, Any] = field(default_factory=dict)  # name -> {_target_: ..., kwargs}
    method: MethodConfig = field(default_factory=MethodConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    run_name: str = "run"
    seed: int = 0
    ckpt_path: Optional[str] = None  # a .ckpt to resume, or "last" (newest last.ckpt of this run name)
    cache_dir: Optional[str] = None  # on-the-fly quantized bases (None: wct.models.cache_dir()/quantized)
    optimized_metric: str = "val/loss"  # returned to sweepers
    progress: bool = True
    quiet: bool = False  # scripts: no progress bars, nothing on stdout (warnings and errors on stderr; wct.console)

    def __post_init__(self) -> None:
        self.progress = self.progress and not self.quiet
        require(self.model.dtype != "auto", "model.dtype", self.model.dtype, "training keeps the base in one dtype "
                "on every device; use float32 or bfloat16", "is for quantize, evaluate and generate")
        if self.tuning.k is not None and (self.method.name != "wct" or self.model.quantized):
            raise WCTError(f"tuning.k={self.tuning.k} adds trainable FP16 columns while the base is quantized on the "
                           f"fly, so it needs method=wct with no model.quantized (got method={self.method.name}"
                           f"{', model.quantized=' + str(self.model.quantized) if self.model.quantized else ''}); "
                           "drop tuning.k (LoRA: set method.r), or drop model.quantized")
        if self.tuning.select == "task" and (self.method.name != "wct" or self.model.quantized):
            raise WCTError("tuning.select=task chooses the weak columns while the base is quantized on the fly, so it "
                           "needs method=wct with model.name and no model.quantized (a packed base has its columns "
                           "fixed); drop model.quantized, or use tuning.select=calib")


GROUPS = {
    "model": ModelConfig, "quant": QuantConfig, "calib": CalibConfig, "eval": EvalConfig, "paths": PathsConfig,
    "task": TaskConfig, "tuning": TuningConfig, "optim": OptimConfig, "trainer": TrainerConfig,
    "method": MethodConfig,
}
APPS = {"quantize": QuantizeApp, "evaluate": EvaluateApp, "generate": GenerateApp, "export": ExportApp,
        "train": TrainApp, "serve": ServeApp}


def run_name(task: str, model: str, quantized: str | None, quant: DictConfig, tuning: str, method: str) -> str:
    """``task-model-quant-tuning`` (``task-model-method`` for LoRA baselines): run folder, W&B name, export.
    The quant label comes from the recipe's fields without validating them (that happens in :func:`to_app`)."""
    from wct.models import model_tag

    if method != "wct":
        return f"{task}-{model_tag(model)}-{method}"
    if quantized:
        return f"{task}-{model_tag(quantized)}-{tuning}"
    q = quant
    qname = q.get("name") or recipe_name(q.method, q.bits, q.target_bit, q.target_rank, q.group_size,
                                          q.get("budget", "layer"))
    return f"{task}-{model_tag(model)}-{qname}-{tuning}"


def optuna_storage_problem() -> str | None:
    """Why Optuna's SQLite storage (``hparams_search=optuna``) cannot work in this environment, or None."""
    import optuna
    import sqlalchemy

    if int(optuna.__version__.split(".")[0]) < 3 and int(sqlalchemy.__version__.split(".")[0]) >= 2:
        return (f"optuna {optuna.__version__} (the version hydra-optuna-sweeper allows) cannot use SQLite storage with "
                f"SQLAlchemy {sqlalchemy.__version__}; install pip install 'sqlalchemy<2' 'alembic<1.14', or sweep "
                "without a storage: hydra.sweeper.storage=null (not resumable)")
    return None


def sqlite_url(folder: str, name: str = "optuna.db") -> str:
    """``sqlite:///<folder>/<name>`` with ``folder`` created (Optuna opens the study before Hydra makes it)."""
    problem = optuna_storage_problem()
    if problem:
        raise WCTError(problem)
    Path(folder).mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{Path(folder).resolve() / name}"


def hydra_output_dir() -> str:
    """This run's Hydra output folder; ``.`` when the config was composed outside a Hydra app (``compose()``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."


def register() -> None:
    """Store every group schema (``<group>/schema``) and app schema (``<verb>_schema``) in Hydra's ConfigStore, and
    the resolvers the configs use: ``wct.repo_root`` (the folder holding conf/ and wct/), ``wct.run_dir``
    (:func:`hydra_output_dir`), ``wct.run_name`` and
    ``wct.sqlite`` (Optuna storage); idempotent."""
    OmegaConf.register_new_resolver("wct.repo_root", lambda: REPO_ROOT, replace=True)
    OmegaConf.register_new_resolver("wct.run_dir", hydra_output_dir, replace=True)
    OmegaConf.register_new_resolver("wct.run_name", run_name, replace=True)
    OmegaConf.register_new_resolver("wct.sqlite", sqlite_url, replace=True)
    cs = ConfigStore.instance()
    for group, node in GROUPS.items():
        cs.store(group=group, name="schema", node=quant_schema() if node is QuantConfig else node)
    for verb, node in APPS.items():
        cs.store(name=f"{verb}_schema", node=node)


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


def to_app(cfg: DictConfig, schema: type):
    """The composed ``cfg`` as an instance of its app dataclass ``schema``, every group a typed, validated object
    (``callbacks`` / ``logger`` stay plain dicts of ``_target_`` entries); WCTError on an unknown key, a value of
    the wrong type or a bad value."""
    check_keys(cfg, schema)
    plain = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), plain))
    except OmegaConfBaseException as e:
        raise WCTError(f"config error: {str(e).splitlines()[0]} (key {getattr(e, 'full_key', '?')}); see "
                       f"conf/ and wct/config.py for the valid keys") from None


register()
