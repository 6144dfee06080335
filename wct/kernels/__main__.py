"""Compile the kernels ahead of their first use:

    python -m wct.kernels build [--arch 80 --arch 90] [--out PATH]   # the CUDA library (nvcc)
    python -m wct.kernels build-cpu                                    # the CPU extension (g++, ninja), as make install does
"""

from __future__ import annotations

import argparse

from wct.errors import WCTError, cli_errors
import wct.kernels.cpu_backend as cpu_backend
import wct.kernels.cuda_backend as cuda_backend


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m wct.kernels", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the CUDA kernel library with nvcc")
    b.add_argument("--arch", action="append", help="SM architecture, e.g. 80 or 90 (repeatable; default 80 and 90)")
    b.add_argument("--out", help="output .so path (default: the cache path the cuda backend loads)")
    sub.add_parser("build-cpu", help="build the CPU extension (kernels/owq_cpu.cpp) into torch's extension cache")
    args = parser.parse_args(argv)
    if args.command == "build-cpu":
        mod = cpu_backend.extension()
        if mod is None:  # WCT_CPU_KERNEL=0, or the build failed and extension() logged why
            raise WCTError("the CPU kernels were not built (WCT_CPU_KERNEL=0, or the compiler error above); wct will "
                           "use the slab path (dequantize, then matmul). Fix: unset WCT_CPU_KERNEL, install g++ and "
                           "`pip install ninja`")
        print(f"built {mod.__file__}")
        return
    archs = tuple(args.arch) if args.arch else cuda_backend.ARCHS
    path = cuda_backend.build(archs, args.out)
    print(f"built {path} for sm_{', sm_'.join(archs)}")


if __name__ == "__main__":
    main()
