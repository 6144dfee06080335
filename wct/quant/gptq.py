"""GPTQ/OPTQ for one linear layer with OWQ's weak columns permuted last (docs/algorithm.md §1.4, §1.6, §1.8).

Notation: W is [N = out, K = in], X the layer inputs, H = (2/N_seq)·Σ x xᵀ [K, K]. Quantizing column c to q_c
and letting the not-yet-quantized columns F absorb the error is the OBS step

    δ_F = -(w_c - q_c) / [H_F⁻¹]_cc · [H_F⁻¹]_{c,F}

which GPTQ evaluates for all columns at once from the upper Cholesky factor U of H⁻¹ (H⁻¹ = UᵀU):
row c of U, divided by U_cc, is exactly [H_F⁻¹]_{c,F} / [H_F⁻¹]_cc for F = columns after c.

OWQ keeps n_o "weak" columns in FP16. They are permuted to the end and never quantized, but they are in F for
every quantized column, so they absorb the compensation of all of them and end at their updated values. That is
GPTQ on the Schur complement H_NN - H_NO H_OO⁻¹ H_ON of the non-weak columns N, with the weak columns O at
W_O + (W_N - Q_N) H_NO H_OO⁻¹ (the optimum for free FP16 columns).
"""

from __future__ import annotations

import math

import torch

from wct.errors import WCTError
from wct.quant.linalg import inverse_cholesky_, permute_
from wct.quant.quantizer import fake_quantize, fit, round_scale

SLAB_ELEMS = 1 << 18  # elements per slab of the sensitivity's round-trip error and of each XᵀX product (1 MiB fp32)


