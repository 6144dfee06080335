"""wct: weak column tuning of OWQ-quantized large language models."""

from wct.nn.owq_linear import OWQLinear

__all__ = ["OWQLinear"]
__version__ = "0.1.0"
