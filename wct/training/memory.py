"""Memory estimates: the itemised peak printed at the start of a training run, and estimates from a model's
``config.json`` alone (no weight loaded) for streaming quantization, loading the packed result and a training step
(docs/scale.md), checked against scripts/bench_scale.py's measured peaks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


def memory_estimate(model: nn.Module, optim: str, micro: int, seq: int, checkpointing: bool) -> str:
    """An itemised, rough peak-memory estimate: stored tensors, trainable state, activations, logits."""
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
SHARD = 256 * 2**20  # wct.quant.stream.SHARD_BYTES: one output shard waits in memory


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
                         compute_bytes: int = 4, train_seq: int = 512) -> dict[str, int]:
    """Bytes, from ``config.json`` alone, of: the fp16 model; the packed model (b-bit codes of the blocks'
    linears, fp16 scales/zeros per row, fp16 embeddings, head and norms; weak columns left out: ~1 % more);
    the peak resident memory of streaming quantization on the CPU in ``compute_bytes`` floats; of loading the
    packed model; and of one training step (micro-batch 1 x ``train_seq`` tokens, no checkpointing).

    Streaming peak = runtime + max(outside phase, block phase): outside phase = embeddings and head in the compute
    dtype + calibration hidden states; block phase = one dense block in the compute dtype + its packed form +
    one fp32 K x K Hessian per linear (K = h for q, k, v, o, gate, up; i for down) + GPTQ's working copies of the
    largest layer + hidden states entering and leaving the block + MLP intermediates of one window + one output
    shard.
    """
    s = Shapes.of(config)
    h, i = s.hidden, s.inter
    fp16 = 2 * s.params
    rows = 3 * h + 2 * s.kv_width + 2 * i  # output rows of the block's linears: fp16 scale + uint8 zero each
    packed_block = s.block_weights * bits // 8 + 3 * rows + 2 * 2 * h  # + two fp16 norms
    packed = s.layers * packed_block + 2 * s.outside_weights
    states = n_samples * seqlen * h * compute_bytes
    outside_phase = compute_bytes * s.outside_weights + states
    hessians = 4 * (6 * h * h + i * i)
    gptq_work = compute_bytes * max(h, i) * max(h, i) * 2
    block_phase = (compute_bytes * s.block_weights + packed_block + hessians + gptq_work + 2 * states
                   + seqlen * i * compute_bytes * 4 + SHARD)
    train = RUNTIME + packed + s.layers * train_seq * h * 40 + train_seq * s.vocab * 4 * 3  # as memory_estimate
    return {"fp16": fp16, "packed": packed, "quantize_stream_peak": RUNTIME + max(outside_phase, block_phase),
            "load_packed_peak": RUNTIME + packed, "train_step_peak": train}