class GPTQ:
    """Hessian accumulator and solver for one layer whose weight is ``weight`` [N, K] (not modified). ``H``: a
    Hessian to start from instead of zeros, which :meth:`solve` reads through a copy and never writes into. A
    Hessian this object made itself is consumed by :meth:`solve` in place (wct.quant.linalg) unless it was lent
    out with :meth:`share`."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32, H: torch.Tensor | None = None,
                 nsamples: int = 0) -> None:
        self.weight = weight.detach()
        self.rows, self.columns = weight.shape
        self.dtype = dtype
        self.H = torch.zeros(self.columns, self.columns, dtype=dtype, device=weight.device) if H is None else H
        self.nsamples = nsamples
        self.owns_H = H is None
        self.loss = 0.0  # Σ (w - q)² / U_cc² / 2 of the last solve (docs/algorithm.md §1.8 step 9)

    def share(self, weight: torch.Tensor) -> GPTQ:
        """A GPTQ for another layer that reads the same inputs: it starts from this Hessian (same bits as
        accumulating its own), and no solve of either writes into it."""
        self.owns_H = False
        return GPTQ(weight, self.dtype, H=self.H, nsamples=self.nsamples)

    def add_batch(self, x: torch.Tensor) -> None:
        """Fold the inputs ``x`` [..., K] of one forward call into H (docs/algorithm.md §1.4).

        A 3-D ``x`` counts x.shape[0] sequences, otherwise one. H stays the running mean
        H_n = n_old/n · H_old + (2/n)·XᵀX, i.e. H = (2/N_seq)·Σ_tokens x xᵀ once all sequences are in.
        """
        new = x.shape[0] if x.dim() > 2 else 1
        x = x.reshape(-1, self.columns).to(device=self.H.device, dtype=self.dtype)
        self.H *= self.nsamples / (self.nsamples + new)
        self.nsamples += new
        x = x * math.sqrt(2 / self.nsamples)
        # XᵀX a slab of H's rows at a time: no K x K temporary. Slabs start at multiples of 16 rows (64-byte
        # aligned columns of X); so cut, the CPU BLAS gives every row the bits of one whole product (odd offsets
        # take another kernel and round differently; tests/test_pack.py)
        step = max(16, SLAB_ELEMS // self.columns // 16 * 16)
        for r in range(0, self.columns, step):
            self.H[r:r + step] += x[:, r:r + step].t() @ x

    def sensitivity(
        self, bits: int, sym: bool = False, tuning: str = "mse", grid: int = 40, frob_norm: bool = True
    ) -> torch.Tensor:
        """s_j = H_jj · Σ_i (W_ij - RTN(W)_ij)² on the raw diagonal, or H_jj alone (docs/algorithm.md §1.6 steps 1-2).

        RTN(W) uses a temporary per-row quantizer fitted on the whole W (``grid`` = 40 for the MSE search).
        """
        d = torch.diagonal(self.H).clone()
        if not frob_norm:
            return d
        err = self.weight.to(self.dtype, copy=True)
        scale, zero = fit(err, bits, sym, tuning, grid)
        # W becomes (W - RTN(W))² a slab of rows at a time, in place: each row's quantizer is fitted already, so
        # one W-sized matrix holds both
        step = max(1, SLAB_ELEMS // max(1, err.shape[1]))
        for r in range(0, err.shape[0], step):
            w = err[r:r + step]
            w.copy_((w - fake_quantize(w, scale[r:r + step], zero[r:r + step], bits)).pow(2))
        return d * err.sum(0)

    @staticmethod
    def weak_columns(sensitivity: torch.Tensor, n: int) -> torch.Tensor:
        """The ``n`` most sensitive columns, sorted ascending, int32 (docs/algorithm.md §1.6 step 3)."""
        return torch.topk(sensitivity, n).indices.sort().values.to(torch.int32)

    def solve(
        self,
        weak_idx: torch.Tensor,
        bits: int,
        *,
        sym: bool = False,
        tuning: str = "mse",
        grid: int = 100,
        group_size: int = -1,
        group_grid: int = 40,
        percdamp: float = 0.01,
        blocksize: int = 128,
        act_order: bool = False,
        order_key: torch.Tensor | None = None,
        scale_dtype: torch.dtype | None = torch.float16,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize all columns but ``weak_idx`` with error feedback into every later column (docs/algorithm.md §1.8).

        Per row (``group_size`` -1 or K) the quantizer is fitted once on the non-weak columns with ``grid`` steps.
        With groups, the group of original column k is k // G; its parameters are fitted (``group_grid`` steps) on
        its non-weak columns, either when the solve reaches its first column (values updated up to the last block
        boundary, as GPTQ) or, with ``act_order``, all up front on the starting W ("static groups"), so every group
        has one (scale, zero) and the result packs. ``act_order`` quantizes the non-weak columns by descending
        ``order_key`` (OWQ: sensitivity; default: diag H). Scales are rounded to ``scale_dtype`` (the storage
        dtype) before use, so the compensation sees the grid that will be stored.

        Returns the fake-quantized weight [N, K] (weak columns at their updated values), scales [K/G, N] and
        integer zeros [K/G, N] (int64), all in the original column order.
        """
        rows, cols = self.rows, self.columns
        G = cols if group_size in (-1, 0) else group_size
        if cols % G:
            raise WCTError(f"group_size={group_size} does not divide in_features={cols}; pick a divisor or -1")
        weak = weak_idx.to(device=self.H.device, dtype=torch.long)
        is_weak = torch.zeros(cols, dtype=torch.bool, device=self.H.device)
        is_weak[weak] = True
        n_q = cols - weak.numel()  # columns that get quantized

        # 1. permutation: non-weak columns (original order, or by descending key with act-order), weak ones last
        keep = (~is_weak).nonzero().squeeze(1)
        if act_order:
            key = torch.diagonal(self.H) if order_key is None else order_key.to(self.H.device)
            keep = keep[torch.argsort(key[keep], descending=True, stable=True)]
        perm = torch.cat([keep, weak])
        W = self.weight.index_select(1, perm).to(self.dtype)  # a copy (in the weight's dtype, then widened)
        # the solve consumes the Hessian: its own in place, a shared one through one permuted copy
        H = permute_(self.H, perm) if self.owns_H else permute_(self.H.index_select(0, perm), perm, rows=False)
        self.H = None
        group_of = perm // G  # group of each permuted position
        group_list = group_of.tolist()
        n_groups = cols // G
        scales = W.new_zeros(n_groups, rows)
        zeros = W.new_zeros(n_groups, rows)
        fitted = torch.zeros(n_groups, dtype=torch.bool)

        def fit_group(g: int, g_grid: int) -> None:
            members = ((group_of == g) & (torch.arange(cols, device=W.device) < n_q)).nonzero().squeeze(1)
            n = members.numel()
            run = n and int(members[-1] - members[0]) == n - 1  # a contiguous run (per row: all of W but the tail)
            s, z = fit(W[:, int(members[0]):int(members[0]) + n] if run else W[:, members], bits, sym, tuning, g_grid)
            scales[g], zeros[g] = round_scale(s, scale_dtype), z
            fitted[g] = True

        # 2. per row: fit on the non-weak columns of the (not yet dead-zeroed) weight
        if n_groups == 1:
            fit_group(0, grid)

        # 3. dead inputs never reach the layer: their weights are irrelevant, zero them and make H invertible
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        if n_groups > 1 and act_order:  # static groups on the starting weight
            for g in range(n_groups):
                fit_group(g, group_grid)

        # 4.-5. damping λ = percdamp·mean(diag H) over all columns, then U = upper Cholesky factor of H⁻¹
        torch.diagonal(H).add_(percdamp * torch.mean(torch.diagonal(H)))
        U = inverse_cholesky_(H)  # in H's storage on the CPU (docs/scale.md: memory of one layer's solve)
        del H
        if U is None:
            raise WCTError(
                f"the Hessian of a {rows}x{cols} layer is not positive definite even after damping "
                f"(percdamp={percdamp}); raise quant.percdamp (e.g. 0.1) or use more calibration samples")

        # 6. lazy blocks over the quantized columns; the trailing update also reaches the weak tail
        loss = torch.zeros((), dtype=self.dtype, device=W.device)
        # the lazy updates go a slab of columns at a time through one reused buffer: no W-sized product per block.
        # Each column's sum runs over the block's rows alone, and with slabs of a multiple of 16 columns the CPU
        # BLAS groups the columns as in one product, so the bits are the same (other widths are not: the narrow
        # remainders take another kernel; tests/test_gptq.py)
        step = max(16, SLAB_ELEMS // max(1, rows) // 16 * 16)
        update = W.new_empty(rows * min(step, cols))
        for i1 in range(0, n_q, blocksize):
            i2 = min(i1 + blocksize, n_q)
            W1 = W[:, i1:i2].clone()
            Err1 = torch.zeros_like(W1)
            U1 = U[i1:i2, i1:i2]
            for i in range(i2 - i1):
                g = group_list[i1 + i]
                if not fitted[g]:  # entering a new group: fit it on its columns of W as of the last block boundary
                    fit_group(g, group_grid)
                w, d = W1[:, i], U1[i, i]
                q = fake_quantize(w.unsqueeze(1), scales[g], zeros[g], bits).squeeze(1)
                err = (w - q) / d
                loss += (err**2).sum() / 2
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)  # OBS update of the block's later columns
                W1[:, i] = q
                Err1[:, i] = err
            W[:, i1:i2] = W1
            for c in range(i2, cols, step):  # lazy update of every later column
                e = min(c + step, cols)
                W[:, c:e] -= torch.matmul(Err1, U[i1:i2, c:e], out=update[:rows * (e - c)].view(rows, e - c))
        self.loss = float(loss)

        # 8. undo the permutation, a slab of rows at a time in place
        del U
        slab_rows = max(1, SLAB_ELEMS // cols)
        for r in range(0, rows, slab_rows):
            W[r:r + slab_rows, perm] = W[r:r + slab_rows].clone()
        return W, scales, zeros.to(torch.int64)
