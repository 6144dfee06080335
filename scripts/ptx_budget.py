"""The instruction budget of the decode GEMV kernels, read from their compiled code without a GPU (docs/kernels.md).

The PTX of a kernel is split into loops by its backward branches; the inner loop measured is the innermost one
with the most instructions (the K loop of a GEMV). Per decoded weight in that loop: PTX instructions (SASS with
nvdisasm, which Triton ships), int→float conversions, global loads per packed 32-bit word; from ``ptxas -v``: stack
frame bytes, registers, spills. Weights per loop iteration come from each kernel's tiling, declared with it below,
or (``0``) from the decode blocks the loop holds (the Triton fp16x2 asm names its weights in a comment) or else the
packed words the loop loads. The instruction counts are for M = 1; stack frame, spills and registers are also read
for every instantiation of the fast CUDA GEMV (``owq_gemv_fast<BITS, M>``, :func:`fast_instances`) from the same
``ptxas -v`` run. Used by ``scripts/kernel_budget.py`` and the static-check test; a development tool, outside the
installed package.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from wct.errors import WCTError
from wct.kernels.sources import load_module, source_dir

TARGET = {4: 3.5, 3: 2.6}  # instructions per weight at batch 1 (issue 13)

_LABEL = re.compile(r"^\s*(\$L\w+|\.L\w+):")
_TARGET = re.compile(r"(\$L__\w+|\.L_x_\d+)")
_I2F_PTX = re.compile(r"\bcvt\.rn?\w*\.(f16|f32|f64|bf16)\.[su](8|16|32|64)\b")
_SASS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


@dataclass
class Loop:
    start: int  # index of the header label line
    end: int  # index of the backward branch


@dataclass
class Figures:
    backend: str
    kernel: str
    arch: str
    bits: int
    weights_per_iter: int
    ptx_per_weight: float
    i2f_per_weight: float
    loads_per_word: float
    sass_per_weight: float | None
    stack_bytes: int
    registers: int
    spill_bytes: int  # spill stores
    spill_load_bytes: int
    within_budget: bool


def is_ptx_instruction(line: str) -> bool:
    """An instruction line of PTX (inline-asm blocks wrap theirs in braces; declarations and labels are not)."""
    s = line.strip().lstrip("{").rstrip("}").strip()
    return bool(s) and s.endswith(";") and not s.startswith((".", "//")) and not _LABEL.match(s)


def ptx_functions(ptx: str) -> dict[str, list[str]]:
    """Entry name → body lines of every ``.entry`` in a PTX module."""
    out: dict[str, list[str]] = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(", ptx):
        body_start = ptx.index("{", ptx.index(")", m.end()))
        depth, i = 0, body_start
        while True:
            depth += {"{": 1, "}": -1}.get(ptx[i], 0)
            if depth == 0:
                break
            i += 1
        out[m.group(1)] = ptx[body_start + 1:i].splitlines()
    return out


def loops(lines: list[str]) -> list[Loop]:
    """Natural loops found by their backward branches (the target label appears above the branch)."""
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    found = []
    for i, line in enumerate(lines):
        if re.search(r"\bbra|\bBRA\b", line) and (t := _TARGET.search(line)) and labels.get(t.group(1), i + 1) < i:
            found.append(Loop(labels[t.group(1)], i))
    return found


def hot_loop(lines: list[str], count=is_ptx_instruction) -> tuple[list[str], list[str]]:
    """The body of the innermost loop with the most instructions (the K loop of a GEMV; fp16x2 decode loops first,
    so a decode loop wins over a longer fp32 weak-column loop), and the lines of the loop enclosing it that lie
    outside it (empty when it is outermost)."""
    all_loops = loops(lines)

    def inside(a: Loop, b: Loop) -> bool:
        return a is not b and b.start <= a.start and a.end <= b.end

    inner = [lp for lp in all_loops if not any(inside(o, lp) for o in all_loops)]
    if not inner:
        raise WCTError("no loop found in the kernel: cannot measure an inner loop")
    sass = count is not is_ptx_instruction

    def key(lp: Loop) -> tuple[bool, int]:  # a loop with fp16x2 decode before a larger fp32 one
        body = lines[lp.start:lp.end + 1]
        return is_decode_loop(body, sass), sum(map(count, body))

    best = max(inner, key=key)
    parents = [o for o in all_loops if inside(best, o)]
    if not parents:
        return lines[best.start:best.end + 1], []
    p = min(parents, key=lambda o: o.end - o.start)
    return lines[best.start:best.end + 1], lines[p.start:best.start] + lines[best.end + 1:p.end + 1]


def ptxas_info(ptx: str, arch: str, ptxas: str) -> tuple[dict[str, tuple[int, int, int, int]], bytes]:
    """``ptxas -v`` on a PTX module: entry → (stack frame bytes, registers, spill store bytes, spill load bytes), and
    the cubin. One run reports every entry of the module."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = Path(tmp) / "k.ptx", Path(tmp) / "k.cubin"
        src.write_text(ptx)
        target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)  # Triton targets sm_90a on Hopper
        proc = subprocess.run([ptxas, "-v", f"--gpu-name={target.group(1) if target else 'sm_' + arch}", "-O3", "-o", str(cubin), str(src)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise WCTError(f"ptxas failed for sm_{arch}: {proc.stderr[-2000:]}")
        return parse_ptxas_v(proc.stderr), cubin.read_bytes()


def parse_ptxas_v(text: str) -> dict[str, tuple[int, int, int, int]]:
    """Entry → (stack frame bytes, registers, spill store bytes, spill load bytes) from ``ptxas -v`` output (the
    "Function properties for" block of each function, then its "Used N registers" line)."""
    info: dict[str, tuple[int, int, int, int]] = {}
    name = None
    for line in text.splitlines():
        if m := re.search(r"Function properties for (\w+)", line):
            name = m.group(1)
        elif name and (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                                      line)):
            info[name] = (int(m.group(1)), info.get(name, (0, 0))[1], int(m.group(2)), int(m.group(3)))
        elif name and (m := re.search(r"Used (\d+) registers", line)):
            stack, _, stores, loads = info.get(name, (0, 0, 0, 0))
            info[name] = (stack, int(m.group(1)), stores, loads)
    return info


def sass_functions(cubin: bytes, nvdisasm: str | None) -> dict[str, list[str]]:
    """Function → SASS lines (with labels) from nvdisasm, or {} without one."""
    if nvdisasm is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin)
        fh.flush()
        proc = subprocess.run([nvdisasm, "-c", fh.name], capture_output=True, text=True)
    if proc.returncode:
        return {}
    out: dict[str, list[str]] = {}
    name = None
    for line in proc.stdout.splitlines():
        if m := re.match(r"\s*\.section\s+\.text\.(\w+)", line):
            name = m.group(1)
            out[name] = []
        elif name is not None:
            out[name].append(line)
    return out


