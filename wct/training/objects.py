"""The objects a training run composes from its config groups: callbacks and loggers from ``_target_`` entries
(``hydra.utils.instantiate``, as lightning-hydra-template does), and the W&B logger's run-time defaults."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from wct.errors import WCTError


def instantiate_group(group: str, entries: dict[str, Any]) -> list:
    """One object per entry of ``entries`` (name -> ``{_target_: ..., kwargs}``; ``None`` entries are skipped, so
    ``callbacks.samples=null`` turns one off); WCTError naming the entry when one cannot be built."""
    from hydra.utils import instantiate

    objects = []
    for name, spec in entries.items():
        if spec is None:
            continue
        if not isinstance(spec, dict) or "_target_" not in spec:
            raise WCTError(f"{group}.{name} has no _target_; each {group} entry is {{_target_: class, kwargs}} "
                           f"(see conf/{group}/)")
        try:
            objects.append(instantiate(spec))
        except Exception as e:  # hydra wraps import and argument errors in its own types
            cause = e.__cause__ or e
            raise WCTError(f"{group}.{name} ({spec['_target_']}) cannot be built: {str(cause).splitlines()[0]}"
                           ) from None
    return objects


def wandb_logger(name: str, save_dir: str, project: str = "wct", entity: str | None = None,
                 offline: bool | None = None, group: str | None = None, tags: list[str] | None = None):
    """A Lightning ``WandbLogger``, offline exactly when ``offline`` is None and ``WANDB_API_KEY`` is unset, grouped
    by the sweep folder's name in a ``-m`` run when ``group`` is None."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.loggers import WandbLogger

    if offline is None:
        offline = not os.environ.get("WANDB_API_KEY")
    if group is None and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        group = Path(HydraConfig.get().sweep.dir).name
    logger = WandbLogger(name=name, project=project, entity=entity, save_dir=save_dir, offline=offline, group=group,
                         tags=list(tags or []))
    # Lightning always passes wandb.init(anonymous=None), which W&B >= 0.19 answers with "The anonymous setting has
    # no effect" on every run: the setting is gone from W&B, so it is not passed at all.
    logger._wandb_init.pop("anonymous", None)
    return logger
