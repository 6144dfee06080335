"""Block-sequential OWQ / GPTQ / RTN quantization of a causal LM (docs/algorithm.md §1.1).

Block 0's inputs are caught once; then, block by block on ``device``: Hessians of the block's linears from the
calibration inputs (all linears in one group, or true-sequential groups), weak columns + GPTQ per linear, each
linear replaced in place by an :class:`OWQLinear`, and the *quantized* block re-run to give the next block's inputs.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from wct import kernels
from wct.errors import WCTError
from wct.nn.owq_linear import OWQLinear
from wct.quant.budget import global_counts
from wct.quant.blocks import (
    ROLE_ALIASES,
    budget_ratios,
    find_blocks,
    find_linears,
    layer_role,
    outside_blocks,
    sequential_groups,
)
from wct.checkpoint import describe_quantization
from wct.quant.config import QuantConfig
from wct.quant.gptq import GPTQ
from wct.format.layout import pack_linear
from wct.quant.quantizer import rtn


@dataclass
class QuantReport:
    """What :func:`quantize_model` did. ``paper_bits`` = b + (16 - b)·(FP16 weights / all weights) (docs/algorithm.md §1.5);
    ``stored_bits`` counts codes incl. placeholders, scales, zeros, indices and FP16 columns (docs/owq-pack.md §2.1)."""

    cfg: QuantConfig
    n_weak: dict[str, int]  # qualified layer name -> number of weak columns
    weak_by_role: dict[str, int]  # layer type -> weak columns per layer (same in every block)
    paper_bits: float
    stored_bits: float
    low_bit_fraction: float
    seconds: float
    loss: dict[str, float] = field(default_factory=dict)  # GPTQ's Σ (w - q)²/U_cc²/2 per layer (0 for RTN)
    block_seconds: list[float] = field(default_factory=list)  # streaming: read + quantize + write, per block
    tune_k: int = 0  # trainable columns per linear beyond the recipe's weak ones (docs/algorithm.md §3.5)

    def summary(self) -> str:
        roles = ", ".join(f"{r}={n}" for r, n in self.weak_by_role.items())
        if self.cfg.budget == "global" or self.tune_k:  # counts differ per block: each type's range over the blocks
            ranges = {}
            for name, n in self.n_weak.items():
                ranges.setdefault(layer_role(name), []).append(n)
            why = "global budget" if self.cfg.budget == "global" else f"with tuning.k={self.tune_k}"
            roles = ", ".join(f"{r}={min(v)}-{max(v)}" for r, v in ranges.items()) + f" ({why})"
        return (
            f"{self.cfg.name}: {len(self.n_weak)} linears, weak columns per layer {roles}; "
            f"{self.paper_bits:.3f} bits (paper label), {self.stored_bits:.3f} bits stored; {self.seconds:.1f} s"
        )


def weak_counts(cfg: QuantConfig, layers: dict[str, tuple[int, str, float]]) -> dict[str, int]:
    """Weak columns per layer from ``layers`` = {name: (in_features, role, budget ratio)} of one block (docs/algorithm.md §1.5).

    target_bit T with b bits: r = 12·(T - b) / ((16 - b)·L), L = number of enabled layer types;
    n = round(in·r·ratio), bumped to even. target_rank k: exactly k per enabled layer. Disabled types (not in
    ``cfg.layers``) and configs with neither target get 0.
    """
    roles = {role for _, role, _ in layers.values()}
    enabled = roles if cfg.layers is None else {ROLE_ALIASES.get(r, r) for r in cfg.layers}
    if cfg.layers is not None and not enabled <= roles:
        raise WCTError(
            f"quant.layers names {sorted(enabled - roles)} but this model's blocks have layer types {sorted(roles)}; "
            "list only those"
        )
    counts = {}
    for name, (k, role, ratio) in layers.items():
        n = 0
        if role in enabled and cfg.target_rank is not None:
            n = cfg.target_rank
        elif role in enabled and cfg.target_bit is not None:
            r = 12 * (cfg.target_bit - cfg.bits) / ((16 - cfg.bits) * len(enabled))
            n = round(k * r * ratio)
            n += n % 2
        if n >= k:
            raise WCTError(
                f"{name} would keep {n} of its {k} input columns in FP16; lower quant.target_bit/target_rank"
            )
        counts[name] = n
    return counts


class _Caught(Exception):
    """Raised by the catcher to stop the forward pass at block 0."""


def _to(obj: Any, device: torch.device, memo: dict[int, torch.Tensor]) -> Any:
    """Move the tensors inside nested tuples / lists / dicts to ``device``; a tensor met again (``memo``: id ->
    moved copy) is moved once, so blocks that share a mask or rotary table share its copy."""
    if isinstance(obj, torch.Tensor):
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device)
        return memo[id(obj)]
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device, memo) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _catch_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, calib: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Run the pre-block modules on ``device`` and catch block 0's hidden states [n, seq, d] and every block's
    keyword args (attention mask, position ids / embeddings, alibi, ...: whatever the model passes its blocks).

    The args are caught per block because they may differ: Gemma 2/3 give their sliding-window layers another
    mask and other rotary embeddings than their global layers. While catching, each block's ``forward`` is a stub
    that records its args and passes block 0's input on unchanged (no block computes, so streamed blocks may stay
    on the meta device); the first sequence runs through every stub, the others stop at block 0."""
    inps: list[torch.Tensor] = []
    kwargs: dict[int, dict[str, Any]] = {}
    last = len(blocks) - 1

    def stub(i: int) -> Callable[..., Any]:
        def forward(*args: Any, **kw: Any) -> tuple[Any, ...]:
            kw = dict(kw)
            hidden = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                inps.append(hidden)
            if i not in kwargs:
                kwargs[i] = kw
            if i == last or len(kwargs) == len(blocks):
                raise _Caught
            return (hidden,)  # read as the block's output (tuple) or as the next block's input: both unused

        return forward

    outside = [m for m in outside_blocks(model, blocks)  # a head streaming has not read yet stays on meta, unused
               if not any(t.is_meta for t in [*m.parameters(), *m.buffers()])]
    homes = [next(m.parameters(), next(m.buffers(), torch.empty(0))).device for m in outside]
    for m in outside:
        m.to(device)
    own = [block.__dict__.get("forward") for block in blocks]  # a forward set on the instance (accelerate hooks)
    for i, block in enumerate(blocks):
        block.forward = stub(i)
    try:
        for j in range(calib.shape[0]):
            try:
                model(calib[j : j + 1].to(device), use_cache=False)
            except _Caught:
                pass
    finally:
        for block, forward in zip(blocks, own):
            del block.forward
            if forward is not None:
                block.forward = forward
        for m, home in zip(outside, homes):
            m.to(home)
    memo: dict[int, torch.Tensor] = {}
    return torch.cat(inps), [_to(kwargs.get(i, kwargs[0]), device, memo) for i in range(len(blocks))]


