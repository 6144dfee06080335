"""A lean decode loop for Llama-family models on CPU (docs/kernels.md "Decode loop").

At 135M parameters a transformers decode step is mostly Python: modules, hooks, cache objects and masks cost
≈ 22 ms of a 35 ms step on 2 cores, the weights ≈ 13 ms. :class:`LlamaDecoder` runs the same mathematics in one
compiled call per token (``kernels/decode_cpu.cpp``) over the model's own tensors (copied are only the RMSNorm
weights and the weak columns in fp32, a few hundred KB; weights that view the safetensors file mapping are moved
into process memory and their mapped pages released: :func:`wct.heap.move_off_file_mappings`):

    h = x + o_proj(attn(rope(q_proj(n₁(x))), rope(k_proj(n₁(x))), v_proj(n₁(x))))
    y = h + down_proj(silu(gate_proj(n₂(h))) ⊙ up_proj(n₂(h)))

- a static KV cache [layers, B, kv_heads, max_len, head_dim] in fp32, filled by a causal prefill of the prompt in
  chunks of at most ``GEMV_MAX_M`` rows (written with torch operations);
- RoPE from the model's own ``rotary_emb`` module (every rope type transformers supports), precomputed for
  max_len positions and applied as q·cos + roll(q)·sin±;
- OWQLinear layers on the compiled int16 GEMV, the weak columns added in the same compiled call (in the
  torch-written prefill, the CPU backend's product: :func:`wct.kernels.cpu_backend.forward`);
- the (tied) head read in its stored dtype: an fp16 embedding is multiplied by the compiled fp16 → fp32 GEMV
  (``kernels/owq_cpu.cpp`` ``dense_gemv``), half the bytes of fp32 and exact in fp32 (fp16 → fp32 is exact).

Activations and accumulations are fp32 whatever the model's dtype. Supported: ``model_type`` llama, mistral
(within its sliding window) and qwen2 with SiLU MLPs; other models, or models not on the CPU, decode through
``model.generate`` (:func:`unsupported_reason` says why, and the caller logs it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wct.heap import move_off_file_mappings
from wct.kernels.dispatch import hold_kernel_layouts
from wct.nn import OWQLinear

ARCHITECTURES = ("llama", "mistral", "qwen2")


def _projections(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's seven linears in the order the step takes them: q, k, v, o, gate, up, down."""
    attn, mlp = layer.self_attn, layer.mlp
    return [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]


def unsupported_reason(model: nn.Module, length: int) -> str | None:
    """Why :class:`LlamaDecoder` cannot run ``model`` for ``length`` positions; None when it can."""
    cfg = getattr(model, "config", None)
    if getattr(cfg, "model_type", None) not in ARCHITECTURES:
        return f"model_type {getattr(cfg, 'model_type', None)!r} is not one of {', '.join(ARCHITECTURES)}"
    inner = getattr(model, "model", None)
    if not hasattr(inner, "layers") or not hasattr(model, "lm_head") or not hasattr(inner, "rotary_emb"):
        return f"{type(model).__name__} is not a plain *ForCausalLM (a wrapped or adapter model)"
    for layer in inner.layers:  # exactly nn.Linear or OWQLinear: a LoRA or bitsandbytes layer computes more
        odd = [type(m).__name__ for m in _projections(layer) if type(m) not in (nn.Linear, OWQLinear)]
        if odd:
            return f"its layers hold {odd[0]} modules, which this loop does not compute"
    if next(model.parameters()).device.type != "cpu":
        return "the model is not on the CPU"
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "its parameters are sharded (FSDP): each process holds a part of them"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    if getattr(cfg, "pretraining_tp", 1) != 1:
        return "pretraining_tp != 1"
    window = getattr(cfg, "sliding_window", None)
    if window and getattr(cfg, "use_sliding_window", True) and length > window:
        return f"{length} positions exceed the sliding window ({window})"
    return None


