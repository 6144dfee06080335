"""Instruction budget of the decode GEMV kernels, read from their compiled code (no GPU needed; docs/kernels.md).

Compiles ``kernels/owq_cuda.cu`` with nvcc and the Triton GEMV ahead of time (``triton.compile`` with a
``GPUTarget``, pointers and strides marked 16-divisible as a real launch specializes them) for sm_80 and sm_90, and
prints per kernel and bit width, for the M = 1 instantiation:

- ``ptx/w``  : PTX instructions in the inner loop per decoded weight (the loop that holds the dot product: the
               innermost loop with the most instructions), ``sass/w`` the same in SASS where nvdisasm is available
               (Triton ships one);
- ``i2f/w``  : int→float conversions (``cvt.rn.f*.{s,u}{8,16,32,64}``; I2F in SASS) per weight in that loop;
- ``ld/word``: global loads issued per packed 32-bit word in that loop (a 128-bit load of 4 words counts 1);
- ``stack``  : stack frame bytes and ``regs`` registers from ``ptxas -v``.

and, for every instantiation of the fast CUDA GEMV (``owq_gemv_fast<BITS, M>``: bits 2, 3, 4 × M = 1, 2, 4, 8, as
the launcher instantiates it), its stack frame, spill store and load bytes and registers from the same ``ptxas -v``
run (JSON ``instances``; none may use local memory).

Weights per loop iteration come from the code (the packed words the CUDA loop loads, the weights the Triton
fp16x2 decode blocks name; scripts/ptx_budget.py): the budget at batch 1 on an H100/H200 is ≤ 3.5 instructions per
weight at 4 bits and ≤ 2.6 at 3 bits, no conversions, no stack frame, no spills.

The CUDA source is compiled with ``-DOWQ_BUDGET_ONLY`` (only the fast kernels, every instantiation: seconds);
``--full`` compiles the whole library instead (minutes), the instantiations then being the launcher's own.

    python scripts/kernel_budget.py [--arch 80 --arch 90] [--out results/kernel_budget.json] [--skip-triton] [--full]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from ptx_budget import (  # beside this file (a development tool)
    TARGET,
    Figures,
    Instance,
    cuda_build,
    cuda_figures,
    fast_instances,
    tools,
    triton_figures,
)
from wct.errors import WCTError, cli_errors
from wct.io import atomic_file


def print_rows(rows: list[Figures]) -> None:
    head = ["backend", "arch", "bits", "ptx/w", "sass/w", "i2f/w", "ld/word", "stack", "regs", "budget", "kernel"]
    cells = [[r.backend, f"sm_{r.arch}", str(r.bits), f"{r.ptx_per_weight:.2f}",
              "-" if r.sass_per_weight is None else f"{r.sass_per_weight:.2f}", f"{r.i2f_per_weight:.2f}",
              f"{r.loads_per_word:.2f}", str(r.stack_bytes), str(r.registers), "ok" if r.within_budget else "OVER",
              r.kernel[:60]] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def print_instances(rows: list[Instance]) -> None:
    head = ["arch", "bits", "M", "stack", "spill st", "spill ld", "regs", "local"]
    cells = [[f"sm_{r.arch}", str(r.bits), str(r.m), str(r.stack_bytes), str(r.spill_store_bytes),
              str(r.spill_load_bytes), str(r.registers), "none" if r.clean else "USED"] for r in rows]
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(head)]
    print("owq_gemv_fast<BITS, M> instantiations (ptxas -v):")
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


@cli_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", action="append", help="SM architecture (repeatable; default 80 and 90)")
    parser.add_argument("--out", default="results/kernel_budget.json")
    parser.add_argument("--skip-cuda", action="store_true")
    parser.add_argument("--skip-triton", action="store_true")
    parser.add_argument("--full", action="store_true", help="compile the whole CUDA library, not only the fast kernels")
    args = parser.parse_args(argv)
    archs = args.arch or ["80", "90"]
    t = tools()
    if t["ptxas"] is None:
        raise WCTError("ptxas not found: install the CUDA toolkit or triton (which ships one)")
    defines = () if args.full else ("OWQ_BUDGET_ONLY",)
    builds = {} if args.skip_cuda else {a: cuda_build(a, t, defines=defines) for a in archs}  # one nvcc + ptxas each
    rows = cuda_figures(archs, t, builds=builds) if builds else []
    rows += [] if args.skip_triton else triton_figures(archs, t)
    instances = [i for a in archs if a in builds for i in fast_instances(builds[a])]
    print_rows(rows)
    if instances:
        print_instances(instances)
    if t["nvdisasm"] is None:
        print("no nvdisasm: SASS not counted")
    with atomic_file(args.out, "w") as fh:
        json.dump({"tools": t, "targets": TARGET, "rows": [asdict(r) for r in rows],
                   "instances": [{**asdict(i), "clean": i.clean} for i in instances]}, fh, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
