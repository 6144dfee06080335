"""Fine-tune the weak columns of an OWQ model (or a LoRA / QLoRA baseline) on instruction data.

    python -m wct.train task=alpaca                                   # smollm2-135m, owq-w4-t4.01 on the fly
    python -m wct.train task=alpaca model.quantized=outputs/quantized/smollm2-135m-owq-w3-t3.01
    python -m wct.train task=json task.data.path=my.jsonl task.data.fields.output=answer
    python -m wct.train ckpt_path=last                                 # resume the newest run of this run name
    python -m wct.train -m hparams_search=optuna                       # Optuna sweep (SQLite study, resumable)

The base is ``model.quantized`` (an owq-pack folder) or ``model.name`` quantized with ``quant`` on ``calib``; the
result is cached under ``cache_dir`` keyed by a hash of (model, quant, calib), so a rerun reuses it. Prints the
resolved config, the trainable parameter count and a memory estimate, then the first rendered example with its
label mask. Writes into the run folder: checkpoints/ (trainable tensors only), csv/ and wandb/ logs,
samples.csv, loss.png, config.yaml (resolved, with the data origin) and results.json. Returns the optimized
metric to sweepers; in a sweep a failed trial returns NaN instead of ending the sweep.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from wct.config import CONF_DIR, quant_config
from wct.errors import WCTError, cli_errors
from wct.io import atomic_file
from wct.training.config import TrainApp


def run_name(task: str, model: str, quantized: str | None, quant: DictConfig, tuning: str, method: str) -> str:
    """``task-model-quant-tuning`` (``task-model-method`` for LoRA baselines): run folder, W&B name, export."""
    from wct.quantize import model_tag

    if method != "wct":
        return f"{task}-{model_tag(model)}-{method}"
    if quantized:
        return f"{task}-{model_tag(quantized)}-{tuning}"
    try:
        qname = quant_config(quant).name
    except WCTError:
        qname = "quant"
    return f"{task}-{model_tag(model)}-{qname}-{tuning}"


def optuna_storage_problem() -> str | None:
    """Why Optuna's SQLite storage cannot work in this environment, or None."""
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


OmegaConf.register_new_resolver("wct.run_name", run_name, replace=True)
OmegaConf.register_new_resolver("wct.sqlite", sqlite_url, replace=True)


def files_state(name: str) -> list:
    """(path, size, mtime) of the files under ``name`` when it is a local file or folder (else [])."""
    path = Path(name).expanduser()
    files = sorted(path.rglob("*")) if path.is_dir() else [path] if path.is_file() else []
    return [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]


def task_text(cfg: DictConfig, rows: list[dict[str, str]]) -> tuple[Path, int]:
    """(file, rows in it): the task's training rows (``rows`` without the validation split) rendered with its
    template, written once to the cache; the text that calibrates when ``calib.fallback=task`` and that chooses
    the weak columns when ``tuning.select=task``."""
    from wct.data.instruct import render_text, split_rows
    from wct.models import cache_dir

    t = cfg.task
    train, _ = split_rows(rows, t.val_fraction, t.val_size, t.seed)
    text = render_text(train)
    out = cache_dir() / "calib" / f"task-{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
    if not out.is_file():
        with atomic_file(out, "w") as fh:
            fh.write(text)
    return out, len(train)


def calibration_source(cfg: DictConfig, data: tuple[list[dict[str, str]], str]) -> str:
    """``calib.source``, or, when it names a local file that is not here and ``calib.fallback=task``, the text of
    the task's rows ``data`` = (rows, origin) (:func:`task_text`), announced by one WARNING.

    The default calibration text lives in ``../shared/data`` beside a checkout; a user's fresh clone has none."""
    from wct.data.text import HUB_CORPORA

    source = str(cfg.calib.source)
    if source in HUB_CORPORA or Path(source).expanduser().exists() or cfg.calib.fallback != "task":
        return source
    rows, origin = data
    path, n = task_text(cfg, rows)
    print(f"WARNING: calibration text {source} not found; calibrating on the task's own rows ({origin}, "
          f"{n} rows) instead. Pass calib.source=FILE for another text.")
    return str(path)


