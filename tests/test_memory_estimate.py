"""Memory estimates from config.json alone (wct.training.memory) on the public Llama-2 shapes, checked against
parameter counts, a really quantized model and what autograd really saves; ``model.estimate_only`` on the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from wct import kernels
from wct.config import TuningConfig
from wct.models import config_dict, tiny_llama
from wct.nn import OWQLinear
from wct.quant.config import QuantConfig
from wct.checkpoint import save_quantized
from wct.quant.owq import quantize_model
from wct.training.memory import Shapes, estimate_from_config, train_memory
from wct.training.module import prepare_wct

REPO = Path(__file__).resolve().parent.parent

LLAMA2 = {  # config.json fields of meta-llama/Llama-2-{7,13,70}b-hf and their published parameter counts
    "7b": ({"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 32, "vocab_size": 32000}, 6_738_415_616),
    "13b": ({"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40,
             "num_key_value_heads": 40, "vocab_size": 32000}, 13_015_864_320),
    "70b": ({"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "vocab_size": 32000}, 68_976_648_192),
}


@pytest.mark.parametrize("size", list(LLAMA2))
def test_parameter_count_matches_the_published_one(size):
    config, params = LLAMA2[size]
    assert Shapes.of(config).params == params
    est = estimate_from_config(config, bits=4, n_samples=128, seqlen=2048)
    assert est["fp16"] == 2 * params
    assert 0.25 * est["fp16"] < est["packed"] < 0.35 * est["fp16"]  # 4-bit blocks, fp16 embeddings and head
    # one block + Hessians + activations, not the model; with the paper's 128 x 2048 windows the fp32 hidden
    # states alone are 2 x 128 x 2048 x h x 4 bytes (8 GiB for 7B): the estimate must show that growth
    few = estimate_from_config(config, bits=4, n_samples=16, seqlen=512)["quantize_stream_peak"]
    assert few < 0.3 * est["fp16"] and est["quantize_stream_peak"] - few > 2 * 112 * 2048 * config["hidden_size"] * 4
    assert est["load_packed_peak"] > est["packed"]


def test_shapes_match_a_real_model_with_gqa_and_tied_embeddings():
    config = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True}
    model = LlamaForCausalLM(LlamaConfig(**config))
    shapes = Shapes.of(config)
    assert shapes.params == sum(p.numel() for p in model.parameters())
    block = model.model.layers[0]
    linears = sum(m.weight.numel() for m in block.modules() if isinstance(m, torch.nn.Linear))
    assert shapes.block_weights == linears


def test_streaming_estimate_grows_with_calibration_not_depth():
    config = dict(LLAMA2["7b"][0])
    base = estimate_from_config(config, n_samples=16, seqlen=512)["quantize_stream_peak"]
    deeper = estimate_from_config({**config, "num_hidden_layers": 64}, n_samples=16, seqlen=512)
    assert deeper["quantize_stream_peak"] == base and deeper["fp16"] > 1.9 * estimate_from_config(config)["fp16"]
    assert estimate_from_config(config, n_samples=64, seqlen=512)["quantize_stream_peak"] > base


# --------------------------------------------------------------------------- one training step (train_memory)

Q4 = QuantConfig(bits=4, target_bit=4.01)


@pytest.mark.parametrize("size", list(LLAMA2))
def test_train_estimate_of_published_llama_shapes(size):
    config, params = LLAMA2[size]
    est = train_memory({"model_type": "llama", **config}, Q4, torch.float32, "bf16-mixed", 1, 2048, "adamw",
                       device="cuda", torch_kernel=False)
    assert est.params == params
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["hidden_size"] // config[
        "num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of q k v o gate up down
    codes = config["num_hidden_layers"] * sum(k * n * 4 // 8 + 3 * n for k, n in shapes)  # + fp16 scale, u8 zero
    packed = est.rows["packed weights"][0]
    assert codes < packed < codes * 1.001  # plus the weak-column indices
    assert est.rows["dense-weight cache (torch kernel)"] == (0, 0)  # a GPU kernel caches nothing
    outside = config["vocab_size"] * h * 2 + h * (2 * config["num_hidden_layers"] + 1)  # embeddings, head, norms
    assert est.rows["other weights (embeddings, head, norms)"][0] == 4 * outside
    off, on = est.total
    assert on < off and est.rows["activations (1 x 2048 tokens)"][1] < est.rows["activations (1 x 2048 tokens)"][0] / 4
    # checkpointed, a step needs less than the fp16 weights alone
    assert packed + est.rows["other weights (embeddings, head, norms)"][0] < on < 2 * params


def test_3bit_codes_count_once_on_every_kernel():
    """A 3-bit layer holds its codes once on every backend (on triton/cuda the kernel words in place of the v1
    planes, 3/8 byte per weight either way): the estimate has no row for a second copy, its packed weights are the
    same on a GPU kernel as on the torch kernel, within 5 % of the codes' 3/8 byte per weight, and below 4 bits'."""
    config, _ = LLAMA2["7b"]
    cfg = {"model_type": "llama", **config}
    q3 = QuantConfig(bits=3, target_bit=3.01)
    gpu3 = train_memory(cfg, q3, torch.float32, "bf16-mixed", 1, 128, "adamw", device="cuda", torch_kernel=False)
    cpu3 = train_memory(cfg, q3, torch.float32, "32-true", 1, 128, "adamw", device="cpu", torch_kernel=True)
    gpu4 = train_memory(cfg, Q4, torch.float32, "bf16-mixed", 1, 128, "adamw", device="cuda", torch_kernel=False)
    h, i, kv = config["hidden_size"], config["intermediate_size"], config["hidden_size"] // config[
        "num_attention_heads"] * config["num_key_value_heads"]
    weights = config["num_hidden_layers"] * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert not [row for row in gpu3.rows if "words" in row or "copy" in row]
    packed = gpu3.rows["packed weights"][0]
    assert packed == cpu3.rows["packed weights"][0]
    assert weights * 3 // 8 < packed <= weights * 3 / 8 * 1.05
    assert packed < gpu4.rows["packed weights"][0]


def _quantized_tiny(target_rank: int):
    model, _ = tiny_llama()
    calib = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, bits=4, target_rank=target_rank, progress=False)
    return model


def test_train_estimate_counts_what_a_quantized_model_holds():
    """Weak columns and packed bytes from config.json alone equal those of a really quantized tiny-llama, both
    for the columns ``quant`` would choose and for those an owq-pack config records."""
    model = _quantized_tiny(4)
    config = model.config.to_dict()
    layers = [m for m in model.modules() if isinstance(m, OWQLinear)]
    weak = sum(m.weak_weight.numel() for m in layers)
    packed = sum(t.numel() * t.element_size() for m in layers for k, t in m.state_dict().items() if k != "weak_weight")
    bare = {k: v for k, v in config.items() if k != "quantization_config"}
    for cfg in (config, bare):
        est = train_memory(cfg, QuantConfig(bits=4, target_rank=4), torch.float32, "32-true", 1, 8, "adamw")
        assert est.trainable == weak and est.rows["packed weights"][0] == packed
        assert est.rows["weak columns"][0] == 4 * weak and est.rows["gradients + optimizer state"][0] == 12 * weak


def test_estimate_reads_a_saved_owq_pack_folder(tmp_path):
    """An owq-pack folder's config.json is guarded (model_type wct_owq, docs/interop.md): config_dict gives the
    base architecture's, and the estimate from the folder equals the one from the quantized model's own config."""
    model = _quantized_tiny(4)
    save_quantized(model, tiny_llama()[1], tmp_path / "owq")
    raw = json.loads((tmp_path / "owq" / "config.json").read_text())
    assert raw["model_type"] == "wct_owq"
    config = config_dict(tmp_path / "owq")
    assert config["model_type"] == "llama" and "wct_base_model_type" not in config
    args = (QuantConfig(bits=4, target_rank=4), torch.float32, "32-true", 1, 8, "adamw")
    assert train_memory(config, *args).rows == train_memory(model.config.to_dict(), *args).rows


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_activation_estimate_matches_what_autograd_saves(precision):
    """The activation item against the bytes autograd really keeps for the backward of one step of a quantized
    tiny-llama (storages saved for backward, minus the model's own tensors), without checkpointing."""
    model = _quantized_tiny(4)
    prepare_wct(model, TuningConfig())
    model.train()
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, 256, (2, 96), generator=torch.Generator().manual_seed(1))
    kernels.configure(cache_dense="0")  # the cached dense weights are saved for backward too: not activations
    try:
        with kernels.use_kernel("torch"), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "32-true"):
                model.model(ids, use_cache=False).last_hidden_state.sum().backward()  # the blocks, not the logits
    finally:
        kernels.configure(cache_dense="auto")
    est = train_memory(model.config.to_dict(), QuantConfig(), torch.float32, precision, 2, 96, "adamw")
    acts = est.rows["activations (2 x 96 tokens)"][0]
    assert 0.8 * sum(saved.values()) < acts < 1.25 * sum(saved.values())


