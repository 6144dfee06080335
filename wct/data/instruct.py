"""Instruction data: the Stanford Alpaca template, prompt-masked tokenization, loading, splitting.

Template (docs/algorithm.md §3.2): ``PROMPT_INPUT`` when a row's ``input`` is non-empty, else ``PROMPT_NO_INPUT``,
byte-exact as in stanford_alpaca's ``train.py``; both end with ``### Response:`` and no trailing space or newline.
The target is ``output`` + EOS, the labels are -100 on every prompt token (loss on the response and EOS only).

Prompt and response are tokenized separately and concatenated, so the mask boundary is exact whatever the
tokenizer merges. Sequences longer than ``max_length`` lose the end of their response (EOS included). A row whose
prompt alone leaves no room for one response token follows ``task.too_long`` (:data:`TOO_LONG`): ``drop`` (the
default, as trl and axolotl drop over-long rows) leaves it out and counts it, ``truncate`` keeps the prompt's end
(its leading special tokens, e.g. BOS, kept) and the response's start, the response getting up to half of
``max_length`` (trl's ``keep_end`` for prompts, ``keep_start`` for completions), ``error`` stops with the row
named. :class:`LengthReport` counts what each mode did.

Sources: a local ``.json`` (a list of rows, or JSON lines), ``.jsonl`` or ``.parquet`` file, the real
``alpaca-libre`` rows embedded in the package (the default task's data, :mod:`wct.data.embedded`), or a dataset on
the Hugging Face hub (``tatsu-lab/alpaca``). :func:`builtin_rows` is a small generated Alpaca-format set for unit
tests.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from wct.data.embedded import INSTRUCTIONS, ORIGINS
from wct.data.text import decode_utf8, read_text
from wct.errors import WCTError

log = logging.getLogger("wct.data")

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
IGNORE_INDEX = -100
FIELDS = ("instruction", "input", "output")
BUILTIN = "builtin"
CHARS_PER_TOKEN = 8  # first guess of the characters one token covers (prefix tokenization of long responses)
HEAD_MARGIN = 64  # tokens beyond the cut that a long response is tokenized with


def format_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt of one row (the model's answer follows it directly)."""
    if input:
        return PROMPT_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def render_text(rows: Iterable[Mapping[str, str]]) -> str:
    """The rows as one plain text (prompt + response per row, blank lines between): what the model reads in
    training, for calibration or weak-column selection on the task."""
    return "\n\n".join(format_prompt(r["instruction"], r.get("input", "")) + r["output"] for r in rows)


def encode(tokenizer, row: Mapping[str, str], max_length: int, index: int | str = "?", too_long: str = "error"
           ) -> dict[str, list[int]] | None:
    """``{"input_ids", "labels"}`` of one row: prompt tokens labelled -100, then ``output`` + EOS (truncated); for a
    prompt that alone fills ``max_length``, per ``too_long`` (module docstring): None (``drop``), the prompt cut
    from the left (``truncate``), or a WCTError naming the row (``error``)."""
    return encode_row(tokenizer, row, max_length, index, too_long)[0]


