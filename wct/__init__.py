"""wct: weak column tuning of OWQ-quantized large language models.

Notebook API (no Hydra needed)::

    import wct
    model, tok = wct.load_model("smollm2-135m")
    report = wct.quantize_model(model, calib_ids, bits=3, target_bit=3.01)
    wct.save_quantized(model, tok, "out/smollm2-owq-3.01")
    model, tok = wct.load_quantized("out/smollm2-owq-3.01")
    # or, the same model: transformers.AutoModelForCausalLM.from_pretrained("out/smollm2-owq-3.01")
"""

from __future__ import annotations

import importlib

from wct.hf import register as _register_with_transformers
from wct.nn.owq_linear import OWQLinear
from wct.quant.config import QuantConfig

_register_with_transformers()  # from_pretrained(owq_folder) after `import wct` (docs/interop.md)

_LAZY = {  # heavy modules (transformers, datasets) load on first use
    "quantize_model": "wct.quant.owq",
    "QuantReport": "wct.quant.owq",
    "save_quantized": "wct.checkpoint",
    "load_quantized": "wct.checkpoint",
    "load_model": "wct.loading",
    "apply_delta": "wct.delta",
}

__all__ = ["OWQLinear", "QuantConfig", *_LAZY]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        attr = "load_any" if name == "load_model" else name
        return getattr(importlib.import_module(_LAZY[name]), attr)
    raise AttributeError(f"module 'wct' has no attribute {name!r}")
