"""owq-pack v1: bit-plane packing of low-bit codes along the input dimension.

A layer's weight W is [N = out, K = in]. Its integer codes are handled here as a [K, N] matrix (GPTQ orientation:
K packed, N contiguous). A code of b bits is split into power-of-two bit planes so that no code straddles an
int32 word:

    bits 4 -> one plane of width 4            (``qweight``; bit-identical to GPTQ/OWQ 4-bit ``qweight``)
    bits 3 -> a 2-bit plane (code bits 0-1)   (``qweight_lo``)
              and a 1-bit plane (code bit 2)  (``qweight_hi``)
    bits 2 -> one plane of width 2            (``qweight``)

A plane of width w is int32 [ceil(K / 32) * w, N]: element k sits in row k // (32 / w) at bit offset
(k % (32 / w)) * w. K is padded with zero codes up to a multiple of 32; unpacking returns the first K rows.

Dequantization (per group g = k // G of G input columns):  W[n, k] = scales[g, n] * (code[k, n] - zeros[g, n]).
Codes at weak columns equal the zero-point, so the dense part is exactly 0 there and the weak columns come only
from ``weak_weight`` [n_o, N].
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4)
PACK_CHUNK_ELEMS = 1 << 17  # codes packed at a time: int64 temporaries of 1 MiB, below the mmap threshold streaming sets
DEQUANT_CHUNK_ELEMS = 1 << 20  # codes dequantized at a time: fp32 temporaries of 4 MiB (fewer, faster steps)
FORMAT_VERSION = 1


def plane_layout(bits: int) -> tuple[tuple[str, int, int], ...]:
    """(tensor name, plane width, bit offset of the plane inside the code) for each plane of a ``bits``-bit code."""
    if bits == 4:
        return (("qweight", 4, 0),)
    if bits == 3:
        return (("qweight_lo", 2, 0), ("qweight_hi", 1, 2))
    if bits == 2:
        return (("qweight", 2, 0),)
    raise ValueError(f"bits={bits} is not supported: owq-pack v1 packs {SUPPORTED_BITS}-bit codes. Use bits=3 or bits=4.")


def padded_k(k: int) -> int:
    """K rounded up to the 32 codes that fill one word of the 1-bit plane (every plane then has whole words)."""
    return (k + 31) // 32 * 32


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret int64 values in [0, 2^32) as two's-complement int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Pack integer codes [K, N] in [0, 2^bits) into the planes of ``plane_layout(bits)``."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [K, N], got shape {tuple(codes.shape)}")
    k, n = codes.shape
    c = codes.to(torch.int64)
    if c.numel() and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    kp = padded_k(k)
    if kp != k:
        c = torch.cat([c, c.new_zeros(kp - k, n)])
    planes = {}
    for name, width, offset in plane_layout(bits):
        per_word = 32 // width
        field = (c >> offset) & ((1 << width) - 1)  # [Kp, N]
        field = field.view(kp // per_word, per_word, n)
        shifts = torch.arange(per_word, dtype=torch.int64, device=c.device).view(1, per_word, 1) * width
        planes[name] = _to_int32((field << shifts).sum(dim=1))
    return planes


def unpack_codes(planes: dict[str, torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: int32 codes [K, N]; also from the 3-bit kernel words (``{WORDS3: words}``, the
    layout a 3-bit layer holds on the triton and cuda backends, :func:`kernel_words3`)."""
    if WORDS3 in planes:
        return words3_codes(planes[WORDS3], k)
    codes = None
    for name, width, offset in plane_layout(bits):
        words = planes[name]
        per_word = 32 // width
        shifts = torch.arange(per_word, dtype=torch.int32, device=words.device).view(1, per_word, 1) * width
        field = (words.unsqueeze(1) >> shifts) & ((1 << width) - 1)  # [rows, per_word, N]
        field = field.reshape(-1, words.shape[-1])[:k] << offset
        codes = field if codes is None else codes | field
    return codes