def encode_row(tokenizer, row: Mapping[str, str], max_length: int, index: int | str = "?", too_long: str = "error"
               ) -> tuple[dict[str, list[int]] | None, bool, bool]:
    """``(example, prompt cut, response cut)``: :func:`encode`'s example and whether the prompt lost its start
    (``too_long=truncate``) or the response its end (EOS included)."""
    if tokenizer.eos_token_id is None:
        raise WCTError("the tokenizer has no EOS token; instruction tuning needs one to end each response")
    prompt = tokenizer(format_prompt(row["instruction"], row.get("input", "")), add_special_tokens=True).input_ids
    room = max_length - len(prompt)
    prompt_cut = room < 1
    if prompt_cut:
        if too_long == "drop":
            return None, False, False
        if too_long != "truncate":
            raise WCTError(
                f"row {index}: the prompt alone has {len(prompt)} tokens, leaving no room for the response within "
                f"task.max_length={max_length}; raise task.max_length, shorten/remove that row, or set "
                "task.too_long=drop (leave such rows out) or truncate (cut their prompt from the left)"
            )
        head = _head_tokens(tokenizer, row["output"], max_length // 2)
        room = min(max_length // 2, len(head) + 1)  # the response's start, EOS included, within half the window
        lead = next((k for k, t in enumerate(prompt) if t not in tokenizer.all_special_ids), len(prompt))
        lead = min(lead, max_length - room - 1)  # leading special tokens (BOS) stay, and at least one token more
        prompt = prompt[:lead] + prompt[len(prompt) - (max_length - room - lead):]
    else:
        head = _head_tokens(tokenizer, row["output"], room)
    response = (head + [tokenizer.eos_token_id])[:room]
    return ({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}, prompt_cut,
            len(head) >= room)


def _head_tokens(tokenizer, text: str, n: int) -> list[int]:
    """The tokens of ``text`` up to the first ``n`` (all of them when fewer). A long text is tokenized from a prefix
    that yields ``n`` tokens plus a margin of :data:`HEAD_MARGIN` (so the cut does not change the first ``n``),
    growing it while it falls short: a 10 MB row costs about ``n`` tokens' work, not 10 MB's."""
    size = CHARS_PER_TOKEN * (n + HEAD_MARGIN)
    while True:
        ids = tokenizer(text[:size], add_special_tokens=False).input_ids
        if size >= len(text) or len(ids) >= n + HEAD_MARGIN:
            return ids[:n] if size < len(text) else ids
        size *= 2


def check_rows(rows: list[Any], source: str, fields: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """Rows mapped to ``instruction/input/output`` (``fields``: our name -> the file's name) and validated:
    every row needs a non-empty string ``instruction`` and a string ``output``; ``input`` is optional."""
    unknown = sorted(set(fields or {}) - set(FIELDS))
    if unknown:
        raise WCTError(f"task.data.fields.{unknown[0]} is not a field wct reads; the keys are {', '.join(FIELDS)} "
                       "(wct's name = your file's name), e.g. task.data.fields.output=answer")
    names = {f: f for f in FIELDS} | dict(fields or {})
    if not rows:
        raise WCTError(f"{source} holds no rows; point task.data.path / task.data.source at a non-empty dataset")
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise WCTError(f"{source}: row {i} is a {type(row).__name__}, not an object with instruction/output")
        r = {f: _as_text(row.get(names[f])) for f in FIELDS}
        missing = [names[f] for f in ("instruction", "output") if names[f] not in row]
        wrong = [f"{names[f]} is a {type(row[names[f]]).__name__}" for f in ("instruction", "output")
                 if names[f] in row and not isinstance(r[f], str)]
        if missing or wrong or not r["instruction"].strip():
            what = (f"has no field {' / '.join(missing)}" if missing else f"is not text ({', '.join(wrong)})" if wrong
                    else "has an empty instruction")
            raise WCTError(
                f"{source}: row {i} {what} (row: {json.dumps(row, default=str)[:200]}); fix or drop that row, "
                "or map your file's field names, e.g. task.data.fields.instruction=question "
                "task.data.fields.output=answer"
            )
        r["input"] = r["input"] if isinstance(r["input"], str) else ""
        out.append(r)
    return out


def _as_text(value: Any) -> Any:
    """Numbers become their decimal text (an answer ``42`` trains as "42"); anything else, NaN and infinities
    included (a parquet float), is left as it is and refused as not text."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return str(value) if number and math.isfinite(value) else value


def read_file(path: Path) -> list[Any]:
    """The rows of a ``.json`` (list, or JSON lines), ``.jsonl`` or ``.parquet`` file (``.json.gz`` / ``.jsonl.gz``
    read compressed)."""
    if path.is_dir():
        raise WCTError(f"task.data.path={path} is a folder; give the .json, .jsonl or .parquet instruction file in it")
    if not path.is_file():
        raise WCTError(f"task.data.path={path} does not exist; give a .json, .jsonl or .parquet instruction file")
    if path.suffix == ".parquet":
        return read_parquet(path)
    packed = path.suffix == ".gz"
    suffix = Path(path.stem).suffix if packed else path.suffix
    if suffix not in (".json", ".jsonl"):
        raise WCTError(f"task.data.path={path}: unsupported file type {suffix!r}; use .json, .jsonl or .parquet")
    text = decode_utf8(gzip.decompress(path.read_bytes()), path) if packed else read_text(path)
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text, parse_constant=NotJSON)
        except json.JSONDecodeError as e:
            raise WCTError(f"{path} is not valid JSON ({e}); fix the file") from None
        for i, row in enumerate(rows if isinstance(rows, list) else []):
            refuse_constants(row, f"{path}: row {i}")
        return rows
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line, parse_constant=NotJSON))
            except json.JSONDecodeError as e:
                raise WCTError(f"{path}, line {n}: not valid JSON ({e}); one JSON object per line is expected") from None
            refuse_constants(rows[-1], f"{path}, line {n} (row {len(rows) - 1})")
    return rows


class NotJSON(str):
    """The literal ``NaN``, ``Infinity`` or ``-Infinity`` where Python's json module would read a float: JavaScript,
    not JSON (RFC 8259 has no such numbers). Read as this marker so the row holding it can be named."""


def refuse_constants(value: Any, where: str, field: str = "") -> None:
    """WCTError naming ``where`` and the field when ``value`` (a parsed row) holds a :class:`NotJSON` literal."""
    if isinstance(value, NotJSON):
        raise WCTError(f"{where}: {f'field {field} holds' if field else 'holds'} {value}, which is not JSON (JSON "
                       "has no NaN or Infinity numbers); write it as a string (\"NaN\") or null, or drop that row")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        refuse_constants(v, where, f"{field}.{k}" if field else str(k))


def read_parquet(path: Path) -> list[Any]:
    """The rows of a parquet file; WCTError naming the file when it is not readable parquet."""
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise WCTError(f"{path} is not a readable parquet file ({str(e).splitlines()[0]}); re-export it, or use "
                       ".json / .jsonl") from None


def load_hub(name: str, split: str) -> list[Any] | None:
    """The rows of hub dataset ``name`` (or its local cache), or None when the hub is unreachable and uncached."""
    from wct.data.hub import load_hub_dataset

    try:
        return list(load_hub_dataset(name, split=split))
    except (OSError, ValueError) as e:  # ConnectionError, offline mode and missing repos are OSErrors
        log.debug("load_dataset(%s) failed: %s", name, e)
        return None


def load_rows(
    source: str, path: str | None = None, split: str = "train", fields: Mapping[str, str] | None = None,
    fallback: str = "error", check: Callable[[list[Any], str, Mapping[str, str] | None], list[dict]] | None = None,
) -> tuple[list[dict], str]:
    """``(rows, origin)``: from ``path`` when given, else ``source``: a dataset embedded in the package
    (``alpaca-libre``, :mod:`wct.data.embedded`), ``builtin`` (the generated set, for unit tests) or a hub dataset.

    ``fallback`` (an embedded name or ``builtin``) replaces an unreachable hub dataset, with a WARNING;
    ``fallback="error"`` raises instead. ``check`` validates and maps the raw rows (default :func:`check_rows`, the
    Alpaca fields). ``origin`` says where the rows came from (recorded in the run config)."""
    check = check or check_rows
    if path:
        p = Path(path).expanduser()
        return check(read_file(p), str(p), fields), str(p)
    if source == BUILTIN:
        return check(builtin_rows(), BUILTIN, fields), BUILTIN
    if source in INSTRUCTIONS:
        return check(read_file(INSTRUCTIONS[source]), source, fields), ORIGINS[source]
    if source in ("none", ""):
        raise WCTError("this task reads a local file (task.data.source=none): pass task.data.path=FILE (a .json, "
                       ".jsonl or .parquet instruction file)")
    rows = load_hub(source, split)
    if rows is not None:
        return check(rows, source, fields), source
    if fallback != BUILTIN and fallback not in INSTRUCTIONS:
        raise WCTError(
            f"could not load the instruction dataset {source!r} (hub unreachable and not cached); pass a local "
            f"file with task.data.path=/path/to/data.json (.json, .jsonl or .parquet), or an embedded set "
            f"(task.data.source={' / '.join(INSTRUCTIONS)})"
        )
    rows, origin = load_rows(fallback, check=check)
    log.warning(
        "WARNING: dataset %s is not reachable offline and not cached; training on %s (%d rows) instead. "
        "Pass task.data.path=FILE for other data.", source, origin, len(rows)
    )
    return rows, origin


def split_rows(rows: list[dict], val_fraction: float, val_size: int | None, seed: int) -> tuple[list, list]:
    """``(train, val)``: a seeded shuffle, then ``val_size`` rows (default ``val_fraction`` of them, at least 1)."""
    n_val = val_size if val_size is not None else max(1, round(len(rows) * val_fraction))
    if not 0 < n_val < len(rows):
        raise WCTError(
            f"{len(rows)} rows cannot give a validation split of {n_val} rows and a non-empty training split; "
            "adjust task.val_fraction / task.val_size"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def show_example(tokenizer, example: Mapping[str, list[int]]) -> str:
    """The rendered example with its label mask: masked text in ``[[...]]``, trained text outside, and the token
    counts (Alpaca: one masked prompt then the response; chat: every non-assistant stretch masked)."""
    ids, labels = example["input_ids"], example["labels"]
    parts, start = [], 0
    for i in range(1, len(ids) + 1):  # runs of equally masked tokens
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            text = tokenizer.decode(ids[start:i])
            parts.append(f"[[{text}]]" if labels[start] == IGNORE_INDEX else text)
            start = i
    n_masked = sum(1 for x in labels if x == IGNORE_INDEX)
    return (
        f"first training example ({n_masked} prompt tokens masked with -100, {len(ids) - n_masked} trained tokens "
        f"incl. end-of-turn); masked part in [[...]]:\n{''.join(parts)}"
    )


# ------------------------------------------------------------------ built-in generated set (unit tests)

_CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
    "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
    "Portugal": "Lisbon", "Greece": "Athens", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna",
    "Chile": "Santiago", "Thailand": "Bangkok", "Cuba": "Havana", "Finland": "Helsinki", "Hungary": "Budapest",
}
_WORDS = (
    "garden window river candle pencil basket mountain orange silver thunder planet violin harbor lantern "
    "meadow rocket puzzle marble coffee island forest bridge castle dragon feather jungle ladder mirror"
).split()


def _builtin_row(kind: int, rng: random.Random) -> dict[str, str]:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    word = rng.choice(_WORDS)
    if kind == 0:
        return {"instruction": "Add the two numbers.", "input": f"{a} and {b}", "output": f"{a} + {b} = {a + b}."}
    if kind == 1:
        return {"instruction": f"What is {a} times {b}?", "input": "", "output": f"{a} times {b} is {a * b}."}
    if kind == 2:
        return {"instruction": "Reverse the letters of the word.", "input": word, "output": word[::-1]}
    if kind == 3:
        country = rng.choice(sorted(_CAPITALS))
        return {"instruction": f"What is the capital of {country}?", "input": "",
                "output": f"The capital of {country} is {_CAPITALS[country]}."}
    if kind == 4:
        letter = rng.choice(sorted(set(word)))
        n = word.count(letter)
        return {"instruction": f"How many times does the letter '{letter}' appear in the word?", "input": word,
                "output": f"The letter '{letter}' appears {n} time{'s' if n > 1 else ''} in \"{word}\"."}
    if kind == 5:
        nums = [rng.randint(1, 50) for _ in range(rng.randint(3, 6))]
        return {"instruction": "Sort these numbers from smallest to largest.", "input": ", ".join(map(str, nums)),
                "output": ", ".join(map(str, sorted(nums)))}
    if kind == 6:
        return {"instruction": f"Is {a} an even or an odd number?", "input": "",
                "output": f"{a} is {'even' if a % 2 == 0 else 'odd'}."}
    words = rng.sample(_WORDS, 3)
    return {"instruction": "Write the words in upper case.", "input": " ".join(words),
            "output": " ".join(w.upper() for w in words)}


def builtin_rows(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """``n`` Alpaca-format rows generated by wct itself (arithmetic, word reversal, capitals, letter counts,
    sorting, parity, upper case); deterministic for a given ``seed``."""
    rng = random.Random(seed)
    return [_builtin_row(i % 8, rng) for i in range(n)]


TOO_LONG = ("drop", "truncate", "error")  # task.too_long: a row whose prompt alone fills task.max_length
SHOWN_ROWS = 5  # row numbers named in the summary line


def share(part: int, whole: int) -> str:
    """``part / whole`` as a percentage with two significant digits (``0.036%``, ``3.6%``, ``36%``, ``100%``)."""
    pct = 100 * part / whole
    return f"{pct:.2g}%" if pct < 10 else f"{pct:.0f}%"


@dataclass
class LengthReport:
    """What ``task.too_long`` did to the rows of one encoding: their number, the rows dropped or whose prompt was
    cut (row numbers of the source, from 0), and the rows whose response lost its end (in every mode)."""

    rows: int = 0
    too_long: str = "drop"
    max_length: int = 0
    dropped: list[int] = field(default_factory=list)
    truncated: list[int] = field(default_factory=list)
    response_cut: int = 0

    def __str__(self) -> str:
        """One summary line: the count, the share and the first rows named."""
        rows = self.dropped or self.truncated
        line = f"too long: no prompt reaches task.max_length={self.max_length}"
        if rows:
            named = ", ".join(map(str, rows[:SHOWN_ROWS])) + (", ..." if len(rows) > SHOWN_ROWS else "")
            what = ("were dropped" if self.dropped else "had their prompt cut from the left to fit")
            line = (f"too long: {len(rows):,} of {self.rows:,} rows ({share(len(rows), self.rows)}) {what} "
                    f"(task.too_long={self.too_long}): their prompt alone has task.max_length={self.max_length} "
                    f"tokens or more (rows {named}); raise task.max_length to keep them whole")
        return line + f"; {self.response_cut:,} responses lost their end to it"

    @property
    def record(self) -> dict[str, int | str]:
        """The counts as the run's ``results.json`` and the export's model card hold them."""
        return {"rows": self.rows, "too_long": self.too_long, "rows_dropped": len(self.dropped),
                "rows_prompt_truncated": len(self.truncated), "rows_response_cut": self.response_cut}


def encode_rows(tokenizer, rows: Iterable[Mapping[str, str]], max_length: int, too_long: str = "error"
                ) -> tuple[list[dict[str, list[int]]], LengthReport]:
    """:func:`encode` every row (errors name the row's position) and the :class:`LengthReport`; a WCTError when
    every row is dropped."""
    if too_long not in TOO_LONG:
        raise WCTError(f"task.too_long={too_long!r} is unknown; use {', '.join(TOO_LONG)}")
    out, report = [], LengthReport(too_long=too_long, max_length=max_length)
    for i, row in enumerate(rows):
        report.rows += 1
        example, prompt_cut, response_cut = encode_row(tokenizer, row, max_length, i, too_long)
        if example is None:
            report.dropped.append(i)
            continue
        if prompt_cut:
            report.truncated.append(i)
        report.response_cut += response_cut
        out.append(example)
    if not out:
        raise WCTError(f"every one of the {report.rows:,} rows has a prompt of task.max_length={max_length} tokens "
                       "or more, so task.too_long=drop left none; raise task.max_length, or set task.too_long="
                       "truncate to cut their prompts from the left")
    return out, report
