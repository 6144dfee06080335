"""Write a random Llama of a given size as a Hugging Face folder (fp16, sharded safetensors, byte-level tokenizer):
the large model for scripts/bench_scale.py, on machines with no model hub.

    python scripts/make_synthetic_llama.py --size 1.5B --out /tmp/synth-1.5b
    python scripts/make_synthetic_llama.py --size 0.3B --out /tmp/synth-0.3b --shard-mib 256

The shape follows Llama's proportions: hidden width by size (1024 up to 0.6B, 2048 up to 3B, 4096 up to 20B,
8192 above), MLP width 8/3 of it rounded up to 256, 128-wide heads, a 32000-token vocabulary (untied head), and as
many blocks as give the size. Weights are N(0, 0.02²) (norms 1), drawn tensor by tensor from one seed and written
shard by shard, so memory stays at one shard; the folder appears complete under its name or not at all.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wct.errors import WCTError, cli_errors  # noqa: E402
from wct.io import atomic_dir  # noqa: E402
from wct.models import byte_tokenizer  # noqa: E402
from wct.format.shards import ShardWriter  # noqa: E402

VOCAB = 32000
WIDTHS = [(0.6e9, 1024), (3e9, 2048), (20e9, 4096), (float("inf"), 8192)]


def parse_size(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([MmBb]?)\s*", text)
    if m is None:
        raise WCTError(f"--size {text!r} is not a parameter count; write it like 0.3B, 1.5B or 350M")
    return float(m[1]) * {"": 1, "m": 1e6, "b": 1e9}[m[2].lower()]


def shape(params: float) -> dict:
    """Llama config fields for about ``params`` parameters (module docstring)."""
    hidden = next(w for limit, w in WIDTHS if params <= limit)
    inter = -(-hidden * 8 // 3 // 256) * 256
    per_block = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    outside = 2 * VOCAB * hidden + hidden
    blocks = round((params - outside) / per_block)
    if blocks < 1:
        raise WCTError(f"--size {params / 1e9:.3g}B is too small for hidden width {hidden}: the embeddings and head "
                       f"alone are {outside / 1e9:.3g}B parameters; ask for at least {(outside + per_block) / 1e9:.2f}B")
    return {"hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": blocks,
            "num_attention_heads": hidden // 128, "num_key_value_heads": hidden // 128, "vocab_size": VOCAB,
            "tie_word_embeddings": False, "max_position_embeddings": 4096}


def tensors(cfg: dict):
    """(name, shape) of every weight of LlamaForCausalLM with ``cfg``, in the order of its state dict."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    yield "model.embed_tokens.weight", (cfg["vocab_size"], h)
    for b in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{b}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield f"{p}self_attn.{name}.weight", (h, h)
        yield f"{p}mlp.gate_proj.weight", (i, h)
        yield f"{p}mlp.up_proj.weight", (i, h)
        yield f"{p}mlp.down_proj.weight", (h, i)
        yield f"{p}input_layernorm.weight", (h,)
        yield f"{p}post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (cfg["vocab_size"], h)


@cli_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1.5B", help="parameter count: 0.3B, 1.5B, 350M ...")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shard-mib", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from transformers import LlamaConfig

    tok = byte_tokenizer()
    fields = shape(parse_size(args.size))
    cfg = LlamaConfig(**fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    shapes = list(tensors(fields))
    count = sum(torch.Size(s).numel() for _, s in shapes)
    need = count * 2
    free = shutil.disk_usage(args.out.parent if args.out.parent.exists() else Path.cwd()).free
    if need > 0.9 * free:
        raise WCTError(f"a {count / 1e9:.2f}B-parameter fp16 model needs {need / 2**30:.1f} GiB but "
                       f"{free / 2**30:.1f} GiB is free at {args.out.parent}; pick a smaller --size or another --out")
    gen = torch.Generator().manual_seed(args.seed)
    with atomic_dir(args.out, "synthetic-model", overwrite=True, key="--out") as tmp:
        writer = ShardWriter(tmp, args.shard_mib * 2**20)
        for name, s in shapes:
            t = torch.ones(s) if name.endswith("norm.weight") else torch.randn(s, generator=gen).mul_(0.02)
            writer.add(name, t.to(torch.float16))
        files = writer.close()
        cfg.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    summary = {"params": count, "fp16_bytes": need, "blocks": fields["num_hidden_layers"],
               "hidden": fields["hidden_size"], "intermediate": fields["intermediate_size"], "shards": len(files),
               "out": str(args.out)}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
