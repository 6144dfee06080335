"""device=auto|cpu|cuda|cuda:N and model.dtype=auto (wct.device), and the verbs' one-line refusal of a missing GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wct.config import CONF_DIR
from wct.device import place, resolve_device, resolve_dtype
from wct.errors import WCTError

REPO = Path(CONF_DIR).parent


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    """Make torch report ``count`` CUDA devices (the probes only: nothing is allocated on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("spec", [None, "auto", "AUTO", " auto "])
def test_auto_is_cpu_without_cuda(monkeypatch, spec):
    fake_gpus(monkeypatch, 0)
    assert resolve_device(spec) == torch.device("cpu")


@pytest.mark.parametrize(("spec", "expected"), [("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:1", "cuda:1"),
                                                ("cpu", "cpu"), (torch.device("cuda", 1), "cuda:1")])
def test_device_with_two_gpus(monkeypatch, spec, expected):
    fake_gpus(monkeypatch, 2)
    assert resolve_device(spec) == torch.device(expected)


@pytest.mark.parametrize(("spec", "count", "message"), [
    ("cuda", 0, "torch sees no CUDA device"),
    ("cuda:0", 0, "torch sees no CUDA device"),
    ("cuda:2", 2, "has 2 CUDA device(s), cuda:0 to cuda:1"),
    ("gpu", 1, "device='gpu' is unknown; use auto, cpu, cuda or cuda:N"),
    ("cuda:x", 1, "is unknown"),
    ("mps", 0, "is unknown"),
])
def test_bad_device_is_one_clear_error(monkeypatch, spec, count, message):
    fake_gpus(monkeypatch, count)
    with pytest.raises(WCTError) as e:
        resolve_device(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("device", "bf16", "expected"), [
    ("cpu", True, torch.float32), ("cuda", True, torch.bfloat16), ("cuda", False, torch.float16)])
def test_auto_dtype(monkeypatch, device, bf16, expected):
    fake_gpus(monkeypatch, 1, bf16)
    assert resolve_dtype("auto", torch.device(device)) == expected


@pytest.mark.parametrize(("spec", "expected"), [("float32", torch.float32), ("bf16", torch.bfloat16),
                                                ("fp16", torch.float16), (None, None)])
def test_explicit_dtype_is_kept_on_any_device(monkeypatch, spec, expected):
    fake_gpus(monkeypatch, 1)
    assert resolve_dtype(spec, torch.device("cuda", 0)) == expected
    assert resolve_dtype(spec, torch.device("cpu")) == expected


def test_place_checks_device_before_dtype(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert place("auto", "auto") == (torch.device("cpu"), torch.float32)
    with pytest.raises(WCTError, match="torch sees no CUDA device"):
        place("cuda", "no-such-dtype")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
@pytest.mark.parametrize("verb", ["wct.evaluate", "wct.quantize", "wct.generate"])
def test_verbs_refuse_cuda_without_it_in_one_line(tmp_path, verb):
    extra = ['prompt="hi"'] if verb == "wct.generate" else ["eval.corpora=[x]"]
    proc = subprocess.run(
        [sys.executable, "-m", verb, "model=tiny-llama", "device=cuda", f"hydra.run.dir={tmp_path}", *extra],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "device=cuda but torch sees no CUDA device" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cuda_device_and_dtype():
    device, dtype = place("cuda", "auto")
    assert device == torch.device("cuda", 0) and dtype in (torch.bfloat16, torch.float16)
    assert resolve_device("auto") == device
    assert torch.ones(2, device=device, dtype=dtype).sum().item() == 2
