"""Quantization recipe (the ``quant`` config group), validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

from wct.errors import WCTError
from wct.format.layout import SUPPORTED_BITS


@dataclass
class QuantConfig:
    """One OWQ / GPTQ / RTN recipe (docs/algorithm.md §1.9 defaults).

    method: "owq" (weak columns + GPTQ), "gptq" (no weak columns), "rtn" (round to nearest). ``tuning`` picks the
    quantizer for every method: "mse" (the |e|^2.4 clipping search; the Python default) or "minmax" (what the
    reference code uses for plain GPTQ/RTN: the ``gptq-*`` / ``rtn-*`` presets set it; docs/algorithm.md §2).
    Weak-column count from ``target_bit`` (docs/algorithm.md §1.5) or ``target_rank``.
    """

    method: str = "owq"
    bits: int = 4
    target_bit: float | None = None
    target_rank: int | None = None
    group_size: int = -1
    sym: bool = False
    tuning: str = "mse"  # "mse" (|e|^2.4 clipping search) or "minmax"
    grid: int = 100  # step-size grid of the main per-row MSE search
    sens_grid: int = 40  # grid of the sensitivity pre-pass and of group refits
    frob_norm: bool = True  # sensitivity H_jj * ||dW_:,j||^2 (False: H_jj alone)
    percdamp: float = 0.01
    blocksize: int = 128
    act_order: bool = False
    true_sequential: bool = False
    layers: list[str] | None = None  # short layer-type names to give weak columns (None: all)
    budget: str = "layer"  # "layer": per-layer counts (§1.5); "global": the same total ranked over all layers
    name: str = ""  # label used in run and output names, e.g. "owq-w3-t3.01"

    def __post_init__(self) -> None:
        if self.method not in ("owq", "gptq", "rtn"):
            raise WCTError(f"quant.method={self.method!r} is unknown; use owq, gptq or rtn")
        if self.bits not in SUPPORTED_BITS:
            raise WCTError(f"quant.bits={self.bits} is not supported; use one of {SUPPORTED_BITS} (3 or 4 for OWQ)")
        if self.tuning not in ("mse", "minmax"):
            raise WCTError(f"quant.tuning={self.tuning!r} is unknown; use mse or minmax")
        if self.target_bit is not None and self.target_rank is not None:
            raise WCTError("set either quant.target_bit or quant.target_rank, not both")
        if self.target_bit is not None and not (self.bits <= self.target_bit < self.bits + 1):
            raise WCTError(
                f"quant.target_bit={self.target_bit} must lie in [bits, bits+1) = [{self.bits}, {self.bits + 1}) "
                f"for bits={self.bits}; e.g. target_bit={self.bits}.01"
            )
        if self.target_rank is not None and self.target_rank < 0:
            raise WCTError(f"quant.target_rank={self.target_rank} must be >= 0")
        if self.method != "owq" and (self.target_bit not in (None, float(self.bits)) or self.target_rank):
            raise WCTError(f"quant.method={self.method} keeps no weak columns; drop target_bit/target_rank or use owq")
        if self.budget not in ("layer", "global"):
            raise WCTError(f"quant.budget={self.budget!r} is unknown; use layer (per-layer counts) or global")
        if self.group_size != -1 and self.group_size < 1:
            raise WCTError(f"quant.group_size={self.group_size} must be -1 (per row) or a positive group width")
        for key in ("grid", "sens_grid", "blocksize"):
            if getattr(self, key) < 1:
                raise WCTError(f"quant.{key}={getattr(self, key)} must be >= 1")
        if not 0 <= self.percdamp < 1:
            raise WCTError(f"quant.percdamp={self.percdamp} must lie in [0, 1) (a fraction of the mean diag(H))")
        if not self.name:
            self.name = self.default_name()

    def default_name(self) -> str:
        return recipe_name(self.method, self.bits, self.target_bit, self.target_rank, self.group_size, self.budget)


def recipe_name(method: str, bits: int, target_bit: float | None, target_rank: int | None, group_size: int,
                budget: str = "layer") -> str:
    """The label of a recipe in run and output names, e.g. ``owq-w3-t3.01``, ``owq-w3-k8``, ``gptq-w4-g64``,
    ``owq-w4-t4.01-global``."""
    tag = f"{method}-w{bits}"
    if target_bit is not None:
        tag += f"-t{target_bit:g}"
    if target_rank is not None:
        tag += f"-k{target_rank}"
    if group_size > 0:
        tag += f"-g{group_size}"
    if budget == "global":
        tag += "-global"
    return tag