class LlamaDecoder:
    """Prefill and one-token steps of a Llama-family ``model`` for ``batch`` sequences of up to ``max_len``
    positions; :meth:`generate` is the greedy / sampled loop."""

    def __init__(self, model: nn.Module, batch: int, max_len: int) -> None:
        cfg, inner = model.config, model.model
        hold_kernel_layouts(model, "cpu")  # 3-bit layers in the v1 planes the compiled step reads
        # weights read from process memory, not the safetensors mapping (faster per token; same values and bytes)
        move_off_file_mappings([*model.parameters(), *model.buffers()])
        self.layers = list(inner.layers)
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.embed = inner.embed_tokens.weight
        self.head = model.lm_head.weight
        self.head_bias = getattr(model.lm_head, "bias", None)
        f32 = lambda t: t.detach().float()  # noqa: E731 (norm weights: a few KB each)
        self.norms = [(f32(l.input_layernorm.weight), l.input_layernorm.variance_epsilon,
                       f32(l.post_attention_layernorm.weight), l.post_attention_layernorm.variance_epsilon)
                      for l in self.layers]
        self.final_norm = (f32(inner.norm.weight), inner.norm.variance_epsilon)
        self.linears = [[self._linear(m) for m in _projections(l)] for l in self.layers]
        shape = (len(self.layers), batch, self.kv_heads, max_len, self.head_dim)
        self.k_cache, self.v_cache = torch.zeros(shape), torch.zeros(shape)
        with torch.no_grad():  # cos/sin of every position, as the model's rotary module computes them
            pos = torch.arange(max_len)[None]
            cos, sin = inner.rotary_emb(torch.zeros(1, dtype=torch.float32), pos)
        half = self.head_dim // 2
        self.cos = cos[0].float()  # [max_len, head_dim]
        # rotate_half(q)·sin = roll(q, half)·[−sin₁, sin₂]
        self.sin = torch.cat([-sin[0, :, :half], sin[0, :, half:]], dim=-1).float()
        self.batch, self.max_len, self.pos = batch, max_len, 0
        import wct.kernels.cpu_backend as cpu

        ext = cpu.extension()
        self._norm = ext.rms_norm if ext is not None else lambda x, w, eps: F.rms_norm(x, (x.shape[-1],), w, eps)
        self.stack = self._stack(ext, model) if ext is not None and batch <= cpu.GEMV_MAX_M else None
        self.prefill_rows = cpu.GEMV_MAX_M

    def _stack(self, ext, model: nn.Module):
        """The compiled decode step (``kernels/decode_cpu.cpp`` ``DecodeStack``) over the same tensors, or None when a
        layer has a width it does not take (2-bit): the torch step then runs every token."""

        def spec(mod: nn.Module) -> tuple | None:
            bias = None if mod.bias is None else mod.bias.detach().float()
            if isinstance(mod, OWQLinear):
                if mod.bits not in (3, 4):
                    return None
                return (list(mod.planes.values()), mod.scales, mod.zeros, mod.weak_idx,
                        mod.weak_weight.detach().float(), bias, None, mod.bits)
            empty = torch.empty(0)
            return [], empty, empty, torch.empty(0, dtype=torch.int32), empty, bias, mod.weight.detach().float(), 0

        stack = ext.DecodeStack(self.heads, self.kv_heads, self.head_dim, float(self.scaling))
        for layer, (w1, e1, w2, e2) in zip(self.layers, self.norms):
            specs = [spec(m) for m in _projections(layer)]
            if any(s is None for s in specs):
                return None
            stack.add_layer(w1, e1, w2, e2, specs)
        return stack

    @staticmethod
    def _linear(mod: nn.Module):
        """A callable x [M, K] fp32 → [M, N] fp32 for an OWQLinear or nn.Linear ``mod``."""
        if isinstance(mod, OWQLinear):  # the CPU backend's product: GEMV up to GEMV_MAX_M rows, else slabs
            import wct.kernels.cpu_backend as cpu

            planes = list(mod.planes.values())
            return lambda x: cpu.forward(x, mod.weak_weight.detach(), planes, mod.scales, mod.zeros, mod.weak_idx,
                                         mod.bias, None, mod.bits)
        weight = mod.weight.detach()
        bias = None if mod.bias is None else mod.bias.detach().float()
        if weight.dtype != torch.float32:
            weight = weight.float()
        return lambda x: F.linear(x, weight, bias)

    def _logits(self, h: Tensor) -> Tensor:
        """[B, vocab] fp32 logits of the last hidden states ``h`` [B, d]."""
        w, eps = self.final_norm
        h = self._norm(h.contiguous(), w, eps)
        if self.head.dtype == torch.float32:
            y = h @ self.head.t()
        else:
            from wct.kernels.cpu_backend import dense_gemv

            y = dense_gemv(h, self.head)
        return y if self.head_bias is None else y + self.head_bias.float()

    @torch.no_grad()
    def forward(self, ids: Tensor) -> Tensor:
        """Logits [B, vocab] of the last of ``ids`` [B, T] appended at the current position (T > 1: a causal
        prefill chunk)."""
        b, t = ids.shape
        p0, p1 = self.pos, self.pos + t
        if b != self.batch or p1 > self.max_len:
            raise ValueError(f"ids {tuple(ids.shape)} at position {p0} do not fit batch {self.batch}, "
                             f"max_len {self.max_len}")
        x = F.embedding(ids, self.embed).float().reshape(b * t, -1)
        self.pos = p1
        if t == 1 and self.stack is not None:
            x = self.stack.step(x, self.k_cache, self.v_cache, p0, self.cos[p0], self.sin[p0])
            return self._logits(x)
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]  # [t, hd]
        mask = torch.arange(p1) <= torch.arange(p0, p1)[:, None]  # query p0 + i sees keys 0 .. p0 + i
        nq, nkv, hd = self.heads, self.kv_heads, self.head_dim
        for i, (lin, (w1, e1, w2, e2)) in enumerate(zip(self.linears, self.norms)):
            q_proj, k_proj, v_proj, o_proj, gate, up, down = lin
            h = self._norm(x, w1, e1)
            qk = torch.cat([q_proj(h), k_proj(h)], dim=1).view(b, t, nq + nkv, hd).transpose(1, 2)
            qk = torch.addcmul(qk * cos, qk.roll(hd // 2, -1), sin)  # [b, nq + nkv, t, hd]
            self.k_cache[i, :, :, p0:p1] = qk[:, nq:]
            self.v_cache[i, :, :, p0:p1] = v_proj(h).view(b, t, nkv, hd).transpose(1, 2)
            keys, values = self.k_cache[i, :, :, :p1], self.v_cache[i, :, :, :p1]
            if t == 1:  # one query per head: softmax(q·Kᵀ·scale)·V with the heads grouped over their kv head
                q = qk[:, :nq].reshape(b, nkv, nq // nkv, hd)
                a = torch.softmax(q @ keys.transpose(2, 3) * self.scaling, dim=-1) @ values
            else:
                a = F.scaled_dot_product_attention(qk[:, :nq], keys, values, attn_mask=mask, scale=self.scaling,
                                                   enable_gqa=nkv != nq).transpose(1, 2)
            x = x + o_proj(a.reshape(b * t, nq * hd))
            h = self._norm(x, w2, e2)
            x = x + down(F.silu(gate(h)).mul_(up(h)))
        return self._logits(x.view(b, t, -1)[:, -1])

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, eos_token_id: int | list[int] | None = None,
                 min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """``ids`` [B, T] followed by up to ``max_new_tokens`` tokens [B, T + n]: greedy, or sampled with
        ``temperature``, ``top_k`` and nucleus ``top_p`` (as transformers applies them); a sequence that produced EOS
        continues with EOS, and the loop stops when every sequence has (not before ``min_new_tokens``)."""
        self.pos = 0
        eos = torch.tensor([] if eos_token_id is None else
                           [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        out = [ids]
        chunk = max(1, self.prefill_rows // ids.shape[0])
        for c in range(0, ids.shape[1], chunk):  # the prompt in chunks the GEMV takes: no slab, small activations
            logits = self.forward(ids[:, c:c + chunk])
        for n in range(max_new_tokens):
            if n < min_new_tokens and eos.numel():
                logits[:, eos] = -float("inf")
            nxt = _pick(logits, do_sample, temperature, top_k, top_p, generator)
            if eos.numel():
                nxt = torch.where(done, eos[0], nxt)
                done |= torch.isin(nxt, eos)
            out.append(nxt[:, None])
            if n + 1 == max_new_tokens or bool(done.all()):
                break
            logits = self.forward(nxt[:, None])
        return torch.cat(out, dim=1)


def _pick(logits: Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float, generator) -> Tensor:
    """The next token per row: argmax, or a draw from softmax(logits / T) restricted to the ``top_k`` most likely
    tokens and then to the smallest set of them whose probability reaches ``top_p``."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
