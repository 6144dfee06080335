"""Issue 22's bad inputs and the model card, as a user meets them: a write refused for lack of room (a file-size
limit set with ``resource.setrlimit``, a full disk) during a real export or quantization of tiny-llama, ``NaN`` /
``Infinity`` literals in JSON task data, rows longer than ``task.max_length`` (``task.too_long``), and the export's
model card (YAML front matter, no local paths, rounded figures)."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from wct.config import CONF_DIR
from wct.data.chat import alpaca_chat_template, encode_conversations
from wct.data.instruct import IGNORE_INDEX, encode_rows, format_prompt, load_rows
from wct.errors import WCTError
from wct.models import load_model

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "alpaca_tiny.json"
MAX_LENGTH = 256  # tiny-llama's tokenizer is byte-level: one token per byte of the prompt
LONG = [3, 17]  # rows whose prompt alone is longer than MAX_LENGTH


def rows(n: int = 32) -> list[dict[str, str]]:
    """``n`` short Alpaca rows, those at :data:`LONG` with a 400-character instruction."""
    out = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}"} for i in range(n)]
    for i in (i for i in LONG if i < n):
        out[i] = {"instruction": "Repeat these words: " + "lantern " * 50, "input": "", "output": "lantern"}
    return out


def write_jsonl(path: Path, data: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


def cli(verb: str, *args: str, fsize: int | None = None) -> subprocess.CompletedProcess:
    """``python -m wct.<verb> args`` offline; ``fsize``: the file-size limit (bytes) of the process, set as
    ``ulimit -f`` does."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    return subprocess.run([sys.executable, "-m", f"wct.{verb}", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=limit if fsize else None)


def error_line(p: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a process that must have failed with exit code 2 and no traceback."""
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr[-3000:])
    return lines[0]


def train_args(tmp: Path, data: Path, *extra: str) -> list[str]:
    """A seconds-long run on tiny-llama (quantized on the fly, 4 weak columns per layer), 2 steps, on ``data``."""
    return ["task=json", f"task.data.path={data}", "model=tiny-llama", "quant.target_bit=null", "quant.target_rank=4",
            f"calib.source={FIXTURE}", "calib.n_samples=2", "calib.seqlen=64", f"cache_dir={tmp / 'cache'}",
            f"paths.root_dir={tmp}", f"task.max_length={MAX_LENGTH}", "task.val_size=4", "task.global_batch_size=4",
            "task.micro_batch_size=2", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv",
            "callbacks.samples.max_new_tokens=4", "trainer.enable_progress_bar=false", "trainer.precision=32-true",
            *extra]


def no_temporaries(out: Path) -> bool:
    """Neither ``out`` nor a temporary sibling of it (``.NAME.tmp-...`` / ``.NAME.old-...``) exists."""
    return not out.exists() and not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real ``python -m wct.train`` run (default ``task.too_long=drop``) on 32 rows, 2 of them too long, exported
    with ``python -m wct.export``; its run folder."""
    tmp = tmp_path_factory.mktemp("run")
    p = cli("train", *train_args(tmp, write_jsonl(tmp / "rows.jsonl", rows())))
    assert p.returncode == 0, p.stderr[-3000:]
    (results,) = (tmp / "outputs").rglob("results.json")
    (results.parent / "train.out").write_text(p.stdout)
    e = cli("export", f"ckpt_path={results.parent / 'checkpoints' / 'last.ckpt'}", f"out={tmp / 'my-export'}",
            f"paths.root_dir={tmp}")
    assert e.returncode == 0, e.stderr[-3000:]
    return results.parent


# ------------------------------------------------------------------ no room to write


def test_export_under_a_file_size_limit_is_one_error_line_and_leaves_nothing(run, tmp_path):
    meta = json.loads((run.parents[3] / "my-export" / "wct_export.json").read_text())
    limit = meta["bytes"] // 2  # the weights file cannot be written; the small files around it can
    out = tmp_path / "exp"
    line = error_line(cli("export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", f"out={out}",
                          f"paths.root_dir={tmp_path}", fsize=limit))
    assert line.startswith(f"error: out={out}: the file-size limit (ulimit -f: {limit:,} bytes) stopped the write")
    assert f"the output needs at least {meta['base_bytes']:,} bytes" in line and "ulimit -f unlimited" in line
    assert no_temporaries(out)


def test_quantize_under_a_file_size_limit(tmp_path):
    out = tmp_path / "q"
    line = error_line(cli("quantize", "model=tiny-llama", "calib=local", f"calib.source={FIXTURE}", "calib.n_samples=2",
                          "calib.seqlen=64", "eval.corpora=[]", "progress=false", f"out={out}",
                          f"paths.root_dir={tmp_path}", fsize=64 * 1024))
    assert re.match(rf"error: out={out}: the file-size limit \(ulimit -f: 65,536 bytes\) stopped the write of \S+ "
                    r"at 65,536 bytes \([\d,]+ bytes of the output written\); nothing was written", line), line
    assert no_temporaries(out)


def test_quantize_onto_a_full_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        out = disk / "q"
        line = error_line(cli("quantize", "model=tiny-llama", "calib=local", f"calib.source={FIXTURE}",
                              "calib.n_samples=2", "calib.seqlen=64", "eval.corpora=[]", "progress=false", f"out={out}",
                              f"paths.root_dir={tmp_path}"))
        assert re.match(rf"error: out={out}: the disk is full \([\d,]+ bytes free in {disk}\) after [\d,]+ bytes of "
                        "the output were written; nothing was written", line), line
        assert no_temporaries(out) and not list(disk.iterdir())
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ------------------------------------------------------------------ NaN / Infinity


def train_config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["model=tiny-llama", "logger=csv", "task=json", "trainer.precision=32-true",
                                           f"paths.run_dir={tmp_path / 'run'}", *overrides])


