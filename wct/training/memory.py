"""Memory estimates: the itemised training peak (:func:`train_memory`, printed at the start of every training run
and by ``python -m wct.train model.estimate_only=true``), and estimates from a model's
``config.json`` alone (no weight loaded) for streaming quantization, loading the packed result and a training step
(docs/scale.md), checked against scripts/bench_scale.py's measured peaks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from wct.config import TrainApp
from wct.errors import WCTError
from wct.nn import OWQLinear
from wct.quant.blocks import budget_ratios, find_blocks, find_linears, layer_role
from wct.quant.config import QuantConfig


def memory_estimate(model: nn.Module, optim: str, micro: int, seq: int, checkpointing: bool) -> str:
    """An itemised, rough peak-memory estimate of a loaded model (the LoRA baselines; WCT runs print
    :func:`train_memory`): stored tensors, trainable state, activations, logits."""
    seen, stored = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            stored += t.numel() * t.element_size()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    state = trainable * (4 + (2 if "8bit" in optim else 8))  # grad fp32 + Adam moments (8-bit: 1 B each)
    c = model.config
    hidden, layers, vocab = c.hidden_size, c.num_hidden_layers, c.vocab_size
    tokens = micro * seq
    acts = tokens * hidden * layers * (4 if checkpointing else 40)  # bytes per token per layer, rough
    logits = tokens * vocab * 4 * 3  # fp32 logits, their softmax and gradient
    total = stored + state + acts + logits
    gb = lambda x: f"{x / 2**30:.2f} GiB"  # noqa: E731
    return (f"memory estimate (rough, peak): weights+buffers {gb(stored)} + trainable state {gb(state)} + "
            f"activations {gb(acts)} ({micro}x{seq} tokens{', checkpointed' if checkpointing else ''}) + "
            f"logits {gb(logits)} = {gb(total)}")


RUNTIME = 480 * 2**20  # resident size of Python + torch + transformers + wct once imported (measured, Linux x86-64)
# what streaming quantization holds beyond the tensors estimate_from_config counts: measured on the synthetic 1.5B
# model (scripts/bench_scale.py, session 8: peak 0.81-0.83 GiB against 0.72 GiB counted)
STREAM_SLACK = 100 * 2**20
# the torch kernel's dequantization workspace (its [N, K] result, built a slab at a time) and what glibc's
# allocator keeps around one step, per weight of the largest linear: fitted with scripts/bench_scale.py on the
# synthetic 0.3B model when the workspace still expanded whole [K, N] temporaries, re-checked after the slab
# change (within 2 %; docs/scale.md, "Memory estimate of a training step")
DEQUANT_BYTES = 112


@dataclass
class Shapes:
    """The shape fields of a Llama-like ``config.json`` that memory depends on."""

    hidden: int
    inter: int
    layers: int
    vocab: int
    kv_width: int  # key/value projection width: kv heads x head dim
    tied: bool

    @classmethod
    def of(cls, config: dict) -> "Shapes":
        heads = config.get("num_attention_heads", 1)
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        return cls(config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
                   config["vocab_size"], config.get("num_key_value_heads", heads) * head_dim,
                   bool(config.get("tie_word_embeddings", False)))

    @property
    def block_weights(self) -> int:
        """Weights of one block's linears: q, o (h x h), k, v (h x kv), gate, up, down (h x i)."""
        h = self.hidden
        return 2 * h * h + 2 * h * self.kv_width + 3 * h * self.inter

    @property
    def outside_weights(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        return self.layers * (self.block_weights + 2 * self.hidden) + self.outside_weights


def estimate_from_config(config: dict, bits: int = 4, n_samples: int = 128, seqlen: int = 2048,
                         compute_bytes: int = 4) -> dict[str, int]:
    """Bytes, from ``config.json`` alone, of: the fp16 model; the packed model (b-bit codes of the blocks'
    linears, fp16 scales/zeros per row, fp16 embeddings, head and norms; weak columns left out: ~1 % more);
    the peak resident memory of streaming quantization on the CPU in ``compute_bytes`` floats; and of loading the
    packed model (a training step: :func:`train_memory`).

    Streaming peak = runtime + max(outside phase, block phase) (docs/scale.md): outside phase = one 16-bit
    vocab x h table (embedding or head) while it is written from the checkpoint + calibration hidden states (the
    input embedding is looked up in its 16-bit table, never cast whole); block phase = one fp32 K x K Hessian per
    distinct layer input (q/k/v share one, gate/up one, so K = h three times and i once) + the widest layer widened
    to the compute dtype for its call or copied for its solve + that layer's 16-bit pages read from the checkpoint
    (the waiting linear weights are file views that hold no memory: ``wct.quant.stream.widen_on_call``) + hidden
    states entering and leaving the block + MLP intermediates of one window + :data:`STREAM_SLACK` (slab
    temporaries, BLAS buffers, glibc's heap). The solves consume their Hessians in place on the CPU
    (``wct.quant.linalg``) and the output shards go to disk tensor by tensor.
    """
    s = Shapes.of(config)
    h, i = s.hidden, s.inter
    fp16 = 2 * s.params
    rows = 3 * h + 2 * s.kv_width + 2 * i  # output rows of the block's linears: fp16 scale + uint8 zero each
    packed_block = s.block_weights * bits // 8 + 3 * rows + 2 * 2 * h  # + two fp16 norms
    packed = s.layers * packed_block + 2 * s.outside_weights
    states = n_samples * seqlen * h * compute_bytes
    outside_phase = 2 * s.vocab * h + states
    widest = compute_bytes * h * i  # the largest linear (gate, up or down) in the compute dtype
    hessians = 4 * (3 * h * h + i * i)
    block_phase = hessians + widest + 2 * h * i + 2 * states + seqlen * i * compute_bytes * 4 + STREAM_SLACK
    return {"fp16": fp16, "packed": packed, "quantize_stream_peak": RUNTIME + max(outside_phase, block_phase),
            "load_packed_peak": RUNTIME + packed}


def meta_model(config: dict) -> nn.Module:
    """The causal LM ``config`` describes, built on the meta device (no memory, no weight read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("quantization_config", "model_type")}
    try:
        cfg = AutoConfig.for_model(config["model_type"], **fields)
    except ValueError as e:
        raise WCTError(f"config.json: {e}; a transformers causal LM config is needed") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def weak_columns(model: nn.Module, config: dict, quant: QuantConfig,
                 tune_k: int = 0) -> tuple[int, int, dict[str, int]]:
    """``(bits, group_size, {qualified linear name: weak columns})`` of the OWQ base of ``model``: those an
    owq-pack ``config.json`` records, else those ``quant`` would choose (docs/algorithm.md §1.5) plus the
    ``tune_k`` trainable ones (§3.5; at most, as they may overlap)."""
    from wct.quant.owq import weak_counts

    prefix, blocks = find_blocks(model)
    first = find_linears(blocks[0])
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") == "owq":
        n_weak = {f"{prefix}.{i}.{n}": 0 for i in range(len(blocks)) for n in first} | dict(qc["n_weak"])
        return qc["bits"], qc.get("group_size", -1), n_weak
    if quant.method == "owq":
        ratios = budget_ratios(first)
        counts = weak_counts(quant, {n: (m.in_features, layer_role(n), ratios[n]) for n, m in first.items()})
    else:
        counts = dict.fromkeys(first, 0)
    counts = {n: min(c + tune_k, first[n].in_features - 1) if tune_k else c for n, c in counts.items()}
    return quant.bits, quant.group_size, {f"{prefix}.{i}.{n}": counts[n] for i in range(len(blocks)) for n in first}


@dataclass
class TrainMemory:
    """Peak-memory items of one WCT training step in bytes, each as (without, with) gradient checkpointing."""

    params: int  # parameters of the dense model
    trainable: int  # weak-column weights
    tokens: int  # micro-batch x sequence length
    rows: dict[str, tuple[int, int]]
    ranks: int = 1  # trainer=fsdp over this many devices: the rows are one device's

    @property
    def total(self) -> tuple[int, int]:
        return sum(r[0] for r in self.rows.values()), sum(r[1] for r in self.rows.values())

    def table(self) -> str:
        """The estimate as a Markdown table (GiB)."""
        gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
        where = f", per device of {self.ranks} sharding the model (trainer=fsdp)" if self.ranks > 1 else ""
        lines = [f"memory estimate of one WCT step ({self.params / 1e9:.2f} B parameters, {self.trainable:,} "
                 f"trainable, {self.tokens} tokens per micro-batch{where}), GiB:",
                 "| item | checkpointing off | checkpointing on |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {gib(off)} | {gib(on)} |" for name, (off, on) in self.rows.items()]
        off, on = self.total
        return "\n".join([*lines, f"| **total (peak)** | **{gib(off)}** | **{gib(on)}** |"])


def _activations(model: nn.Module, tokens: int, attn: int, size: int) -> tuple[int, int]:
    """Bytes autograd keeps for the backward of one micro-batch through the decoder blocks, without and with
    gradient checkpointing. Per token and block (Llama-like, SDPA attention; listed with
    ``torch.autograd.graph.saved_tensors_hooks`` on quantized tiny-llama and the synthetic 0.3B model): SDPA's q,
    k, v and output (2 h + 2 kv) and the MLP's gate, act(gate) and up (3 i) in the compute dtype ``attn`` (bf16
    under autocast), the two RMSNorms' inputs (2 h) in the model dtype ``size``; wct's OWQLinear op saves only
    the weak columns of its input. Checkpointing keeps each block's input and recomputes one block."""
    c = model.config
    h, layers = c.hidden_size, c.num_hidden_layers
    i = getattr(c, "intermediate_size", None) or 4 * h
    heads = c.num_attention_heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * (getattr(c, "head_dim", None) or h // heads)
    per_block = tokens * (attn * (2 * h + 2 * kv + 3 * i) + size * 2 * h)
    return layers * per_block, layers * tokens * h * size + per_block


def train_memory(config: dict, quant: QuantConfig, dtype: torch.dtype, precision: str, micro: int, seq: int,
                 optim: str, device: str = "cpu", master: torch.dtype = torch.float32,
                 cache_budget: int = 0, torch_kernel: bool = True, ranks: int = 1, tune_k: int = 0) -> TrainMemory:
    """The itemised peak of one WCT step for the model ``config`` (a ``config.json`` dict; an owq-pack's records
    its weak columns, otherwise ``quant`` chooses them) — from the shapes alone, on the meta device.

    ``dtype``: the base's floating tensors outside OWQLinear (``model.dtype``); OWQLinear keeps its stored dtypes
    (codes int32, zeros uint8, scales fp16). ``precision``: Lightning's; "*-mixed"/"*-true" 16-bit runs keep
    activations in 2 bytes. Items: runtime (Python + torch imported, host memory only), packed weights (codes,
    scales, zeros, indices of every OWQLinear), other weights (embeddings, head, norms), weak columns (``master``
    dtype), their gradient + optimizer state (AdamW: two fp32 moments; 8-bit: two bytes), the torch backend's
    dense-weight cache (the blocks' linears dequantized in ``dtype``, up to ``cache_budget`` bytes:
    :func:`wct.kernels.dispatch.cache_budget`, 0 unless forced with WCT_CACHE_DENSE=1; a 3-bit layer's codes
    count once in either layout it holds, :func:`wct.kernels.dispatch.hold_kernel_layout`), the torch kernel's dequantization workspace (``torch_kernel``: :data:`DEQUANT_BYTES` per weight of the largest
    linear), activations (:func:`_activations`)
    and the logits (fp32 copy, its log-softmax and gradient).

    ``tune_k``: ``tuning.k`` of an on-the-fly base (its upper bound of trainable columns per linear, §3.5).

    ``ranks`` > 1: ``trainer=fsdp`` over that many devices (:mod:`wct.training.sharding`), the rows one device's.
    The packed weights, weak columns, gradients and optimizer state are sharded (1/ranks each), plus two decoder
    blocks' packed weights and weak columns all-gathered at a time (the block running and the one FSDP2
    prefetches) and one block's weak-column gradients before their reduce-scatter; the embeddings, head and norms
    count whole (the root, which FSDP2 keeps gathered from forward to backward); no dense-weight cache
    (``TuneModule.configure_model`` turns it off); activations and logits are per device already."""
    model = meta_model(config)
    bits, group, n_weak = weak_columns(model, config, quant, tune_k)
    prefix, blocks = find_blocks(model)
    size = torch.empty(0, dtype=dtype).element_size()
    ws = torch.empty(0, dtype=master).element_size()
    compute = 2 if precision.startswith(("bf16", "16")) else size
    shardable = replicated = weak = dense = largest = 0
    block_shardable, block_weak = [0] * len(blocks), [0] * len(blocks)
    for name, n in n_weak.items():
        lin = model.get_submodule(name)
        layer = OWQLinear(lin.in_features, lin.out_features, bits, group, n, lin.bias is not None, device="meta")
        params = dict(layer.named_parameters())
        stored = {k: t.numel() * t.element_size() for k, t in layer.state_dict().items() if k != "weak_weight"}
        codes = sum(b for k, b in stored.items() if k in params)  # planes, scales, zeros: FSDP shards parameters
        shardable += codes
        replicated += sum(stored.values()) - codes  # weak-column indices and bias: buffers, on every rank
        weak += n * lin.out_features
        dense += lin.in_features * lin.out_features
        largest = max(largest, lin.in_features * lin.out_features)
        if name.startswith(f"{prefix}."):
            b = int(name.removeprefix(f"{prefix}.").split(".")[0])
            block_shardable[b] += codes
            block_weak[b] += n * lin.out_features
    other = sum(p.numel() for p in model.parameters()) - dense  # dense counts the weak columns too
    state = weak * (4 + (2 if "8bit" in optim else 8))
    cache = min(dense * size, cache_budget)
    packed, weak_bytes = shardable + replicated, weak * ws
    if ranks > 1:
        packed = -(-shardable // ranks) + replicated + 2 * max(block_shardable)
        weak_bytes = -(-weak_bytes // ranks) + 2 * max(block_weak) * ws
        state, cache = -(-state // ranks) + max(block_weak) * 4, 0
    tokens = micro * seq
    acts = _activations(model, tokens, compute, size)
    logits = tokens * model.config.vocab_size * (compute + 3 * 4)
    same = lambda b: (b, b)  # noqa: E731
    rows = {"runtime (Python, torch)": same(RUNTIME if device == "cpu" else 0), "packed weights": same(packed),
            "other weights (embeddings, head, norms)": same(other * size), "weak columns": same(weak_bytes),
            "gradients + optimizer state": same(state), "dense-weight cache (torch kernel)": same(cache),
            "dequantization workspace (torch kernel)": same(DEQUANT_BYTES * largest if torch_kernel else 0),
            f"activations ({micro} x {seq} tokens)": acts, "logits": same(logits)}
    return TrainMemory(sum(p.numel() for p in model.parameters()), weak, tokens, rows, ranks)


def estimate_run(app: TrainApp, config: dict | None = None) -> TrainMemory:
    """:func:`train_memory` of the WCT run ``app`` describes, from ``config`` (the loaded base's) or else the
    ``config.json`` of ``model.quantized`` (its recorded weak columns) or of ``model.name`` (the columns ``quant``
    would choose); no weight is loaded."""
    from wct.kernels.dispatch import cache_budget
    from wct.device import accelerator_is_gpu, as_dtype, resolve_precision
    from wct.models import config_dict

    if app.method.name != "wct":
        raise WCTError(f"model.estimate_only=true estimates WCT runs; method={app.method.name} loads the "
                       "full-precision base, whose size is 2 bytes per parameter in 16 bits; use method=wct")
    t = app.trainer
    gpu = accelerator_is_gpu(t.accelerator)
    device = "cuda" if gpu else "cpu"
    torch_kernel = t.kernel in ("torch", "cpu") or (t.kernel == "auto" and device == "cpu")  # both dequantize slabs
    budget = cache_budget(torch.device(device)) if torch_kernel else 0
    config = config or config_dict(app.model.quantized or app.model.name)
    ranks = t.devices * t.num_nodes if t.strategy == "fsdp" and isinstance(t.devices, int) else 1
    precision = resolve_precision(t.precision, gpu)[0]
    return train_memory(config, app.quant, as_dtype(app.model.dtype), precision, app.task.micro_batch_size,
                        app.task.max_length, app.optim.name, device, as_dtype(app.tuning.master_dtype), budget,
                        torch_kernel, ranks, app.tuning.k or 0)