def quantized_base(cfg: DictConfig, data: tuple[list[dict[str, str]], str]) -> Path:
    """The owq-pack folder of ``model.name`` quantized with ``quant`` on ``calib``, made once and cached under a
    hash of the three configs (and, for local models, their files' sizes and times). ``data``: the task's
    ``(rows, origin)`` (:func:`wct.training.datamodule.task_rows`), for task calibration or selection."""
    from wct.data.text import calibration_windows
    from wct.models import cache_dir, load_model
    from wct.quant.checkpoint import save_quantized
    from wct.quant.owq import quantize_model
    from wct.quantize import model_tag

    qcfg = quant_config(cfg.quant)
    source = calibration_source(cfg, data)
    select = task_text(cfg, data[0])[0] if cfg.tuning.select == "task" else None
    key = {
        "model": cfg.model.name,
        "files": files_state(cfg.model.name) + files_state(source),
        "quant": OmegaConf.to_container(cfg.quant, resolve=True),
        "calib": OmegaConf.to_container(cfg.calib, resolve=True),
    }
    if select:  # the file's name holds the hash of the rendered rows
        key["select"] = select.name
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir) if cfg.cache_dir else cache_dir() / "quantized"
    out = root / f"{model_tag(cfg.model.name)}-{qcfg.name}{'-task' if select else ''}-{digest}"
    if (out / "config.json").is_file():
        print(f"base: reusing the cached quantized model {out}")
        return out
    print(f"base: quantizing {cfg.model.name} with {qcfg.name} (cached afterwards in {out})")
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    c = cfg.calib
    calib = calibration_windows(tok, source, c.n_samples, c.seqlen, c.seed)
    windows = None
    if select:
        windows = calibration_windows(tok, select, c.n_samples, c.seqlen, c.seed)
        print(f"base: weak columns chosen on the Hessians of {c.n_samples} x {c.seqlen} tokens of the task's rows")
    report = quantize_model(model, calib, qcfg, progress=cfg.progress, select=windows)
    if select:
        model.config.quantization_config["weak_selection"] = f"task:{select.name}"
    print(report.summary())
    try:
        save_quantized(model, tok, out)
    except OSError:  # another process (a DDP rank, a parallel trial) wrote it first
        if not (out / "config.json").is_file():
            raise
    return out


def load_base(cfg: DictConfig, data: tuple[list[dict[str, str]], str]):
    """``(model, tokenizer, meta)``: the model to train with only its trainable tensors requiring grad, and the
    checkpoint metadata (base name, folder, fingerprint). ``data``: the task's ``(rows, origin)``."""
    from wct.models import load_model
    from wct.quant.checkpoint import load_quantized
    from wct.training.module import fingerprint, prepare_wct

    method, select = cfg.method.name, cfg.tuning.select
    if select not in ("calib", "task"):
        raise WCTError(f"tuning.select={select!r} is unknown; use calib (the calibration text's Hessians choose the "
                       "weak columns) or task (the task's rows choose them)")
    if select == "task" and (method != "wct" or cfg.model.quantized):
        raise WCTError("tuning.select=task chooses the weak columns while the base is quantized on the fly, so it "
                       "needs method=wct with model.name and no model.quantized (a packed base has its columns fixed); "
                       "drop model.quantized, or use tuning.select=calib")
    if method == "wct":
        base_dir = Path(cfg.model.quantized) if cfg.model.quantized else quantized_base(cfg, data)
        model, tok = load_quantized(base_dir, dtype=cfg.model.dtype)
        meta = {"base": str(cfg.model.quantized or cfg.model.name), "base_dir": str(base_dir.resolve()),
                "fingerprint": fingerprint(model)}
        prepare_wct(model, cfg.tuning)
    else:
        from wct.baselines.lora import prepare_lora_model

        model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
        meta = {"base": cfg.model.name, "base_dir": None, "fingerprint": fingerprint(model)}
        m = cfg.method
        targets = m.target_modules if isinstance(m.target_modules, str) else list(m.target_modules)
        model = prepare_lora_model(model, method, r=m.r, alpha=m.alpha, dropout=m.dropout, target_modules=targets)
    return model, tok, meta | {"method": method}


