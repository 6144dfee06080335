"""Find a causal LM's decoder blocks and their linear layers by introspection (docs/algorithm.md §1.3).

No per-family tables beyond short role names: the blocks are the longest ``nn.ModuleList`` of same-class
modules; their linears are every ``nn.Linear`` (or transformers ``Conv1D``) inside; a layer is "attention" when
a module on its path is named like attention, otherwise MLP.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from wct.errors import WCTError

# last name component -> short role (docs/algorithm.md §1.3 `--layers` names); anything else keeps its own name
_ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "up_proj": "up",
    "gate_proj": "gate",
    "down_proj": "down",
    "query_key_value": "qkv",
    "qkv_proj": "qkv",
    "c_attn": "qkv",
    "c_fc": "fc1",
    "dense_h_to_4h": "fc1",
    "dense_4h_to_h": "fc2",
    "gate_up_proj": "gate_up",
}
ROLE_ALIASES = {"out": "o"}  # accepted in QuantConfig.layers
_ATTN_INPUTS = {"q", "k", "v", "qkv"}
_MLP_INPUTS = {"up", "gate", "gate_up", "fc1"}


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, list) of the decoder blocks: the longest ModuleList whose members share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    if best is None:
        raise WCTError(
            f"{type(model).__name__} has no list of decoder blocks (an nn.ModuleList of identical modules); "
            "wct quantizes transformer causal LMs such as Llama, Qwen2, OPT, BLOOM, Falcon or GPT-2"
        )
    return best


def outside_blocks(model: nn.Module, blocks: nn.ModuleList) -> list[nn.Module]:
    """The largest submodules holding no decoder block: embeddings, rotary tables, final norm, lm_head."""
    found = []

    def walk(mod: nn.Module) -> None:
        for child in mod.children():
            if child is blocks:
                continue
            if any(m is blocks for m in child.modules()):
                walk(child)
            else:
                found.append(child)

    walk(model)
    return found


def find_linears(block: nn.Module) -> dict[str, nn.Module]:
    """{name inside the block: layer} for every nn.Linear / Conv1D, in module order."""
    found = {n: m for n, m in block.named_modules() if isinstance(m, (nn.Linear, Conv1D))}
    if not found:
        raise WCTError(
            f"decoder block {type(block).__name__} contains no linear layers to quantize; "
            "wct needs blocks built from nn.Linear (or transformers Conv1D) layers"
        )
    return found


def is_attention(name: str) -> bool:
    """True when a module on the path ``name`` is named like attention (self_attn, attention, attn, ...)."""
    return any("attn" in part or "attention" in part for part in name.lower().split(".")[:-1])


def layer_role(name: str) -> str:
    """Short type of a linear from its qualified name: q, k, v, o, up, gate, down, fc1, fc2, qkv, dense, ..."""
    last = name.split(".")[-1]
    if last == "c_proj":  # GPT-2 reuses the name for the attention output and the second MLP layer
        return "o" if is_attention(name) else "fc2"
    return _ROLES.get(last, last)


def budget_ratios(linears: dict[str, nn.Module]) -> dict[str, float]:
    """Share of the FP16 budget per layer (docs/algorithm.md §1.3): attention 1; MLP 0.375 in a gated (LLaMA-like) block,
    0.25 otherwise (OPT/BLOOM/Falcon)."""
    gated = any(layer_role(n).startswith("gate") for n in linears)
    mlp = 0.375 if gated else 0.25
    return {n: 1.0 if is_attention(n) else mlp for n in linears}


def sequential_groups(names: list[str]) -> list[list[str]]:
    """True-sequential order (docs/algorithm.md §1.3): attention inputs [q,k,v], the other attention layers [o], the MLP
    inputs [up,gate] / [fc1], then the rest [down] / [fc2]; empty stages are dropped."""

    def stage(n: str) -> int:
        role = layer_role(n)
        if is_attention(n):
            return 0 if role in _ATTN_INPUTS else 1
        return 2 if role in _MLP_INPUTS else 3

    return [g for s in range(4) if (g := [n for n in names if stage(n) == s])]
