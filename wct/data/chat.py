"""Chat data: multi-turn conversations rendered with a chat template, loss on the assistant turns only.

Rows hold ``messages`` (OpenAI style: ``{"role", "content"}`` turns) or ShareGPT ``conversations`` (``{"from",
"value"}`` turns, ``human``/``gpt``/``system``/``tool`` mapped to our roles); the field names and role names are
configurable (``task.data.fields.messages/role/content``, ``task.data.roles``). An Alpaca row (instruction, input,
output) is read as one user turn (instruction, then the input after a blank line) and one assistant turn, so the
embedded alpaca-libre set also serves ``task=chat``.

Templates (``task.template``): ``model`` (the tokenizer's own chat template), ``alpaca``
(:func:`alpaca_chat_template`: the Stanford Alpaca prompt per user turn, response + EOS per assistant turn) or the
path of a Jinja file. Rendering goes through ``tokenizer.apply_chat_template(..., tokenize=False)``.

Labels (docs/data.md): for assistant turn ``i`` the conversation is rendered up to turn ``i - 1`` with the generation
prompt (``P``) and up to turn ``i`` (``F``); the whole rendering must start with ``F`` and ``F`` with ``P``, and ``F``
must continue ``P`` with the turn's content verbatim. The labelled characters are the content plus the text up to and
including the first special token the template writes after it (its end-of-turn token: ``<|im_end|>``, EOS, ...).
The rendered text is tokenized once with character offsets; a token is trained when it overlaps a labelled span,
and the spans' token boundaries are checked (a token that merges prompt text into the content is an error), so a
phrase repeated from a user turn can never be mistaken for the answer.

Too-long conversations lose whole turns from the end until the last kept assistant turn fits ``max_length``
(``task.truncation=drop_turns``; a conversation whose first assistant turn alone does not fit is dropped), or stop
the run (``task.truncation=error``). :func:`encode_conversations` reports how many.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from wct.data.instruct import IGNORE_INDEX, PROMPT_NO_INPUT, SHOWN_ROWS, share
from wct.errors import WCTError

ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "observation": "tool", "function_response": "tool"}
TRUNCATION = ("drop_turns", "error")


# ------------------------------------------------------------------ rows -> conversations


def _describe(row: Any) -> str:
    return json.dumps(row, default=str, ensure_ascii=False)[:200]


def conversation(row: Any, index: int, source: str, fields: Mapping[str, str] | None = None,
                 roles: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The turns ``[{"role", "content"}]`` of one row (module docstring), validated: known roles, string contents,
    at least one assistant turn."""
    where = f"{source}: row {index}"
    if not isinstance(row, Mapping):
        raise WCTError(f"{where} is a {type(row).__name__}, not an object with messages; fix or drop that row")
    fields = dict(fields or {})
    key = fields.get("messages") or next((k for k in ("messages", "conversations") if k in row), None)
    if key is None and isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
    turns = row.get(key) if key else None
    if not isinstance(turns, list) or not turns:
        raise WCTError(
            f"{where} has no list of turns under {key or 'messages / conversations'!r} (row: {_describe(row)}); "
            "fix or drop that row, or name the field with task.data.fields.messages=..."
        )
    sharegpt = key == "conversations" and "messages" not in fields
    role_key = fields.get("role", "from" if sharegpt else "role")
    content_key = fields.get("content", "value" if sharegpt else "content")
    mapping = {r: r for r in ROLES} | SHAREGPT_ROLES | dict(roles or {})
    out = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or not isinstance(turn.get(content_key), str):
            raise WCTError(f"{where}, turn {t}: no string {content_key!r} (turn: {_describe(turn)}); fix or drop "
                           "that row, or name the field with task.data.fields.content=...")
        name = turn.get(role_key)
        if name not in mapping or mapping[name] not in ROLES:
            raise WCTError(
                f"{where}, turn {t}: role {name!r} (field {role_key!r}) is not one of {', '.join(mapping)}; fix "
                f"the row or map it with task.data.roles.{name}=user (roles: {', '.join(ROLES)})"
            )
        out.append({"role": mapping[name], "content": turn[content_key]})
    if not any(m["role"] == "assistant" for m in out):
        raise WCTError(f"{where} has no assistant turn, so nothing to train on (row: {_describe(row)}); fix or "
                       "drop that row")
    return out


def check_conversations(rows: list[Any], source: str, fields: Mapping[str, str] | None = None,
                        roles: Mapping[str, str] | None = None) -> list[dict[str, list[dict[str, str]]]]:
    """Every row as ``{"messages": turns}`` (:func:`conversation`); errors name the row."""
    if not rows:
        raise WCTError(f"{source} holds no rows; point task.data.path / task.data.source at a non-empty dataset")
    return [{"messages": conversation(r, i, source, fields, roles)} for i, r in enumerate(rows)]


# ------------------------------------------------------------------ templates


