"""Shared fixtures: offline environment, tiny random models, the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before anything
# (bitsandbytes, peft, wct.kernels) imports triton, so it is set here rather than in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wct.nn.owq_linear import OWQLinear  # noqa: E402 (after TRITON_INTERPRET is chosen)
from wct.pack import pack_linear  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the checkout; tests that need it skip when it is absent (a user's fresh clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rtn_pack(model, bits: int, group: int = -1, n_weak: dict | None = None):
    """Round-to-nearest min-max quantize every block linear in place (weak = the first columns by norm)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    for i, (name, lin) in enumerate(linears):
        w = lin.weight.detach().double()
        n, k = w.shape
        g = k if group == -1 else group
        k_o = (n_weak or {}).get(name.rsplit(".", 1)[1], 2 * (i % 3))
        idx = w.norm(dim=0).argsort(descending=True)[:k_o]
        wg = w.reshape(n, k // g, g)
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        s = ((hi - lo) / (2**bits - 1)).half().double()
        z = torch.clamp(torch.round(-lo / s), 0, 2**bits - 1)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, 2**bits - 1)
        fq = (s[..., None] * (q - z[..., None])).reshape(n, k)
        fq[:, idx] = w[:, idx]
        packed = pack_linear(fq, s.t(), z.t(), idx, bits, lin.bias)
        model.set_submodule(name, OWQLinear.from_packed(packed, bits, k))
    model.config.quantization_config = {"method": "rtn", "bits": bits, "target_bit": None}
    return model


@pytest.fixture
def kernel_config():
    """Restore wct.kernels' configuration (backend, dense-cache policy) and empty its caches after the test."""
    import wct.kernels as kernels

    saved = dict(kernels._config)
    yield
    kernels._config.update(saved)
    kernels.clear_cache()


@pytest.fixture
def rtn_pack():
    """``rtn_pack(model, bits, group=-1, n_weak=None)``: :func:`_rtn_pack`, a packed model built without the OWQ
    driver (for checkpoint and loader tests)."""
    return _rtn_pack
