"""``nn.Conv1d``, ``nn.Conv2d``: exact per-sample scores from unfolded inputs.

A convolution applies its kernel at every output position ``p``: with ``U`` the unfolded
input (``torch.nn.functional.unfold``: one column of ``C_in / groups * prod(kernel)``
patch values per position and group) and ``G`` the gradients at the output, sample ``i``'s
score for the kernel of group ``k`` is ``sum_p G[i, k, :, p] U[i, k, :, p]^T`` and for the
bias ``sum_p G[i, :, p]`` -- a sum of outer products over positions, formed as one batched
matrix product into the rows (:class:`~natgrad.layers.rows.RowsFactor`). Every stride,
padding (numbers, ``"same"``, ``"valid"``, and the ``reflect``/``replicate``/``circular``
modes), dilation and group count is handled; a ``Conv1d`` is a ``Conv2d`` of height 1.
Unbatched inputs are left to the generic scores.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F  # noqa: N812 - PyTorch's own convention
from torch import Tensor, nn

from natgrad.layers._base import FactorableLayer, LayerCall, register_layer
from natgrad.layers.rows import RowsFactor

__all__ = ["Conv1dLayer", "Conv2dLayer", "ConvLayer", "unfolded_patches"]


def _explicit_padding(module: nn.Module) -> list[int]:
    """``F.pad``'s ``(left, right)`` pairs, last dimension first, for the module's padding."""
    dims = len(module.kernel_size)
    if module.padding == "valid":
        return [0, 0] * dims
    if module.padding == "same":
        pairs = []
        for k, d in zip(module.kernel_size, module.dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in module.padding]
    return [side for pair in reversed(pairs) for side in pair]


def unfolded_patches(module: nn.Module, inputs: Tensor) -> Tensor:
    """The patches the module multiplies its kernel with: ``(N, C_in * prod(k), L)``.

    Column ``p`` holds, channel-major then kernel offsets, the input values under the
    kernel at output position ``p`` (padding applied as the module applies it).
    """
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    padded = F.pad(inputs, _explicit_padding(module), mode=mode)
    if isinstance(module, nn.Conv1d):
        padded = padded.unsqueeze(2)
        kernel, dilation, stride = (
            (1, *module.kernel_size),
            (1, *module.dilation),
            (1, *module.stride),
        )
    else:
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    return F.unfold(padded, kernel, dilation=dilation, stride=stride)


class ConvLayer(FactorableLayer):
    """Factors a convolution called once on a batched ``(N, C_in, *spatial)`` input."""

    module_type: ClassVar[type[nn.Module]] = nn.Conv2d
    spatial_dims: ClassVar[int] = 2

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight",) + (("bias",) if module.bias is not None else ())

    def usable(self, call: LayerCall, num_samples: int) -> bool:
        inputs = call.inputs[0] if call.inputs else None
        return (
            isinstance(inputs, Tensor)
            and isinstance(call.output, Tensor)
            and inputs.dim() == self.spatial_dims + 2
            and inputs.shape[0] == num_samples
        )

    def factor(
        self,
        module: nn.Module,
        call: LayerCall,
        output_grad: Tensor,
        positions: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> RowsFactor:
        patches = unfolded_patches(module, call.inputs[0].detach())
        n, groups, out_channels = patches.shape[0], module.groups, module.out_channels
        grads = output_grad.detach().reshape(n, groups, out_channels // groups, -1)
        if grads.shape[-1] != patches.shape[-1]:  # not this module's geometry: zero rows,
            width = sum(p.numel() for p in positions.values())  # refused by verify_on_batch
            index = torch.cat([positions[name] for name in self.parameter_names(module)])
            return RowsFactor(patches.new_zeros(n, width, dtype=dtype), index)
        patches = patches.reshape(n, groups, -1, patches.shape[-1])
        weight_rows = torch.matmul(grads, patches.transpose(2, 3)).reshape(n, -1)
        matrix = positions["weight"].reshape(out_channels, -1)
        if "bias" in positions:
            bias_rows = grads.sum(dim=3).reshape(n, out_channels, 1)
            weight_rows = torch.cat([weight_rows.reshape(n, out_channels, -1), bias_rows], 2)
            matrix = torch.cat([matrix, positions["bias"].reshape(out_channels, 1)], dim=1)
        return RowsFactor(weight_rows.reshape(n, -1).to(dtype), matrix.reshape(-1))


class Conv1dLayer(ConvLayer):
    """``nn.Conv1d``."""

    module_type = nn.Conv1d
    spatial_dims = 1


class Conv2dLayer(ConvLayer):
    """``nn.Conv2d``."""

    module_type = nn.Conv2d
    spatial_dims = 2


register_layer(Conv1dLayer())
register_layer(Conv2dLayer())