def memory_estimate(model, optim: str, micro: int, seq: int, checkpointing: bool) -> str:
    """An itemised, rough peak-memory estimate: stored tensors, trainable state, activations, logits."""
    seen, stored = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel() * t.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * (4 + (2 if "8bit" in optim else 8))  # grad fp32 + Adam moments (8-bit: 1 B each)
    c = model.config
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    tokens = micro * seq
    acts = tokens * hidden * layers * (4 if checkpointing else 40)  # bytes per token per layer, rough
    logits = tokens * vocab * 4 * 3  # fp32 logits, their softmax and gradient
    total = stored + state + acts + logits
    gb = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    return (f"memory estimate (rough, peak): weights+buffers {gb(stored)} + trainable state {gb(state)} + "
            f"activations {gb(acts)} ({micro}x{seq} tokens{', checkpointed' if checkpointing else ''}) + "
            f"logits {gb(logits)} = {gb(total)}")


def resolve_ckpt(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``last`` → the newest ``checkpoints/last.ckpt`` of earlier runs with this run name; else the path given."""
    if not ckpt_path:
        return None
    if ckpt_path == "last":
        found = sorted(run_dir.parent.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        found = [p for p in found if run_dir not in p.parents]
        if not found:
            raise WCTError(f"ckpt_path=last: no earlier run under {run_dir.parent} has checkpoints/last.ckpt; "
                           "pass the checkpoint file with ckpt_path=/path/to/last.ckpt")
        return str(found[-1])
    if not Path(ckpt_path).is_file():
        raise WCTError(f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file of a wct run or ckpt_path=last")
    return ckpt_path


def make_loggers(cfg: DictConfig, run_dir: Path, config: dict) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    if cfg.logger.wandb:
        offline = cfg.logger.offline if cfg.logger.offline is not None else not os.environ.get("WANDB_API_KEY")
        group = cfg.logger.group
        if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            group = Path(HydraConfig.get().sweep.dir).name
        loggers.append(WandbLogger(name=cfg.run_name, project=cfg.logger.project, entity=cfg.logger.entity,
                                   save_dir=str(run_dir), offline=offline, group=group,
                                   tags=list(cfg.logger.tags), config=config))
    return loggers


def make_callbacks(cfg: DictConfig, run_dir: Path, tok) -> list:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from wct.training.callbacks import LossGuard, LossPlot, SampleGenerations, Throughput, WeakColumnStats

    c = cfg.callbacks
    ckpt_dir = str(run_dir / "checkpoints")
    cbs = [
        ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=c.checkpoint_every_n_steps),
        Throughput(),
    ]
    if c.save_top_k:
        cbs.append(ModelCheckpoint(dirpath=ckpt_dir, filename="best-step{step:05d}", monitor="val/loss", mode="min",
                                   save_top_k=c.save_top_k, auto_insert_metric_name=False))
    if c.loss_guard:
        cbs.append(LossGuard(c.max_loss_ratio))
    if c.samples:
        cbs.append(SampleGenerations(tok, list(cfg.task.sample_prompts), c.sample_max_new_tokens, run_dir))
    if c.weak_stats and cfg.method.name == "wct":
        cbs.append(WeakColumnStats())
    if c.plot:
        cbs.append(LossPlot(run_dir))
    return cbs


def check_config(cfg: DictConfig) -> None:
    """Keys appended with ``+key=value`` skip Hydra's struct check: merge into the schema to catch them."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.merge(OmegaConf.structured(TrainApp), OmegaConf.to_container(cfg))  # untyped: extra keys fail
    except OmegaConfBaseException as e:
        raise WCTError(f"config error: {str(e).splitlines()[0]} (key {getattr(e, 'full_key', '?')}); see "
                       "conf/train.yaml and wct/training/config.py for the valid keys") from None


def fit(cfg: DictConfig):
    """Train per ``cfg``; returns ``(optimized metric, module)``. Everything :func:`run` does, minus the CLI
    error wrapper (tests call this to inspect the trained module)."""
    import lightning as L
    import torch

    from wct import kernels
    from wct.training.callbacks import AtomicCheckpointIO, LossPlot
    from wct.training.datamodule import InstructDataModule, task_rows
    from wct.training.module import TuneModule, logical_params, lr_lambda, make_optimizer

    start = time.time()
    check_config(cfg)
    print(OmegaConf.to_yaml(cfg, resolve=True))
    run_dir = Path(cfg.paths.run_dir)
    ckpt_path = resolve_ckpt(cfg.ckpt_path, run_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    kernels.configure(kernel=cfg.trainer.kernel)
    data = task_rows(cfg.task)  # loaded once: training, and task calibration / column selection
    model, tok, meta = load_base(cfg, data)
    if cfg.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()

    dm = InstructDataModule(cfg.task, tok, cfg.trainer.max_steps, cfg.trainer.max_epochs, rows=data)
    dm.load()
    config = OmegaConf.to_container(cfg, resolve=True) | {"data_origin": dm.origin}
    with atomic_file(run_dir / "config.yaml", "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    total_steps = dm.total_steps()
    module = TuneModule(model, cfg.optim, total_steps, meta | {"config": config})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = logical_params(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    t = cfg.trainer
    strategy = t.strategy
    if strategy == "ddp":  # the packed OWQ tensors are frozen buffers, identical on every rank: never broadcast
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(broadcast_buffers=False)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=total_steps, max_epochs=-1, logger=make_loggers(cfg, run_dir, config),
        callbacks=make_callbacks(cfg, run_dir, tok), gradient_clip_val=cfg.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar and cfg.progress,
        deterministic=t.deterministic, default_root_dir=str(run_dir), num_sanity_val_steps=0,
        use_distributed_sampler=False, plugins=[AtomicCheckpointIO()], check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, inference_mode=False,  # the dense cache must stay usable by autograd
    )
    make_optimizer([torch.nn.Parameter(torch.zeros(1, device=trainer.strategy.root_device))], cfg.optim)  # fail early
    lr_lambda(cfg.optim, total_steps)
    acc = dm.accumulation(trainer.world_size)
    trainer.accumulate_grad_batches = acc
    trainer.val_check_interval = t.val_check_interval * acc
    print(f"batch: global {cfg.task.global_batch_size} = micro {cfg.task.micro_batch_size} x {trainer.world_size} "
          f"device(s) x {acc} accumulation steps; {total_steps} optimizer steps")
    print(memory_estimate(model, cfg.optim.name, cfg.task.micro_batch_size, cfg.task.max_length,
                          t.gradient_checkpointing))

    before = None
    if t.validate_first and ckpt_path is None:
        before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if module.validated_at != trainer.global_step:  # always end with a validation: the "loss after" figure
        trainer.validate(module, datamodule=dm, verbose=False)
        for cb in trainer.callbacks:
            if isinstance(cb, LossPlot) and trainer.global_rank == 0:
                cb.plot()
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if cfg.optimized_metric not in metrics:
        raise WCTError(f"optimized_metric={cfg.optimized_metric} was not logged; logged metrics: "
                       f"{', '.join(sorted(metrics))}")
    results = {"run_name": cfg.run_name, "val_loss_before": before, "metrics": metrics, "steps": trainer.global_step,
               "trainable_params": trainable, "data_origin": dm.origin, "seconds": time.time() - start,
               "checkpoint": str(run_dir / "checkpoints" / "last.ckpt")}
    if trainer.global_rank == 0:
        with atomic_file(run_dir / "results.json", "w") as f:
            json.dump(results, f, indent=2)
        shown = f"{before:.4f} -> " if before is not None else ""
        print(f"done: val/loss {shown}{metrics.get('val/loss', float('nan')):.4f} after {trainer.global_step} steps, "
              f"{results['seconds']:.0f} s; run folder {run_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics[cfg.optimized_metric], module


@cli_errors
def run(cfg: DictConfig) -> float:
    """``python -m wct.train``: :func:`fit`, with WCTErrors printed as one message (exit code 2)."""
    return fit(cfg)[0]


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float:
    import wandb

    try:
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            return run(cfg)
        try:
            return run(cfg)
        except (Exception, SystemExit) as e:  # a failed trial must not end the sweep
            print(f"trial failed ({type(e).__name__}: {e}); returning NaN to the sweeper", file=sys.stderr)
            return math.nan
    finally:
        wandb.finish()  # multirun jobs must not log into each other's run


if __name__ == "__main__":
    main()
