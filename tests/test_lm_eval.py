"""lm-evaluation-harness on a packed model: a local fixture task, checked against log-likelihoods computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wct.errors import WCTError
from wct.models import tiny_llama
from wct.quant.checkpoint import load_quantized, save_quantized

pytest.importorskip("lm_eval")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "lm_eval"


@pytest.fixture
def packed(tmp_path, monkeypatch, rtn_pack):
    monkeypatch.chdir(REPO)  # the fixture task names its data file relative to the repository root
    model, tok = tiny_llama()
    rtn_pack(model, 4, 32)
    return save_quantized(model, tok, tmp_path / "packed")


@torch.no_grad()
def choice_loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the sum of the continuation tokens' log-probabilities, in float64."""
    ctx = tok(context).input_ids
    ids = torch.tensor([tok(context + continuation).input_ids])
    logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
    return sum(logp[i - 1, ids[0, i]].item() for i in range(len(ctx), ids.shape[1]))


def test_local_task_equals_independent_loglikelihoods(packed):
    from wct.evaluation.harness import run_lm_eval

    model, tok = load_quantized(packed)
    out = run_lm_eval(model, tok, ["wct_tiny_mc"], include_path=str(FIXTURES), log_samples=True)
    rows = [json.loads(line) for line in (FIXTURES / "tiny_mc.jsonl").read_text().splitlines()]
    samples = sorted(out["samples"]["wct_tiny_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == len(rows) == out["n-samples"]["wct_tiny_mc"]["effective"]
    correct = []
    for row, sample in zip(rows, samples):
        context = f"Question: {row['question']}\nAnswer:"
        ours = [choice_loglikelihood(model, tok, context, f" {c}") for c in row["choices"]]
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert theirs == pytest.approx(ours, abs=1e-4)
        correct.append(float(max(range(len(ours)), key=ours.__getitem__) == row["answer"]))
    assert out["results"]["wct_tiny_mc"]["acc,none"] == pytest.approx(sum(correct) / len(correct))


def test_cli_lm_eval_table_and_results(packed, tmp_path, capsys):
    from hydra import compose, initialize_config_dir

    from wct.config import CONF_DIR
    from wct.evaluate import run

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"model.quantized={packed}", "eval=lm_eval", "eval.tasks=[wct_tiny_mc]", "eval.limit=4",
            f"eval.include_path={FIXTURES}", f"paths.run_dir={tmp_path / 'run'}", "progress=false"])
        results = run(cfg)
        printed = capsys.readouterr().out
        assert "wct_tiny_mc" in printed and "|acc" in printed.replace(" ", "")
        saved = json.loads((tmp_path / "run" / "results.json").read_text())
        acc = saved["lm_eval"]["results"]["wct_tiny_mc"]["acc,none"]
        assert acc == results["lm_eval"]["results"]["wct_tiny_mc"]["acc,none"]
        assert saved["lm_eval"]["n-samples"]["wct_tiny_mc"]["effective"] == 4 and saved["ppl"] == {}

        for override, message in [("eval.tasks=[no_such_task_xyz]", "unknown lm-eval task"),
                                  ("eval.tasks=[]", "eval.corpora and eval.tasks are empty")]:
            with pytest.raises(SystemExit):
                run(compose(config_name="evaluate", overrides=[
                    f"model.quantized={packed}", "eval=lm_eval", override, f"eval.include_path={FIXTURES}",
                    f"paths.run_dir={tmp_path / 'bad'}"]))
            assert message in capsys.readouterr().err


def test_uncached_dataset_is_one_line(packed, tmp_path):
    from wct.evaluation.harness import run_lm_eval

    task = (FIXTURES / "wct_tiny_mc.yaml").read_text().replace("task: wct_tiny_mc", "task: wct_uncached_mc")
    task = task.replace("dataset_path: json", "dataset_path: wct-nobody/not-cached-anywhere").replace(
        "dataset_kwargs:\n  data_files:\n    test: tests/fixtures/lm_eval/tiny_mc.jsonl\n", "")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "uncached.yaml").write_text(task)
    model, tok = load_quantized(packed)
    with pytest.raises(WCTError, match="not in the local cache"):
        run_lm_eval(model, tok, ["wct_uncached_mc"], include_path=str(tmp_path / "tasks"))