def alpaca_chat_template() -> str:
    """Jinja chat template that renders [user] + generation prompt byte-exactly as the Alpaca no-input prompt
    (``wct.data.instruct.PROMPT_NO_INPUT``) and an assistant turn as its response + EOS, as training saw them."""
    head, _, tail = PROMPT_NO_INPUT.partition("{instruction}")
    cut = tail.index("### Response:")
    q = json.dumps  # JSON string literals are valid Jinja string literals
    return (
        "{% for m in messages %}"
        f"{{% if m['role'] == 'user' %}}{{{{ {q(head)} + m['content'] + {q(tail[:cut])} }}}}"
        f"{{% elif m['role'] == 'assistant' %}}{{{{ {q(tail[cut:])} + m['content'] + eos_token }}}}{{% endif %}}"
        "{% endfor %}"
        f"{{% if add_generation_prompt %}}{{{{ {q(tail[cut:])} }}}}{{% endif %}}"
    )


def with_chat_template(tokenizer, config: dict | None = None):
    """The tokenizer with the chat template a model was trained on (returns the template name): the run's
    ``chat_template`` (``task=chat``, recorded in its config), else the Alpaca template.

    It replaces any template the base tokenizer had: ``apply_chat_template`` on an export must render the prompts
    the weak columns were tuned on, not the base model's chat format."""
    trained = (config or {}).get("chat_template")
    tokenizer.chat_template = trained or alpaca_chat_template()
    return tokenizer, f"chat ({config['task']['template']})" if trained else "alpaca"


def resolve_template(tokenizer, spec: str) -> str:
    """The Jinja text of ``task.template``: ``model`` (the tokenizer's chat template), ``alpaca``, or a file."""
    if spec == "model":
        template = getattr(tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template:
            raise WCTError("this tokenizer has no chat template (task.template=model); give one with "
                           "task.template=/path/to/template.jinja, or use task.template=alpaca")
        return template
    if spec == "alpaca":
        return alpaca_chat_template()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WCTError(f"task.template={spec!r} is neither model, alpaca nor an existing Jinja file; fix the path")
    return path.read_text(encoding="utf-8")


def render(tokenizer, template: str, messages: list[dict[str, str]], generation: bool, where: str) -> str:
    """``apply_chat_template`` as text; a template that fails becomes one WCTError naming ``where``."""
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation)
    except Exception as e:  # jinja2 errors, raise_exception() in templates, missing variables
        raise WCTError(f"{where}: the chat template failed to render it ({type(e).__name__}: {e}); fix the row "
                       "or the template (task.template)") from None
    if not isinstance(text, str):
        raise WCTError(f"{where}: the chat template rendered {type(text).__name__}, not text; fix the template")
    return text


# ------------------------------------------------------------------ encoding


