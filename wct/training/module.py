"""The LightningModule of weak column tuning (docs/architecture.md §3, docs/algorithm.md §3).

Trainable: every OWQLinear ``weak_weight`` as an fp32 master copy, optionally norms and the output head
(``tuning``); everything else is frozen and checked to be. A LoRA baseline passes a peft model whose adapters
are the only trainable tensors. Loss: the causal LM loss on response tokens (labels -100 elsewhere);
``train/loss`` is the mean over the micro-batches of one optimizer step, ``val/loss`` the token-weighted mean over
the validation split (all ranks), ``val/ppl`` = exp(val/loss).

Checkpoints hold only the trainable tensors, the optimizer, scheduler and loop state, and ``checkpoint["wct"]``:
the base's fingerprint (:func:`fingerprint`), its name / folder, the method and the resolved config. A checkpoint
of another base is refused.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import lightning as L
import torch
from torch import nn

from wct.data.batching import MODEL_KEYS, real_tokens
from wct.device import as_dtype
from wct.errors import WCTError
from wct.nn.owq_linear import OWQLinear
from wct.config import OptimConfig, TuningConfig

def fingerprint(model: nn.Module) -> str:
    """sha256 over every tensor of ``model`` (name, dtype, shape, bytes) in state-dict order: the base's identity."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def logical_params(model: nn.Module) -> int:
    """Parameters of the model as a dense model would count them (each quantized weight counts once)."""
    owq = [m for m in model.modules() if isinstance(m, OWQLinear)]
    seen, n = {id(p) for m in owq for p in m.packed}, 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    for m in owq:
            n += (m.in_features - m.n_weak) * m.out_features
            n += 0 if m.bias is None else m.bias.numel()
    return n


def no_weak_columns(recipe: dict) -> str:
    """Why a base has no weak column to train, and a recipe that gives it some (not the one that gave none)."""
    bits, target = recipe.get("bits", 4), recipe.get("target_bit")
    if recipe.get("method", "owq") == "owq" and target is not None:
        return (f"the base has no weak columns to train: quant.target_bit={target} rounds to 0 weak columns per layer "
                f"at this model's layer widths; raise it (e.g. quant.target_bit={bits + 0.1:g}) or set a fixed count "
                "per layer: quant.target_bit=null quant.target_rank=8")
    return ("the base has no weak columns to train (no OWQLinear with n_weak > 0); quantize with quant.method=owq "
            f"and a target_bit above bits or a target_rank, e.g. quant.bits={bits} quant.target_bit=null "
            "quant.target_rank=8")


def prepare_wct(model: nn.Module, tuning: TuningConfig) -> list[str]:
    """Freeze ``model`` but its weak columns (fp32 masters) and, per ``tuning``, norms / output head; returns
    the trainable parameter names. WCTError when the model has no weak column to train."""
    master = as_dtype(tuning.master_dtype)
    model.requires_grad_(False)
    owq = [m for m in model.modules() if isinstance(m, OWQLinear)]
    if not any(m.n_weak for m in owq):
        raise WCTError(no_weak_columns(getattr(model.config, "quantization_config", None) or {}))
    chosen: list[nn.Parameter] = []
    for m in owq:
        m.weak_weight = nn.Parameter(m.weak_weight.detach().to(master), requires_grad=False)
        chosen += [m.weak_weight] if m.n_weak else []
    if tuning.norms:
        chosen += [p for m in model.modules() if type(m).__name__.endswith("Norm") for p in m.parameters(False)]
    if tuning.lm_head:
        chosen.append(model.get_output_embeddings().weight)
    for p in chosen:
        p.data = p.data.to(master)
        p.requires_grad_(True)
    ids = {id(p) for p in chosen}
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in ids]
    if stray:
        raise WCTError(f"parameters outside the tuning set are trainable: {stray[:5]}; report this as a bug")
    return names


def make_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW (torch) or bitsandbytes AdamW8bit / PagedAdamW8bit. Both bitsandbytes optimizers run on CPU
    (bitsandbytes >= 0.48; paging falls back to plain 8-bit state there, with bitsandbytes' own warning)."""
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, **kw)
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise WCTError(f"optim.name={cfg.name} needs bitsandbytes ({e}); pip install bitsandbytes or optim=adamw")
    cls = bnb.optim.AdamW8bit if cfg.name == "adamw8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kw)


