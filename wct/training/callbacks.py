"""Callbacks of wct.train: throughput, sample generations, weak-column change norms, the loss guard, the loss
plot, and atomic checkpoint writes."""

from __future__ import annotations

import csv
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from wct.data.batching import real_tokens
from wct.errors import WCTError
from wct.io import atomic_file
from wct.nn.owq_linear import OWQLinear


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory, or the process's peak resident set size on CPU, in GB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 1e9 if sys.platform == "darwin" else rss * 1024 / 1e9


def ends_optimizer_step(trainer: L.Trainer, batch_idx: int) -> bool:
    """Whether micro-batch ``batch_idx`` is the last of its gradient-accumulation group."""
    return (batch_idx + 1) % trainer.accumulate_grad_batches == 0


class Throughput(L.Callback):
    """``perf/tokens_per_s`` (non-padding tokens per second of training, shown in the progress bar) and
    ``perf/peak_mem_gb``, once per optimizer step."""

    def __init__(self) -> None:
        self.start, self.tokens = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.tokens += real_tokens(batch) * trainer.world_size
        if ends_optimizer_step(trainer, batch_idx):
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            pl_module.log("perf/tokens_per_s", rate, on_step=True, prog_bar=True)
            pl_module.log("perf/peak_mem_gb", peak_memory_gb(pl_module.device), on_step=True)
            self.start = None


class LossGuard(L.Callback):
    """Stop the run, saying why, when a loss is not finite, or when an optimizer step's mean loss exceeds
    ``max_ratio`` × the mean of the first ``warmup`` steps' losses (per-batch noise does not trigger it)."""

    def __init__(self, max_ratio: float = 5.0, warmup: int = 3) -> None:
        self.max_ratio, self.warmup, self.first = max_ratio, warmup, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
        step = trainer.global_step
        if not math.isfinite(loss):
            raise WCTError(f"training loss became {loss} at step {step}; stopped. Lower optim.lr, keep "
                           "optim.grad_clip on, or train in 32-bit (trainer.precision=32-true)")
        mean = trainer.callback_metrics.get("train/loss")
        if not ends_optimizer_step(trainer, batch_idx) or mean is None:
            return
        if len(self.first) < self.warmup:
            self.first.append(float(mean))
        elif float(mean) > self.max_ratio * (ref := sum(self.first) / len(self.first)):
            raise WCTError(f"training loss exploded at step {step}: {float(mean):.4g} > {self.max_ratio} x the first "
                           f"steps' mean {ref:.4g}; stopped. Lower optim.lr or raise callbacks.loss_guard.max_ratio")

    def state_dict(self) -> dict[str, Any]:
        return {"first": self.first}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first = state["first"]


