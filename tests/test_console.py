"""wct.console.run_output: quiet silences standard output and wct's INFO lines for the verb only, and gives the
caller's settings back afterwards (a verb called from Python leaves no trace)."""

from __future__ import annotations

import logging
import os

import pytest

from wct.console import run_output


@pytest.mark.parametrize("silent_before", [None, "false"])
def test_quiet_output_is_restored_after_the_verb(monkeypatch, capsys, silent_before):
    if silent_before is None:
        monkeypatch.delenv("WANDB_SILENT", raising=False)
    else:
        monkeypatch.setenv("WANDB_SILENT", silent_before)
    logger = logging.getLogger("wct")
    monkeypatch.setattr(logger, "level", logging.DEBUG)
    with pytest.raises(RuntimeError, match="the verb failed"), run_output(quiet=True):
        print("inside")
        assert os.environ["WANDB_SILENT"] == "true" and logger.level == logging.WARNING
        raise RuntimeError("the verb failed")  # restored on the error path too
    print("after")
    assert capsys.readouterr().out == "after\n"
    assert os.environ.get("WANDB_SILENT") == silent_before and logger.level == logging.DEBUG


def test_not_quiet_changes_nothing(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    level = logging.getLogger("wct").level
    with run_output(quiet=False):
        print("shown")
    assert capsys.readouterr().out == "shown\n"
    assert "WANDB_SILENT" not in os.environ and logging.getLogger("wct").level == level
