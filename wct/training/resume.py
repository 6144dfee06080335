"""Resuming a run from a checkpoint (docs/guarantees.md "Resume"): find it, read it safely, and make the run do what
its printed configuration says.

* :func:`load_checkpoint` reads every checkpoint with ``torch.load(weights_only=True)`` (tensors and plain
  containers only), explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` cannot turn it off; unreadable, truncated
  or code-carrying files are one :class:`~wct.errors.WCTError` line.
* :func:`check_resume` compares the run's resolved config with the checkpoint's: the keys in :data:`APPLIED`
  may change and take effect (:func:`apply_optim_config` puts the new optimizer values into the restored param
  groups and the scheduler's base rates; the schedule itself is rebuilt from the new config, steps included);
  the keys in :data:`FREE` do not change the trained numbers; any other change (base, quant, calibration, tuning,
  method, task and data, seed, global batch, optimizer type, precision, devices) is refused, naming the keys.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from wct.errors import WCTError

# may change on resume and take effect from the next optimizer step
APPLIED = ("optim.lr", "optim.betas", "optim.eps", "optim.weight_decay", "optim.scheduler", "optim.warmup_steps",
           "optim.warmup_ratio", "optim.min_lr_ratio", "optim.grad_clip", "trainer.max_steps", "trainer.max_epochs")
# may change freely: where and how the run reports, not what it computes (prefixes end with a dot); the base's
# folder may move (its identity is its fingerprint, checked when Lightning restores the checkpoint)
FREE = ("paths.", "logger.", "callbacks.", "run_name", "ckpt_path", "cache_dir", "progress", "optimized_metric",
        "model.quantized",
        "data_origin", "data_rows.", "task.sample_prompts", "trainer.enable_progress_bar",
        "trainer.log_every_n_steps", "trainer.val_check_interval", "trainer.limit_val_batches",
        "trainer.validate_first", "trainer.kernel", "trainer.gradient_checkpointing", "trainer.deterministic")
_ABSENT = "<absent>"


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
        what = "is a folder" if Path(ckpt_path).is_dir() else "does not exist"
        raise WCTError(f"ckpt_path={ckpt_path} {what}; pass a .ckpt file of a wct run (<run>/checkpoints/last.ckpt) "
                       "or ckpt_path=last")
    return ckpt_path


def load_checkpoint(path: str | Path, key: str = "ckpt_path") -> dict[str, Any]:
    """The checkpoint at ``path`` read with ``weights_only=True`` onto the CPU, checked to be a wct.train one.
    ``key`` names the setting in error messages."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors come in many types; all mean "not a checkpoint we will read"
        refused = re.search(r"Unsupported global: GLOBAL [\w.]+", str(e))  # without torch's allowlisting advice
        if refused:
            raise WCTError(f"{key}={path} holds Python objects other than tensors and plain containers "
                           f"({refused.group(0)}); wct reads checkpoints with weights_only=True and refuses this "
                           "one: use a checkpoint written by wct.train") from None
        first = (str(e).splitlines() or [""])[0]
        reason = f": {first}" if len(first.split()) >= 3 and "weights_only" not in first else ""
        raise WCTError(f"{key}={path} is not a readable checkpoint (truncated, or not a torch file{reason}); "
                       "pass a .ckpt written by wct.train (<run>/checkpoints/last.ckpt)") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("wct"), dict) or "state_dict" not in ckpt:
        raise WCTError(f"{key}={path} was not written by wct.train (no 'wct' section); pass a checkpoint of a wct run")
    return ckpt


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": leaf}`` of nested dicts (lists are leaves)."""
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out |= flatten(v, f"{prefix}{k}.")
    return out


def _free(key: str) -> bool:
    return any(key == f or (f.endswith(".") and key.startswith(f)) for f in FREE)


def check_resume(saved: dict[str, Any], config: dict[str, Any], path: str) -> list[str]:
    """Compare the checkpoint's resolved config ``saved`` with this run's ``config``; WCTError naming every key
    that may not change. Returns the ``key: old -> new`` lines of the changes that take effect."""
    old, new = flatten(saved), flatten(config)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT) and not _free(k))
    refused = [k for k in changed if k not in APPLIED]
    if refused:
        shown = "; ".join(f"{k}: {old.get(k, _ABSENT)!r} -> {new.get(k, _ABSENT)!r}" for k in refused[:8])
        raise WCTError(f"ckpt_path={path}: resuming cannot change {', '.join(refused)} ({shown}); resume with the "
                       f"checkpoint's values, or start a new run without ckpt_path. Only {', '.join(APPLIED)} (and "
                       "logging) may change on resume")
    return [f"{k}: {old.get(k, _ABSENT)!r} -> {new.get(k, _ABSENT)!r}" for k in changed]


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, config: dict[str, Any]) -> str | None:
    """The checkpoint to resume (``ckpt_path``, ``last`` resolved) after :func:`check_resume` against ``config``
    (this run's resolved config); prints the changes that take effect. None when the run starts fresh."""
    path = resolve_ckpt(ckpt_path, run_dir)
    if path is None:
        return None
    changes = check_resume(load_checkpoint(path)["wct"].get("config", {}), config, path)
    for line in changes:
        print(f"resume: {line} (takes effect from the next optimizer step)")
    return path


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg) -> None:
    """Make the (restored) optimizer and LambdaLR scheduler follow ``cfg`` (an OptimConfig): lr, betas, eps and
    weight decay in every param group, ``cfg.lr`` as the scheduler's base rate, and the current rate
    ``cfg.lr * lambda(step)`` of the scheduler's (new) schedule. A no-op on a fresh run."""
    for i, group in enumerate(optimizer.param_groups):
        group.update(initial_lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
        group["lr"] = cfg.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
