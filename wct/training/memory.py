"""A rough, itemised peak-memory estimate printed at the start of a training run."""

from __future__ import annotations

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
