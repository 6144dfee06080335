"""device=auto|cpu|cuda|cuda:N and model.dtype=auto (wct.device), and the verbs' one-line refusal of a missing GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wct.config import CONF_DIR
from wct.device import place, resolve_device, resolve_dtype, resolve_precision
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


def fake_cpu(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    """Make torch report the CPU's bf16 capabilities (AVX512-BF16, AMX tiles)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize(("device", "gpu_bf16", "cpu_bf16", "expected"), [
    ("cpu", True, (False, False), torch.float32), ("cpu", True, (True, False), torch.bfloat16),
    ("cpu", False, (False, True), torch.bfloat16),
    ("cuda", True, (False, False), torch.bfloat16), ("cuda", False, (True, True), torch.float16)])
def test_auto_dtype(monkeypatch, device, gpu_bf16, cpu_bf16, expected):
    fake_gpus(monkeypatch, 1, gpu_bf16)
    fake_cpu(monkeypatch, *cpu_bf16)
    assert resolve_dtype("auto", torch.device(device)) == expected


@pytest.mark.parametrize(("gpu", "gpu_bf16", "cpu_bf16", "expected", "why"), [
    (False, True, (False, False), "32-true", "no native bf16"),
    (False, True, (True, False), "bf16-mixed", "computes bf16 natively"),
    (False, True, (False, True), "bf16-mixed", "computes bf16 natively"),
    (True, True, (False, False), "bf16-mixed", "GPU computes bf16"),
    (True, False, (True, True), "16-mixed", "GPU has no bf16")])
def test_auto_precision_follows_the_hardware(monkeypatch, gpu, gpu_bf16, cpu_bf16, expected, why):
    fake_gpus(monkeypatch, 1 if gpu else 0, gpu_bf16)
    fake_cpu(monkeypatch, *cpu_bf16)
    precision, reason = resolve_precision("auto", gpu)
    assert precision == expected and why in reason and reason.startswith("auto:")


@pytest.mark.parametrize("cpu_bf16", [(False, False), (True, False)])
def test_a_gpu_run_planned_on_a_machine_without_cuda_assumes_bf16(monkeypatch, cpu_bf16):
    # model.estimate_only of trainer=gpu on a CPU machine: no CUDA device to ask, so the GPU rule's bf16
    fake_gpus(monkeypatch, 0, bf16=False)
    fake_cpu(monkeypatch, *cpu_bf16)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_precision("auto", gpu=True) == ("bf16-mixed", "auto: the GPU computes bf16 natively")


@pytest.mark.parametrize(("gpu", "gpu_bf16", "cpu_bf16"), [
    (g, gb, cb) for g in (False, True) for gb in (False, True) for cb in [(False, False), (True, False), (False, True)]])
def test_auto_precision_and_auto_dtype_are_one_rule(monkeypatch, gpu, gpu_bf16, cpu_bf16):
    fake_gpus(monkeypatch, 1, gpu_bf16)
    fake_cpu(monkeypatch, *cpu_bf16)
    dtype = resolve_dtype("auto", torch.device("cuda" if gpu else "cpu"))
    precision = resolve_precision("auto", gpu)[0]
    assert {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": torch.float32}[precision] == dtype


@pytest.mark.parametrize("spec", ["bf16-mixed", "bf16-true"])
def test_explicit_bf16_on_an_emulating_cpu_is_obeyed_with_one_measured_warning(monkeypatch, caplog, spec):
    fake_gpus(monkeypatch, 0)
    fake_cpu(monkeypatch, False, False)
    with caplog.at_level("WARNING", logger="wct"):
        assert resolve_precision(spec, gpu=False) == (spec, "as set")
    (record,) = caplog.records
    slowdown = float(record.getMessage().split("run ")[1].split("x slower")[0])
    assert record.levelname == "WARNING" and "without native bf16" in record.getMessage() and slowdown > 0


@pytest.mark.parametrize(("spec", "cpu_bf16", "gpu"), [("32-true", (True, True), False),
                                                        ("bf16-mixed", (True, True), False),
                                                        ("16-mixed", (False, False), True)])
def test_explicit_precision_is_obeyed_silently_where_it_is_native(monkeypatch, caplog, spec, cpu_bf16, gpu):
    fake_gpus(monkeypatch, 1 if gpu else 0)
    fake_cpu(monkeypatch, *cpu_bf16)
    with caplog.at_level("WARNING", logger="wct"):
        assert resolve_precision(spec, gpu) == (spec, "as set")
    assert not caplog.records


@pytest.mark.parametrize(("spec", "expected"), [("float32", torch.float32), ("bf16", torch.bfloat16),
                                                ("fp16", torch.float16), (None, None)])
def test_explicit_dtype_is_kept_on_any_device(monkeypatch, spec, expected):
    fake_gpus(monkeypatch, 1)
    assert resolve_dtype(spec, torch.device("cuda", 0)) == expected
    assert resolve_dtype(spec, torch.device("cpu")) == expected


def test_place_checks_device_before_dtype(monkeypatch):
    fake_gpus(monkeypatch, 0)
    fake_cpu(monkeypatch, False, False)
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
