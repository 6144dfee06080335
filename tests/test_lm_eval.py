"""lm-evaluation-harness on a packed model: a local fixture task, checked against log-likelihoods computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wct.errors import WCTError
from wct.models import tiny_llama
from wct.checkpoint import load_quantized, save_quantized

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


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_cli_lm_eval_on_an_adapter_export_scores_base_plus_adapter(method, tmp_path, monkeypatch, capsys):
    """eval=lm_eval on a LoRA / QLoRA adapter folder written by wct.export (model.name=<folder>: its base, NF4 for
    QLoRA, plus the adapter) gives the accuracy of independent log-likelihoods of that model, not of the base."""
    from hydra import compose, initialize_config_dir

    from wct.baselines import prepare_lora_model
    from wct.config import CONF_DIR
    from wct.evaluate import run
    from wct.exporting import export_adapter
    from wct.loading import load_adapter_export
    from wct.runs import Trained

    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(REPO)
    model, tok = tiny_llama()
    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}
    peft_model = prepare_lora_model(model, method, **lora)
    trained = {}
    g = torch.Generator().manual_seed(0)
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data += 0.5 * torch.randn(p.shape, generator=g)  # 'training': the adapter changes the scores
            trained[name] = p.detach().clone()
    config = {"model": {"name": "tiny-llama", "dtype": "float32"}, "method": {"name": method, **lora}}
    export_adapter(Trained(peft_model, tok, method, config, "tiny-llama", None, trained), tmp_path / "adapter")

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="evaluate", overrides=[
            f"model.name={tmp_path / 'adapter'}", "eval=lm_eval", "eval.tasks=[wct_tiny_mc]",
            f"eval.include_path={FIXTURES}", f"paths.run_dir={tmp_path / 'run'}", "progress=false"])
        results = run(cfg)
    assert "wct_tiny_mc" in capsys.readouterr().out
    adapted, atok = load_adapter_export(tmp_path / "adapter")
    base, btok = tiny_llama()
    rows = [json.loads(line) for line in (FIXTURES / "tiny_mc.jsonl").read_text().splitlines()]

    def accuracy(m, t) -> float:
        hits = []
        for row in rows:
            context = f"Question: {row['question']}\nAnswer:"
            ll = [choice_loglikelihood(m, t, context, f" {c}") for c in row["choices"]]
            hits.append(float(max(range(len(ll)), key=ll.__getitem__) == row["answer"]))
        return sum(hits) / len(hits)

    got = results["lm_eval"]["results"]["wct_tiny_mc"]["acc,none"]
    assert got == pytest.approx(accuracy(adapted, atok))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["lm_eval"]["results"]["wct_tiny_mc"]["acc,none"] == got
    assert got != accuracy(base, btok)  # the score is the adapted model's, which ranks the choices differently


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
