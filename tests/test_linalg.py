"""wct.quant.linalg: the in-place permutation and inverse Cholesky factor against torch's out-of-place chain."""

import pytest
import torch

from wct.quant import linalg
from wct.quant.linalg import in_place_ok, inverse_cholesky_, permute_


def hessian(k: int, dtype: torch.dtype, seed: int = 0, asymmetric: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * k, k, generator=g, dtype=dtype)
    h = x.t() @ x / k
    if asymmetric:  # accumulated in slabs, H need not be bitwise symmetric: torch factors its lower triangle
        h = h + torch.triu(torch.randn(k, k, generator=g, dtype=dtype), 1) * 1e-4
    return h + 0.01 * torch.eye(k, dtype=dtype)


def torch_chain(h: torch.Tensor) -> torch.Tensor:
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [7, 300])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_inverse_cholesky_in_place_has_the_bits_of_torchs_chain(dtype, k, asymmetric, monkeypatch):
    monkeypatch.setattr(linalg, "SLAB_ELEMS", 5 * k)  # several mirror slabs, one ragged
    h = hessian(k, dtype, asymmetric=asymmetric)
    ref = torch_chain(h)
    work = h.clone()
    assert in_place_ok(work)
    u = inverse_cholesky_(work)
    assert u.data_ptr() == work.data_ptr()  # no K x K result of its own
    assert torch.equal(torch.triu(u), ref) and u.stride() == ref.stride()
    # and the factor is right: Uᵀ U = H⁻¹ for the H of h's lower triangle, against float64
    lower = torch.tril(h.double())
    u64 = torch.triu(u).double()
    assert torch.allclose(u64.t() @ u64, torch.linalg.inv(lower + torch.tril(lower, -1).t()), rtol=1e-3 if dtype == torch.float32 else 1e-9,
                          atol=1e-4 if dtype == torch.float32 else 1e-10)


def test_inverse_cholesky_reports_an_indefinite_matrix():
    assert inverse_cholesky_(-torch.eye(5)) is None
    view = torch.zeros(5, 10)[:, ::2]  # the out-of-place path
    view.copy_(-torch.eye(5))
    assert inverse_cholesky_(view) is None


def test_out_of_place_path_matches_torch():
    h = hessian(40, torch.float32)
    view = torch.empty(40, 80)[:, ::2]  # a non-contiguous matrix takes the torch path
    view.copy_(h)
    assert not in_place_ok(view)
    assert torch.equal(inverse_cholesky_(view), torch_chain(h))


@pytest.mark.parametrize("rows", [True, False])
def test_permute_in_place_equals_indexing(rows, monkeypatch):
    monkeypatch.setattr(linalg, "SLAB_ELEMS", 3 * 50)
    h = hessian(50, torch.float32, asymmetric=True)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(1))
    start = h.clone() if rows else h[perm]
    out = permute_(start, perm, rows=rows)
    assert out.data_ptr() == start.data_ptr()
    assert torch.equal(out, h[perm][:, perm])
