"""OWQLinear: a linear layer stored in owq-pack v1 whose only trainable tensor is ``weak_weight``.

    y = deq(W_q) · x + W_o · x[idx] + b

deq(W_q) is exactly 0 at the weak columns ``idx`` (their codes equal the zero-point), W_o = ``weak_weight`` [n_o, N]
holds those columns in 16-bit (fp32 master copy while training). The packed planes, scales and zeros are frozen
parameters (``requires_grad=False``; integer planes and zeros cannot require a gradient anyway), so sharded data
parallelism (FSDP2 ``fully_shard``, :mod:`wct.training.sharding`) shards them instead of replicating them as it
does buffers; the weak-column indices and the bias are buffers. The state_dict keys are the same either way. The
product is computed by :func:`wct.kernels.owq_linear`, which dispatches to a backend.
"""

from __future__ import annotations

import torch
from torch import nn

from wct.format.layout import dequantize_full, padded_k, plane_layout


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
    def planes(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name, _, _ in plane_layout(self.bits)}

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
