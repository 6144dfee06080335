"""Where the kernel sources live: ``kernels/`` beside the package in a checkout, ``wct/kernels_src`` in a wheel."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from wct.errors import WCTError

_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "kernels_src",  # installed wheel: kernels/ shipped as wct/kernels_src
    Path(__file__).resolve().parents[2] / "kernels",  # source checkout / editable install
)


def source_dir() -> Path:
    """The folder holding ``owq_triton.py`` and the CUDA ``.cu``/``.cuh`` files."""
    for path in _CANDIDATES:
        if (path / "owq_triton.py").is_file():
            return path
    raise WCTError(
        f"wct kernel sources not found (looked in {', '.join(map(str, _CANDIDATES))}); "
        "reinstall wct so that its kernels/ folder ships with the package"
    )


def load_module(filename: str, name: str) -> ModuleType:
    """Import ``kernels/<filename>`` by path as ``name`` (``kernels`` is not an importable package: the name belongs
    to another PyPI distribution). Registered in ``sys.modules`` so Triton can read the kernels' source."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, source_dir() / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
