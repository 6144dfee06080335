"""wct.io and the outputs of wct.quantize / wct.export: a user's files survive ``out=``, a file is never replaced by
a folder, ``overwrite=true`` replaces only a wct output of the same kind, killed writes leave nothing behind the
next write, and outputs follow the umask."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TEXT, cfg_of, tiny_overrides, trained_from
from wct.errors import WCTError
from wct.io import (
    MARKER,
    OutputExistsError,
    atomic_dir,
    atomic_file,
    check_output,
    output_kind,
    remove_stale_temps,
)

REPO = Path(__file__).resolve().parents[1]


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder a user owns (a file and a sub-folder with a file); returns its files' contents."""
    (path / "notes").mkdir(parents=True)
    (path / "thesis.tex").write_bytes(b"\\section{Results}\n")
    (path / "notes" / "todo.txt").write_bytes(b"back up everything\n")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture
def text(tmp_path) -> Path:

    path = tmp_path / "book.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def quantize(tmp_path: Path, text: Path, *extra: str):
    from wct.quantize import run

    return run(cfg_of("quantize", tiny_overrides(tmp_path, text, "quant=owq-w3-t3.1", *extra)))


@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_user_folder_survives_quantize_out(tmp_path, text, capsys, overwrite):
    out = tmp_path / "user" / "mine"
    before = user_folder(out)
    with pytest.raises(SystemExit) as e:
        quantize(tmp_path, text, f"out={out}", f"overwrite={overwrite}")
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"out={out} exists and was not written by wct" in err
    assert snapshot(out) == before and siblings(out) == []


def test_existing_file_is_not_replaced_by_a_folder(tmp_path, text, capsys):
    out = tmp_path / "user" / "model.bin"
    out.parent.mkdir()
    out.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        quantize(tmp_path, text, f"out={out}", "overwrite=true")
    assert f"out={out} is an existing file" in capsys.readouterr().err
    assert out.read_bytes() == b"precious" and siblings(out) == []


def test_quantize_output_is_replaced_only_with_overwrite(tmp_path, text, capsys):
    out = tmp_path / "outputs" / "q1"
    quantize(tmp_path, text, f"out={out}")
    assert output_kind(out) == "quantized"
    first = (out / "model.safetensors").stat().st_ino
    with pytest.raises(SystemExit):
        quantize(tmp_path, text, f"out={out}")
    assert "already holds a wct quantized output; pass overwrite=true" in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_ino == first
    quantize(tmp_path, text, f"out={out}", "overwrite=true", "quant=owq-w4-t4.01")
    assert (out / "model.safetensors").stat().st_ino != first and siblings(out) == []
    assert __import__("json").loads((out / "config.json").read_text())["quantization_config"]["bits"] == 4


def test_user_folder_survives_export_out(tmp_path):

    from wct.exporting import export_wct
    from wct.models import load_model
    from wct.checkpoint import save_quantized
    from wct.quant.owq import quantize_model

    model, tok = load_model("tiny-llama")
    quantize_model(model, torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0)), bits=4,
                   target_rank=4, progress=False)
    base = save_quantized(model, tok, tmp_path / "base")
    out = tmp_path / "export"
    before = user_folder(out)
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="not written by wct"):
            export_wct(trained_from(base), out, overwrite=overwrite)
    assert snapshot(out) == before
    with pytest.raises(OutputExistsError, match=r"holds a wct quantized output, which this command \(export"):
        export_wct(trained_from(base), base, overwrite=True)  # another kind of wct output is not replaced either
    export_wct(trained_from(base), tmp_path / "e2")
    with pytest.raises(OutputExistsError, match="overwrite=true"):
        export_wct(trained_from(base), tmp_path / "e2")
    export_wct(trained_from(base, scale=0.1), tmp_path / "e2", overwrite=True)
    assert output_kind(tmp_path / "e2") == "export" and sorted(os.listdir(tmp_path)) == ["base", "e2", "export"]


def test_raise_mid_write_leaves_nothing_and_keeps_the_old_output(tmp_path):
    out = tmp_path / "o"
    with atomic_dir(out, "test") as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out, "test", overwrite=True) as tmp:
            (tmp / "a").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a").read_text() == "old" and siblings(out) == []
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "f.json", "w") as fh:
            fh.write("{")
            raise RuntimeError("killed")
    assert sorted(os.listdir(tmp_path)) == ["o"]


KILLED_WRITE = """
import os, signal, sys
from wct.io import atomic_dir, atomic_file
with atomic_{what}(sys.argv[1], {args}) as t:
    {write}
    os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.parametrize("what", ["dir", "file"])
def test_killed_write_temp_is_removed_by_the_next_write(tmp_path, what):
    out = tmp_path / "o"
    args, write = ('"test", True', '(t / "big").write_bytes(b"x" * 1000)') if what == "dir" else ('"w"', 't.write("x")')
    code = KILLED_WRITE.format(what=what, args=args, write=write)
    p = subprocess.run([sys.executable, "-c", code, str(out)], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert p.returncode == -signal.SIGKILL
    (stale,) = siblings(out)
    assert stale.startswith(".o.tmp-") and not out.exists()
    running = tmp_path / f".o.tmp-{stale.split('-')[1]}-{os.getpid()}-live"  # a running writer's temp: kept
    running.mkdir()
    (tmp_path / ".o.tmp-notours").mkdir()  # not wct's naming: never touched
    if what == "dir":
        with atomic_dir(out, "test") as tmp:
            (tmp / "big").write_bytes(b"new")
    else:
        with atomic_file(out, "w") as fh:
            fh.write("new")
    assert siblings(out) == sorted([running.name, ".o.tmp-notours"])


def test_fallback_swap_killed_between_renames_restores_the_old_output(tmp_path):
    out = tmp_path / "o"
    with atomic_dir(out, "test") as tmp:
        (tmp / "a").write_text("old")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    from wct.io import _sibling_prefix

    old = _sibling_prefix(out, "old").replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-") + "abcd"
    out.rename(tmp_path / old)  # the state a kill -9 between "final -> old" and "tmp -> final" leaves
    remove_stale_temps(out)
    assert (out / "a").read_text() == "old" and siblings(out) == []


@pytest.mark.parametrize("mask,folder,file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_follow_the_umask(tmp_path, mask, folder, file):
    old = os.umask(mask)
    try:
        with atomic_dir(tmp_path / "o", "test") as tmp:
            (tmp / "a").write_text("x")
        with atomic_file(tmp_path / "f") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == folder
    assert stat.S_IMODE((tmp_path / "o" / MARKER).stat().st_mode) == file
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == file


def test_unwritable_or_blocked_parent_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WCTError, match="a file is in the way"):
        with atomic_dir(tmp_path / "file" / "out", "test"):
            pass
    assert (tmp_path / "file").read_text() == "x"
    with pytest.raises(WCTError, match="out=/proc/wct-out: cannot write into /proc"):
        check_output("/proc/wct-out", "test")  # even root cannot create folders there
