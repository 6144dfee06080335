"""The GPU validation kit's CPU-side paths (scripts/gpu_check.py): kit packing and reassembly, the offline install plan,
parts that pass, fail, time out or are skipped, the report, the loss / perplexity comparisons, and that every
command the kit runs composes with Hydra."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gpu_check import (
    MANIFEST,
    Part,
    assemble,
    compare_curves,
    compare_ppl,
    install_plan,
    loss_curve,
    pack,
    plan,
    render_markdown,
    run_parts,
    wheel_id,
    write_report,
)
from wct.config import CONF_DIR
from wct.errors import WCTError

REPO = Path(CONF_DIR).parent
PY = sys.executable


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    src = tmp_path / "src"
    src.mkdir()
    out = {}
    for name, size in [("wheels/big-1.0-py3-none-any.whl", 2500), ("wheels/small-2.0-py3-none-any.whl", 300),
                       ("data/janeausten/emma.txt", 999), ("data/x.txt", 1)]:
        path = src / name.replace("/", "_")
        path.write_bytes(os.urandom(size))
        out[name] = path
    return out


def test_pack_and_assemble_round_trip(tmp_path, files):
    folders = pack(files, tmp_path / "kit", limit=1000)
    sizes = [sum(p.stat().st_size for p in f.rglob("*") if p.is_file() and p.name != MANIFEST) for f in folders]
    assert max(sizes) <= 1000 and sum(sizes) == sum(p.stat().st_size for p in files.values())
    assert len(folders) == 4  # 2500 B cut into 1000 + 1000 + 500; the rest packed beside the 500
    assert (folders[-1] / MANIFEST).is_file() and not any((f / MANIFEST).exists() for f in folders[:-1])
    done, missing = assemble(folders[::-1], tmp_path / "out")
    assert missing == {}
    assert {str(p.relative_to(tmp_path / "out")) for p in done} == set(files)
    for rel, src in files.items():
        assert (tmp_path / "out" / rel).read_bytes() == src.read_bytes()


def test_assemble_names_what_did_not_arrive(tmp_path, files):
    folders = pack(files, tmp_path / "kit", limit=1000)
    big_piece = next(f for f in folders[:-1] if any(f.rglob("*.part*")))
    absent = sorted(p.name for p in big_piece.rglob("*") if p.is_file())
    done, missing = assemble([f for f in folders if f != big_piece], tmp_path / "out")
    assert "wheels/big-1.0-py3-none-any.whl" in missing
    assert all(name in " ".join(missing.values()) for name in absent)
    assert len(done) + len(missing) == len(files)
    assert not (tmp_path / "out" / "wheels" / "big-1.0-py3-none-any.whl").exists()


def test_assemble_refuses_a_corrupt_piece_and_a_missing_manifest(tmp_path, files):
    folders = pack(files, tmp_path / "kit", limit=1000)
    piece = next(folders[0].rglob("*.part*"))
    data = piece.read_bytes()
    piece.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])  # always a different first byte (the data is random)
    done, missing = assemble(folders, tmp_path / "out")
    assert "checksum differs" in missing["wheels/big-1.0-py3-none-any.whl"]
    assert not (tmp_path / "out" / "wheels" / "big-1.0-py3-none-any.whl").exists()
    assert assemble(folders[:-1], tmp_path / "out2")[1].keys() == {MANIFEST}


def test_pack_refuses_an_existing_folder(tmp_path, files):
    (tmp_path / "kit").mkdir()
    with pytest.raises(WCTError, match="exists"):
        pack(files, tmp_path / "kit", limit=1000)


def test_install_plan():
    wheels = [Path("w/Hydra_Core-1.3.8-py3-none-any.whl"), Path("w/torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl"),
              Path("w/multiprocess-0.70.19-py312-none-any.whl")]
    todo, notes = install_plan(wheels, {"hydra-core": "1.3.8", "torch": "2.13.0"})
    assert [w.name for w in todo] == [wheels[2].name, wheels[1].name]
    assert notes == ["hydra-core 1.3.8 already installed"]
    assert wheel_id(wheels[0]) == ("hydra-core", "1.3.8")
    with pytest.raises(WCTError, match="two wheels of hydra-core"):
        install_plan([*wheels, Path("hydra_core-1.3.2-py3-none-any.whl")], {})
    with pytest.raises(WCTError, match="not a wheel file name"):
        install_plan([Path("notes.txt.whl")], {})


def test_parts_fail_time_out_and_skip_without_stopping_the_rest(tmp_path):
    marker = tmp_path / "late"
    parts = [
        Part("ok", "passes", 30, commands=[[PY, "-c", "print('hello')"], [PY, "-c", "print('again')"]],
             figures=lambda: {"n": 3}),
        Part("bad", "exits 3", 30, commands=[[PY, "-c", "import sys; print('boom'); sys.exit(3)"]]),
        Part("slow", "sleeps past its timeout", 1,
             commands=[[PY, "-c", f"import time, pathlib; time.sleep(4); pathlib.Path({str(marker)!r}).touch()"]]),
        Part("after-bad", "needs bad", 30, needs=("bad",), commands=[[PY, "-c", "pass"]]),
        Part("gpu", "needs cuda", 30, requires=("cuda",), commands=[[PY, "-c", "pass"]]),
        Part("cmp", "compares", 5, needs=("ok",), check=lambda r: (r["ok"].figures["n"] == 3, {"seen": 3})),
        Part("raises", "its check raises", 5, check=lambda r: r["missing"]),
        Part("last", "still runs", 30, commands=[[PY, "-c", "print('end')"]]),
    ]
    start = time.monotonic()
    results = {r.name: r for r in run_parts(parts, tmp_path, dict(os.environ), set(), budget=60, cwd=tmp_path)}
    assert time.monotonic() - start < 30
    assert {n: r.status for n, r in results.items()} == {
        "ok": "passed", "bad": "failed", "slow": "timeout", "after-bad": "skipped", "gpu": "skipped",
        "cmp": "passed", "raises": "failed", "last": "passed"}
    assert results["ok"].figures == {"n": 3} and "again" in results["ok"].log
    assert "exit code 3" in results["bad"].reason and "boom" in results["bad"].log
    assert "needs bad" in results["after-bad"].reason and "needs cuda" in results["gpu"].reason
    assert "KeyError" in results["raises"].reason
    time.sleep(4)
    assert not marker.exists()  # the timed-out command was killed, not left running


def test_budget_skips_what_no_longer_fits(tmp_path):
    parts = [Part("a", "sleeps", 30, commands=[[PY, "-c", "import time; time.sleep(4)"]]),
             Part("b", "too late", 30, commands=[[PY, "-c", "pass"]])]
    results = run_parts(parts, tmp_path, dict(os.environ), set(), budget=2.0, cwd=tmp_path)
    assert [r.status for r in results] == ["timeout", "skipped"]
    assert "budget was used up" in results[1].reason


def test_report_files(tmp_path):
    parts = [Part("ok", "passes", 30, commands=[[PY, "-c", "pass"]], figures=lambda: {"ppl": 12.5}),
             Part("bad", "fails", 30, commands=[[PY, "-c", "raise SystemExit(1)"]])]
    results = run_parts(parts, tmp_path, dict(os.environ), set(), budget=60, cwd=tmp_path)
    md, js = write_report(results, {"gpu": "none"}, tmp_path / "report")
    text = md.read_text()
    assert "1 passed, 1 failed, 0 timeout, 0 skipped" in text
    assert "| ok | passed |" in text and "ppl=12.5" in text and "| bad | failed |" in text
    data = json.loads(js.read_text())
    assert [p["status"] for p in data["parts"]] == ["passed", "failed"] and data["env"] == {"gpu": "none"}
    assert render_markdown(results, {}).count("###") == 2


def test_compare_curves_and_ppl():
    ref = {1: 2.0, 2: 1.5, 3: 1.2}
    ok, fig = compare_curves(ref, {1: 2.01, 2: 1.5, 3: 1.2}, 0.01)
    assert ok and fig["max_rel_diff"] == pytest.approx(0.005)
    assert not compare_curves(ref, {1: 2.0, 2: 1.6, 3: 1.2}, 0.01)[0]
    assert not compare_curves(ref, {1: 2.0, 2: 1.5}, 0.5)[0]  # a step missing
    assert not compare_curves({}, {}, 0.5)[0]
    ok, fig = compare_ppl({"pp": 20.2}, {"pp": 20.0}, 0.02)
    assert ok and fig["ppl"]["pp"]["rel_diff"] == pytest.approx(0.01)
    assert not compare_ppl({"pp": 21.0}, {"pp": 20.0}, 0.02)[0]


@pytest.mark.parametrize("resources", [{"cuda", "smollm2"}, {"cuda"}])
def test_every_kit_command_composes(tmp_path, resources):
    """The Hydra overrides of each wct verb the kit runs exist (a typo would only show on the GPU machine)."""
    composed = 0
    for part in plan(tmp_path, resources):
        for argv in part.commands:
            if argv[1:2] != ["-m"] or not argv[2].startswith("wct."):
                continue
            verb = argv[2].removeprefix("wct.")
            importlib.import_module(argv[2])  # registers the verb's schema
            overrides = [a for a in argv[3:] if not a.startswith("hydra")]
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose(config_name=verb, overrides=overrides)
            if verb == "train" and "smollm2" in resources:
                assert cfg.model.name == "smollm2-135m" and cfg.model.quantized.endswith("owq-cuda")
            composed += 1
    assert composed == (10 if "smollm2" in resources else 8)


@pytest.mark.slow  # a real training run in a subprocess
def test_loss_curve_of_a_real_training_run(tmp_path):
    """The kit's train part, on the CPU: its metrics.csv gives one train/loss per optimizer step."""
    proc = subprocess.run(
        [PY, "-m", "wct.train", "experiment=smoke_tiny", "trainer.max_steps=3", "trainer.val_check_interval=3",
         "progress=false", "trainer.enable_progress_bar=false", f"cache_dir={tmp_path / 'bases'}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    curve = loss_curve(tmp_path / "run")
    assert sorted(curve) == [0, 1, 2] and all(0 < v < 20 for v in curve.values())


@pytest.mark.slow  # pip installs a kit into a fresh site
def test_main_installs_the_kit_offline_and_reports(tmp_path):
    """scripts/gpu_check.py on a kit holding one real wheel: installed into the work folder's site, report
    written; without CUDA every GPU part is skipped."""
    pkg = tmp_path / "probe"
    (pkg / "wctkitprobe").mkdir(parents=True)
    (pkg / "wctkitprobe" / "__init__.py").write_text("VALUE = 7\n")
    (pkg / "pyproject.toml").write_text('[project]\nname = "wctkitprobe"\nversion = "1.0"\n'
                                        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n')
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "w"),
                    str(pkg)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "w").glob("*.whl"))
    kit = pack({f"wheels/{wheel.name}": wheel}, tmp_path / "gpukit", limit=2**20)[-1]
    out, work = tmp_path / "report", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "WCT_GPU_STAGE": str(tmp_path / "no-stage")}
    proc = subprocess.run([PY, str(REPO / "scripts" / "gpu_check.py"), "--kit", str(kit), "--out", str(out), "--work", str(work),
                           "--budget", "120", "--only", "imports,gpu-tests"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert (work / "site" / "wctkitprobe" / "__init__.py").is_file(), proc.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert "wctkitprobe-1.0" in report["env"]["install"]
    assert [p["name"] for p in report["parts"]] == ["imports", "gpu-tests"]
    if "cuda" not in report["env"]["resources"]:
        assert report["parts"][1]["status"] == "skipped"
    assert (out / "report.md").is_file() and (out / "logs.txt").is_file()
    bad = subprocess.run([PY, str(REPO / "scripts" / "gpu_check.py"), "--kit", str(kit), "--out", str(out), "--work", str(work),
                          "--only", "nope"], capture_output=True, text=True, timeout=600, env=env)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --only names unknown parts ['nope']")
