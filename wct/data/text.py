"""Plain text for calibration and perplexity: the GPTQ/OWQ corpora through ``datasets``, or local text.

``source`` is ``wikitext2``, ``ptb``, ``c4`` (Hugging Face hub, or its local ``datasets`` cache) or the path of a
UTF-8 text file or of a folder whose ``*.txt`` files are read in name order and joined with a blank line, or the
name of a text embedded in the package (``emma``: :mod:`wct.data.embedded`).

Protocols (docs/algorithm.md §1.2 and §1.10):

* calibration: ``random.Random(seed)``; for c4 each sample draws random documents until one is longer than
  ``seqlen`` tokens and takes a random ``seqlen`` window of it; every other source is tokenized as one text
  (train split; wikitext2 joined with "\\n\\n", ptb with " ") and each sample is a random ``seqlen`` window;
* evaluation: wikitext2 test joined with "\\n\\n"; ptb test joined with " " with special tokens split, so the
  literal ``<unk>`` is ordinary text (the reference's "fix poor llama ptb"); c4 = the first 1100 documents of the
  validation shard joined with " ", truncated to 256 windows. Local text is used whole.

BOS (``bos`` below; the configs' ``calib.bos`` / ``eval.bos`` = auto | always | never, resolved by
:func:`resolve_bos`): without it (``never``, the papers' protocol) the text is tokenized with the tokenizer's
default settings and cut as it comes, so a tokenizer that adds a BOS puts one only at the start of the whole text
(or of each C4 document); with it (``always``) the text is tokenized without special tokens and every window is
BOS followed by ``seqlen - 1`` text tokens.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import torch

from wct.data.embedded import TEXTS
from wct.errors import WCTError

BOS_MODES = ("auto", "always", "never")

# name -> (hub dataset, config, text field, joiner, {split: data file})
HUB_CORPORA = {
    "wikitext2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "text", "\n\n", None),
    "ptb": ("ptb-text-only/ptb_text_only", "penn_treebank", "sentence", " ", None),
    "c4": (
        "allenai/c4",
        None,
        "text",
        " ",
        {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"},
    ),
}
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256


def _hub_documents(name: str, split: str) -> list[str]:
    from wct.data.hub import load_hub_dataset as load_dataset

    repo, config, field, _, files = HUB_CORPORA[name]
    if files is not None:
        split = "validation" if split == "test" else split
    try:
        if files is not None:
            ds = load_dataset(repo, data_files={split: files[split]}, split=split)
        else:
            ds = load_dataset(repo, config, split=split)
    except OSError as e:  # ConnectionError (offline / unreachable hub) and DatasetNotFoundError are OSErrors
        raise WCTError(
            f"could not load the {name} corpus ({repo}, {split} split): {str(e).splitlines()[0]}. The hub is not "
            "reachable and no cached copy exists; use local text instead, e.g. calib.source=/path/to/book.txt "
            "or eval.corpora=[/path/to/text_or_folder] (any UTF-8 .txt file or folder of .txt files)"
        ) from None
    return ds[field]


def read_text(path: Path) -> str:
    """The UTF-8 text of file ``path`` (a leading byte-order mark is dropped); WCTError naming the file and the
    byte offset of the first invalid byte, or why it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise WCTError(f"{path} cannot be read ({e.strerror}); check the path and its permissions") from None
    return decode_utf8(data, path)


def decode_utf8(data: bytes, path: Path) -> str:
    """``data`` (the contents of ``path``) as UTF-8 text without a leading byte-order mark; WCTError naming the
    file and the byte offset of the first invalid byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise WCTError(
            f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start} is invalid; convert the file "
            f"to UTF-8 (e.g. iconv -f latin1 -t utf-8 {path} > {path.stem}.utf8{path.suffix})"
        ) from None


def _local_text(path: Path) -> str:
    if path.suffix == ".gz":  # the embedded texts (wct/data/embedded)
        return decode_utf8(gzip.decompress(path.read_bytes()), path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise WCTError(f"folder {path} holds no .txt files; point to a text file or a folder of .txt files")
        return "\n\n".join(read_text(f) for f in files)
    return read_text(path)


def _check_source(source: str | Path) -> Path | None:
    """None for a hub corpus name, else the existing local path (an embedded text's file for its name, e.g.
    ``emma``); a clear error for anything else."""
    if str(source) in HUB_CORPORA:
        return None
    if str(source) in TEXTS:
        return TEXTS[str(source)]
    path = Path(source).expanduser()
    if not path.exists():
        raise WCTError(
            f"text source {str(source)!r} is neither a corpus name ({', '.join([*HUB_CORPORA, *TEXTS])}) nor an "
            "existing file or folder; fix the path or use one of those names"
        )
    return path


def load_text(source: str | Path, split: str = "test") -> str:
    """The whole text of ``source`` for ``split`` (train / test), joined by the protocol of the module docstring."""
    path = _check_source(source)
    if path is not None:
        return _local_text(path)
    docs = _hub_documents(str(source), split)
    if str(source) == "c4" and split == "test":
        docs = docs[:C4_EVAL_DOCS]
    return HUB_CORPORA[str(source)][3].join(docs)


def tokenize(tokenizer, text: str, split_special_tokens: bool = False, add_special_tokens: bool = True) -> torch.Tensor:
    """Token ids [T] (int64) of ``text`` with the tokenizer's default settings (``add_special_tokens=False``: the
    text's tokens only, no BOS / EOS)."""
    enc = tokenizer(text, verbose=False, split_special_tokens=split_special_tokens,
                    add_special_tokens=add_special_tokens)
    return torch.tensor(enc["input_ids"], dtype=torch.long)


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default settings put its BOS token first: ``tokenizer("x")`` starts with
    ``bos_token_id`` and the same text without special tokens does not (Gemma: yes; SmolLM2: no)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return tokenizer("x")["input_ids"][:1] == [bos] and plain[:1] != [bos]


