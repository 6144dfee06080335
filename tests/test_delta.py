"""Weak-column deltas: exported small, applied in both loading routes bitwise equal to the merged export."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import wct
from wct.delta import apply_delta, packed_fingerprint, read_delta, write_delta
from wct.errors import WCTError
from wct.exporting import check_batch, export_delta, export_wct, logits
from wct.models import load_model
from wct.checkpoint import WEIGHTS, load_quantized, owq_layers, save_quantized
from wct.quant.owq import quantize_model

from helpers import export_config, trained_from


def trained_run(base_dir, seed_scale: float, norms: bool):
    """A 'trained' WCT run on the tiny base; with ``norms`` it also trained the final norm and the tied head."""
    trained = trained_from(base_dir, scale=seed_scale)
    if norms:
        g = torch.Generator().manual_seed(int(seed_scale * 1000))
        for name in ("model.norm.weight", "model.embed_tokens.weight"):
            p = trained.model.get_parameter(name)
            trained.extra[name] = p.detach().float() + seed_scale * torch.randn(p.shape, generator=g)
            p.data = trained.extra[name].clone()
    return trained


@pytest.mark.parametrize("norms", [False, True])
def test_delta_equals_merged_export_in_both_routes(base_dir, tmp_path, norms):  # noqa: F811
    trained = trained_run(base_dir, 0.05, norms)
    export_wct(trained, tmp_path / "merged")
    meta = export_delta(trained, tmp_path / "d.safetensors")
    ids = check_batch(trained.model.config.vocab_size)
    merged = logits(load_quantized(tmp_path / "merged")[0], ids)
    assert not torch.equal(merged, logits(load_quantized(base_dir)[0], ids))  # the fine-tune changed the model
    ours, _ = load_quantized(base_dir, delta=tmp_path / "d.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    wct.apply_delta(hf, tmp_path / "d.safetensors")
    assert torch.equal(logits(ours, ids), merged) and torch.equal(logits(hf, ids), merged)
    tensors, info = read_delta(tmp_path / "d.safetensors")
    weak = {n for n, m in owq_layers(hf).items() if m.n_weak}
    assert set(tensors) == {f"{n}.weak_weight" for n in weak} | set(trained.extra)
    assert {t.dtype for n, t in tensors.items() if n.endswith("weak_weight")} == {torch.float16}
    assert info["base_fingerprint"] == packed_fingerprint(load_quantized(base_dir)[0])
    assert '"model"' in info["training_config"] and "val/loss" in info["metrics"]
    assert meta["bytes"] == (tmp_path / "d.safetensors").stat().st_size
    card = (tmp_path / "merged" / "README.md").read_text()  # the model card says how to load it, both ways
    assert "wct.load_quantized(" in card and "AutoModelForCausalLM.from_pretrained(" in card
    kinds = {n.rsplit(".", 1)[-1]: m.n_weak for n, m in owq_layers(hf).items()}
    assert f"'q_proj': [{kinds['q_proj']}]" in card
    if not norms:  # only the weak columns: a small fraction of the base
        assert meta["bytes"] < (base_dir / WEIGHTS).stat().st_size / 4


def test_swapping_deltas_in_place(base_dir, tmp_path):  # noqa: F811
    runs = {"a": trained_run(base_dir, 0.05, norms=True), "b": trained_run(base_dir, 0.08, norms=False)}
    ids = check_batch(runs["a"].model.config.vocab_size)
    expected = {}
    for key, trained in runs.items():
        export_wct(trained, tmp_path / f"merged-{key}")
        export_delta(trained, tmp_path / f"{key}.safetensors")
        expected[key] = logits(load_quantized(tmp_path / f"merged-{key}")[0], ids)
    served, _ = load_quantized(base_dir)
    for key in ("a", "b", "a", "b"):  # b trained no norms: swapping a -> b must restore the base's norms
        start = time.perf_counter()
        apply_delta(served, tmp_path / f"{key}.safetensors")
        print(f"delta swap to {key}: {1e3 * (time.perf_counter() - start):.1f} ms")
        assert torch.equal(logits(served, ids), expected[key])


def test_bad_deltas_are_refused_and_leave_the_model_alone(base_dir, tmp_path):  # noqa: F811
    trained = trained_run(base_dir, 0.05, norms=False)
    good = export_delta(trained, tmp_path / "d.safetensors")["path"]
    model, tok = load_quantized(base_dir)
    ids = check_batch(model.config.vocab_size)
    before = logits(model, ids)

    other, _ = load_model("tiny-llama")  # same model, other calibration text: another quantized base
    quantize_model(other, torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(5)), bits=4,
                   target_rank=4, progress=False)
    other_dir = save_quantized(other, tok, tmp_path / "other")
    with pytest.raises(WCTError, match="exported for another base"):
        load_quantized(other_dir, delta=good)

    data = (tmp_path / "d.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(WCTError, match="truncated or corrupt"):
        apply_delta(model, tmp_path / "cut.safetensors")
    with pytest.raises(WCTError, match="not a wct delta"):
        apply_delta(model, base_dir / WEIGHTS)
    with pytest.raises(WCTError, match="does not exist"):
        apply_delta(model, tmp_path / "nope.safetensors")

    tensors, meta = read_delta(good)
    name = next(iter(tensors))
    for bad, message in [
        ({**tensors, name: tensors[name][:-1]}, "has shape"),
        ({k: v for k, v in tensors.items() if k != name}, "weak columns missing"),
        ({**tensors, "model.layers.0.nope": tensors[name].clone()}, "unknown tensors"),
    ]:
        write_delta(tmp_path / "bad.safetensors", bad, meta["base_fingerprint"], meta["base"], {}, {})
        with pytest.raises(WCTError, match=message):
            apply_delta(model, tmp_path / "bad.safetensors")
    assert torch.equal(logits(model, ids), before)


def test_cli_delta_export(wct_run, base_dir, tmp_path, capsys):  # noqa: F811
    from wct.export import run

    run(export_config(f"ckpt_path={wct_run}", f"out={tmp_path / 'merged'}"))
    meta = run(export_config(f"ckpt_path={wct_run}", "format=delta", f"out={tmp_path / 'd.safetensors'}"))
    assert "read back bit-exactly" in capsys.readouterr().out
    ids = check_batch(256)
    assert torch.equal(logits(load_quantized(base_dir, delta=meta["path"])[0], ids),
                       logits(load_quantized(tmp_path / "merged")[0], ids))
    with pytest.raises(SystemExit):
        run(export_config(f"ckpt_path={wct_run}", "format=zip"))
    assert "format='zip' is not an export format" in capsys.readouterr().err
