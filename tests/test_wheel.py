"""The wheel as a user installs it: built without warnings from a clean copy of the sources, it holds the runtime
package, its Hydra configs, kernel sources and embedded data, and none of the development tools; installed into a
fresh virtual environment, ``python -m wct.quantize`` and ``python -m wct.train task=alpaca`` run from a folder
outside the repository (the dependencies come from this environment through a .pth file, not from the checkout)."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import REPO

SOURCES = ["wct", "conf", "kernels", "pyproject.toml", "README.md"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[Path, str]:
    """(the built wheel, the build's output) from a copy of the sources (no stale build/ folder can leak in)."""
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
        else:
            shutil.copy(REPO / name, src / name)
    out = tmp_path_factory.mktemp("dist")
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out),
                        str(src)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    (whl,) = out.glob("wct-*.whl")
    return whl, p.stdout + p.stderr


def test_the_wheel_builds_without_warnings_and_ships_the_runtime_only(wheel):
    whl, log = wheel
    assert "warning" not in log.lower(), [line for line in log.splitlines() if "warn" in line.lower()]
    names = set(zipfile.ZipFile(whl).namelist())
    assert "wct/__init__.py" in names and "wct/kernels/dispatch.py" in names
    shipped = {n for n in names if n.startswith("wct/conf/") and n.endswith(".yaml")}
    assert shipped == {f"wct/conf/{p.relative_to(REPO / 'conf')}" for p in (REPO / "conf").rglob("*.yaml")}
    assert {f"wct/kernels_src/{p.name}" for p in (REPO / "kernels").iterdir() if p.suffix in (".py", ".cu", ".cuh")} <= names
    assert any(n.startswith("wct/data/embedded/") and n.endswith(".gz") for n in names)
    tools = {p.stem for p in (REPO / "scripts").glob("*.py")}
    assert not [n for n in names if Path(n).stem in tools or n.startswith(("scripts/", "tests/"))]


def test_installed_wheel_quantizes_and_trains_outside_the_repository(wheel, tmp_path):
    whl, _ = wheel
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    p = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "-q", str(whl)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")  # torch & co., not wct
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_API_KEY")}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")

    def run(*args: str) -> str:
        p = subprocess.run([str(py), *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
        return p.stdout + p.stderr

    where = run("-c", "import wct, wct.config; print(wct.__file__); print(wct.config.CONF_DIR)")
    assert where.count(str(venv)) == 2 and str(REPO) not in where  # the installed copy, with its shipped configs
    out = run("-m", "wct.quantize", "model=tiny-llama", "calib.n_samples=2", "calib.seqlen=64", "eval=none",
              "progress=false")
    (folder,) = (work / "outputs" / "quantized").iterdir()
    assert (folder / "config.json").is_file() and "results.json" in out
    out = run("-m", "wct.train", "task=alpaca", "model=tiny-llama", "quant.target_bit=null", "quant.target_rank=4",
              "calib.n_samples=2", "calib.seqlen=64", "task.max_length=1024", "task.val_size=4", f"cache_dir={tmp_path}",
              "task.global_batch_size=4", "task.micro_batch_size=2", "trainer.max_steps=2",
              "trainer.val_check_interval=2", "callbacks.samples.max_new_tokens=4", "progress=false")
    assert "data: alpaca-libre (embedded" in out and "done: val/loss" in out
    assert list((work / "outputs" / "train").rglob("results.json"))