def _weight(layer: nn.Module) -> torch.Tensor:
    """[N, K] weight of an nn.Linear or a Conv1D (which stores it as [K, N])."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def _run_block(block: nn.Module, inps: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """The block applied to each calibration sequence (batch 1, as the catcher saw them)."""
    outs = []
    for j in range(inps.shape[0]):
        out = block(inps[j : j + 1], **kwargs)
        outs.append(out[0] if isinstance(out, (tuple, list)) else out)
    return torch.cat(outs)


def _hessians(
    block: nn.Module, layers: dict[str, nn.Module], inps: torch.Tensor, kwargs: dict[str, Any]
) -> dict[str, GPTQ]:
    """One :class:`GPTQ` per layer holding the Hessian of its inputs over ``inps`` run through ``block`` (docs/algorithm.md §1.4).

    Layers called with the same input tensor (q/k/v on the normed hidden states, gate/up) share one Hessian,
    accumulated once: the same bits as one each, a third of the Hessian work and memory of an attention block's
    projections (docs/scale.md). Which layers share is read from the first sequence and checked on every other."""
    if not layers:
        return {}
    owner: dict[str, str] = {}  # layer -> the layer whose Hessian it accumulates into (itself for an owner)
    acc: dict[str, GPTQ] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # this sequence's layer inputs so far, and their owners

    def hook(name: str, x: torch.Tensor) -> None:
        first = next((n for t, n in seen if t is x), name)
        if owner.setdefault(name, first) != first:
            raise WCTError(f"layer {name} shared its input with {owner[name]} on one calibration sequence but not "
                           "on another; wct cannot accumulate its Hessian (please report this model)")
        if first == name:
            seen.append((x, name))
            if name not in acc:  # made once: a K x K zeros per call would come and go (0.12 GiB at 5632 wide)
                acc[name] = GPTQ(_weight(layers[name]))
            acc[name].add_batch(x)

    hooks = [m.register_forward_hook(lambda mod, x, y, n=n: hook(n, x[0])) for n, m in layers.items()]
    hooks.append(block.register_forward_pre_hook(lambda mod, args: seen.clear()))
    try:
        _run_block(block, inps, kwargs)
    finally:
        seen.clear()
        for h in hooks:
            h.remove()
    gptqs = {}
    for n, m in layers.items():
        if n not in owner:  # never called: an empty Hessian, as before any input
            gptqs[n] = GPTQ(_weight(m))
        else:
            src = acc[owner[n]]
            gptqs[n] = src if owner[n] == n else src.share(_weight(m))
    return gptqs


def _sensitivities(blocks: nn.ModuleList, prefix: str, inps: torch.Tensor, kwargs: list[dict[str, Any]],
                   enabled: set[str], cfg: QuantConfig, device: torch.device,
                   visit: Callable[[int, bool], None] | None = None) -> dict[str, torch.Tensor]:
    """Pre-pass for ``quant.budget=global``: the sensitivity (docs/algorithm.md §1.6) of every layer named in ``enabled``, on
    Hessians of the full-precision model (blocks run unquantized). ``visit(i, True)`` before block ``i`` is used
    and ``visit(i, False)`` after (streaming reads the block's weights and drops them again)."""
    scores = {}
    for i, block in enumerate(blocks):
        if visit is not None:
            visit(i, True)
        home = next(block.parameters()).device
        block.to(device)
        linears = {n: m for n, m in find_linears(block).items() if n in enabled}
        for n, g in _hessians(block, linears, inps, kwargs[i]).items():
            scores[f"{prefix}.{i}.{n}"] = g.sensitivity(cfg.bits, cfg.sym, cfg.tuning, cfg.sens_grid, cfg.frob_norm)
        if i + 1 < len(blocks):
            inps = _run_block(block, inps, kwargs[i])
        block.to(home)
        if visit is not None:
            visit(i, False)
    return scores


def _storage_dtype(model: nn.Module) -> torch.dtype:
    """Dtype of stored scales and weak columns: the model's 16-bit dtype, or fp16 for an fp32 model."""
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _quantize_layer(
    layer: nn.Module,
    gptq: GPTQ | None,
    n_weak: int,
    cfg: QuantConfig,
    storage: torch.dtype,
    chooser: GPTQ | None = None,
    tune_k: int = 0,
) -> tuple[dict[str, torch.Tensor], float]:
    """Packed owq-pack v1 tensors of one layer and its GPTQ loss (docs/algorithm.md §1.6-§1.8; RTN without
    ``gptq``).

    ``chooser``: a second Hessian (of other inputs, e.g. the task's) whose sensitivity picks the weak columns;
    GPTQ's compensation and act-order still use ``gptq``'s. ``tune_k``: the tuning budget (docs/algorithm.md
    §3.5): the ``tune_k`` columns of highest sensitivity on ``chooser`` (else on ``gptq``) are quantized and
    compensated like any other, then stored as FP16 weak columns holding their dequantized values (codes at the
    zero-point), so the base computes the same function and those columns train."""
    w = _weight(layer).detach()
    weak = torch.zeros(0, dtype=torch.int32, device=w.device)
    loss = 0.0
    if gptq is None:
        q, scales, zeros = rtn(w.float(), cfg.bits, cfg.sym, cfg.tuning, cfg.grid, cfg.group_size, storage)
    else:
        sens = choice = None
        if n_weak or tune_k:
            sens = gptq.sensitivity(cfg.bits, cfg.sym, cfg.tuning, cfg.sens_grid, cfg.frob_norm)
            choice = sens if chooser is None else chooser.sensitivity(
                cfg.bits, cfg.sym, cfg.tuning, cfg.sens_grid, cfg.frob_norm)
        if n_weak:
            weak = GPTQ.weak_columns(choice, n_weak)
        tuned = GPTQ.weak_columns(choice, tune_k) if tune_k else None  # before the solve changes W in place
        q, scales, zeros = gptq.solve(
            weak,
            cfg.bits,
            sym=cfg.sym,
            tuning=cfg.tuning,
            grid=cfg.grid,
            group_size=cfg.group_size,
            group_grid=cfg.sens_grid,  # QuantConfig.sens_grid: the grid of the sensitivity pass and of group refits
            percdamp=cfg.percdamp,
            blocksize=cfg.blocksize,
            act_order=cfg.act_order,
            order_key=sens if n_weak else None,  # with weak columns, act-order goes by sensitivity (§1.8)
            scale_dtype=storage,
        )
        loss = gptq.loss
        if tuned is not None:  # q holds grid values there: pack_linear keeps them as the FP16 starting values
            weak = torch.unique(torch.cat([weak, tuned.to(weak.device)])).to(torch.int32)
    bias = layer.bias.detach() if layer.bias is not None else None
    return pack_linear(q, scales, zeros, weak, cfg.bits, bias, storage, storage), loss


def _check_tokens(model: nn.Module, ids: torch.Tensor, what: str) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise WCTError(f"{what} must be an integer tensor of token ids [n_samples, seqlen] (see wct.data.text)")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise WCTError(
            f"the {what} set is empty (shape {tuple(ids.shape)}): its text is shorter than one "
            "window of seqlen tokens; use a longer text or a smaller seqlen"
        )
    vocab = getattr(model.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise WCTError(f"{what} token id {int(ids.max())} is outside the vocabulary ({vocab}); "
                       "tokenize its text with this model's tokenizer")


def _check_inputs(
    model: nn.Module, calib: torch.Tensor, select: torch.Tensor | None, cfg: QuantConfig, linears: dict[str, nn.Module]
) -> None:
    _check_tokens(model, calib, "calibration")
    if select is not None:
        _check_tokens(model, select, "selection")
        if select.shape[1] != calib.shape[1]:
            raise WCTError(f"the selection windows have {select.shape[1]} tokens and the calibration windows "
                           f"{calib.shape[1]}; cut both to one seqlen")
        if cfg.method != "owq":
            raise WCTError(f"selection data chooses weak columns, which quant.method={cfg.method} does not keep; "
                           "use method owq or drop the selection data")
    for name, layer in linears.items():
        k = _weight(layer).shape[1]
        if cfg.group_size > 0 and k % cfg.group_size:
            raise WCTError(
                f"quant.group_size={cfg.group_size} does not divide in_features={k} of {name}; "
                "use a divisor of every layer's input width, or -1 for per-row quantization"
            )


def check_tuning_budget(tune_k: int, widths: dict[str, int], cfg: QuantConfig) -> None:
    """WCTError unless ``tune_k`` trainable columns fit every layer (``widths``: name -> in_features) and the
    recipe keeps weak columns (method owq)."""
    if not tune_k:
        return
    if cfg.method != "owq":
        raise WCTError(f"tuning.k={tune_k} stores trainable FP16 columns, which quant.method={cfg.method} does not "
                       "keep; use an owq recipe (quant=owq-w4-t4.01) or drop tuning.k")
    name, width = min(widths.items(), key=lambda kv: kv[1])
    if tune_k >= width:
        raise WCTError(f"tuning.k={tune_k} trainable columns per layer do not fit {name}, which has {width} input "
                       f"columns; use tuning.k < {width}")


@dataclass
class _Setup:
    """What every block's quantization shares: the blocks, the names of block 0's linears (not the layers: a
    streamed block 0 must be freed), weak columns per block-0 layer name and per qualified layer (``per_layer``:
    the global budget changes them block by block), and the dtype of stored scales / weak columns."""

    prefix: str
    blocks: nn.ModuleList
    first: list[str]
    counts: dict[str, int]
    per_layer: dict[str, int]
    storage: torch.dtype


@dataclass
class _Stream:
    """The calibration (and selection) hidden states entering the next block, and each block's keyword args."""

    inps: torch.Tensor | None
    sel_inps: torch.Tensor | None
    kwargs: list[dict[str, Any]]


def _recipe(cfg: QuantConfig | None, recipe: dict[str, Any]) -> QuantConfig:
    """``cfg``, or the QuantConfig of the recipe keywords."""
    if cfg is not None and recipe:
        raise WCTError(f"pass either cfg or recipe keywords ({', '.join(recipe)}), not both")
    if cfg is None:
        try:
            cfg = QuantConfig(**recipe)
        except TypeError as e:
            fields = ", ".join(QuantConfig.__annotations__)
            raise WCTError(f"{e}; the recipe fields are those of QuantConfig: {fields}") from None
    return cfg


def _setup(model: nn.Module, calib: torch.Tensor, select: torch.Tensor | None, cfg: QuantConfig,
           tune_k: int = 0) -> _Setup:
    """Checks and per-layer counts from block 0 (its weights may still be on the meta device)."""
    prefix, blocks = find_blocks(model)
    first = find_linears(blocks[0])
    _check_inputs(model, calib, select, cfg, first)
    check_tuning_budget(tune_k, {n: _weight(m).shape[1] for n, m in first.items()}, cfg)
    ratios = budget_ratios(first)
    layers = {n: (_weight(m).shape[1], layer_role(n), ratios[n]) for n, m in first.items()}
    counts = weak_counts(cfg, layers) if cfg.method == "owq" else dict.fromkeys(first, 0)
    per_layer = {f"{prefix}.{i}.{n}": counts[n] for i in range(len(blocks)) for n in first}
    return _Setup(prefix, blocks, list(first), counts, per_layer, _storage_dtype(model))


def _catch(model: nn.Module, setup: _Setup, calib: torch.Tensor, select: torch.Tensor | None, cfg: QuantConfig,
           device: torch.device, visit: Callable[[int, bool], None] | None = None) -> _Stream:
    """Block 0's calibration (and selection) inputs; for ``quant.budget=global`` also the pre-pass that spreads
    the weak columns over all blocks' layers (``visit``: as :func:`_sensitivities`'s)."""
    inps, kwargs = (None, []) if cfg.method == "rtn" else _catch_block_inputs(model, setup.blocks, calib, device)
    sel_inps = None if select is None else _catch_block_inputs(model, setup.blocks, select, device)[0]
    if cfg.budget == "global" and inps is not None:  # docs/algorithm.md: wct/quant/budget.py
        enabled = {n for n in setup.first if setup.counts[n]}
        scores = _sensitivities(setup.blocks, setup.prefix, inps, kwargs, enabled, cfg, device, visit)
        setup.per_layer = dict.fromkeys(setup.per_layer, 0) | global_counts(scores, sum(setup.per_layer.values()))
    return _Stream(inps, sel_inps, kwargs)


def _quantize_block(i: int, setup: _Setup, stream: _Stream, cfg: QuantConfig, device: torch.device,
                    n_weak: dict[str, int], losses: dict[str, float], tune_k: int = 0) -> None:
    """Quantize block ``i`` on ``device`` (its linears become OWQLinear), record its layers in ``n_weak`` /
    ``losses``, advance ``stream`` through the quantized block, and move the block back where it was."""
    block, prefix, per_layer = setup.blocks[i], setup.prefix, setup.per_layer
    home = next(block.parameters()).device
    block.to(device)
    linears = find_linears(block)
    groups = sequential_groups(list(linears)) if cfg.true_sequential else [list(linears)]
    for group in groups:
        gptqs: dict[str, GPTQ] = {}
        choosers: dict[str, GPTQ] = {}
        if cfg.method != "rtn":
            gptqs = _hessians(block, {n: linears[n] for n in group}, stream.inps, stream.kwargs[i])
        if stream.sel_inps is not None:
            choosers = _hessians(block, {n: linears[n] for n in group if per_layer[f"{prefix}.{i}.{n}"] or tune_k},
                                 stream.sel_inps, stream.kwargs[i])
        for n in group:  # each layer and its Hessians are dropped once it is solved (docs/scale.md)
            layer = linears.pop(n)
            packed, losses[f"{prefix}.{i}.{n}"] = _quantize_layer(
                layer, gptqs.pop(n, None), per_layer[f"{prefix}.{i}.{n}"], cfg, setup.storage, choosers.pop(n, None),
                tune_k)
            k = _weight(layer).shape[1]
            block.set_submodule(n, OWQLinear.from_packed(packed, cfg.bits, k))
            n_weak[f"{prefix}.{i}.{n}"] = packed["weak_idx"].numel()
        del gptqs, choosers
    if stream.inps is not None and i + 1 < len(setup.blocks):
        with kernels.no_dense_cache():  # the quantized block feeds the next one, run once: nothing to cache
            stream.inps = _run_block(block, stream.inps, stream.kwargs[i])
            if stream.sel_inps is not None:
                stream.sel_inps = _run_block(block, stream.sel_inps, stream.kwargs[i])
    block.to(home)


def _finish(model: nn.Module, setup: _Setup, cfg: QuantConfig, n_weak: dict[str, int], losses: dict[str, float],
            start: float, selection: str, calibration: dict[str, Any] | None = None, tune_k: int = 0) -> QuantReport:
    """The report, and ``model.config.quantization_config`` (a plain dict) for checkpointing. ``selection``: the
    ``weak_selection`` entry (``calib`` or the selection text's label); ``calibration``: the ``calibration``
    entry (how the calibration windows were made: source, n_samples, seqlen, seed, bos), when given."""
    recipe = {
        "method": cfg.method,
        "target_bit": cfg.target_bit,
        "target_rank": cfg.target_rank,
        "sym": cfg.sym,
        "recipe": asdict(cfg),
        "weak_selection": selection,
    }
    if calibration is not None:
        recipe["calibration"] = dict(calibration)
    if tune_k:  # docs/algorithm.md §3.5: the trainable columns beyond the recipe's weak ones
        recipe["tuning_k"] = tune_k
    meta = describe_quantization(model, recipe)
    model.config.quantization_config = meta
    return QuantReport(
        cfg=cfg,
        n_weak=n_weak,
        weak_by_role={layer_role(n): setup.counts[n] for n in setup.first},
        paper_bits=meta["paper_bits"],
        stored_bits=meta["stored_bits"],
        low_bit_fraction=meta["low_bit_fraction"],
        seconds=time.time() - start,
        loss=losses,
        tune_k=tune_k,
    )


@torch.no_grad()
def quantize_model(
    model: nn.Module,
    calib: torch.Tensor,
    cfg: QuantConfig | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    select: torch.Tensor | None = None,
    selection_label: str = "select",
    calibration: dict[str, Any] | None = None,
    tune_k: int | None = None,
    **recipe: Any,
) -> QuantReport:
    """Quantize every linear of every decoder block of ``model`` in place (docs/algorithm.md §1.1).

    ``calib``: token ids [n_samples, seqlen]. ``cfg``: the recipe, or give its fields as keywords
    (``quantize_model(model, calib, bits=3, target_bit=3.01)``). Each block runs on ``device`` (default: CPU) and
    goes back to where it was. Records ``model.config.quantization_config`` (a plain dict) for checkpointing.

    ``select``: token ids [n, seqlen] of other text (the fine-tuning task's) whose Hessians choose the weak columns
    instead of calib's: s_j = H^sel_jj·‖W_:,j − RTN(W)_:,j‖² (docs/algorithm.md §1.6 on H^sel). Like calib they are
    propagated through the already-quantized blocks; GPTQ's error compensation still runs on calib's Hessian.
    ``selection_label`` names that text in ``quantization_config["weak_selection"]``. ``calibration``: how
    ``calib`` was made (e.g. ``asdict(CalibConfig)`` with ``bos`` resolved), kept as
    ``quantization_config["calibration"]``. ``tune_k``: the tuning budget, trainable FP16 columns per linear
    beyond the recipe's weak ones, chosen on ``select``'s Hessians (else calib's) (:func:`_quantize_layer`);
    recorded as ``quantization_config["tuning_k"]``, and the bits reported count them.

    :func:`wct.quant.stream.quantize_streaming` does the same block by block from safetensors shards.
    """
    start = time.time()
    cfg = _recipe(cfg, recipe)
    device = torch.device(device or "cpu")
    tune_k = tune_k or 0
    setup = _setup(model, calib, select, cfg, tune_k)
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    model.eval()
    model.config.use_cache = False
    stream = _catch(model, setup, calib, select, cfg, device)
    n_weak, losses = {}, {}
    for i in tqdm(range(len(setup.blocks)), desc=f"quantize {cfg.name}", unit="block", disable=not progress):
        _quantize_block(i, setup, stream, cfg, device, n_weak, losses, tune_k)
    model.train(was_training)
    model.config.use_cache = use_cache
    return _finish(model, setup, cfg, n_weak, losses, start, "calib" if select is None else selection_label,
                   calibration, tune_k)