def train_error(capsys, cfg) -> str:
    """``wct.train.run(cfg)``: exit code 2 and one error line, no traceback; the line."""
    from wct.train import run as train

    with pytest.raises(SystemExit) as e:
        train(cfg)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_json_numbers_are_refused_with_the_row(tmp_path, capsys, literal):
    good = [json.dumps(r) for r in rows(4)]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(good[:2] + [f'{{"instruction": "Divide 0 by 0.", "output": {literal}}}'] + good[2:]))
    line = train_error(capsys, train_config(tmp_path, f"task.data.path={jsonl}"))
    assert line == (f"error: {jsonl}, line 3 (row 2): field output holds {literal}, which is not JSON (JSON has no NaN "
                    'or Infinity numbers); write it as a string ("NaN") or null, or drop that row')
    listed = tmp_path / "rows.json"  # a JSON list, the literal nested in a chat turn
    listed.write_text(f'[{good[0]}, {{"messages": [{{"role": "user", "content": "x"}}, '
                      f'{{"role": "assistant", "content": {literal}}}]}}]')
    with pytest.raises(WCTError, match=rf"rows.json: row 1: field messages\.1\.content holds {literal}, which is not"):
        load_rows("none", str(listed))
    assert load_rows("none", str(write_jsonl(tmp_path / "ok.jsonl", [{"instruction": "NaN?", "output": "NaN"}])))


# ------------------------------------------------------------------ task.too_long


@pytest.fixture(scope="module")
def tok():
    return load_model("tiny-llama")[1]


def test_too_long_drop_is_counted_in_one_line_in_results_and_in_the_card(run):
    out = (run / "train.out").read_text()
    summary = [line for line in out.splitlines() if line.startswith("too long:")]
    assert summary == [f"too long: 2 of 32 rows (6.2%) were dropped (task.too_long=drop): their prompt alone has "
                       f"task.max_length={MAX_LENGTH} tokens or more (rows 3, 17); raise task.max_length to keep them "
                       "whole; 0 responses lost their end to it"]
    assert "26 training / 4 validation rows" in out  # 32 - 2 dropped - 4 validation
    results = json.loads((run / "results.json").read_text())
    assert results["data_rows"] == {"rows": 32, "too_long": "drop", "rows_dropped": 2, "rows_prompt_truncated": 0,
                                    "rows_response_cut": 0}
    card = (run.parents[3] / "my-export" / "README.md").read_text()
    assert "| training rows | 30 of 32 used; 2 dropped as too long (task.too_long=drop), 0 responses cut" in card