def lr_lambda(cfg: OptimConfig, total_steps: int):
    """Multiplier of ``cfg.lr`` at optimizer step s: linear warmup, then constant / cosine / linear decay to
    ``min_lr_ratio`` (names and ranges validated by :class:`wct.config.OptimConfig`)."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * total_steps)

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.scheduler == "cosine" else 1 - progress
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * decay

    return f


class TuneModule(L.LightningModule):
    """Trains the parameters of ``model`` that require grad (see module docstring); ``meta`` goes into every
    checkpoint and must carry ``fingerprint``."""

    def __init__(self, model: nn.Module, optim: OptimConfig, total_steps: int, meta: dict[str, Any]):
        super().__init__()
        self.model, self.optim, self.total_steps, self.meta = model, optim, total_steps, meta
        self.trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise WCTError("nothing to train: no parameter requires grad")
        self.strict_loading = False  # checkpoints hold the trainable tensors only
        self._step_losses: list[torch.Tensor] = []
        self._val = torch.zeros(2, dtype=torch.float64)  # token-weighted NLL sum, token count
        self.best_val = math.inf
        self.tokens_seen = 0
        self.validated_at = -1  # global step of the latest validation

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**{k: v for k, v in batch.items() if k in MODEL_KEYS}, use_cache=False).loss

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self(batch)
        self._step_losses.append(loss.detach())
        self.tokens_seen += real_tokens(batch)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning's logging step counts the optimizer steps taken, as global_step does, but comes back one too
        # high when a run resumes from the checkpoint written at the end of fit (a run extended with a larger
        # max_steps): kept equal, so the resumed run logs step k where the straight run logs it
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.global_step
        loss = torch.stack(self._step_losses).mean().float()
        self._step_losses.clear()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, sync_dist=True)
        self.log("lr", optimizer.param_groups[0]["lr"], on_step=True, on_epoch=False)

    def on_validation_epoch_start(self) -> None:
        self._val = torch.zeros(2, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        n = (batch["labels"][:, 1:] != -100).sum()
        self._val += torch.stack([self(batch).double() * n, n.double()])

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")
        loss = (total[0] / total[1].clamp(min=1)).item()
        self.best_val = min(self.best_val, loss)
        self.validated_at = self.global_step
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0)), "val/loss_best": self.best_val},
                      prog_bar=True)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ModelParallelStrategy, which sets ``device_mesh``): shard the model
        with FSDP2 over the data-parallel ranks, packed OWQ tensors included (:mod:`wct.training.sharding`), once.
        The torch kernel's dense-weight cache is turned off there: it would hold every layer's dense weight whole."""
        from torch.distributed.fsdp import FSDPModule

        from wct import kernels
        from wct.training.sharding import shard_model

        if self.device_mesh is None or isinstance(self.model, FSDPModule):
            return
        kernels.configure(cache_dense="0")
        shard_model(self.model, self.device_mesh["data_parallel"])

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = make_optimizer(params, self.optim)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(self.optim, self.total_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_start(self) -> None:
        """A resumed run trains with this run's optimizer settings, not the checkpoint's (wct.training.resume)."""
        from wct.training.resume import apply_optim_config

        apply_optim_config(self.trainer.optimizers[0], self.trainer.lr_scheduler_configs[0].scheduler, self.optim)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by parameter name of ``model`` (what a checkpoint holds)."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach() for n in self.trainable}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = {f"model.{n}" for n in self.trainable}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["wct"] = dict(self.meta, trainable=list(self.trainable), best_val=self.best_val,
                                 tokens_seen=self.tokens_seen)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("wct")
        if meta is None:
            raise WCTError("this checkpoint was not written by wct.train (no 'wct' section); resume from a wct run")
        if meta.get("fingerprint") != self.meta["fingerprint"]:
            raise WCTError(
                f"the checkpoint was trained on another base (base {meta.get('base')!r}, fingerprint "
                f"{str(meta.get('fingerprint'))[:12]}) than this run's (base {self.meta.get('base')!r}, fingerprint "
                f"{self.meta['fingerprint'][:12]}); resume with the same model / quant / calib settings (or "
                f"model.quantized={meta.get('base_dir')})"
            )
        expected = {f"model.{n}" for n in self.trainable}
        if set(checkpoint["state_dict"]) != expected:
            raise WCTError(
                "the checkpoint's trained tensors differ from this run's trainable set (another tuning or method "
                "config?); resume with the tuning/method the checkpoint was written with"
            )
        self.best_val = meta.get("best_val", math.inf)
        self.tokens_seen = meta.get("tokens_seen", 0)