def special_strings(tokenizer) -> list[str]:
    """The texts of the tokenizer's special tokens (EOS, ``<|im_end|>``, ...): candidates for end-of-turn."""
    found = set(tokenizer.all_special_tokens)
    found |= {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
    return sorted((s for s in found if s), key=len, reverse=True)


def assistant_spans(tokenizer, template: str, messages: list[dict[str, str]], where: str) -> tuple[str, list]:
    """``(text, spans)``: the rendered conversation and, per assistant turn, the ``[start, end)`` characters to
    train on: its content and its end-of-turn token (module docstring)."""
    text = render(tokenizer, template, messages, False, where)
    specials = special_strings(tokenizer)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = render(tokenizer, template, messages[:i], True, where)
        full = render(tokenizer, template, messages[: i + 1], False, where)
        if not (text.startswith(full) and full.startswith(prompt)):
            raise WCTError(
                f"{where}, turn {i}: the template renders the conversation up to this assistant turn differently "
                "from the whole conversation (or the generation prompt differently from the turn's start); label "
                "offsets need a template whose renderings of a conversation's prefixes are prefixes of it"
            )
        start = len(prompt)
        if not full.startswith(m["content"], start):
            raise WCTError(
                f"{where}, turn {i}: the template does not render the assistant content verbatim after the "
                f"generation prompt (expected {m['content'][:60]!r}, found {full[start:start + 60]!r}); the labels "
                "would not match the content. Use a template that writes the content as is"
            )
        tail = full[start + len(m["content"]):]
        ends = [(tail.find(s), -len(s), s) for s in specials if s in tail]
        if not ends:
            raise WCTError(
                f"{where}, turn {i}: the template writes no special token after the assistant content (found "
                f"{tail[:40]!r}), so the model would never learn to end its turn; add the end-of-turn token "
                "(e.g. {{ eos_token }}) after each assistant message in the template"
            )
        pos, neg, _ = min(ends)
        spans.append((start, start + len(m["content"]) + pos - neg))
    return text, spans


def tokenize_spans(tokenizer, text: str, spans: list[tuple[int, int]], where: str) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of ``text``: tokens overlapping a span keep their id as label, others -100.

    A trained token that starts before its span by more than whitespace, or one that ends past it, merges prompt
    text into the answer: an error, since the labels would then not be the assistant content."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        inside = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and b > a]
        if not inside or text[offsets[inside[0]][0]:start].strip() or offsets[inside[-1]][1] != end:
            raise WCTError(
                f"{where}: the assistant content at characters {start}-{end} does not fall on token boundaries "
                "after tokenization (the template joins it to the text around it); the labels would not match "
                "the content. Put a separator or special token around the assistant turn in the template"
            )
        for k in inside:
            labels[k] = ids[k]
    return {"input_ids": list(ids), "labels": labels}


def encode_conversation(tokenizer, template: str, messages: list[dict[str, str]], where: str
                        ) -> dict[str, list[int]]:
    """The whole conversation encoded with its assistant labels (no length limit)."""
    return tokenize_spans(tokenizer, *assistant_spans(tokenizer, template, messages, where), where)


@dataclass
class ChatReport:
    """What :func:`encode_conversations` cut: conversations shortened, turns dropped, conversations dropped (their
    row numbers, from 0) of ``rows``."""

    shortened: int = 0
    turns_dropped: int = 0
    dropped: list[int] = field(default_factory=list)
    rows: int = 0
    too_long: str = "drop"

    @property
    def rows_dropped(self) -> int:
        return len(self.dropped)

    def __str__(self) -> str:
        if not (self.shortened or self.rows_dropped):
            return "truncation: every conversation fits task.max_length"
        named = ", ".join(map(str, self.dropped[:SHOWN_ROWS])) + (", ..." if self.rows_dropped > SHOWN_ROWS else "")
        rows = f" (rows {named}; {share(self.rows_dropped, self.rows)} of {self.rows:,})" if self.dropped else ""
        return (f"truncation: {self.shortened} conversation(s) lost {self.turns_dropped} turn(s) from the end and "
                f"{self.rows_dropped} were dropped{rows} (their first assistant turn alone exceeds task.max_length)")

    @property
    def record(self) -> dict[str, int | str]:
        """The counts as the run's ``results.json`` and the export's model card hold them."""
        return {"rows": self.rows, "too_long": self.too_long, "rows_dropped": self.rows_dropped,
                "rows_shortened": self.shortened, "turns_dropped": self.turns_dropped}


def fit_conversation(tokenizer, template: str, messages: list[dict[str, str]], max_length: int, truncation: str,
                     where: str) -> tuple[dict[str, list[int]] | None, int]:
    """``(example or None, turns dropped)``: the conversation within ``max_length`` tokens, whole turns dropped from
    the end so it still ends with an assistant turn (``truncation=drop_turns``), or a WCTError (``error``)."""
    example = encode_conversation(tokenizer, template, messages, where)
    if len(example["input_ids"]) <= max_length:
        return example, 0
    if truncation == "error":
        raise WCTError(f"{where}: {len(example['input_ids'])} tokens exceed task.max_length={max_length}; raise "
                       "task.max_length, drop the row, or set task.truncation=drop_turns")
    ends = [i + 1 for i, m in enumerate(messages) if m["role"] == "assistant"]
    for end in reversed(ends[:-1]):
        example = encode_conversation(tokenizer, template, messages[:end], where)
        if len(example["input_ids"]) <= max_length:
            return example, len(messages) - end
    return None, len(messages)


def encode_conversations(tokenizer, template: str, rows: list[Mapping[str, list[dict[str, str]]]],
                         max_length: int, truncation: str = "drop_turns", source: str = "data", too_long: str = "drop"
                         ) -> tuple[list[dict[str, list[int]]], ChatReport]:
    """Every row (``{"messages": turns}``) encoded within ``max_length``; the report counts what was cut. A
    conversation that does not fit even with turns dropped is left out (``too_long=drop``) or an error (``error``)."""
    if truncation not in TRUNCATION:
        raise WCTError(f"task.truncation={truncation!r} is unknown; use {' or '.join(TRUNCATION)}")
    if too_long not in ("drop", "error"):
        raise WCTError(f"task.too_long={too_long!r} is not one for chat data; use drop or error (conversations lose "
                       "whole turns from the end, task.truncation=drop_turns)")
    report, out = ChatReport(rows=len(rows), too_long=too_long), []
    for i, row in enumerate(rows):
        example, dropped = fit_conversation(tokenizer, template, row["messages"], max_length, truncation,
                                            f"{source}: row {i}")
        if example is None:
            if too_long == "error":
                raise WCTError(f"{source}: row {i}: its first assistant turn alone exceeds task.max_length="
                               f"{max_length}; raise task.max_length, drop the row, or set task.too_long=drop")
            report.dropped.append(i)
            continue
        out.append(example)
        report.shortened += dropped > 0
        report.turns_dropped += dropped
    if not out:
        raise WCTError(f"{source}: no conversation fits task.max_length={max_length}; raise it")
    return out, report
