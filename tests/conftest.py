"""Shared fixtures: offline environment, tiny random models, the shared data folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (make test: -n 2 on 2 cores) each worker computes on one thread: two workers of two OpenMP
# threads each on two cores wait on each other (3-5x slower). Subprocesses the tests start inherit it.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

# The development tools (scripts/gpu_check.py, scripts/ptx_budget.py, ...) are not in the installed package; their
# tests import them from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

# Without CUDA, Triton kernels run in Triton's interpreter on CPU tensors. It must be chosen before anything
# (bitsandbytes, peft, wct.kernels) imports triton, so it is set here rather than in the kernel tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from wct.nn.owq_linear import OWQLinear  # noqa: E402 (after TRITON_INTERPRET is chosen)
from wct.format.layout import pack_linear  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` (make test-slow) keep each ``xdist_group`` on one worker. pytest-xdist 3.8 marks a
    grouped test by appending ``@group`` to ``item._nodeid``, which pytest 9 no longer reads (a node id comes from
    ``Node._id``), so the groups were silently ignored and both workers built the SmolLM2 fixture (4 min each)."""
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodes import coerce_node_id

    for item in items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


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


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """A tiny OWQ base (4-bit, 4 weak columns per layer) saved as an owq-pack folder, built once per test run
    (tests only read it)."""
    from helpers import make_base

    return make_base(tmp_path_factory.mktemp("base") / "tiny-owq", seed=0)


@pytest.fixture(scope="session")
def base(base_dir) -> Path:
    """The same tiny OWQ base under the name the training tests use."""
    return base_dir


@pytest.fixture(scope="session")
def wct_run(base_dir, tmp_path_factory) -> Path:
    """A real 2-step WCT training run on the tiny base (its checkpoints/last.ckpt), run once per test run."""
    from helpers import train_config

    from wct.train import fit

    run_dir = tmp_path_factory.mktemp("run")
    fit(train_config(run_dir, f"model.quantized={base_dir}", "trainer.max_steps=2", "trainer.val_check_interval=2",
                     "trainer.validate_first=false", "optim.lr=1e-3"))
    return run_dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="session")
def smollm2_owq(shared_data, tmp_path_factory):
    """The real SmolLM2-135M quantized once per test run to OWQ 4.01 bits on 8 x 256 tokens of *Emma*: (the
    in-memory model, its report, its tokenizer, the saved owq-pack folder). Tests only read it. Every test using it
    is in the ``smollm2`` xdist group, so one worker builds it (make test-slow: --dist loadgroup)."""
    from wct.data.text import calibration_windows
    from wct.models import load_model
    from wct.checkpoint import save_quantized
    from wct.quant.config import QuantConfig
    from wct.quant.owq import quantize_model

    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, shared_data / "janeausten" / "emma.txt", n_samples=8, seqlen=256, seed=0)
    report = quantize_model(model, calib, QuantConfig(method="owq", bits=4, target_bit=4.01), progress=False)
    return model, report, tok, save_quantized(model, tok, tmp_path_factory.mktemp("smol") / "owq-4.01")


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


def _tiny_owq_base(folder: Path, calib_seed: int = 0) -> Path:
    """tiny-llama quantized with OWQ (4 bits, 4 weak columns per layer) on seeded random calibration tokens and saved
    as an owq-pack folder whose tokenizer carries tests/fixtures/tiny_chat.jinja; another ``calib_seed`` gives
    another base (other packed weights, another fingerprint)."""
    from wct.models import load_model
    from wct.checkpoint import save_quantized
    from wct.quant.owq import quantize_model

    model, tok = load_model("tiny-llama")
    calib = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(calib_seed))
    quantize_model(model, calib, bits=4, target_rank=4, progress=False)
    tok.chat_template = (Path(__file__).parent / "fixtures" / "tiny_chat.jinja").read_text()
    return save_quantized(model, tok, folder)


def _weak_delta(base_dir: Path, out: Path, scale: float, seed: int) -> Path:
    """A weak-column delta of ``base_dir`` written with the public delta API: every layer's weak columns plus
    ``scale``·N(0, 1) noise (seeded), as a fine-tune of the weak columns would leave them."""
    from wct.delta import delta_tensors, owq_layers, packed_fingerprint, write_delta
    from wct.checkpoint import load_quantized

    model, _ = load_quantized(base_dir)
    g = torch.Generator().manual_seed(seed)
    weak = {n: m.weak_weight.detach().float() + scale * torch.randn(m.weak_weight.shape, generator=g)
            for n, m in owq_layers(model).items() if m.n_weak}
    return write_delta(out, delta_tensors(model, weak, {}, {}), packed_fingerprint(model), str(base_dir),
                       {"made_by": "tests/conftest.py"}, {})


@pytest.fixture(scope="session")
def tiny_owq_base():
    """``tiny_owq_base(folder, calib_seed=0)``: :func:`_tiny_owq_base`."""
    return _tiny_owq_base


@pytest.fixture(scope="session")
def weak_delta():
    """``weak_delta(base_dir, out, scale, seed)``: :func:`_weak_delta`."""
    return _weak_delta
