"""lm-evaluation-harness on a loaded wct model (docs/interop.md).

    python -m wct.evaluate model.quantized=DIR eval=lm_eval eval.tasks=[arc_easy,hellaswag] eval.limit=100

The model (OWQ export, FP model, or adapter on its base: whatever ``wct.evaluate`` loaded) is wrapped in lm-eval's
``HFLM`` and scored with ``lm_eval.simple_evaluate``. Offline, a task whose dataset is not in the local cache fails
with one line; task YAMLs in ``eval.include_path`` work without the hub (``dataset_path: json`` over a local file).
"""

from __future__ import annotations

from typing import Any

from wct.errors import WCTError


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise WCTError("eval=lm_eval needs lm-evaluation-harness, which is not installed: pip install 'wct[lm_eval]' "
                       "(or pip install lm_eval)") from None
    return lm_eval, HFLM, TaskManager


def task_manager(tasks: list[str], include_path: str | None):
    """lm-eval's TaskManager knowing ``tasks``: the local YAMLs of ``include_path`` alone when they define every
    task (no scan of lm-eval's thousands of built-in tasks), else the built-ins too. Unknown names: WCTError."""
    _, _, TaskManager = _lm_eval()
    if not tasks:
        raise WCTError("eval.tasks is empty; name lm-eval tasks, e.g. eval.tasks=[arc_easy,hellaswag]")
    if include_path:
        local = TaskManager(include_path=include_path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise WCTError(f"unknown lm-eval task(s) {unknown}; list them with `lm-eval ls tasks`, or point "
                       "eval.include_path at the folder of your task YAMLs")
    return tm


def run_lm_eval(model, tokenizer, tasks: list[str], limit: float | None = None, num_fewshot: int | None = None,
                include_path: str | None = None, batch_size: int = 1, log_samples: bool = False) -> dict[str, Any]:
    """``lm_eval.simple_evaluate`` of ``tasks`` on ``model`` (wrapped in ``HFLM``); returns its result dict
    (``results``, ``versions``, ``n-shot``, ``configs``, ``samples`` when ``log_samples``)."""
    lm_eval, HFLM, _ = _lm_eval()
    tm = task_manager(list(tasks), include_path)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, num_fewshot=num_fewshot,
                                      task_manager=tm, log_samples=log_samples, bootstrap_iters=0)
    except (ConnectionError, FileNotFoundError) as e:
        raise WCTError(f"lm-eval task(s) {list(tasks)}: a dataset is not in the local cache and cannot be downloaded "
                       f"({str(e).splitlines()[0]}); run once with network access, or use a local task YAML "
                       "(eval.include_path=)") from None
    if out is None:
        raise WCTError("lm-eval returned no results (not the main process)")
    return out


def lm_eval_table(out: dict[str, Any]) -> str:
    """lm-eval's own Markdown table of the results (and of the groups, when there are any)."""
    lm_eval, _, _ = _lm_eval()
    table = lm_eval.utils.make_table(out)
    return table + ("\n" + lm_eval.utils.make_table(out, "groups") if out.get("groups") else "")


def summary(out: dict[str, Any]) -> dict[str, Any]:
    """The JSON-safe part of lm-eval's result dict that goes into results.json."""
    keys = ("results", "groups", "versions", "n-shot", "higher_is_better", "n-samples")
    return {k: out[k] for k in keys if k in out}
