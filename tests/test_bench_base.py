"""scripts/bench_base.py: one row runs the real ``wct.train`` and ``wct.evaluate`` commands on tiny-llama and reads
their printed lines and result files (the patterns must keep matching what the entry points print)."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.json"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_base", REPO / "scripts" / "bench_base.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the benchmark script end to end
def test_a_row_quantizes_trains_and_evaluates_its_own_base(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    tiny = ["model=tiny-llama", "quant.target_bit=null", "quant.target_rank=4", f"calib.source={FIXTURE}",
            "calib.n_samples=2", "calib.seqlen=64", "task.max_length=1024", "task.val_size=4",
            "task.global_batch_size=4", "task.micro_batch_size=2", "trainer.val_check_interval=2",
            "trainer.enable_progress_bar=false"]
    row = bench.bench_row("tiny", tiny, tmp_path / "work", steps=2)
    assert row["recipe"] == "owq-w4-k4" and row["steps"] == 2
    assert 4.0 < row["paper_bits"] < 5.0 and row["quantize_s"] > 0
    assert row["val_loss_base"] > 0 and row["val_loss_after"] > 0 and row["val_loss_after"] != row["val_loss_base"]
    assert math.isfinite(bench.ppl_value(row["ppl"])) and bench.ppl_value(row["ppl"]) > 1
    # the base it evaluated is the one the training run quantized into its fresh cache
    assert any((tmp_path / "work" / "tiny" / "bases").iterdir())


def test_unknown_rows_and_a_used_work_folder_are_refused(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["bench_base.py", "--rows", "default,nonsense", "--work", str(tmp_path / "w")])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert str(e.value).startswith("error: --rows names unknown rows ['nonsense']")
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "old").write_text("x")
    monkeypatch.setattr("sys.argv", ["bench_base.py", "--rows", "default", "--work", str(tmp_path / "w")])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert "is not empty" in str(e.value)