def is_sass_instruction(line: str) -> bool:
    m = _SASS.search(line)
    return bool(m) and m.group(2) != "NOP"


def words_loaded(loop: list[str]) -> int:
    """32-bit words the global loads of a loop read (PTX ``ld.global[.v2|.v4]``, SASS ``LDG[.64|.128]``): the
    weights an iteration decodes when it loads only packed planes (weights = words · 32 / bits)."""
    words = 0
    for line in loop:
        s = _unpredicated(line)
        if s.startswith("ld.global"):
            words += int(m.group(1)) if (m := re.search(r"\.v(\d)\.", s)) else 1
        elif m := re.search(r"\bLDG\.E(\.\w+)*", line):
            words += 4 if ".128" in m.group(0) else 2 if ".64" in m.group(0) else 1
    return words


_DECODE = re.compile(r"//\s*owq-decode (\d+) weights")
_F16X2_PTX = re.compile(r"^(fma|sub|add|mul)(\.rn)?\.f16x2\b")
_F16X2_SASS = re.compile(r"\bH(FMA2|ADD2|MUL2)(?!\.F32)(\.MMA)?\s")  # HADD2.F32 is an fp16→fp32 conversion
_SASS_MOV = re.compile(r"\bHFMA2(\.MMA)?\s+R\d+,\s*-?RZ,\s*-?RZ,")  # ptxas's constant move: 0·0 + immediate
_LOP3 = re.compile(r"\blop3\.b32|\bLOP3\.LUT\b")


def marked_weights(loop: list[str]) -> int:
    """Weights the decode blocks of a loop name (the Triton fp16x2 asm marks each block ``// owq-decode N weights``):
    counted from the code itself, so the compiler's unrolling and peeling are accounted for."""
    return sum(int(m.group(1)) for line in loop if (m := _DECODE.search(line)))


def f16x2_ops(loop: list[str], sass: bool) -> int:
    """fp16x2 arithmetic instructions of a loop: PTX fma/sub/mul .f16x2, SASS HFMA2/HADD2/HMUL2 (ptxas may turn a
    multiply into an HFMA2, but keeps one instruction per PTX one; HADD2.F32 conversions and HFMA2 -RZ, RZ constant
    moves are not counted)."""
    if sass:
        return sum(1 for line in loop if is_sass_instruction(line) and _F16X2_SASS.search(line)
                   and not _SASS_MOV.search(line))
    return sum(1 for line in loop if is_ptx_instruction(line) and _F16X2_PTX.match(_unpredicated(line)))


