"""OWQLinear: a linear layer stored in owq-pack v1 whose only trainable tensor is ``weak_weight``.

    y = deq(W_q) · x + W_o · x[idx] + b

deq(W_q) is exactly 0 at the weak columns ``idx`` (their codes equal the zero-point), W_o = ``weak_weight`` [n_o, N]
holds those columns in 16-bit (fp32 master copy while training). The packed planes, scales and zeros are frozen
parameters (``requires_grad=False``; integer planes and zeros cannot require a gradient anyway), so sharded data
parallelism (FSDP2 ``fully_shard``, :mod:`wct.training.sharding`) shards them instead of replicating them as it
does buffers; the weak-column indices and the bias are buffers. The state_dict keys are the same either way. The
product is computed by :func:`wct.kernels.owq_linear`, which dispatches to a backend.

A 3-bit layer holds its codes in one of two layouts (``layout``, :meth:`OWQLinear.to_layout`): the v1 planes
``qweight_lo``/``qweight_hi``, or the kernel words ``qweight_w3`` that the triton and cuda GEMVs read
(docs/kernels.md "3-bit words"), which the dispatcher converts to in place of the planes. Both are 3/8 byte per
weight. The state_dict always holds the v1 planes (converted back for the call), so a save is owq-pack v1, bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from wct.format.layout import (
    WORDS3, code_names, dequantize_full, kernel_words3, padded_k, plane_layout, planes_from_words3,
)


def frozen(t: torch.Tensor) -> nn.Parameter:
    """``t`` as a parameter that never trains."""
    return nn.Parameter(t, requires_grad=False)


class OWQLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding an OWQ-packed weight."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        n_weak: int,
        bias: bool,
        dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        group = in_features if group_size in (-1, 0, None) else group_size
        if in_features % group:
            raise ValueError(
                f"group_size={group_size} does not divide in_features={in_features}; "
                "choose a group size that divides every layer's input width, or -1 for per-row quantization"
            )
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group
        kp = padded_k(in_features)
        for name, width, _ in plane_layout(bits):
            self.register_parameter(name, frozen(torch.zeros(kp * width // 32, out_features, dtype=torch.int32,
                                                             device=device)))
        self.scales = frozen(torch.ones(in_features // group, out_features, dtype=dtype, device=device))
        self.zeros = frozen(torch.zeros(in_features // group, out_features, dtype=torch.uint8, device=device))
        self.register_buffer("weak_idx", torch.zeros(n_weak, dtype=torch.int32, device=device))
        self.weak_weight = nn.Parameter(torch.zeros(n_weak, out_features, dtype=dtype, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, packed: dict[str, torch.Tensor], bits: int, in_features: int) -> "OWQLinear":
        """Build a layer from the tensors returned by :func:`wct.format.layout.pack_linear`."""
        out_features = packed["scales"].shape[1]
        group = in_features // packed["scales"].shape[0]
        layer = cls(
            in_features,
            out_features,
            bits,
            group,
            packed["weak_idx"].numel(),
            bias="bias" in packed,
            dtype=packed["weak_weight"].dtype,
            device=packed["scales"].device,
        )
        layer.load_state_dict(packed, strict=True)
        return layer

    def set_tensor(self, name: str, t: torch.Tensor) -> None:
        """Replace tensor ``name`` by ``t`` as what it is: the weak columns a parameter that trains when floating,
        the packed tensors frozen parameters, the others buffers (loaders that fill a meta-device layer)."""
        if name == "weak_weight":
            self.weak_weight = nn.Parameter(t, requires_grad=t.is_floating_point())
        elif name in self._parameters:
            self._parameters[name] = frozen(t)
        else:
            self._buffers[name] = t

    @property
    def layout(self) -> str:
        """How the codes are held: ``v1`` (the owq-pack planes) or ``words3`` (3 bits: the kernel words)."""
        return "words3" if WORDS3 in self._parameters else "v1"

    @property
    def planes(self) -> dict[str, torch.Tensor]:
        """The code tensors in the layout held (the v1 planes, or ``{qweight_w3: words}``)."""
        return {name: getattr(self, name) for name in code_names(self.bits, self.layout)}

    def to_layout(self, layout: str) -> None:
        """Hold the codes in ``layout`` (one of ``wct.format.layout.LAYOUTS``) in place of the current one: the new tensors are built,
        then the old ones dropped, so one layer's codes are held twice only during the call. Bit-exact both ways."""
        code_names(self.bits, layout)  # refuses an unknown layout, and words3 at widths other than 3
        if layout == self.layout:
            return
        with torch.inference_mode(False), torch.no_grad():  # an inference tensor could not be saved for a backward
            if layout == "words3":
                new = {WORDS3: kernel_words3(self.qweight_lo, self.qweight_hi)}
            else:
                new = planes_from_words3(getattr(self, WORDS3))
        rest = {k: v for k, v in self._parameters.items() if k not in self.planes}
        self._parameters.clear()  # the codes first, as the constructor registers them
        self._parameters.update({k: frozen(v) for k, v in new.items()})
        self._parameters.update(rest)

    def _save_to_state_dict(self, destination, prefix: str, keep_vars: bool) -> None:
        """The state_dict holds the v1 planes in either layout (a save stays owq-pack v1)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.layout != "words3":
            return
        keys = list(destination)
        at = keys.index(prefix + WORDS3)
        tail = [(k, destination.pop(k)) for k in keys[at:]]
        destination.update({prefix + k: v for k, v in planes_from_words3(tail[0][1].detach()).items()})
        destination.update(tail[1:])

    def _load_from_state_dict(self, state_dict, prefix: str, *args) -> None:
        """A v1 state_dict loads into a layer holding the kernel words by going back to the planes first (the
        dispatcher converts again on its next decode)."""
        if self.layout == "words3" and prefix + "qweight_lo" in state_dict:
            self.to_layout("v1")
        super()._load_from_state_dict(state_dict, prefix, *args)

    @property
    def packed(self) -> list[nn.Parameter]:
        """The frozen packed parameters: planes, scales, zeros."""
        return [*self.planes.values(), self.scales, self.zeros]

    @property
    def n_weak(self) -> int:
        return self.weak_idx.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_full [N, K] in ``dtype``: what this layer multiplies by."""
        return dequantize_full(
            self.planes, self.scales, self.zeros, self.weak_idx, self.weak_weight, self.bits, self.in_features, dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from wct.kernels import owq_linear

        return owq_linear(x, self)

    def extra_repr(self) -> str:
        g = "row" if self.group_size == self.in_features else self.group_size
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={g}, n_weak={self.n_weak}"
