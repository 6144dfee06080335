"""One training run, composed from a validated :class:`wct.config.TrainApp`: the base, the data, the Lightning
Trainer with the configured callbacks and loggers, training, the final validation and ``results.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf

from wct import kernels
from wct.config import TrainApp
from wct.device import accelerator_is_gpu, resolve_precision
from wct.errors import WCTError
from wct.io import atomic_file
from wct.training.base import load_base
from wct.training.callbacks import AtomicCheckpointIO, LossPlot
from wct.training.datamodule import InstructDataModule, task_rows
from wct.training.memory import estimate_run, memory_estimate
from wct.training.module import TuneModule, logical_params
from wct.training.objects import instantiate_group
from wct.training.resume import resume_checkpoint



def build_trainer(app: TrainApp, total_steps: int, config: dict) -> L.Trainer:
    """The Lightning Trainer of ``app.trainer`` with the callbacks and loggers of their config groups."""
    t = app.trainer
    strategy = t.strategy
    if strategy == "ddp":  # the packed OWQ tensors are frozen buffers, identical on every rank: never broadcast
        from lightning.pytorch.strategies import DDPStrategy

        strategy = DDPStrategy(broadcast_buffers=False)
    elif strategy == "fsdp":  # FSDP2 over every device (TuneModule.configure_model shards; wct.training.sharding)
        from wct.training.sharding import ShardedStrategy

        if not isinstance(t.devices, int):
            raise WCTError(f"trainer=fsdp needs trainer.devices as a number of devices, not {t.devices!r}")
        strategy = ShardedStrategy(t.devices * t.num_nodes)
    from lightning.pytorch.callbacks import ModelCheckpoint

    loggers = instantiate_group("logger", app.logger)
    for logger in loggers:
        logger.log_hyperparams(config)
    callbacks = instantiate_group("callbacks", app.callbacks)
    return L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
        precision=t.precision, max_steps=total_steps, max_epochs=-1, logger=loggers or False,
        callbacks=callbacks, gradient_clip_val=app.optim.grad_clip or None,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar and app.progress,
        deterministic=t.deterministic, default_root_dir=app.paths.run_dir, num_sanity_val_steps=0,
        use_distributed_sampler=False, plugins=[AtomicCheckpointIO()], check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches, inference_mode=False,  # the dense cache must stay usable by autograd
        enable_model_summary=False,  # wct prints the trainable parameters itself (and the memory estimate)
        enable_checkpointing=any(isinstance(cb, ModelCheckpoint) for cb in callbacks),
    )


def fit(app: TrainApp, config: dict) -> tuple[float, TuneModule]:
    """Train per ``app`` (``config``: the resolved config as a plain dict, saved with the run); returns
    ``(optimized metric, module)``."""
    start = time.time()
    run_dir = Path(app.paths.run_dir)
    t = app.trainer
    t.precision, why = resolve_precision(t.precision, accelerator_is_gpu(t.accelerator))
    print(f"precision: {t.precision} ({why})")
    config = config | {"trainer": config["trainer"] | {"precision": t.precision}}  # what runs is what is saved
    ckpt_path = resume_checkpoint(app.ckpt_path, run_dir, config)
    if ckpt_path:
        print(f"resuming from {ckpt_path}")
    L.seed_everything(app.seed, workers=True, verbose=False)
    kernels.configure(kernel=app.trainer.kernel)
    data = task_rows(app.task)  # loaded once: training, and task calibration / column selection
    model, tok, meta = load_base(app, data)
    if app.trainer.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()

    dm = InstructDataModule(app.task, tok, app.trainer.max_steps, app.trainer.max_epochs, rows=data)
    dm.load()
    config = config | dm.record
    with atomic_file(run_dir / "config.yaml", "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.create(config)))
    total_steps = dm.total_steps()
    module = TuneModule(model, app.optim, total_steps, meta | {"config": config})
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = logical_params(model)
    print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")

    trainer = build_trainer(app, total_steps, config)
    acc = dm.accumulation(trainer.world_size)
    trainer.accumulate_grad_batches = acc
    trainer.val_check_interval = app.trainer.val_check_interval * acc
    print(f"batch: global {app.task.global_batch_size} = micro {app.task.micro_batch_size} x {trainer.world_size} "
          f"device(s) x {acc} accumulation steps; {total_steps} optimizer steps")
    padding = dm.padding_fraction(trainer.world_size)
    print(f"padding: {100 * padding:.1f}% of the training forwards' token positions (task.group_by_length="
          f"{app.task.group_by_length}, task.packing={app.task.packing})")
    if meta["method"] == "wct":
        print(estimate_run(app, model.config.to_dict()).table())
        print(f"(trainer.gradient_checkpointing={app.trainer.gradient_checkpointing})")
    else:
        print(memory_estimate(model, app.optim.name, app.task.micro_batch_size, app.task.max_length,
                              app.trainer.gradient_checkpointing))

    before = None
    if app.trainer.validate_first and ckpt_path is None:
        before = trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"]
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if module.validated_at != trainer.global_step:  # always end with a validation: the "loss after" figure
        trainer.validate(module, datamodule=dm, verbose=False)
        for cb in trainer.callbacks:
            if isinstance(cb, LossPlot) and trainer.global_rank == 0:
                cb.plot()
    trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)  # the full training state
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if app.optimized_metric not in metrics:
        raise WCTError(f"optimized_metric={app.optimized_metric} was not logged; logged metrics: "
                       f"{', '.join(sorted(metrics))}")
    results = {"run_name": app.run_name, "val_loss_before": before, "metrics": metrics, "steps": trainer.global_step,
               "trainable_params": trainable, "data_origin": dm.origin, "data_rows": dm.lengths,
               "padding_fraction": padding, "seconds": time.time() - start,
               "checkpoint": str(run_dir / "checkpoints" / "last.ckpt")}
    if trainer.global_rank == 0:
        with atomic_file(run_dir / "results.json", "w") as f:
            json.dump(results, f, indent=2)
        shown = f"{before:.4f} -> " if before is not None else ""
        print(f"done: val/loss {shown}{metrics.get('val/loss', float('nan')):.4f} after {trainer.global_step} steps, "
              f"{results['seconds']:.0f} s, padding {100 * padding:.1f}%; run folder {run_dir}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return metrics[app.optimized_metric], module
