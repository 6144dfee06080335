"""Alpaca template (byte-exact golden strings), prompt masking, truncation, loading and bad rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from wct.data.instruct import (
    IGNORE_INDEX,
    builtin_rows,
    check_rows,
    encode,
    format_prompt,
    load_rows,
    read_file,
    show_example,
    split_rows,
)
from wct.data.batching import collate
from wct.errors import WCTError
from wct.models import byte_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.json"

# Golden strings written out by hand, character by character, from stanford_alpaca's PROMPT_DICT.
GOLDEN_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\nName a colour.\n\n### Response:"
)
GOLDEN_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\nTranslate.\n\n### Input:\nhello"
    "\n\n### Response:"
)


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()  # one token per byte: token counts are byte counts


def test_golden_templates():
    assert format_prompt("Name a colour.") == GOLDEN_NO_INPUT
    assert format_prompt("Name a colour.", "") == GOLDEN_NO_INPUT
    assert format_prompt("Translate.", "hello") == GOLDEN_INPUT
    assert not format_prompt("x").endswith((" ", "\n"))  # no trailing space or newline after the header


@pytest.mark.parametrize("inp", ["", "hello"])
def test_label_mask_boundary(tok, inp):
    row = {"instruction": "Translate.", "input": inp, "output": "bonjour"}
    ex = encode(tok, row, max_length=1000)
    prompt = format_prompt("Translate.", inp).encode()
    n = len(prompt)
    assert len(ex["input_ids"]) == len(ex["labels"]) == n + len("bonjour") + 1
    assert ex["labels"][:n] == [IGNORE_INDEX] * n  # whole prompt masked
    assert ex["labels"][n:] == ex["input_ids"][n:]  # response and EOS trained
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"][:n]) == format_prompt("Translate.", inp)
    assert tok.decode(ex["input_ids"][n:-1]) == "bonjour"
    shown = show_example(tok, ex)
    assert f"[[{format_prompt('Translate.', inp)}]]bonjour</s>" in shown


def test_truncation_keeps_prompt_and_cuts_response(tok):
    row = {"instruction": "Say it.", "output": "abcdefghij"}
    n = len(format_prompt("Say it.").encode())
    ex = encode(tok, row, max_length=n + 4)
    assert len(ex["input_ids"]) == n + 4
    assert tok.decode(ex["input_ids"][n:]) == "abcd"  # response cut, EOS dropped with it
    assert ex["labels"][n:] == ex["input_ids"][n:]
    with pytest.raises(WCTError, match=r"row 7: the prompt alone has \d+ tokens.*task.max_length"):
        encode(tok, row, max_length=n, index=7)


def test_bad_rows_name_the_row():
    good = {"instruction": "a", "input": "", "output": "b"}
    with pytest.raises(WCTError, match="row 1 has no field output"):
        check_rows([good, {"instruction": "x"}], "data.json")
    with pytest.raises(WCTError, match="row 0 has no field instruction"):
        check_rows([{"output": "y"}], "data.json")
    with pytest.raises(WCTError, match="row 2 has an empty instruction"):
        check_rows([good, good, {"instruction": "  ", "output": "y"}], "data.json")
    with pytest.raises(WCTError, match="row 0 is a list"):
        check_rows([["a", "b"]], "data.json")
    with pytest.raises(WCTError, match="holds no rows"):
        check_rows([], "data.json")
    assert check_rows([{"instruction": "a", "output": ""}], "d")[0] == {"instruction": "a", "input": "", "output": ""}


def test_field_mapping_and_file_formats(tmp_path):
    rows = [{"question": f"q{i}", "context": "c" if i % 2 else None, "answer": f"a{i}"} for i in range(4)]
    fields = {"instruction": "question", "input": "context", "output": "answer"}
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    expected = [{"instruction": f"q{i}", "input": "c" if i % 2 else "", "output": f"a{i}"} for i in range(4)]
    for name in ("d.json", "d.jsonl", "d.parquet"):
        got, origin = load_rows("unused", str(tmp_path / name), fields=fields)
        assert got == expected and origin.endswith(name)
    with pytest.raises(WCTError, match="does not exist"):
        read_file(tmp_path / "missing.json")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{oops\n')
    with pytest.raises(WCTError, match="line 2: not valid JSON"):
        read_file(tmp_path / "bad.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(WCTError, match="unsupported file type"):
        read_file(tmp_path / "d.csv")


def test_fixture_and_shared_data(tok, shared_data):
    rows, _ = load_rows("unused", str(FIXTURE))
    assert len(rows) == 22 and sum(bool(r["input"]) for r in rows) == 11
    libre, _ = load_rows("unused", str(shared_data / "alpaca-libre" / "alpaca_libre.json"))
    assert len(libre) == 2828
    train, val = split_rows(libre, 0.05, None, seed=0)
    assert len(val) == 141 and len(train) == 2687
    assert split_rows(libre, 0.05, None, seed=0) == (train, val)  # seeded


def test_embedded_rows_are_the_default_and_the_offline_fallback(caplog, shared_data):
    rows, origin = load_rows("alpaca-libre")
    assert origin.startswith("alpaca-libre (embedded: wct/data/embedded/alpaca_libre.jsonl.gz; MIT/CC0")
    shared, _ = load_rows("unused", str(shared_data / "alpaca-libre" / "alpaca_libre.json"))
    # the first 2,528 rows of the shared set with non-empty outputs; the last 300 are held out for the benchmarks
    assert rows == [r for r in shared[:2528] if r["output"].strip()] and len(rows) == 2494
    held_out = {r["instruction"] + r["input"] for r in shared[2528:]}
    assert not any(r["instruction"] + r["input"] in held_out for r in rows)
    with caplog.at_level("WARNING", logger="wct.data"):
        again, origin2 = load_rows("wct-test/no-such-dataset", fallback="alpaca-libre")
    assert again == rows and origin2 == origin
    assert sum("training on alpaca-libre (embedded" in r.message for r in caplog.records) == 1


def test_builtin_set_is_deterministic():
    rows, origin = load_rows("builtin")
    assert origin == "builtin" and rows == builtin_rows() and len(rows) == 400
    assert check_rows(rows, "builtin") == rows  # every generated row is valid
    assert len({r["instruction"] + r["input"] for r in rows}) > 200  # varied
    assert rows[0] == builtin_rows(seed=0)[0] and builtin_rows(seed=1) != rows
    with pytest.raises(WCTError, match="task.data.path"):
        load_rows("wct-test/no-such-dataset", fallback="error")


def test_collate_right_pads(tok):
    a = encode(tok, {"instruction": "a", "output": "xy"}, 1000)
    b = encode(tok, {"instruction": "a", "output": "xyz12"}, 1000)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    n = len(b["input_ids"])
    assert batch["input_ids"].shape == (2, n)
    assert batch["input_ids"][0, len(a["input_ids"]):].eq(tok.pad_token_id).all()
    assert batch["labels"][0, len(a["input_ids"]):].eq(IGNORE_INDEX).all()
    assert batch["attention_mask"].sum(1).tolist() == [len(a["input_ids"]), n]
    assert batch["input_ids"][1].tolist() == b["input_ids"]


def test_embedded_calibration_text_is_emma(shared_data):
    from wct.data.text import load_text

    assert load_text("emma") == (shared_data / "janeausten" / "emma.txt").read_text(encoding="utf-8")
    with pytest.raises(WCTError, match="neither a corpus name .*emma"):
        load_text("persuasion")
