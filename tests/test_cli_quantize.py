"""Hydra composition of conf/ and the wct.quantize / wct.evaluate entry points on tiny-llama."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from wct.config import CONF_DIR
from wct.checkpoint import load_quantized

from helpers import REPO, TEXT, TINY, cfg_of, tiny_overrides


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (Path(CONF_DIR) / "quant").glob("*.yaml")))
def test_every_quant_recipe_composes(recipe):
    q = OmegaConf.to_object(cfg_of("quantize", [f"quant={recipe}"]).quant)
    expected = {"owq-w3": "owq-w3-t3.01", "owq-w4": "owq-w4-t4.01"}.get(recipe, recipe)
    assert q.name == expected  # names come from the fields, so sweeps get distinct output folders


def test_defaults_compose_and_resolve():
    cfg = cfg_of("quantize", ["paths.run_dir=."])
    assert cfg.model.name == "smollm2-135m" and cfg.calib.seqlen == 512 and cfg.eval.max_windows == 40
    assert cfg.calib.source == "emma"  # the embedded Emma (wct/data/embedded), no ../shared needed
    assert Path(cfg.paths.data_dir).is_absolute()  # independent of the working directory
    ev = cfg_of("evaluate", ["model.quantized=/x", "eval=paper", "paths.run_dir=."])
    assert list(ev.eval.corpora) == ["wikitext2", "ptb", "c4"] and ev.eval.seqlen == 2048
    for override, message in [
        ("quant.foo=1", "Key 'foo' not in 'QuantConfig'"),
        ("quant.bits=three", "'three' of type 'str' could not be converted to Integer"),
        ("calib.n_sample=3", "Key 'n_sample' not in 'CalibConfig'"),
        ("model=gpt5", "Could not find 'model/gpt5'"),
    ]:
        with pytest.raises(ConfigCompositionException) as e:
            cfg_of("quantize", [override])
        assert message in f"{e.value} {e.value.__cause__}", override
    bad = OmegaConf.create({"name": "x", "dtype": "float32", "quantized": None, "extra": 1})
    with pytest.raises(Exception, match="extra"):
        OmegaConf.merge(cfg_of("quantize", []).model, bad)


def test_quantize_run_writes_checkpoint_and_results(tmp_path, text, capsys):
    from wct.quantize import run

    results = run(cfg_of("quantize", tiny_overrides(tmp_path, text, "quant=owq-w3-t3.1")))
    out = tmp_path / "q" / "tiny-llama-owq-w3-t3.1"
    assert results["checkpoint"] == str(out) and (out / "model.safetensors").is_file()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["ppl"] == results["ppl"] and saved["quant"]["name"] == "owq-w3-t3.1"
    assert saved["weak_by_type"]["q_proj"] == [2] and saved["paper_bits"] > 3.1
    printed = capsys.readouterr().out
    assert "target_bit: 3.1" in printed and "paper label" in printed and str(out) in printed

    from wct.evaluate import run as evaluate

    ev = evaluate(cfg_of("evaluate", [f"model.quantized={out}", f"eval.corpora=[{text}]", "eval.seqlen=64",
                                      "eval.max_windows=3", f"paths.run_dir={tmp_path / 'ev'}", "progress=false"]))
    assert ev["ppl"] == results["ppl"]  # the reloaded checkpoint is bit-exact
    assert "book" in capsys.readouterr().out
    assert load_quantized(out)[0].config.quantization_config["target_bit"] == 3.1


def test_bos_resolved_and_recorded(tmp_path, text):
    """calib.bos / eval.bos reach the windows and are recorded resolved: in results.json of both verbs and in the
    checkpoint's quantization_config; auto is never for tiny-llama's tokenizer (it adds no BOS)."""
    from wct.evaluate import run as evaluate
    from wct.quantize import run

    res = run(cfg_of("quantize", tiny_overrides(tmp_path, text, "quant=owq-w4-t4.01", "calib.bos=always")))
    assert res["bos"] == {"calib": "always", "eval": "never"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["bos"] == res["bos"]
    out = Path(res["checkpoint"])
    calibration = load_quantized(out)[0].config.quantization_config["calibration"]
    assert calibration == {"source": str(text), "n_samples": 4, "seqlen": 64, "seed": 0, "fallback": "error",
                           "bos": "always"}
    common = [f"model.quantized={out}", f"eval.corpora=[{text}]", "eval.seqlen=64", "eval.max_windows=3",
              "progress=false"]
    auto = evaluate(cfg_of("evaluate", [*common, f"paths.run_dir={tmp_path / 'auto'}"]))
    assert auto["bos"] == {"eval": "never"} and auto["ppl"] == res["ppl"]
    always = evaluate(cfg_of("evaluate", [*common, "eval.bos=always", f"paths.run_dir={tmp_path / 'always'}"]))
    assert json.loads((tmp_path / "always" / "results.json").read_text())["bos"] == {"eval": "always"}
    assert always["ppl"]["book"] != auto["ppl"]["book"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("quant.bits=5", "quant.bits=5 is not supported"),
        ("quant.target_bit=2.5", r"quant.target_bit=2.5 must lie in \[bits, bits\+1\)"),
        ("quant.group_size=48", "group_size=48 does not divide"),
        ("calib.seqlen=100000", "too few for one calibration window"),
        ("+quant.foo=1", "unknown config key quant.foo; valid keys here: method, bits"),
        ("+calib.n_sample=1", "unknown config key calib.n_sample"),
        ("calib.bos=maybe", "calib.bos='maybe' is unknown; use one of auto, always, never"),
        ("eval.bos=sometimes", "eval.bos='sometimes' is unknown; use one of auto, always, never"),
        ("+outdir=x", "unknown config key outdir"),
    ],
)
def test_bad_input_one_message_no_output(tmp_path, text, capsys, override, message):
    from wct.quantize import run

    with pytest.raises(SystemExit) as e:
        run(cfg_of("quantize", tiny_overrides(tmp_path, text, "quant=owq-w3-t3.01", override)))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and __import__("re").search(message, err) and "Traceback" not in err
    assert not (tmp_path / "q").exists() or not any((tmp_path / "q").iterdir())


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow  # a multirun sweep of quantize processes
def test_cli_multirun_and_errors(tmp_path, text):
    r = cli("wct.quantize", "-m", "quant=owq-w3", "quant.target_bit=3.0,3.1", *TINY, f"calib.source={text}",
            f"eval.corpora=[{text}]", f"paths.quantized_dir={tmp_path / 'q'}", f"hydra.sweep.dir={tmp_path / 'm'}",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = [json.loads((tmp_path / "m" / str(i) / "results.json").read_text()) for i in range(2)]
    assert [x["quant"]["name"] for x in runs] == ["owq-w3-t3", "owq-w3-t3.1"]
    assert runs[0]["paper_bits"] == 3.0 < runs[1]["paper_bits"]
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["tiny-llama-owq-w3-t3", "tiny-llama-owq-w3-t3.1"]

    png = tmp_path / "ratio.png"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_quant_ratio.py"), str(tmp_path / "m"),
                        "--out", str(png)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert png.stat().st_size > 1000

    r = cli("wct.quantize", "quant.foo=1", *TINY, f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert r.returncode != 0 and "Key 'foo' not in 'QuantConfig'" in r.stderr
    r = cli("wct.evaluate", "model=tiny-llama", "eval=wikitext2", f"hydra.run.dir={tmp_path / 'ev'}", cwd=tmp_path)
    assert r.returncode == 2 and "error: could not load the wikitext2 corpus" in r.stderr
    assert "local text" in r.stderr and "Traceback" not in r.stderr
