"""The packed layout of the reference OWQ code (``QuantLinear.qweight``, docs/owq-pack.md §2.2), read into codes
that :func:`wct.format.layout.pack_codes` turns into owq-pack v1 planes (:func:`wct.checkpoint.import_reference`)."""

from __future__ import annotations

import torch


def unpack_reference_codes(qweight: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Codes [K, N] of a reference ``QuantLinear.qweight`` [K/32·b, N] (docs/owq-pack.md §2.2).

    Both layouts are little-endian bit streams of 32 codes per b words: code i of a run of 32 occupies stream bits
    [b·i, b·i + b), so 4-bit is 8 codes per word and 3-bit straddles words at codes 10 and 21.
    """
    n = qweight.shape[1]
    words = (qweight.to(torch.int64) & 0xFFFFFFFF).view(in_features // 32, bits, n)
    codes = torch.empty(in_features // 32, 32, n, dtype=torch.int64)
    for i in range(32):
        w, off = divmod(bits * i, 32)
        c = words[:, w] >> off
        if off + bits > 32:
            c = c | (words[:, w + 1] << (32 - off))
        codes[:, i] = c & ((1 << bits) - 1)
    return codes.view(in_features, n)