def is_decode_loop(loop: list[str], sass: bool) -> bool:
    """A loop that decodes into fp16x2 (LOP3 and fp16x2 arithmetic), not an fp32 loop that converts fp16 values."""
    return f16x2_ops(loop, sass) > 0 and any(_LOP3.search(line) for line in loop)


def _unpredicated(line: str) -> str:
    return re.sub(r"^@!?%\w+\s+", "", line.strip().lstrip("{").strip())


def measure(backend: str, kernel: str, arch: str, bits: int, body: list[str], weights: tuple[int, int | None],
            info: tuple[int, int, int, int], sass: list[str] | None) -> Figures:
    """Figures of one kernel from its PTX body, ptxas info and SASS. ``weights`` = (weights per iteration of the
    inner loop, weights per iteration of its enclosing loop or None): with the second, the enclosing loop's own
    instructions (a decode done once per 32 rows outside the dot loop) are amortized over its weights."""
    w_out = weights[1]
    ptx_loop = hot_loop(body)[0]
    marked = marked_weights(ptx_loop)

    def weights_in(loop: list[str], count) -> float:
        if weights[0]:
            return weights[0]
        if marked:  # marked decode blocks; in SASS scaled by its fp16x2 arithmetic (one instruction per PTX one)
            if count is is_ptx_instruction:
                return marked
            return marked * f16x2_ops(loop, True) / f16x2_ops(ptx_loop, False)
        return words_loaded(loop) * 32 // bits

    def per_weight(lines: list[str], count, pick=lambda s: True) -> float:
        loop, outer = hot_loop(lines, count)
        w_in = weights_in(loop, count)
        n_in = sum(1 for ln in loop if count(ln) and pick(_unpredicated(ln)))
        n_out = sum(1 for ln in outer if count(ln) and pick(_unpredicated(ln))) if w_out else 0
        return n_in / w_in + n_out / (w_out or 1)

    per_w = per_weight(body, is_ptx_instruction)
    i2f = per_weight(body, is_ptx_instruction, lambda s: bool(_I2F_PTX.search(s)))
    loads_per_word = per_weight(body, is_ptx_instruction, lambda s: s.startswith("ld.global")) * 32 / bits
    sass_w = per_weight(sass, is_sass_instruction) if sass else None
    stack, regs, spill, spill_loads = info
    ok = stack == 0 and spill == 0 and spill_loads == 0 and i2f == 0 and per_w <= TARGET.get(bits, 3.5)
    w_in = weights_in(ptx_loop, is_ptx_instruction)
    return Figures(backend, kernel, arch, bits, int(w_in), round(per_w, 3), round(i2f, 3), round(loads_per_word, 3),
                   None if sass_w is None else round(sass_w, 3), stack, regs, spill, spill_loads, ok)


def tools() -> dict[str, str | None]:
    """nvcc, ptxas and nvdisasm (the CUDA toolkit's, else the ones Triton ships)."""
    found = {t: shutil.which(t) for t in ("nvcc", "ptxas", "nvdisasm")}

    home = os.environ.get("CUDA_HOME")
    for t in found:
        if home and (Path(home) / "bin" / t).is_file():
            found[t] = str(Path(home) / "bin" / t)
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        for t in ("ptxas", "nvdisasm"):
            if found[t] is None and (bundled / t).is_file():
                found[t] = str(bundled / t)
    except ImportError:
        pass
    return found


# The CUDA GEMV at M = 1 with fp16 activations and fp16 scales: (entry-name regex, (weights per inner-loop
# iteration, weights per iteration of the enclosing loop or None)); 0 = every global load of the inner loop reads
# packed words (the fast kernel: scales, zeros and x are read outside it or from shared memory), so the weights of
# an iteration (however far nvcc unrolled it) are the words loaded · 32 / bits.
# the previous kernel (runtime bits and M) decoded 32 codes per k0 iteration into a local array, then one weight per
# j iteration (unrolled ×2 by nvcc); nvcc versions its k0 loop by bits, the version measured is the largest.
CUDA_KERNELS = {
    4: [(r"owq_gemv_fastILi4ELi1EE", (0, None)), (r"owq_gemv_kernelI6__halfS0_", (2, 32))],
    3: [(r"owq_gemv_fastILi3ELi1EE", (0, None)), (r"owq_gemv_kernelI6__halfS0_", (2, 32))],
}


