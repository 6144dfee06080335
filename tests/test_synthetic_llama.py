"""scripts/make_synthetic_llama.py: a random Llama of the asked size that transformers loads, sharded with an index;
bad sizes (not a count, too small for the width, too large for the disk) are one ``error:`` line each and leave
no folder behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_synthetic_llama.py"


def make(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))


def test_smallest_model_is_sharded_and_loads_in_transformers(tmp_path):
    """0.08B: one block at hidden width 1024 (the embeddings and head are 65.5 M of it), 64 MiB shards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "synth"
    p = make("--size", "0.08B", "--out", str(out), "--shard-mib", "64")
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert (summary["blocks"], summary["hidden"], summary["intermediate"]) == (1, 1024, 2816)
    # independent count: embedding + head, 4 attention squares, 3 MLP matrices, 2 block norms + the final norm
    assert summary["params"] == 2 * 32000 * 1024 + 4 * 1024**2 + 3 * 1024 * 2816 + 3 * 1024
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) == summary["shards"] >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert all(s.stat().st_size <= 64 * 2**20 + 2**20 for s in shards)  # a tensor larger than a shard: none here

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16)
    assert sum(t.numel() for t in model.parameters()) == summary["params"]
    w = model.model.layers[0].mlp.down_proj.weight.float()
    assert abs(w.std().item() - 0.02) < 1e-3 and torch.equal(model.model.norm.weight, torch.ones(1024).half())
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello", return_tensors="pt").input_ids
    assert model.float()(ids).logits.shape == (1, ids.shape[1], 32000)

    again = tmp_path / "again"  # one seed: the same bytes
    assert make("--size", "0.08B", "--out", str(again), "--shard-mib", "64").returncode == 0
    assert all(s.read_bytes() == (again / s.name).read_bytes() for s in shards)


@pytest.mark.parametrize("size,message", [
    ("abc", "--size 'abc' is not a parameter count; write it like 0.3B"),
    ("10M", "--size 0.01B is too small for hidden width 1024: the embeddings and head alone are 0.0655B"),
    ("100000B", "GiB is free at"),  # 200 TB of fp16
])
def test_bad_size_is_one_line_and_leaves_nothing(tmp_path, size, message):
    out = tmp_path / "synth"
    p = make("--size", size, "--out", str(out))
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in p.stderr and list(tmp_path.iterdir()) == []
