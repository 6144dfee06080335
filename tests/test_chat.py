"""Chat data: golden renderings and label masks (SmolLM2's own template, a tiny-llama Jinja template), whole-turn
truncation, ShareGPT mapping, bad rows and templates, and the trained template kept by the export."""

from __future__ import annotations

from pathlib import Path

import pytest

from wct.data.chat import (
    alpaca_chat_template,
    check_conversations,
    conversation,
    encode_conversation,
    encode_conversations,
    resolve_template,
)
from wct.data.instruct import IGNORE_INDEX, PROMPT_NO_INPUT, show_example
from wct.errors import WCTError
from wct.models import byte_tokenizer

TINY_TEMPLATE = Path(__file__).parent / "fixtures" / "tiny_chat.jinja"

# system prompt, three assistant turns, the first assistant turn repeats a phrase of the user's turn
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Repeat after me: the cat sat on the mat."},
    {"role": "assistant", "content": "the cat sat on the mat."},
    {"role": "user", "content": "And the dog?"},
    {"role": "assistant", "content": "The dog ran."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You're welcome."},
]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]

# written out by hand from the two templates (SmolLM2: ChatML; tests/fixtures/tiny_chat.jinja: [INST] style)
SMOL_GOLDEN = [  # (text, trained)
    ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nRepeat after me: the cat sat on the mat.<|im_end|>\n"
     "<|im_start|>assistant\n", False),
    ("the cat sat on the mat.<|im_end|>", True),
    ("\n<|im_start|>user\nAnd the dog?<|im_end|>\n<|im_start|>assistant\n", False),
    ("The dog ran.<|im_end|>", True),
    ("\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n", False),
    ("You're welcome.<|im_end|>", True),
    ("\n", False),
]
TINY_GOLDEN = [
    ("<s><<SYS>>Be brief.<</SYS>>\n[INST] Repeat after me: the cat sat on the mat. [/INST] ", False),
    ("the cat sat on the mat.</s>", True),
    ("\n[INST] And the dog? [/INST] ", False),
    ("The dog ran.</s>", True),
    ("\n[INST] Thanks! [/INST] ", False),
    ("You're welcome.</s>", True),
    ("\n", False),
]


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    from wct.models import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


@pytest.fixture(scope="module")
def tiny():
    return byte_tokenizer()


def runs(tok, example) -> list[tuple[str, bool]]:
    """The example as (decoded text, trained) runs of equally masked tokens."""
    out, ids, labels = [], example["input_ids"], example["labels"]
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            out.append((tok.decode(ids[start:i]), labels[start] != IGNORE_INDEX))
            start = i
    return out


def piecewise(tok, golden) -> tuple[list[int], list[int]]:
    """Independent reference: each golden piece tokenized on its own, labels = ids where trained."""
    ids, labels = [], []
    for text, trained in golden:
        piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


@pytest.mark.parametrize("which", ["smol", "tiny"])
def test_golden_rendering_and_mask(which, smol, tiny):
    tok, template, golden = (smol, "model", SMOL_GOLDEN) if which == "smol" else (tiny, str(TINY_TEMPLATE), TINY_GOLDEN)
    jinja = resolve_template(tok, template)
    text = tok.apply_chat_template(CHAT, chat_template=jinja, tokenize=False)
    assert text == "".join(t for t, _ in golden)
    ex = encode_conversation(tok, jinja, CHAT, "row 0")
    assert runs(tok, ex) == golden
    ids, labels = piecewise(tok, golden)
    assert ex["input_ids"] == ids and ex["labels"] == labels
    assert ex["labels"] != ex["input_ids"]  # the user's "the cat sat on the mat." stays masked
    shown = show_example(tok, ex)
    assert "]]the cat sat on the mat." in shown and "[[\n" in shown


def test_repeated_phrase_is_labelled_in_the_assistant_turn_only(tiny):
    ex = encode_conversation(tiny, resolve_template(tiny, str(TINY_TEMPLATE)), CHAT, "row 0")
    text = tiny.decode(ex["input_ids"])
    phrase = "the cat sat on the mat."
    first = text.index(phrase)
    second = text.index(phrase, first + 1)
    token = [c - 2 for c in range(len(text))]  # byte tokenizer: one token per byte after "<s>" (3 chars, 1 token)
    trained = {k for k, y in enumerate(ex["labels"]) if y != IGNORE_INDEX}
    assert not trained & {token[first + j] for j in range(len(phrase))}  # the user's copy: masked
    assert {token[second + j] for j in range(len(phrase))} <= trained  # the assistant's: trained


def test_alpaca_template_for_chat(tiny):
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]
    ex = encode_conversation(tiny, alpaca_chat_template(), chat, "row 0")
    assert runs(tiny, ex) == [(PROMPT_NO_INPUT.format(instruction="Name a colour."), False), ("Red.</s>", True)]


def test_truncation_drops_whole_turns_from_the_end(tiny):
    jinja = resolve_template(tiny, str(TINY_TEMPLATE))
    full = encode_conversation(tiny, jinja, CHAT, "row 0")
    two = encode_conversation(tiny, jinja, CHAT[:5], "row 0")
    one = encode_conversation(tiny, jinja, CHAT[:3], "row 0")
    rows = [{"messages": CHAT}] * 3
    out, report = encode_conversations(tiny, jinja, rows, len(two["input_ids"]))
    assert out == [two] * 3 and (report.shortened, report.turns_dropped, report.rows_dropped) == (3, 6, 0)
    assert "3 conversation(s) lost 6 turn(s)" in str(report)
    out, report = encode_conversations(tiny, jinja, rows, len(two["input_ids"]) - 1)
    assert out == [one] * 3 and report.turns_dropped == 12
    out, report = encode_conversations(tiny, jinja, rows, len(full["input_ids"]))
    assert out == [full] * 3 and str(report) == "truncation: every conversation fits task.max_length"