def dequantize_dense(
    planes: dict[str, torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense low-bit part as a contiguous [N, K] in ``dtype``: s·(code − z) (exactly 0 at weak columns, whose
    codes equal the zero-point).

    Built a slab of output columns at a time into the result (``DEQUANT_CHUNK_ELEMS`` codes per slab), so besides the
    result only one slab's codes and floats are alive; elementwise, so the bits do not depend on the slab."""
    out_features = scales.shape[1]
    groups = scales.shape[0]
    group = in_features // groups
    out = torch.empty(out_features, in_features, dtype=dtype, device=scales.device)
    step = max(1, DEQUANT_CHUNK_ELEMS // max(1, in_features))
    for n in range(0, out_features, step):
        sl = slice(n, n + step)
        w = unpack_codes({k: p[:, sl] for k, p in planes.items()}, bits, in_features).to(dtype)  # [K, n]
        w.view(groups, group, -1).sub_(zeros[:, sl].to(dtype).unsqueeze(1)).mul_(scales[:, sl].to(dtype).unsqueeze(1))
        out[sl] = w.t()
    return out


def dequantize_full(
    planes: dict[str, torch.Tensor],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    weak_idx: torch.Tensor,
    weak_weight: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """W_full [N, K]: the dense part with the weak columns (``weak_weight`` [n_o, N]) written in."""
    w = dequantize_dense(planes, scales, zeros, bits, in_features, dtype)
    if weak_idx.numel():
        w[:, weak_idx.long()] = weak_weight.to(dtype).t()
    return w


def pack_linear(
    weight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    weak_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
    weak_dtype: torch.dtype = torch.float16,
    scale_dtype: torch.dtype = torch.float16,
) -> dict[str, torch.Tensor]:
    """Pack a fake-quantized weight [N, K] (grid values off the weak columns, free values on them).

    ``scales``/``zeros`` are [K/G, N] (G = group size; one row for per-row quantization). Codes are recovered as
    round(W / s) + z (docs/owq-pack.md §3), clamped to the code range; weak columns are set to the zero-point.
    Returns the owq-pack v1 tensors of one layer.
    """
    n, k = weight.shape
    if k % scales.shape[0]:
        raise ValueError(f"{scales.shape[0]} groups do not divide in_features={k}")
    group = k // scales.shape[0]
    idx = weak_idx.to(torch.int64).sort().values
    parts = []
    for a in range(0, n, max(1, PACK_CHUNK_ELEMS // k)):  # output columns are independent: pack slabs of them
        b = min(n, a + max(1, PACK_CHUNK_ELEMS // k))
        w = weight.detach()[a:b].to(torch.float32).t()  # [K, n_slab]
        s = scales[:, a:b].to(scale_dtype).to(torch.float32).repeat_interleave(group, dim=0)
        z = zeros[:, a:b].to(torch.float32).repeat_interleave(group, dim=0)
        codes = torch.clamp(torch.round(w / s) + z, 0, 2**bits - 1)
        if idx.numel():
            codes[idx] = z[idx]
        parts.append(pack_codes(codes.to(torch.int64), bits))
    out = {name: torch.cat([p[name] for p in parts], dim=1) if len(parts) > 1 else parts[0][name]
           for name in parts[0]} if parts else pack_codes(torch.zeros(k, 0, dtype=torch.int64), bits)
    out["scales"] = scales.to(scale_dtype).contiguous()
    out["zeros"] = zeros.to(torch.uint8).contiguous()
    out["weak_idx"] = idx.to(torch.int32).contiguous()
    out["weak_weight"] = weight.detach()[:, idx].t().to(weak_dtype).contiguous()  # [n_o, N]
    if bias is not None:
        out["bias"] = bias.detach().clone()
    return out


def stored_bits(n: int, k: int, bits: int, groups: int, n_o: int, weak_bits: int = 16) -> float:
    """True stored bits per weight of one packed layer: codes (incl. weak placeholders and K padding),
    16-bit scales, 8-bit zeros, 32-bit indices and the FP16 weak columns, divided by N*K."""
    total = padded_k(k) * n * bits + groups * n * (16 + 8) + n_o * 32 + n_o * n * weak_bits
    return total / (n * k)


KERNEL3_CHUNK = 1 << 22  # codes converted at a time by kernel_words3 (bounds its temporaries: ~100 MB)
WORDS3 = "qweight_w3"  # a 3-bit layer's tensor of kernel words when it holds them in place of the v1 planes
LAYOUTS = ("v1", "words3")  # how a layer holds its codes: the owq-pack v1 planes, or (3 bits) the kernel words


def code_names(bits: int, layout: str = "v1") -> tuple[str, ...]:
    """The names of the code tensors of a ``bits``-bit layer held in ``layout``, in order."""
    if layout == "words3":
        if bits != 3:
            raise ValueError(f"the words3 layout holds 3-bit codes, not {bits}-bit ones")
        return (WORDS3,)
    if layout != "v1":
        raise ValueError(f"layout={layout!r} is not a code layout; choose one of {', '.join(LAYOUTS)}")
    return tuple(name for name, _, _ in plane_layout(bits))


def named_codes(tensors: list[torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """The code tensors a backend gets (a list) by name: one tensor at 3 bits is the kernel words, two the planes."""
    return dict(zip(code_names(bits, "words3" if holds_words3(tensors, bits) else "v1"), tensors))


def holds_words3(tensors: list[torch.Tensor], bits: int) -> bool:
    """Whether a backend's code tensors are the 3-bit kernel words (one tensor) rather than the v1 planes (two)."""
    return bits == 3 and len(tensors) == 1


def kernel_words3(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The 3-bit words the fast GEMV kernels read, converted from the owq-pack v1 planes ``qweight_lo`` [Kp/16, N]
    and ``qweight_hi`` [Kp/32, N]: int32 [Kp/32 · 3, N] on the planes' device (docs/kernels.md "3-bit words").

    Never stored: owq-pack v1 stays the format; the backends build this once per layer (wct.kernels.dispatch).
    Per 32-row block b and column n, word j = row 3b + j (j = 0, 1, 2); lane l (the low half for l = 0, the high
    half for l = 1) holds the codes of rows 16l + 5j + i at bits 16l + 3i (i < 5), and bit j of the code of row
    16l + 15 at bit 16l + 15. So lanes pair rows (p, p + 16): p = 5j + i in the slots, p = 15 in the spare bits.
    """
    kp, n = lo.shape[0] * 16, lo.shape[1]
    out = torch.empty(kp // 32 * 3, n, dtype=torch.int32, device=lo.device)
    step = max(1, KERNEL3_CHUNK // max(kp, 1))
    slot = (torch.arange(5, device=lo.device) * 3).view(1, 1, 1, 5, 1)
    bit = torch.arange(3, device=lo.device).view(1, 1, 3, 1)
    for n0 in range(0, n, step):
        cols = slice(n0, n0 + step)
        codes = unpack_codes({"qweight_lo": lo[:, cols], "qweight_hi": hi[:, cols]}, 3, kp).to(torch.int64)
        c = codes.view(kp // 32, 2, 16, -1)  # [block, lane, row in lane, column]
        main = (c[:, :, :15].reshape(kp // 32, 2, 3, 5, -1) << slot).sum(3)  # [block, lane, word, column]
        spare = ((c[:, :, 15].unsqueeze(2) >> bit) & 1) << 15
        half = main | spare
        out[:, cols] = _to_int32(half[:, 0] | (half[:, 1] << 16)).reshape(kp // 32 * 3, -1)
    return out


def words3_codes(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`kernel_words3` as codes: int32 [K, N] from the words [Kp/32 · 3, N] (rows past ``k`` are
    padding and dropped). Lane l of word j holds rows 16l + 5j + i at bits 16l + 3i (i < 5), and bit j of row
    16l + 15 at bit 16l + 15."""
    n = words.shape[1]
    w = words.view(-1, 3, n)  # [block, word, column]
    lanes = []
    for lane in range(2):
        half = (w >> (16 * lane)) & 0xFFFF
        main = (half.unsqueeze(2) >> (torch.arange(5, device=w.device) * 3).view(1, 1, 5, 1)) & 7  # [b, 3, 5, N]
        spare = (((half >> 15) & 1) << torch.arange(3, device=w.device).view(1, 3, 1)).sum(1, keepdim=True)
        lanes.append(torch.cat([main.reshape(-1, 15, n), spare.to(main.dtype)], dim=1))  # rows 0-15 of the lane
    return torch.stack(lanes, dim=1).reshape(-1, n)[:k]


def planes_from_words3(words: torch.Tensor) -> dict[str, torch.Tensor]:
    """The owq-pack v1 planes ``qweight_lo`` and ``qweight_hi`` of the 3-bit kernel words (inverse of
    :func:`kernel_words3`, bit for bit), converted ``KERNEL3_CHUNK`` codes at a time."""
    kp, n = words.shape[0] // 3 * 32, words.shape[1]
    out = {"qweight_lo": torch.empty(kp // 16, n, dtype=torch.int32, device=words.device),
           "qweight_hi": torch.empty(kp // 32, n, dtype=torch.int32, device=words.device)}
    step = max(1, KERNEL3_CHUNK // max(kp, 1))
    for n0 in range(0, n, step):
        cols = slice(n0, n0 + step)
        for name, plane in pack_codes(words3_codes(words[:, cols], kp), 3).items():
            out[name][:, cols] = plane
    return out
