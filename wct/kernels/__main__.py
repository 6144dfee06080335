"""``python -m wct.kernels build [--arch 80 --arch 90] [--out PATH]``: compile the CUDA kernels ahead of use."""

from __future__ import annotations

import argparse

from wct.errors import cli_errors
import wct.kernels.cuda_backend as cuda_backend


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wct.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the CUDA kernel library with nvcc")
    b.add_argument("--arch", action="append", help="SM architecture, e.g. 80 or 90 (repeatable; default 80 and 90)")
    b.add_argument("--out", help="output .so path (default: the cache path the cuda backend loads)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else cuda_backend.ARCHS
    path = cuda_backend.build(archs, args.out)
    print(f"built {path} for sm_{', sm_'.join(archs)}")


if __name__ == "__main__":
    main()
