"""A careless user's inputs: each is exit code 2 and exactly one ``error:`` line naming the file or key (never a
traceback), or works as the README says. Data files, calibration text, checkpoints, packed folders, field mapping,
a recipe without weak columns, a 10 MB row, sweeps where every trial fails, and Hydra run folders under
``paths.root_dir``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from helpers import TEXT, cfg_of, tiny_overrides
from wct.config import CONF_DIR
from wct.data.instruct import encode, format_prompt, load_rows
from wct.errors import WCTError

REPO = Path(__file__).resolve().parents[1]
ROWS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{2 * i}"} for i in range(12)]


def train_cfg(tmp_path: Path, *overrides: str):
    """The default train config on tiny-llama, with a json task: it fails (or not) while reading the task data."""
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose("train", overrides=["model=tiny-llama", "logger=csv", "task=json", "trainer.precision=32-true",
                                           f"paths.run_dir={tmp_path / 'run'}", *overrides])


def one_error(capsys, run, cfg) -> str:
    """Run the entry point ``run`` on ``cfg``: it must exit 2 with one error line and no traceback; the line."""
    with pytest.raises(SystemExit) as e:
        run(cfg)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def train_error(capsys, tmp_path, *overrides: str) -> str:
    from wct.train import run

    return one_error(capsys, run, train_cfg(tmp_path, *overrides))


def write_jsonl(path: Path, rows: list[dict], encoding: str = "utf-8") -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding=encoding)
    return path


def test_task_data_not_utf8_names_file_and_offset(tmp_path, capsys):
    rows = [dict(ROWS[0], output="café au lait")] + ROWS
    data = write_jsonl(tmp_path / "latin1.jsonl", rows, encoding="latin-1")
    offset = data.read_bytes().index(b"\xe9")
    line = train_error(capsys, tmp_path, f"task.data.path={data}")
    assert f"{data} is not UTF-8 text: byte 0xe9 at offset {offset}" in line and "iconv" in line


def test_utf8_bom_is_accepted(tmp_path):
    data = tmp_path / "bom.jsonl"
    data.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "plain.jsonl", ROWS).read_bytes())
    rows, _ = load_rows("none", str(data))
    assert rows[0]["instruction"] == "What is 0 plus 0?" and len(rows) == 12
    text = tmp_path / "bom.txt"
    text.write_bytes(b"\xef\xbb\xbf" + TEXT.encode())
    from wct.data.text import load_text

    assert load_text(text) == TEXT


def test_calibration_text_not_utf8(tmp_path, capsys):
    from wct.quantize import run

    book = tmp_path / "book.txt"
    book.write_bytes(TEXT.encode()[:100] + b"\xff\xfe" + TEXT.encode()[100:])
    line = one_error(capsys, run, cfg_of("quantize", tiny_overrides(tmp_path, book)))
    assert f"{book} is not UTF-8 text: byte 0xff at offset 100" in line


@pytest.mark.parametrize("name,content,message", [
    ("corrupt.parquet", b"PAR1 this is not parquet", "is not a readable parquet file"),
    ("empty.jsonl", b"", "holds no rows"),
    ("broken.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": \n', "line 2: not valid JSON"),
    ("data.csv", b"instruction,output\na,b\n", "unsupported file type '.csv'"),
    ("folder", None, "is a folder; give the .json, .jsonl or .parquet instruction file in it"),
    ("missing.jsonl", "absent", "does not exist"),
])
def test_bad_task_files(tmp_path, capsys, name, content, message):
    path = tmp_path / name
    if content is None:
        path.mkdir()
    elif content != "absent":
        path.write_bytes(content)
    assert message in train_error(capsys, tmp_path, f"task.data.path={path}")


def test_json_task_without_a_path(tmp_path, capsys):
    assert "pass task.data.path=FILE" in train_error(capsys, tmp_path)


def test_readme_field_mapping_works_and_the_message_recommends_it(tmp_path, capsys):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["instruction"], "answer": r["output"]} for r in ROWS])
    line = train_error(capsys, tmp_path, f"task.data.path={data}")
    assert "has no field instruction / output" in line
    recommended = re.findall(r"task\.data\.fields\.\w+=\w+", line)
    assert recommended == ["task.data.fields.instruction=question", "task.data.fields.output=answer"]
    cfg = train_cfg(tmp_path, f"task.data.path={data}", *recommended)  # README: python -m wct.train task=json ...
    rows, _ = load_rows(cfg.task.data.source, cfg.task.data.path, fields=cfg.task.data.fields)
    assert rows[3] == {"instruction": "What is 3 plus 3?", "input": "", "output": "6"}
    assert "task.data.fields.answer is not a field wct reads" in train_error(
        capsys, tmp_path, f"task.data.path={data}", "+task.data.fields.answer=output")


def test_numeric_output_is_text(tmp_path):
    data = write_jsonl(tmp_path / "n.jsonl", [dict(r, output=int(r["output"])) for r in ROWS] + [
        {"instruction": "Half of 3?", "output": 1.5}])
    rows, _ = load_rows("none", str(data))
    assert rows[5]["output"] == "10" and rows[-1]["output"] == "1.5"
    bad = write_jsonl(tmp_path / "b.jsonl", [dict(ROWS[0], output=None)])
    with pytest.raises(WCTError, match=r"row 0 is not text \(output is a NoneType\)"):
        load_rows("none", str(bad))


class CountingTokenizer:
    """A tokenizer that records the longest text it was asked to tokenize."""

    def __init__(self, tok) -> None:
        self.tok, self.longest, self.eos_token_id = tok, 0, tok.eos_token_id

    def __call__(self, text: str, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)


def test_a_10mb_row_is_truncated_before_tokenizing():
    from wct.models import tiny_llama

    _, tok = tiny_llama()
    rng = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", " ", "\n", "zeta, ", "é"]
    long = "".join(words[i] for i in torch.randint(0, len(words), (3_000_000,), generator=rng).tolist())
    assert len(long.encode()) > 10_000_000
    counting = CountingTokenizer(tok)
    row = {"instruction": "Repeat.", "input": "", "output": long}
    got = encode(counting, row, max_length=256)
    assert counting.longest < 100_000
    prompt = tok(format_prompt("Repeat."), add_special_tokens=True).input_ids
    reference = tok(long[:50_000], add_special_tokens=False).input_ids  # an independent, plainly long-enough head
    assert got["input_ids"] == prompt + reference[: 256 - len(prompt)] and len(got["input_ids"]) == 256


def test_no_weak_columns_recommends_another_recipe():
    from wct.models import tiny_llama
    from wct.quant.config import QuantConfig
    from wct.quant.owq import quantize_model
    from wct.config import TuningConfig
    from wct.training.module import prepare_wct

    model, _ = tiny_llama()
    calib = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    quantize_model(model, calib, QuantConfig(method="owq", bits=4, target_bit=4.01), progress=False)
    with pytest.raises(WCTError) as e:
        prepare_wct(model, TuningConfig())
    message = str(e.value)
    assert "quant.target_bit=4.01 rounds to 0 weak columns" in message and "quant.target_bit=4.1" in message
    assert "owq-w4-t4.01" not in message.split("rounds")[1]


def test_packed_folder_without_tokenizer(tmp_path, capsys):
    from wct.evaluate import run
    from wct.models import tiny_llama
    from wct.checkpoint import save_quantized
    from wct.quant.owq import quantize_model

    model, tok = tiny_llama()
    quantize_model(model, torch.randint(0, 256, (2, 32)), bits=4, target_rank=2, progress=False)
    out = save_quantized(model, tok, tmp_path / "packed")
    for f in out.glob("tokenizer*"):
        f.unlink()
    book = tmp_path / "book.txt"
    book.write_text(TEXT)
    line = one_error(capsys, run, cfg_of("evaluate", [f"model.quantized={out}", f"eval.corpora=[{book}]",
                                                      f"paths.run_dir={tmp_path / 'ev'}"]))
    assert f"{out} has no tokenizer files (tokenizer_config.json)" in line


def test_checkpoint_path_is_a_folder(tmp_path, capsys):
    assert f"ckpt_path={tmp_path} is a folder" in train_error(capsys, tmp_path, f"ckpt_path={tmp_path}")


@pytest.mark.parametrize("app", ["quantize", "evaluate", "export"])
def test_hydra_run_folder_is_under_root_dir(tmp_path, app):
    import wct.export  # noqa: F401 (registers export_schema)

    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        cfg = compose(app, overrides=[f"paths.root_dir={tmp_path}"], return_hydra_config=True)
    assert cfg.hydra.run.dir.startswith(f"{tmp_path}/outputs/") and cfg.hydra.sweep.dir.startswith(f"{tmp_path}/")


def test_all_failing_sweep_exits_non_zero(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "wct.train", "-m", "model=tiny-llama", "logger=csv", "task=json",
                        f"task.data.path={tmp_path / 'a.jsonl'},{tmp_path / 'b.jsonl'}", f"paths.root_dir={tmp_path}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    assert f"sweep: 2 trials, 0 ok, 2 failed (failed: task.data.path={tmp_path / 'a.jsonl'}; " in p.stderr