def test_too_long_truncate_keeps_the_prompts_end_and_the_responses_start(tok):
    data = rows()
    data[17] = dict(data[17], output="The word is lantern. " * 20)  # a long response too: it keeps half the window
    encoded, report = encode_rows(tok, data, MAX_LENGTH, "truncate")
    assert len(encoded) == 32 and report.truncated == LONG and report.dropped == [] and report.response_cut == 1
    assert "2 of 32 rows (6.2%) had their prompt cut from the left to fit (task.too_long=truncate)" in str(report)
    for i, response in ((3, "lantern"), (17, data[17]["output"][: MAX_LENGTH // 2])):
        ids, labels = encoded[i]["input_ids"], encoded[i]["labels"]
        n_prompt = labels.count(IGNORE_INDEX)
        prompt = tok(format_prompt(data[i]["instruction"])).input_ids
        assert len(ids) == MAX_LENGTH and ids[:n_prompt] == prompt[-n_prompt:]  # the prompt's end, "### Response:"
        trained = tok.decode(labels[n_prompt:])
        assert trained == (response + tok.eos_token if i == 3 else response)  # EOS cut with the long response
    short, _ = encode_rows(tok, data[:3], MAX_LENGTH, "truncate")
    assert short == encode_rows(tok, data[:3], MAX_LENGTH, "error")[0]  # rows that fit are the same in every mode


def test_too_long_error_and_every_row_dropped_are_one_error_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", rows())
    line = train_error(capsys, train_config(tmp_path, f"task.data.path={data}", f"task.max_length={MAX_LENGTH}",
                                            "task.too_long=error", "quant.target_bit=null", "quant.target_rank=4",
                                            f"calib.source={FIXTURE}", "calib.n_samples=2", "calib.seqlen=64",
                                            f"cache_dir={tmp_path / 'cache'}"))
    n = len(format_prompt(rows()[3]["instruction"]).encode())  # byte-level tokenizer, no BOS
    assert line.startswith(f"error: row 3: the prompt alone has {n} tokens, leaving no room for the response within "
                           f"task.max_length={MAX_LENGTH}; raise task.max_length")
    long = write_jsonl(tmp_path / "long.jsonl", [rows()[i] for i in LONG])
    line = train_error(capsys, train_config(tmp_path, f"task.data.path={long}", f"task.max_length={MAX_LENGTH}",
                                            "quant.target_bit=null", "quant.target_rank=4", f"calib.source={FIXTURE}",
                                            "calib.n_samples=2", "calib.seqlen=64", f"cache_dir={tmp_path / 'cache'}"))
    assert line == (f"error: every one of the 2 rows has a prompt of task.max_length={MAX_LENGTH} tokens or more, so "
                    "task.too_long=drop left none; raise task.max_length, or set task.too_long=truncate to cut their "
                    "prompts from the left")
    assert "task.too_long" in train_error(capsys, train_config(tmp_path, "task=chat", "task.too_long=truncate"))
    assert "task.too_long" in train_error(capsys, train_config(tmp_path, f"task.data.path={data}",
                                                               "task.too_long=cut"))


def test_chat_conversations_that_cannot_fit_follow_too_long(tok):
    long = {"messages": [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "y"}]}
    fits = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    encoded, report = encode_conversations(tok, alpaca_chat_template(), [fits, long, fits], MAX_LENGTH)
    assert len(encoded) == 2 and report.dropped == [1] and "(rows 1; 33% of 3)" in str(report)
    assert report.record == {"rows": 3, "too_long": "drop", "rows_dropped": 1, "rows_shortened": 0,
                             "turns_dropped": 0}
    with pytest.raises(WCTError, match=r"data: row 1: its first assistant turn alone exceeds task.max_length=256"):
        encode_conversations(tok, alpaca_chat_template(), [fits, long], MAX_LENGTH, too_long="error")


# ------------------------------------------------------------------ the model card


def test_model_card_has_hub_metadata_no_local_paths_and_rounded_figures(run):
    export = run.parents[3] / "my-export"
    card = (export / "README.md").read_text()
    head, sep, body = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep
    meta = yaml.safe_load(head)
    assert meta == {"base_model": "tiny-llama", "library_name": "wct", "license": "apache-2.0",
                    "tags": ["wct", "owq", "quantized", "4-bit"], "datasets": ["rows.jsonl"],
                    "pipeline_tag": "text-generation"}
    for local in (str(Path.home()), str(run.parents[3]), "/tmp", "/root", str(REPO)):
        assert local not in card
    assert not re.search(r"(?<![\w.])/[\w.-]+/", card)  # no absolute path at all
    assert not re.search(r"\d\.\d{5,}", card)  # nothing printed with more digits than it means
    results = json.loads((run / "results.json").read_text())
    loss = results["metrics"]["val/loss"]
    assert f"→ {loss:.4g};" in body and f"| val/loss | {loss:.4g} |" in body and f"{loss:.4g}" != str(loss)
    fingerprint = json.loads((export / "wct_export.json").read_text())["base_model"]["fingerprint"]
    assert re.fullmatch(r"[0-9a-f]{16,}", fingerprint) and f"| base fingerprint | {fingerprint[:16]} |" in body
    assert "quantized with the recipe owq-w4-k4" in body and "wct.load_quantized('my-export')" in body
