"""scripts/bench_quant.py: the calibration seed and the "reference OWQ code" column (docs/algorithm.md §2.1)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_quant.py"
TEXT = "".join(f"Line {i}: she said that {i * 37 % 101} letters had come by the morning post.\n" for i in range(200))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quant", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def protocol_args(bench, **change):
    """The script's defaults (the full protocol), with ``change`` applied."""
    args = bench.parser().parse_args([])
    vars(args).update(change)
    return args


def test_reference_column_only_on_its_protocol(bench):
    row = {"row": "owq-w3-t3.01", "ppl": 41.5, "paper_bits": 3.01, "stored_bits": 3.2, "checkpoint_bytes": 2**20,
           "quantize_seconds": 1.0}
    same = bench.reference_ppl(protocol_args(bench))
    assert same == {"gptq-w3": 97.13, "owq-w3-t3.01": 40.64, "owq-w4-t4.01": 29.36}
    header, _, line = bench.table([row], same).splitlines()
    assert "reference OWQ code" in header
    assert line.split()[:3] == ["owq-w3-t3.01", "41.500", "40.64"]
    for change in ({"seed": 1}, {"n_samples": 16}, {"eval_windows": 8}, {"dtype": "bfloat16"},
                   {"calib": "/data/other.txt"}, {"bos": "always"}):
        other = bench.reference_ppl(protocol_args(bench, **change))
        assert other == {}, change
        assert bench.table([row], other).splitlines()[2].split()[2] == "-"


@pytest.mark.slow  # two quantize processes
def test_seed_changes_the_calibration_windows(tmp_path):
    book = tmp_path / "book.txt"
    book.write_text(TEXT, encoding="utf-8")
    outs = []
    for seed in (0, 1):
        out = tmp_path / f"bench{seed}.json"
        r = subprocess.run(
            [sys.executable, str(SCRIPT), "--model", "tiny-llama", "--rows", "gptq-w3", "--n-samples", "2",
             "--seqlen", "32", "--eval-windows", "2", "--calib", str(book), "--eval", str(book), "--seed", str(seed),
             "--out", str(out)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        assert "reference OWQ code" in r.stdout
        outs.append(json.loads(out.read_text()))
    assert [o["meta"]["args"]["seed"] for o in outs] == [0, 1]
    assert [o["meta"]["bos"] for o in outs] == ["never", "never"]  # auto: tiny-llama's tokenizer adds no BOS
    assert outs[0]["reference_owq_code"] == outs[1]["reference_owq_code"] == {}
    assert outs[0]["rows"][0]["ppl"] != outs[1]["rows"][0]["ppl"]
