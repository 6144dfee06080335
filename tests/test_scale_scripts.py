"""The scale scripts on the smallest synthetic model. scripts/make_synthetic_llama.py: a random Llama of the asked
size that transformers loads, sharded with an index, the same bytes from one seed; bad sizes (not a count, too
small for the width, too large for the disk) are one ``error:`` line each and leave no folder behind.
scripts/bench_scale.py: its three phases end to end, their figures against independent counts, and its bad input
as one line each."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2")))


def one_error(p: subprocess.CompletedProcess) -> str:
    """The single ``error:`` line a refused command printed (asserted to be all of its stderr)."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
    return lines[0]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> tuple[Path, dict]:
    """0.08B: one block at hidden width 1024 (the embeddings and head are 65.5 M of it), 64 MiB shards."""
    out = tmp_path_factory.mktemp("synth") / "model"
    p = script("make_synthetic_llama.py", "--size", "0.08B", "--out", str(out), "--shard-mib", "64")
    assert p.returncode == 0, p.stderr[-2000:]
    return out, json.loads(p.stdout.strip().splitlines()[-1])


def test_smallest_model_is_sharded_and_loads_in_transformers(synth, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = synth
    assert (summary["blocks"], summary["hidden"], summary["intermediate"]) == (1, 1024, 2816)
    # independent count: embedding + head, 4 attention squares, 3 MLP matrices, 2 block norms + the final norm
    assert summary["params"] == 2 * 32000 * 1024 + 4 * 1024**2 + 3 * 1024 * 2816 + 3 * 1024
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == summary["shards"] >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 64 * 2**20 + 2**20 for s in shards)

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert sum(t.numel() for t in model.parameters()) == summary["params"]
    w = model.model.layers[0].mlp.down_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 1e-3 and torch.equal(model.model.norm.weight, torch.ones(1024).half())
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt").input_ids
    assert model.float()(ids).logits.shape == (1, ids.shape[1], 32000)

    again = tmp_path / "again"  # one seed: the same bytes
    p = script("make_synthetic_llama.py", "--size", "0.08B", "--out", str(again), "--shard-mib", "64")
    assert p.returncode == 0
    assert all(s.read_bytes() == (again / s.name).read_bytes() for s in shards)


@pytest.mark.parametrize("size,message", [
    ("abc", "--size 'abc' is not a parameter count; write it like 0.3B"),
    ("10M", "--size 0.01B is too small for hidden width 1024: the embeddings and head alone are 0.0655B"),
    ("100000B", "GiB is free at"),  # 200 TB of fp16
])
def test_bad_size_is_one_line_and_leaves_nothing(tmp_path, size, message):
    p = script("make_synthetic_llama.py", "--size", size, "--out", str(tmp_path / "synth"))
    assert message in one_error(p) and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # bench_scale.py end to end: three phases in subprocesses
def test_bench_scale_measures_the_three_phases(synth, tmp_path):
    model, summary = synth
    packed, out = tmp_path / "packed", tmp_path / "bench.json"
    p = script("bench_scale.py", "--model", str(model), "--packed", str(packed), "--out", str(out),
               "--n-samples", "2", "--seqlen", "64")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "requires_grad=True to a scalar" not in p.stderr
    res = json.loads(out.read_text())
    assert res["fp16_bytes"] == sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert res["block_weights"] == 4 * 1024**2 + 3 * 1024 * 2816
    q, ld, t = res["quantize"], res["load"], res["train"]
    assert len(q["block_seconds"]) == summary["blocks"] and 4.0 < q["paper_bits"] < 4.1
    # ru_maxrss is the kernel's high-water mark, updated lazily (per-thread counters): it may trail VmRSS by pages
    assert ld["peak_rss"] >= ld["rss_after_forward"] - 2**20 and ld["rss_after_forward"] >= ld["runtime_rss"] > 0
    assert q["peak_rss"] > ld["runtime_rss"]
    # a random model predicts about uniformly over the 32000 tokens: loss near ln 32000 = 10.37
    assert t["trainable"] > 0 and abs(t["loss"] - math.log(32000)) < 1.0
    # the estimate's counts from config.json alone against the files
    assert res["estimate"]["fp16"] == summary["params"] * 2
    assert abs(res["estimate"]["packed"] / res["packed_bytes"] - 1) < 0.01
    assert "quantize (streaming): peak RSS" in p.stdout and "load packed + one token: peak RSS" in p.stdout
    # resident OWQ weight bytes after one token: the stored tensors on every backend the CPU runs, no copy beside
    r = ld["resident"]
    assert 0 < r["stored"] < res["packed_bytes"]
    for backend in ("torch", "cpu"):
        assert r[backend]["bytes"] == r["stored"] and r[backend]["max_layer_ratio"] == 1.0
    assert "resident OWQ weight bytes after one token" in p.stdout


@pytest.mark.slow  # bench_scale.py phases in subprocesses
def test_bench_scale_bad_input_is_one_line(synth, tmp_path):
    model, _ = synth
    assert "has no config.json" in one_error(script("bench_scale.py", "--model", str(tmp_path / "absent")))
    assert "bogus is not a phase" in one_error(script("bench_scale.py", "--model", str(model), "--skip", "bogus"))
    line = one_error(script("bench_scale.py", "--model", str(model), "--packed", str(tmp_path / "empty"),
                            "--skip", "quantize"))
    assert "holds no packed model" in line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    line = one_error(script("bench_scale.py", "--model", str(model), "--packed", str(mine), "--skip", "load,train"))
    assert line.startswith("error: phase quantize: ") and "was not written by wct" in line
    assert [f.name for f in mine.iterdir()] == ["notes.txt"] and not (tmp_path / "empty").exists()