def test_rows_that_cannot_fit(tiny):
    jinja = resolve_template(tiny, str(TINY_TEMPLATE))
    one = encode_conversation(tiny, jinja, CHAT[:3], "row 0")
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    two_rows = [{"messages": CHAT}, {"messages": other}]
    out, report = encode_conversations(tiny, jinja, two_rows, len(one["input_ids"]) - 1)
    assert len(out) == 1 and report.rows_dropped == 1 and "1 were dropped" in str(report)
    with pytest.raises(WCTError, match=r"data: row 0: \d+ tokens exceed task.max_length=40"):
        encode_conversations(tiny, jinja, [{"messages": CHAT}], 40, truncation="error")
    with pytest.raises(WCTError, match="no conversation fits"):
        encode_conversations(tiny, jinja, [{"messages": CHAT}], 10)


def test_sharegpt_mapping():
    row = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi"},
                             {"from": "gpt", "value": "Hello."}]}
    assert conversation(row, 0, "f") == [{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Hi"},
                                         {"role": "assistant", "content": "Hello."}]
    custom = {"dialog": [{"speaker": "client", "text": "Hi"}, {"speaker": "bot", "text": "Hello."}]}
    fields = {"messages": "dialog", "role": "speaker", "content": "text"}
    got = check_conversations([custom], "f", fields, {"client": "user", "bot": "assistant"})
    assert got == [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}]
    messages = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    assert conversation(messages, 0, "f") == messages["messages"]
    alpaca = {"instruction": "Translate.", "input": "hello", "output": "bonjour"}
    assert conversation(alpaca, 0, "f") == [{"role": "user", "content": "Translate.\n\nhello"},
                                            {"role": "assistant", "content": "bonjour"}]


@pytest.mark.parametrize("row, message", [
    ({"text": "hi"}, r"f: row 3 has no list of turns under 'messages / conversations'"),
    ({"messages": [{"role": "robot", "content": "x"}]}, r"f: row 3, turn 0: role 'robot' .*task.data.roles.robot"),
    ({"conversations": [{"from": "alien", "value": "x"}]}, r"f: row 3, turn 0: role 'alien' \(field 'from'\)"),
    ({"messages": [{"role": "user", "content": "x"}]}, r"f: row 3 has no assistant turn"),
    ({"messages": [{"role": "user", "content": 5}]}, r"f: row 3, turn 0: no string 'content'"),
    ("just text", r"f: row 3 is a str"),
])
def test_bad_rows_name_the_row(row, message):
    with pytest.raises(WCTError, match=message):
        conversation(row, 3, "f")


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('no system role') }}", r"row 5: the chat template failed to render it .*no system role"),
    ("{% for m in messages %}{{ m['content'] | upper }}{{ eos_token }}{% endfor %}",
     r"row 5, turn 1: the template does not render the assistant content verbatim"),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", r"row 5, turn 1: the template writes no special token"),
    ("{% for m in messages %}{% if loop.last %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}",
     r"row 5, turn 1: the template renders the conversation up to this assistant turn differently"),
    ("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}X{% endif %}",
     r"row 5, turn 1: .* \(or the generation prompt differently from the turn's start\)"),
    ("{% for m in messages %}{% if m['role'] == 'assistant' %}A: {% endif %}{{ m['content'] }}{{ eos_token }}"
     "{% endfor %}", r"row 5, turn 1: the template does not render the assistant content verbatim .*found 'A: "),
])
def test_bad_templates_name_the_row(tiny, template, message):
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(WCTError, match=message):
        encode_conversation(tiny, template, chat, "row 5")


def test_content_merged_into_a_token_is_refused(smol):
    # no separator between the header and the answer: the tokenizer merges "assistant" and "ly" into tokens that
    # straddle the label boundary
    template = ("{% for m in messages %}{{ m['role'] }}{% if m['role'] != 'assistant' %}: {{ m['content'] }}"
                "{% else %}{{ m['content'] }}<|im_end|>{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}assistant{% endif %}")
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ly yes"}]
    with pytest.raises(WCTError, match="row 2: the assistant content at characters .* does not fall on token"):
        encode_conversation(smol, template, chat, "row 2")


def test_template_choice(tiny, tmp_path):
    with pytest.raises(WCTError, match="this tokenizer has no chat template .*task.template=/path/to/template.jinja"):
        resolve_template(tiny, "model")
    with pytest.raises(WCTError, match="task.template='nope.jinja' is neither model, alpaca nor an existing"):
        resolve_template(tiny, "nope.jinja")
    assert resolve_template(tiny, str(TINY_TEMPLATE)) == TINY_TEMPLATE.read_text()
    assert resolve_template(tiny, "alpaca") == alpaca_chat_template()


def test_export_keeps_the_trained_chat_template(tiny):
    from wct.data.chat import with_chat_template

    jinja = TINY_TEMPLATE.read_text()
    tok, name = with_chat_template(tiny, {"chat_template": jinja, "task": {"template": str(TINY_TEMPLATE)}})
    assert tok.chat_template == jinja and name == f"chat ({TINY_TEMPLATE})"
    tok, name = with_chat_template(tiny, {"task": {"template": "alpaca"}})
    assert tok.chat_template == alpaca_chat_template() and name == "alpaca"
