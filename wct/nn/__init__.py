"""Neural-network modules of wct."""

from wct.nn.owq_linear import OWQLinear

__all__ = ["OWQLinear"]
