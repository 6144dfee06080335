"""A Hydra callback (conf/hydra/default.yaml) that ends every ``-m`` sweep with one summary line of its trials and
a non-zero exit status when none of them succeeded.

A trial failed when its job raised, or when it returned NaN (``wct.train`` returns NaN for a failed trial so
that the sweep goes on). Counts are kept in this process: Hydra's basic launcher and the Optuna sweeper run every
job here."""

from __future__ import annotations

import math
import sys
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class SweepSummary(Callback):
    """Counts the sweep's ok and failed trials; prints ``sweep: N trials, K ok, M failed`` at its end and exits
    with status 1 when every trial failed."""

    def __init__(self) -> None:
        self.trials: list[tuple[list[str], bool]] = []  # (overrides, ok) per finished job

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        value = job_return._return_value  # the property re-raises a failed job's exception
        nan = isinstance(value, float) and math.isnan(value)
        self.trials.append((list(job_return.overrides or []), job_return.status == JobStatus.COMPLETED and not nan))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not self.trials:
            return
        common = set.intersection(*(set(o) for o, _ in self.trials))  # shown: what tells the trials apart
        failed = [" ".join(x for x in o if x not in common) or f"#{i}" for i, (o, ok) in enumerate(self.trials)
                  if not ok]
        ok = len(self.trials) - len(failed)
        shown = f" (failed: {'; '.join(failed[:5])}{' ...' if len(failed) > 5 else ''})" if failed else ""
        print(f"sweep: {len(self.trials)} trials, {ok} ok, {len(failed)} failed{shown}",
              file=sys.stderr if failed else sys.stdout)
        if not ok:
            raise SystemExit(1)