class SampleGenerations(L.Callback):
    """Greedy answers to fixed prompts at each validation: a W&B table and ``samples.csv``. The tokenizer is the
    datamodule's (``trainer.datamodule.tokenizer``), the template the one the run trains with (Alpaca, or for
    ``task=chat`` the tokenizer's chat template, which the datamodule set)."""

    def __init__(self, prompts: list[str], max_new_tokens: int, run_dir: str | Path) -> None:
        self.prompts, self.max_new_tokens = list(prompts), max_new_tokens
        self.file = Path(run_dir) / "samples.csv"

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FSDPModule

        from wct.generation import generate, render

        sharded = isinstance(pl_module.model, FSDPModule)  # trainer=fsdp: every rank must run a sharded forward
        if trainer.sanity_checking or not self.prompts or (trainer.global_rank != 0 and not sharded):
            return
        tok = trainer.datamodule.tokenizer
        template = "chat" if trainer.datamodule.chat_template else "alpaca"
        rows = [[trainer.global_step, prompt, generate(pl_module.model, tok, render(tok, prompt, template=template),
                                                       self.max_new_tokens, add_special_tokens=template != "chat")]
                for prompt in self.prompts]
        if trainer.global_rank != 0:
            return
        new = not self.file.exists()
        self.file.parent.mkdir(parents=True, exist_ok=True)
        with self.file.open("a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["step", "prompt", "output"])
            w.writerows(rows)
        for logger in trainer.loggers:
            if hasattr(logger, "log_table"):
                logger.log_table(key="samples", columns=["step", "prompt", "output"], data=rows)


class WeakColumnStats(L.Callback):
    """At each validation, per layer: ``weak_delta/<layer>`` = ||W_o - W_o(start)|| / ||W_o(start)||, and the
    mean and max over layers (``weak/delta_mean``, ``weak/delta_max``)."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}

    def _layers(self, pl_module) -> dict[str, OWQLinear]:
        return {n: m for n, m in pl_module.model.named_modules() if isinstance(m, OWQLinear) and m.n_weak}

    @staticmethod
    def _whole(m: OWQLinear) -> torch.Tensor:
        """The layer's weak columns in fp32, whole: under trainer=fsdp each rank holds a shard (a DTensor), which
        is all-gathered here (every rank runs these hooks), so the start kept in checkpoints is the whole tensor
        and every rank logs the same, global value."""
        w = m.weak_weight.detach()
        return (w.full_tensor() if hasattr(w, "full_tensor") else w).float()

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self.start:
            self.start = {n: self._whole(m).clone() for n, m in self._layers(pl_module).items()}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.start:
            return
        deltas = {}
        for n, m in self._layers(pl_module).items():
            w0 = self.start[n].to(m.weak_weight.device)
            deltas[f"weak_delta/{n}"] = ((self._whole(m) - w0).norm() / w0.norm().clamp(min=1e-12)).item()
        if deltas:
            values = list(deltas.values())
            pl_module.log_dict(deltas | {"weak/delta_mean": sum(values) / len(values), "weak/delta_max": max(values)})

    def state_dict(self) -> dict[str, Any]:
        return {"start": self.start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.start = state["start"]


class LossPlot(L.Callback):
    """Keeps the loss history (kept in checkpoints, so a resumed run plots the whole curve) and writes
    ``loss.png`` (train/loss and val/loss vs optimizer step) into the run folder at the end of fit."""

    def __init__(self, run_dir: str | Path) -> None:
        self.file = Path(run_dir) / "loss.png"
        self.history: dict[str, list[tuple[int, float]]] = {"train/loss": [], "val/loss": []}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.callback_metrics.get("train/loss")
        if ends_optimizer_step(trainer, batch_idx) and loss is not None:
            self.history["train/loss"].append((trainer.global_step, float(loss)))

    def on_validation_end(self, trainer, pl_module) -> None:  # after the module's epoch-end logging
        loss = trainer.callback_metrics.get("val/loss")
        if not trainer.sanity_checking and loss is not None:
            self.history["val/loss"].append((trainer.global_step, float(loss)))

    def on_fit_end(self, trainer, pl_module) -> None:
        if trainer.global_rank == 0:
            self.plot()

    def plot(self) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for key, points in self.history.items():
            if points:
                ax.plot(*zip(*points), marker="o" if key == "val/loss" else None, label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        with atomic_file(self.file) as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        return self.file

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = state["history"]


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` every ``every_n_train_steps`` optimizer steps that, at a step which also validates,
    saves after that validation (Lightning saves before it, and a run resumed from that checkpoint skips the
    validation: its val/loss history lost a point). Uses Lightning's own deferral of a step save to
    ``on_validation_end``."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step, every = trainer.global_step, self._every_n_train_steps
        val_every = int(trainer.val_check_interval) // trainer.accumulate_grad_batches
        if (every and step % every == 0 and val_every and step % val_every == 0 and step < trainer.max_steps
                and ends_optimizer_step(trainer, batch_idx)):
            self._defer_save_until_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary file beside the target, renamed over it when complete (Lightning's own
    save writes through an fsspec temp file in the system temp dir and moves it: a copy across file systems);
    loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        with atomic_file(path) as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Resume reads with ``weights_only=True`` always (wct.training.resume.load_checkpoint), whatever Lightning
        or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` ask for."""
        from wct.training.resume import load_checkpoint

        return load_checkpoint(path)