def resolve_bos(tokenizer, mode: str, key: str = "bos") -> bool:
    """Whether every window starts with BOS under ``mode`` (the config value of ``key``): ``always``; ``never``;
    ``auto``: what the tokenizer does by default (:func:`tokenizer_adds_bos`)."""
    if mode not in BOS_MODES:
        raise WCTError(f"{key}={mode!r} is unknown; use one of {', '.join(BOS_MODES)}")
    if mode == "always" and tokenizer.bos_token_id is None:
        raise WCTError(f"{key}=always but the tokenizer has no BOS token; use {key}=never (or auto)")
    return mode == "always" or (mode == "auto" and tokenizer_adds_bos(tokenizer))


def bos_label(bos: bool) -> str:
    """The resolved mode recorded in results: ``always`` or ``never``."""
    return "always" if bos else "never"


def _with_bos(windows: torch.Tensor, tokenizer) -> torch.Tensor:
    """``windows`` [n, L] of text tokens -> [n, L + 1], each row BOS followed by its text tokens."""
    bos = torch.full((windows.shape[0], 1), tokenizer.bos_token_id, dtype=windows.dtype)
    return torch.cat([bos, windows], dim=1)


def _too_short(source: str | Path, n: int, seqlen: int, need: str) -> WCTError:
    return WCTError(
        f"text {str(source)!r} has {n} tokens, too few for {need} of seqlen={seqlen}; "
        "use a longer text or a smaller seqlen"
    )


def calibration_windows(
    tokenizer, source: str | Path, n_samples: int = 128, seqlen: int = 2048, seed: int = 0, bos: bool = False
) -> torch.Tensor:
    """``n_samples`` random windows of ``seqlen`` tokens, LongTensor [n_samples, seqlen] (docs/algorithm.md §1.2).

    ``bos``: each window is BOS + ``seqlen - 1`` text tokens (module docstring; :func:`resolve_bos`)."""
    if n_samples < 1 or seqlen < 2:
        raise WCTError(f"calibration needs n_samples >= 1 and seqlen >= 2 (got {n_samples}, {seqlen})")
    body = seqlen - 1 if bos else seqlen  # text tokens per window
    rng = random.Random(seed)
    windows = []
    if str(source) == "c4":
        docs = _hub_documents("c4", "train")
        for _ in range(n_samples):
            while True:
                ids = tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)], add_special_tokens=not bos)
                if ids.numel() > body:
                    break
            i = rng.randint(0, ids.numel() - body - 1)
            windows.append(ids[i : i + body])
    else:
        ids = tokenize(tokenizer, load_text(source, split="train"), add_special_tokens=not bos)
        if ids.numel() <= body:
            raise _too_short(source, ids.numel(), seqlen, "one calibration window")
        for _ in range(n_samples):
            i = rng.randint(0, ids.numel() - body - 1)
            windows.append(ids[i : i + body])
    out = torch.stack(windows)
    return _with_bos(out, tokenizer) if bos else out


def eval_tokens(tokenizer, source: str | Path, seqlen: int = 2048, max_windows: int | None = None,
                bos: bool = False) -> torch.Tensor:
    """Evaluation tokens [n_windows * seqlen] of ``source`` (docs/algorithm.md §1.10), cut to whole non-overlapping windows.

    ``max_windows`` keeps only the first windows (c4 is always capped at 256, as in the reference). ``bos``: the
    text is cut into windows of ``seqlen - 1`` tokens and each gets a BOS in front (module docstring).
    """
    ids = tokenize(tokenizer, load_text(source, split="test"), split_special_tokens=str(source) == "ptb",
                   add_special_tokens=not bos)
    body = seqlen - 1 if bos else seqlen
    n = ids.numel() // body
    if str(source) == "c4":
        n = min(n, C4_EVAL_WINDOWS)
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise _too_short(source, ids.numel(), seqlen, "one evaluation window")
    ids = ids[: n * body]
    return _with_bos(ids.view(n, body), tokenizer).flatten() if bos else ids
