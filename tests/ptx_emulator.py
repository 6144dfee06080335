"""A numpy emulator for the few PTX instructions of the Triton fp16x2 GEMV's inline assembly (kernels/owq_triton.py),
so the assembly text itself runs on the CPU: lop3, shr/shl, prmt, sub/mul/fma .rn.f16x2, mov.b32 {lo, hi},
cvt.f32.f16 and ld.global.nc.v4.b32. Written from the PTX ISA definitions, independently of the kernel's tl form.
Every value is a vector (one lane per sample); fp16 arithmetic is done exactly in float64 and rounded once (.rn)."""

from __future__ import annotations

import re

import numpy as np

_OPERAND = re.compile(r"\$(\d+)")


def _lop3(a: np.ndarray, b: np.ndarray, c: np.ndarray, lut: int) -> np.ndarray:
    """Bit i of the result is LUT[(a_i << 2) | (b_i << 1) | c_i]."""
    out = np.zeros_like(a)
    for t in range(8):
        if lut >> t & 1:
            out |= (a if t & 4 else ~a) & (b if t & 2 else ~b) & (c if t & 1 else ~c)
    return out


def _prmt(a: np.ndarray, b: np.ndarray, sel: int) -> np.ndarray:
    """Byte permute of the 8 bytes {b, a} (a is bytes 0-3); selector nibbles 0-7, no sign replication."""
    v = (b.astype(np.uint64) << np.uint64(32)) | a.astype(np.uint64)
    out = np.zeros_like(a)
    for i in range(4):
        byte = (v >> np.uint64(8 * ((sel >> (4 * i)) & 7))) & np.uint64(0xFF)
        out |= byte.astype(np.uint32) << np.uint32(8 * i)
    return out


def _lanes(u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lo = (u & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float64)
    hi = (u >> 16).astype(np.uint16).view(np.float16).astype(np.float64)
    return lo, hi


def _pack(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round each exact float64 lane once to fp16 (numpy rounds to nearest even) and pack the bits."""
    return lo.astype(np.float16).view(np.uint16).astype(np.uint32) | (
        hi.astype(np.float16).view(np.uint16).astype(np.uint32) << np.uint32(16))


def run(asm: str, args: dict[int, np.ndarray], memory: np.ndarray | None = None) -> dict[int, np.ndarray]:
    """Execute ``asm`` (a Triton inline-asm block) with input operands ``args`` ($n → uint32 or uint64 vector);
    ``memory`` is a uint32 array addressed in bytes for loads. Returns the written operands ($n → vector; fp32
    outputs as float32 values)."""
    regs: dict[str, np.ndarray] = {f"${k}": v for k, v in args.items()}

    def val(tok: str) -> np.ndarray:
        tok = tok.strip()
        if tok in regs:
            return regs[tok]
        n = next(iter(regs.values())).shape
        return np.full(n, int(tok, 0) & 0xFFFFFFFF, dtype=np.uint32)

    written: dict[int, np.ndarray] = {}
    for raw in asm.splitlines():
        line = raw.split("//")[0].strip().strip("{}").strip()
        if not line or line.startswith(".reg"):
            continue
        op, rest = line.rstrip(";").split(None, 1)
        if op == "mov.b32" and rest.startswith("{"):
            lo, hi, src = re.match(r"\{\s*(\w+),\s*(\w+)\s*\},\s*(\S+)", rest).groups()
            s = val(src)
            regs[lo], regs[hi] = s & 0xFFFF, s >> 16
            continue
        if op == "ld.global.nc.v4.b32":
            dst, base, off = re.match(r"\{([^}]*)\},\s*\[\s*(\$\d+)\s*\+\s*(\d+)\s*\]", rest).groups()
            addr = (val(base).astype(np.int64) + int(off)) // 4
            for i, d in enumerate(t.strip() for t in dst.split(",")):
                regs[d] = memory[addr + i].astype(np.uint32)
            continue
        ops = [t.strip() for t in rest.split(",")]
        d, src = ops[0], ops[1:]
        if op == "lop3.b32":
            r = _lop3(val(src[0]), val(src[1]), val(src[2]), int(src[3], 0))
        elif op == "shr.u32":
            r = val(src[0]) >> np.uint32(int(src[1]))
        elif op == "shl.b32":
            r = (val(src[0]).astype(np.uint64) << np.uint64(int(src[1]))).astype(np.uint32)
        elif op == "prmt.b32":
            r = _prmt(val(src[0]), val(src[1]), int(src[2], 0))
        elif op in ("sub.rn.f16x2", "mul.rn.f16x2", "fma.rn.f16x2"):
            (a0, a1), (b0, b1) = _lanes(val(src[0])), _lanes(val(src[1]))
            if op == "sub.rn.f16x2":
                r = _pack(a0 - b0, a1 - b1)
            elif op == "mul.rn.f16x2":
                r = _pack(a0 * b0, a1 * b1)
            else:
                c0, c1 = _lanes(val(src[2]))
                r = _pack(a0 * b0 + c0, a1 * b1 + c1)
        elif op == "cvt.f32.f16":
            r = (val(src[0]) & 0xFFFF).astype(np.uint16).view(np.float16).astype(np.float32)
        else:
            raise ValueError(f"instruction not emulated: {line}")
        regs[d] = r
        if m := _OPERAND.fullmatch(d):
            written[int(m.group(1))] = r
    return written