def _write_config(folder, config):
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow  # train processes
def test_estimate_only_on_the_command_line(tmp_path):
    """``python -m wct.train model.estimate_only=true`` on a folder holding only the 70B config.json: the table,
    exit 0, nothing loaded; a folder without config.json and the flag on another verb: one error line."""
    folder = _write_config(tmp_path / "llama-70b", {"model_type": "llama", **LLAMA2["70b"][0]})
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "wct.train", "model=hf", f"model.name={folder}", "model.estimate_only=true",
           f"hydra.run.dir={tmp_path / 'run'}", "task.micro_batch_size=1", "task.max_length=4096"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "68.98 B parameters" in p.stdout and "| activations (1 x 4096 tokens) |" in p.stdout
    assert "| **total (peak)** |" in p.stdout and sorted(f.name for f in folder.iterdir()) == ["config.json"]
    # trainer=fsdp over 8 devices: one device's share, the packed weights 1/8 plus two gathered blocks (of 80)
    fsdp = subprocess.run([*cmd, "trainer=fsdp", "trainer.devices=8"], capture_output=True, text=True, env=env,
                          timeout=300, cwd=REPO)
    assert fsdp.returncode == 0, fsdp.stderr[-2000:]
    assert "per device of 8 sharding the model (trainer=fsdp)" in fsdp.stdout

    def row(out: str, name: str) -> float:
        return float(next(line for line in out.splitlines() if line.startswith(f"| {name} |")).split("|")[2])

    whole, share = row(p.stdout, "packed weights"), row(fsdp.stdout, "packed weights")
    assert whole / 8 + 2 * whole / 80 - 0.02 <= share <= whole / 8 + 2 * whole / 80 + 0.02  # GiB, 2 decimals
    root = "other weights (embeddings, head, norms)"
    assert row(fsdp.stdout, root) == row(p.stdout, root)  # the root: gathered whole through the step
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = subprocess.run(cmd[:4] + [f"model.name={empty}", *cmd[5:]], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error:") and "config.json" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    other = subprocess.run([sys.executable, "-m", "wct.generate", "model=tiny-llama", "model.estimate_only=true",
                            "prompt=hi", f"hydra.run.dir={tmp_path / 'gen'}"], capture_output=True, text=True,
                           env=env, timeout=300, cwd=REPO)
    assert other.returncode == 2 and "model.estimate_only" in other.stderr and "wct.train" in other.stderr