@dataclass
class CudaBuild:
    """One nvcc → PTX → ``ptxas -v`` build of a CUDA source for one arch: every entry's PTX body, ptxas figures and
    SASS (with nvdisasm)."""
    arch: str
    functions: dict[str, list[str]]
    info: dict[str, tuple[int, int, int, int]]
    sass: dict[str, list[str]]


def cuda_build(arch: str, t: dict, source: Path | None = None, defines: tuple[str, ...] = ()) -> CudaBuild:
    """Compile ``source`` (default ``kernels/owq_cuda.cu``) to PTX for ``arch`` with nvcc (``defines`` as -D flags;
    ``OWQ_BUDGET_ONLY`` compiles only the fast GEMV kernels, every instantiation), then run ``ptxas -v`` once on the
    whole module."""
    if t["nvcc"] is None:
        raise WCTError("nvcc not found: install the CUDA toolkit or set CUDA_HOME (or pass --skip-cuda)")
    source = source or source_dir() / "owq_cuda.cu"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "owq_cuda.ptx"
        cmd = [t["nvcc"], "-O3", "-std=c++17", *(f"-D{d}" for d in defines), f"-arch=compute_{arch}", "-ptx",
               "-o", str(ptx_path), str(source)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise WCTError(f"nvcc failed: {proc.stderr[-2000:]}")
        ptx = ptx_path.read_text()
    info, cubin = ptxas_info(ptx, arch, t["ptxas"])
    return CudaBuild(arch, ptx_functions(ptx), info, sass_functions(cubin, t["nvdisasm"]))


def cuda_figures(archs: list[str], t: dict, source: Path | None = None, kernels: dict | None = None,
                 defines: tuple[str, ...] = (), builds: dict[str, CudaBuild] | None = None) -> list[Figures]:
    """Figures of the CUDA GEMV kernels in ``source`` (default ``kernels/owq_cuda.cu``) for each arch; ``kernels``
    maps bits to [(entry regex, weights)] (default :data:`CUDA_KERNELS`), the first match per bit width is measured.
    ``defines`` are passed as -D flags (``OWQ_BUDGET_ONLY`` compiles only the fast kernels); ``builds`` (arch →
    :func:`cuda_build`) reuses builds already made."""
    rows = []
    for arch in archs:
        b = (builds or {}).get(arch) or cuda_build(arch, t, source, defines)
        for bits, candidates in (kernels or CUDA_KERNELS).items():
            for pattern, weights in candidates:
                name = next((n for n in b.functions if re.search(pattern, n)), None)
                if name is not None:
                    rows.append(measure("cuda", name, arch, bits, b.functions[name], weights, b.info[name],
                                        b.sass.get(name)))
                    break
    return rows


# Every instantiation of the fast GEMV template, by its mangled name: owq_gemv_fast<BITS, M>.
FAST_INSTANCE = re.compile(r"owq_gemv_fastILi(\d+)ELi(\d+)EE")


@dataclass
class Instance:
    """``ptxas -v`` figures of one instantiation of a templated kernel (``owq_gemv_fast<bits, m>``)."""
    kernel: str
    arch: str
    bits: int
    m: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    registers: int

    @property
    def clean(self) -> bool:
        """No stack frame and no spills (nothing in local memory)."""
        return self.stack_bytes == self.spill_store_bytes == self.spill_load_bytes == 0


def fast_instances(build: CudaBuild, pattern: re.Pattern = FAST_INSTANCE) -> list[Instance]:
    """Every ``owq_gemv_fast<BITS, M>`` entry of a build, from its one ``ptxas -v`` run, sorted by (bits, M)."""
    rows = []
    for name, (stack, regs, stores, loads) in build.info.items():
        if m := pattern.search(name):
            rows.append(Instance(name, build.arch, int(m.group(1)), int(m.group(2)), stack, stores, loads, regs))
    return sorted(rows, key=lambda r: (r.bits, r.m))


def launcher_instances(source: Path | None = None) -> set[tuple[int, int]]:
    """The (bits, M) pairs ``owq_gemv`` launches the fast kernel with, read from the launcher's source: the bit widths
    ``fast_m<BITS>`` is called with × the template row counts of ``OWQ_M_CASES``."""
    text = (source or source_dir() / "owq_cuda.cu").read_text()
    bits = {int(b) for b in re.findall(r"return\s+fast_m<(\d+)>\(a\)", text)}
    cases = re.search(r"#define OWQ_M_CASES\(F, \.\.\.\)(.*?)default:", text, re.DOTALL)
    ms = {int(m) for m in re.findall(r"F<(\d+), __VA_ARGS__>", cases.group(1))} if cases else set()
    if not bits or not ms:
        raise WCTError("could not read the fast kernel's instantiations from the launcher (fast_m, OWQ_M_CASES)")
    return {(b, m) for b in bits for m in ms}


TRITON_HALF2_TILE = (1024, 64, 4)  # BLOCK_N, BLOCK_K, warps of the measured fp16x2 GEMV: 8 columns per thread


def triton_specs(bits: int) -> list[tuple]:
    """(jit function, signature, constexprs, attrs, (weights per loop iteration per thread, None), num_warps) of the
    Triton GEMV at M = 1 with fp16 activations as a GPU launch specializes it (pointers and sizes 16-divisible, N a
    multiple of BLOCK_N): ``owq_gemv``'s fp16x2 path (HALF2, inline PTX) with :data:`TRITON_HALF2_TILE`, its
    weights counted from the marked decode blocks of the loop (0); in sources before that path, ``owq_gemv`` with
    BLOCK_N = BLOCK_K = 64 and 4 warps, or before that kernel, ``owq_fwd`` in its GEMV mode."""
    mod = load_module("owq_triton.py", "owq_triton_budget")
    types = {"plane_a": "*i32", "plane_b": "*i32", "plane_w": "*i32", "scales": "*fp16", "zeros": "*u8", "idx": "*i32", "ws": "*fp32",
             "counters": "*i32"}
    if hasattr(mod, "asm_gemv4"):
        fn = mod.owq_gemv
        block_n, block_k, warps = TRITON_HALF2_TILE
        const = dict(BITS=bits, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_O=16, HAS_BIAS=True, HALF2=True, ASM=True,
                     EVEN_N=True)
        if "WORDS" in fn.arg_names:  # a 3-bit layer holds the kernel words on the triton backend
            const["WORDS"] = bits == 3
        sig = {a: "constexpr" if a in const else types.get(a, "*fp16" if a in ("x", "wo", "bias", "y") else "i32")
               for a in fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                   if a not in const and a not in ("M", "n_o")}
        return [(fn, sig, const, aligned, (0, None), warps)]
    if hasattr(mod, "owq_gemv"):
        fn = mod.owq_gemv
        const = dict(BITS=bits, BLOCK_N=64, BLOCK_K=64, BLOCK_O=16, HAS_BIAS=True)
    else:
        fn = mod.owq_fwd
        const = dict(BITS=bits, BLOCK_M=1, BLOCK_N=64, BLOCK_K=64, BLOCK_O=16, USE_DOT=False, HAS_BIAS=True,
                     UPCAST=False)
        types["out"] = "*fp16"
    sig = {a: "constexpr" if a in const else types.get(a, "*fp16" if a in ("x", "wo", "bias", "y") else "i32")
           for a in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
               if a not in const and a not in ("M", "n_o")}
    return [(fn, sig, const, aligned, (64 * 64 // 128, None), 4)]


TRITON_WORKER = r"""
import json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
sys.path.insert(0, sys.argv[3])
from ptx_budget import triton_specs

for fn, sig, const, attrs, weights, num_warps in triton_specs(int(sys.argv[1])):
    k = triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", int(sys.argv[2]), 32),
                       options={"num_warps": num_warps})
    print(json.dumps({"name": k.metadata.name, "ptx": k.asm["ptx"], "weights": weights,
                      "ptxas": get_ptxas(int(sys.argv[2])).path}))
"""


def triton_figures(archs: list[str], t: dict) -> list[Figures]:
    """Compile the Triton GEMV ahead of time in a subprocess (TRITON_INTERPRET must be off while decorating)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for arch in archs:
        for bits in (4, 3):
            proc = subprocess.run([sys.executable, "-c", TRITON_WORKER, str(bits), arch, str(Path(__file__).parent)], capture_output=True,
                                  text=True, env=env)
            if proc.returncode:
                raise WCTError(f"Triton AOT compile failed for sm_{arch}, {bits} bits: {proc.stderr[-2000:]}")
            for line in proc.stdout.splitlines():
                k = json.loads(line)
                info, cubin = ptxas_info(k["ptx"], arch, k["ptxas"])  # Triton's ptxas reads its PTX version
                sass = sass_functions(cubin, t["nvdisasm"])
                body = ptx_functions(k["ptx"])[k["name"]]
                rows.append(measure("triton", k["name"], arch, bits, body, tuple(k["weights"]), info[k["name"]],
                                    sass.get(k["name"])))
    return rows
