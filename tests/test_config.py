"""wct.config: every verb's schema in one place, validated into typed objects; bad values are one WCTError that
names the key (and, through the entry points, one `error:` line with exit code 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from wct.config import CONF_DIR, APPS, OptimConfig, TrainApp, to_app
from wct.errors import WCTError
from wct.quant.config import QuantConfig

REPO = Path(__file__).resolve().parents[1]


def composed(verb: str, *overrides: str):
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        return compose(verb, overrides=list(overrides))


def test_to_app_gives_typed_validated_objects():
    app = to_app(composed("train", "model=tiny-llama", "optim.lr=3e-4"), TrainApp)
    assert isinstance(app, TrainApp) and isinstance(app.optim, OptimConfig) and isinstance(app.quant, QuantConfig)
    assert app.optim.lr == 3e-4 and app.quant.name == "owq-w4-t4.01"  # the name is filled from the recipe
    assert app.callbacks["checkpoint"]["_target_"] == "wct.training.callbacks.StepCheckpoint"


@pytest.mark.parametrize("verb", ["quantize", "evaluate", "train"])
def test_every_verb_composes_into_its_schema(verb):
    assert isinstance(to_app(composed(verb), APPS[verb]), APPS[verb])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1.0 is invalid; it must be > 0"),
    ("optim.lr=0", "optim.lr=0.0 is invalid"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is invalid; it must be >= 0"),
    ("optim.betas=[0.9,1.5]", r"optim.betas=\[0.9, 1.5\] is invalid; give two values in \[0, 1\)"),
    ("optim.betas=[0.9]", r"optim.betas=\[0.9\] is invalid"),
    ("optim.eps=0", "optim.eps=0.0 is invalid"),
    ("optim.warmup_ratio=1.5", "optim.warmup_ratio=1.5 is invalid"),
    ("task.micro_batch_size=0", "task.micro_batch_size=0 is invalid; it must be >= 1"),
    ("task.global_batch_size=-4", "task.global_batch_size=-4 is invalid"),
    ("task.max_length=0", "task.max_length=0 is invalid"),
    ("task.val_fraction=1.0", "task.val_fraction=1.0 is invalid"),
    ("trainer.precision=bf16-mixd", "trainer.precision='bf16-mixd' is unknown; use one of auto, 32-true"),
    ("trainer.kernel=cudaa", "trainer.kernel='cudaa' is unknown"),
    ("trainer.max_steps=0", "trainer.max_steps=0 is invalid"),
    ("trainer.val_check_interval=0", "trainer.val_check_interval=0 is invalid"),
    ("method.name=dora", "method.name='dora' is unknown"),
    ("model.dtype=int8", "model.dtype='int8' is unknown"),
    ("model.dtype=auto", "model.dtype='auto' is for quantize, evaluate and generate; training keeps"),
    ("calib.n_samples=0", "calib.n_samples=0 is invalid"),
    ("quant.group_size=0", "quant.group_size=0 must be -1"),
    ("quant.percdamp=-0.01", "quant.percdamp=-0.01 must lie in"),
    ("quant.grid=0", "quant.grid=0 must be >= 1"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(WCTError, match=message):
        to_app(composed("train", "model=tiny-llama", override), TrainApp)


@pytest.mark.parametrize("verb", ["quantize", "evaluate"])
def test_device_and_auto_dtype_compose_for_the_verbs_that_place_models(verb):
    app = to_app(composed(verb, "model.dtype=auto", "device=cpu"), APPS[verb])
    assert (app.device, app.model.dtype) == ("cpu", "auto")


def test_unknown_appended_key_is_refused():
    with pytest.raises(WCTError, match="unknown config key trainer.precison; valid keys here: accelerator"):
        to_app(composed("train", "+trainer.precison=32-true"), TrainApp)


def test_cli_bad_value_is_one_line_and_exit_2(tmp_path):
    p = subprocess.run([sys.executable, "-m", "wct.train", "experiment=smoke_tiny", f"paths.root_dir={tmp_path}",
                        "optim.lr=-1"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 2
    assert p.stderr.splitlines() == ["error: optim.lr=-1.0 is invalid; it must be > 0 (WCT: ~1e-5..1e-3)"]
    assert not (tmp_path / "outputs" / "train").exists() or not any((tmp_path / "outputs" / "train").rglob("*.ckpt"))
