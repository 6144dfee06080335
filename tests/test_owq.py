import copy

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
from transformers.pytorch_utils import Conv1D

from wct.errors import WCTError
from wct.nn.owq_linear import OWQLinear
from wct.quant.blocks import budget_ratios, find_blocks, find_linears, layer_role, sequential_groups
from wct.quant.config import QuantConfig
from wct.quant.gptq import GPTQ
from wct.quant.owq import _hessians, quantize_model, weak_counts

LLAMA_7B = {
    **{f"self_attn.{p}_proj": (4096, p, 1.0) for p in "qkvo"},
    "mlp.gate_proj": (4096, "gate", 0.375),
    "mlp.up_proj": (4096, "up", 0.375),
    "mlp.down_proj": (11008, "down", 0.375),
}
OPT_6_7B = {
    **{f"self_attn.{p}_proj": (4096, p, 1.0) for p in "qkv"},
    "self_attn.out_proj": (4096, "o", 1.0),
    "fc1": (4096, "fc1", 0.25),
    "fc2": (16384, "fc2", 0.25),
}


@pytest.mark.parametrize(
    "bits,target,attn,up,down",
    [(3, 3.01, 6, 2, 6), (3, 3.05, 28, 10, 28), (3, 3.1, 54, 20, 54), (4, 4.01, 6, 2, 6)],
)
def test_weak_counts_llama_7b(bits, target, attn, up, down):  # docs/algorithm.md §1.5 worked values
    n = weak_counts(QuantConfig(bits=bits, target_bit=target), LLAMA_7B)
    assert [n[f"self_attn.{p}_proj"] for p in "qkvo"] == [attn] * 4
    assert (n["mlp.up_proj"], n["mlp.gate_proj"], n["mlp.down_proj"]) == (up, up, down)


@pytest.mark.parametrize("target,attn,fc1,fc2", [(3.01, 6, 2, 6), (3.1, 64, 16, 64)])
def test_weak_counts_opt_6_7b(target, attn, fc1, fc2):
    n = weak_counts(QuantConfig(bits=3, target_bit=target), OPT_6_7B)
    assert [n[f"self_attn.{p}"] for p in ("q_proj", "k_proj", "v_proj", "out_proj")] == [attn] * 4
    assert (n["fc1"], n["fc2"]) == (fc1, fc2)


def test_weak_counts_target_rank_and_layer_subsets():
    assert set(weak_counts(QuantConfig(target_rank=7), LLAMA_7B).values()) == {7}  # exactly k, not made even
    # only q and k enabled: the whole budget goes to them (L = 2), the rest keep none
    n = weak_counts(QuantConfig(bits=3, target_bit=3.01, layers=["q", "k"]), LLAMA_7B)
    assert n["self_attn.q_proj"] == n["self_attn.k_proj"] == 20  # round(4096·0.12/(13·2)) = 19 -> 20
    assert sum(n.values()) == 40
    assert weak_counts(QuantConfig(bits=3, target_bit=3.01, layers=["out"]), OPT_6_7B)["self_attn.out_proj"] > 0
    assert set(weak_counts(QuantConfig(method="owq", bits=3), LLAMA_7B).values()) == {0}
    with pytest.raises(WCTError, match="layer types"):
        weak_counts(QuantConfig(bits=3, target_bit=3.01, layers=["fc1"]), LLAMA_7B)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_opt() -> OPTForCausalLM:
    cfg = OPTConfig(
        hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128,
        word_embed_proj_dim=64, max_position_embeddings=64,
    )
    return OPTForCausalLM(cfg).eval()


def tiny_gpt2() -> GPT2LMHeadModel:  # Conv1D layers, fused qkv
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


TINY = {"llama": tiny_llama, "opt": tiny_opt, "gpt2": tiny_gpt2}


def test_block_introspection():
    name, blocks = find_blocks(tiny_llama())
    assert name == "model.layers" and len(blocks) == 2
    lin = find_linears(blocks[0])
    assert [layer_role(n) for n in lin] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert budget_ratios(lin)["mlp.up_proj"] == 0.375 and budget_ratios(lin)["self_attn.o_proj"] == 1.0
    assert sequential_groups(list(lin)) == [
        ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        ["self_attn.o_proj"],
        ["mlp.gate_proj", "mlp.up_proj"],
        ["mlp.down_proj"],
    ]
    name, blocks = find_blocks(tiny_opt())
    lin = find_linears(blocks[0])
    assert [layer_role(n) for n in lin] == ["k", "v", "q", "o", "fc1", "fc2"]
    assert budget_ratios(lin)["fc2"] == 0.25
    assert sequential_groups(list(lin))[1:] == [["self_attn.out_proj"], ["fc1"], ["fc2"]]
    assert layer_role("transformer.h.0.attn.c_proj") == "o" and layer_role("transformer.h.0.mlp.c_proj") == "fc2"


