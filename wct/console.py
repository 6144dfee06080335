"""What a run prints: wct's own lines, progress bars, the resolved config and the summary — and no third-party noise.

The one place where wct silences other libraries' output, each with its reason (docs/guarantees.md "Output"):

- Lightning's INFO lines ("GPU available: False", "Using bfloat16 AMP", "`Trainer.fit` stopped", the litlogger tip)
  restate what wct prints itself (the precision line, the device) or advertise; they also came out twice, once
  through Lightning's own handler and once through the root logger Hydra configures. Lightning logs from WARNING up,
  through its own handler only.
- ``isinstance(treespec, LeafSpec) is deprecated``: raised by Lightning's own ``_pytree`` helper against torch's API
  on every fit; not ours to fix, nothing a user can act on.
- ``It is recommended to use self.log('val/...', ..., sync_dist=True)``: wct reduces val/* over the ranks itself and
  computes weak* from the whole weak columns, so the values are already global (wct.training.module).
- W&B runs quietly (``WANDB_QUIET``): the run folder is printed by wct; W&B warnings still show.

``quiet=true`` (a setting of quantize, evaluate and train, for scripts) also turns progress bars off and sends
standard output nowhere: warnings and ``error:`` lines still reach standard error, results go to ``results.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Iterator

THIRD_PARTY_WARNINGS = [  # message regexes; the module docstring gives each one's reason
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"It is recommended to use `self.log\('(val|weak)",
]
QUIET_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")


def silence_third_party() -> None:
    """Filter the warnings and log lines listed in the module docstring (idempotent: filters are set once, since
    adding a filter makes Python forget which warnings it has already shown)."""
    if getattr(silence_third_party, "done", False):
        return
    for message in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message)
    for name in QUIET_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.WARNING)
        logger.propagate = False  # Lightning's own handler prints it once
    os.environ.setdefault("WANDB_QUIET", "true")
    silence_third_party.done = True  # type: ignore[attr-defined]


@contextlib.contextmanager
def run_output(quiet: bool) -> Iterator[None]:
    """The output of one verb: third-party noise off; with ``quiet`` standard output off too."""
    silence_third_party()
    if not quiet:
        yield
        return
    silent, logger = os.environ.get("WANDB_SILENT"), logging.getLogger("wct")
    level = logger.level
    os.environ["WANDB_SILENT"] = "true"
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        logger.setLevel(logging.WARNING)
        try:
            yield
        finally:  # the caller's settings back, so a verb called from Python leaves no trace
            sys.stdout.flush()
            logger.setLevel(level)
            if silent is None:
                os.environ.pop("WANDB_SILENT", None)
            else:
                os.environ["WANDB_SILENT"] = silent
