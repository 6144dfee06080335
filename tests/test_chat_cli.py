"""``python -m wct.train task=chat`` end to end on tiny-llama with a Jinja template: the run records the template and
the data origin, prints the first conversation with its mask, and the export and ``wct.generate`` keep the template."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers import REPO, run_dirs, tiny, train

TEMPLATE = Path(__file__).parent / "fixtures" / "tiny_chat.jinja"


@pytest.mark.slow  # training, export and generation processes
def test_chat_run_keeps_its_template(tmp_path):
    chats = tmp_path / "chats.jsonl"
    rows = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Count to {n}."},
                               {"from": "gpt", "value": " ".join(map(str, range(1, n + 1)))},
                               {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]}
            for n in range(1, 30)]
    chats.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    p = train("task=chat", *tiny(tmp_path), f"task.data.path={chats}", f"task.template={TEMPLATE}",
              "task.max_length=96", "task.packing=true")
    out = p.stdout
    cut = re.search(r"truncation: (\d+) conversation\(s\) lost (\d+) turn\(s\) from the end and (\d+) were dropped",
                    out)
    shortened, turns, dropped = map(int, cut.groups())
    assert shortened > 0 and turns == 2 * shortened and dropped > 0  # "Count to 29" does not fit 96 bytes
    assert f"data: {chats}: {29 - dropped - 4} training / 4 validation rows" in out
    assert "[[<s><<SYS>>Be brief.<</SYS>>\n[INST] Count to" in out and " [/INST] ]]1" in out
    (run,) = run_dirs(tmp_path / "outputs" / "train")
    assert run.parent.name == "chat-tiny-llama-owq-w4-k4-weak"
    config = OmegaConf.load(run / "config.yaml")
    assert config.chat_template == TEMPLATE.read_text() and config.data_origin == str(chats)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    e = subprocess.run([sys.executable, "-m", "wct.export", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert e.returncode == 0, e.stderr[-3000:]
    export = run / "export-last"
    assert json.loads((export / "wct_export.json").read_text())["template"] == f"chat ({TEMPLATE})"
    from wct.generation import render, resolve_template
    from wct.loading import load_for_use

    for loaded in (load_for_use(OmegaConf.create({"name": "x", "quantized": str(export), "dtype": "float32"})),
                   load_for_use(None, str(run / "checkpoints" / "last.ckpt"))):
        tok = loaded.tokenizer
        assert loaded.tuned == f"chat ({TEMPLATE})" and tok.chat_template == TEMPLATE.read_text()
        assert resolve_template("auto", tok, loaded.tuned, False) == "chat"
        assert render(tok, "Hi", template="chat") == "<s>[INST] Hi [/INST] "
    g = subprocess.run([sys.executable, "-m", "wct.generate", f"model.quantized={export}", "prompt=Hi",
                        "max_new_tokens=2"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert g.returncode == 0, g.stderr[-3000:]