def fake_quant_twin(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """The same model with each OWQLinear replaced by an nn.Linear holding ``weights[name]``: the fake-quantized
    weight the quantizer produced before packing (weak columns rounded to their fp16 storage), so a wrong
    packing or dequantization cannot agree with it by construction."""
    twin = copy.deepcopy(model)
    for name, mod in list(twin.named_modules()):
        if isinstance(mod, OWQLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            lin.weight.data = weights[name].float()
            if mod.bias is not None:
                lin.bias.data = mod.bias.float()
            twin.set_submodule(name, lin)
    return twin


def record_fake_quant(monkeypatch) -> list[torch.Tensor]:
    """Spy on the OWQ driver's ``pack_linear``: the fake-quantized weights [N, K] it is given, in call order,
    with the weak columns rounded to the dtype they are stored in."""
    import wct.quant.owq as driver

    seen, real = [], driver.pack_linear

    def spy(weight, scales, zeros, weak_idx, bits, bias=None, weak_dtype=torch.float16, scale_dtype=torch.float16):
        w = weight.detach().clone().float()
        idx = weak_idx.long()
        w[:, idx] = w[:, idx].to(weak_dtype).float()
        seen.append(w)
        return real(weight, scales, zeros, weak_idx, bits, bias, weak_dtype, scale_dtype)

    monkeypatch.setattr(driver, "pack_linear", spy)
    return seen


CASES = [
    ("llama", dict(method="owq", bits=3, target_bit=3.1)),
    ("llama", dict(method="owq", bits=4, target_rank=3, group_size=32, act_order=True)),
    ("llama", dict(method="owq", bits=3, target_bit=3.1, group_size=32, true_sequential=True)),
    ("llama", dict(method="gptq", bits=4, tuning="minmax", act_order=True)),
    ("llama", dict(method="rtn", bits=3, group_size=32)),
    ("opt", dict(method="owq", bits=3, target_bit=3.1, sym=True)),
    ("opt", dict(method="gptq", bits=3, group_size=32, tuning="minmax")),
    ("gpt2", dict(method="owq", bits=4, target_bit=4.1, group_size=32, act_order=True)),
]


@pytest.mark.parametrize("family,recipe", CASES)
def test_quantize_model_end_to_end(family, recipe, monkeypatch):
    monkeypatch.setenv("WCT_CPU_GEMV", "fp32")  # the packed model against its fake-quant twin to fp32 rounding
    fake_weights = record_fake_quant(monkeypatch)
    model = TINY[family]()
    n_linears = len(find_linears(find_blocks(model)[1][0]))
    calib = torch.randint(0, 128, (4, 24))
    cfg = QuantConfig(**recipe)
    report = quantize_model(model, calib, cfg, progress=False)
    _, blocks = find_blocks(model)
    for block in blocks:
        assert sum(isinstance(m, OWQLinear) for m in block.modules()) == n_linears
        assert not any(isinstance(m, (nn.Linear, Conv1D)) for m in block.modules())
    assert len(report.n_weak) == 2 * n_linears
    if cfg.method == "owq":
        assert sum(report.n_weak.values()) > 0
    qc = model.config.quantization_config
    assert qc["quant_method"] == "owq" and qc["bits"] == cfg.bits and qc["n_weak"] == report.n_weak
    assert report.stored_bits > report.paper_bits >= cfg.bits
    with torch.no_grad():
        packed = model(calib).logits
        fake = fake_quant_twin(model, dict(zip(report.n_weak, fake_weights, strict=True)))(calib).logits
    assert torch.allclose(packed, fake, atol=1e-5, rtol=1e-5)


def test_each_block_is_calibrated_on_the_quantized_previous_block(monkeypatch):
    """Block i's Hessians come from the outputs of the *quantized* blocks before it (docs/algorithm.md §1.1):
    the hidden states block 1 was calibrated on equal those entering block 1 of the finished quantized model,
    and differ from those of the full-precision model."""
    import wct.quant.owq as driver

    model, calib = tiny_llama(), torch.randint(0, 128, (3, 16))
    fp = copy.deepcopy(model)
    seen, real = [], driver._hessians
    monkeypatch.setattr(driver, "_hessians", lambda block, layers, inps, kw: seen.append(inps.clone()) or real(
        block, layers, inps, kw))
    quantize_model(model, calib, QuantConfig(bits=3, target_bit=3.1), progress=False)
    assert len(seen) == 2  # one Hessian pass per block

    def block1_inputs(m: nn.Module) -> torch.Tensor:
        got = []
        hook = m.model.layers[1].register_forward_pre_hook(lambda mod, args, kwargs: got.append(
            (args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
        with torch.no_grad():
            m(calib)
        hook.remove()
        return got[0]

    quantized, full = block1_inputs(model), block1_inputs(fp)
    assert torch.allclose(seen[1].reshape(quantized.shape), quantized, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(seen[1].reshape(full.shape), full, atol=1e-3, rtol=1e-3)


def test_owq_beats_rtn_on_model_output():
    torch.manual_seed(0)
    base = tiny_llama()
    calib = torch.randint(0, 128, (8, 32))
    with torch.no_grad():
        ref = base(calib).logits
    errs = {}
    for cfg in (QuantConfig(method="owq", bits=3, target_bit=3.1), QuantConfig(method="rtn", bits=3)):
        model = copy.deepcopy(base)
        quantize_model(model, calib, cfg, progress=False)
        with torch.no_grad():
            errs[cfg.method] = (model(calib).logits - ref).pow(2).mean().item()
    assert errs["owq"] < 0.7 * errs["rtn"]


def test_recipe_keywords_and_default_device():
    model = tiny_llama()
    report = quantize_model(model, torch.randint(0, 128, (2, 16)), bits=4, target_rank=2, progress=False)
    assert report.cfg.name == "owq-w4-k2" and set(report.n_weak.values()) == {2}
    assert report.weak_by_role == dict.fromkeys(["q", "k", "v", "o", "gate", "up", "down"], 2)
    with pytest.raises(WCTError, match="recipe fields"):
        quantize_model(tiny_llama(), torch.randint(0, 128, (2, 16)), bitz=4, progress=False)


@pytest.mark.slow
@pytest.mark.xdist_group("smollm2")
def test_smollm2_first_blocks_owq_beats_rtn(shared_data):
    from wct.data.text import calibration_windows
    from wct.models import load_model

    base, tok = load_model("smollm2-135m")
    _, blocks = find_blocks(base)
    del blocks[2:]  # the first two blocks keep it fast; the network still runs end to end
    base.config.num_hidden_layers = 2
    text = shared_data / "janeausten" / "emma.txt"
    calib = calibration_windows(tok, text, 8, 128)
    held = calibration_windows(tok, text, 4, 128, seed=1)
    with torch.no_grad():
        ref = base(held).logits
    errs = {}
    for cfg in (QuantConfig(method="owq", bits=3, target_bit=3.05), QuantConfig(method="rtn", bits=3)):
        model = copy.deepcopy(base)
        report = quantize_model(model, calib, cfg, progress=False)
        assert len(report.n_weak) == 14
        with torch.no_grad():
            errs[cfg.method] = (model(held).logits - ref).pow(2).mean().item()
    assert errs["owq"] < 0.8 * errs["rtn"]


def test_bad_inputs_have_clear_errors():
    model = tiny_llama()
    with pytest.raises(WCTError, match="shorter than one window"):
        quantize_model(model, torch.zeros(0, 16, dtype=torch.long), QuantConfig(bits=3), progress=False)
    with pytest.raises(WCTError, match="does not divide in_features"):
        quantize_model(model, torch.zeros(2, 16, dtype=torch.long), QuantConfig(group_size=48), progress=False)
    with pytest.raises(WCTError, match="token ids"):
        quantize_model(model, torch.zeros(2, 16), QuantConfig(), progress=False)
    with pytest.raises(WCTError, match="token id 130 is outside the vocabulary"):
        quantize_model(model, torch.full((2, 16), 130), QuantConfig(), progress=False)
    with pytest.raises(WCTError, match="would keep 64 of its 64 input columns in FP16"):
        quantize_model(model, torch.zeros(2, 16, dtype=torch.long), QuantConfig(target_rank=64), progress=False)
    with pytest.raises(WCTError, match="either quant.target_bit or quant.target_rank"):
        quantize_model(model, torch.zeros(2, 16, dtype=torch.long), bits=3, target_bit=3.1, target_rank=4)

    class NoLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.LayerNorm(4) for _ in range(2)])

    with pytest.raises(WCTError, match="no linear layers"):
        quantize_model(NoLinear(), torch.zeros(1, 4, dtype=torch.long), QuantConfig(), progress=False)


def test_weak_columns_chosen_on_selection_data():
    """``select`` windows choose the weak columns by their own Hessian (docs/algorithm.md §1.6 on H^sel): block 0's q_proj keeps
    the top-n of H^sel_jj·‖W - RTN(W)‖² computed here from the full-precision model; ``select=calib`` changes nothing."""
    from wct.quant.gptq import GPTQ

    torch.manual_seed(0)
    base = tiny_llama()
    calib = torch.randint(0, 64, (4, 16))
    select = torch.randint(64, 128, (4, 16))
    cfg = QuantConfig(bits=3, target_rank=4)

    q = base.model.layers[0].self_attn.q_proj
    ref = GPTQ(q.weight)
    hook = q.register_forward_hook(lambda m, x, y: ref.add_batch(x[0]))
    with torch.no_grad():
        for j in range(select.shape[0]):
            base(select[j : j + 1])
    hook.remove()
    expected = GPTQ.weak_columns(ref.sensitivity(3, cfg.sym, cfg.tuning, cfg.sens_grid), 4)

    plain, same, chosen = (copy.deepcopy(base) for _ in range(3))
    quantize_model(plain, calib, cfg, progress=False)
    quantize_model(same, calib, cfg, progress=False, select=calib)
    quantize_model(chosen, calib, cfg, progress=False, select=select)
    assert torch.equal(chosen.model.layers[0].self_attn.q_proj.weak_idx, expected)
    for a, b in zip(plain.state_dict().values(), same.state_dict().values()):
        assert torch.equal(a, b)
    idx = {name: [m.weak_idx for m in model.modules() if isinstance(m, OWQLinear)]
           for name, model in (("plain", plain), ("chosen", chosen))}
    assert sum(not torch.equal(a, b) for a, b in zip(idx["plain"], idx["chosen"])) >= 7
    assert chosen.config.quantization_config["weak_selection"] == "select"


def test_selection_data_errors():
    calib = torch.randint(0, 128, (2, 16))
    with pytest.raises(WCTError, match="cut both to one seqlen"):
        quantize_model(tiny_llama(), calib, QuantConfig(target_rank=2), progress=False, select=calib[:, :8])
    with pytest.raises(WCTError, match="quant.method=rtn does not keep"):
        quantize_model(tiny_llama(), calib, QuantConfig(method="rtn"), progress=False, select=calib)
    with pytest.raises(WCTError, match="selection set is empty"):
        quantize_model(tiny_llama(), calib, QuantConfig(target_rank=2), progress=False, select=calib[:0])


def test_layers_reading_one_input_share_one_hessian(monkeypatch):
    """q/k/v (and gate/up) read the same tensor: their Hessian is accumulated once and shared, with the same bits as
    one accumulator per layer, and close to the float64 H = (2/N) Σ x xᵀ of each layer's own inputs. Each of the
    four accumulators is made once, not once per sequence (a K x K zeros each time)."""
    import wct.quant.owq as owq

    made = []

    class Counted(GPTQ):
        def __init__(self, weight, *args, **kw):
            made.append(weight.shape)
            super().__init__(weight, *args, **kw)

    monkeypatch.setattr(owq, "GPTQ", Counted)
    model = tiny_llama()
    block = model.model.layers[0]
    hidden = torch.randn(3, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden[:1], pos), "position_ids": pos}
    linears = find_linears(block)
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    hooks = [m.register_forward_hook(lambda mod, x, y, n=n: seen[n].append(x[0].detach().clone()))
             for n, m in linears.items()]
    with torch.no_grad():
        gptqs = _hessians(block, linears, hidden, kwargs)
    for h in hooks:
        h.remove()
    assert len(made) == 4  # made inside the hooks: q/k/v, o, gate/up, down (shared ones come from share())
    attn, mlp = "self_attn.", "mlp."
    assert gptqs[attn + "q_proj"].H is gptqs[attn + "k_proj"].H is gptqs[attn + "v_proj"].H
    assert gptqs[mlp + "gate_proj"].H is gptqs[mlp + "up_proj"].H
    assert gptqs[attn + "o_proj"].H is not gptqs[attn + "q_proj"].H
    assert gptqs[mlp + "down_proj"].H is not gptqs[mlp + "up_proj"].H
    for n, layer in linears.items():
        own = GPTQ(layer.weight)
        for x in seen[n]:
            own.add_batch(x)
        assert torch.equal(gptqs[n].H, own.H) and gptqs[n].nsamples == own.nsamples == 3
        x64 = torch.cat(seen[n]).reshape(-1, layer.in_features).double()
        assert torch.allclose(gptqs[n].H.double(), 2 / 3 * x64.t() @ x64, rtol=1e-4, atol=1e-5)
