"""``nn.Linear``: sample ``i``'s score for ``[W | b]`` is the outer product ``g_i [a_i; 1]^T``.

With ``A`` the layer inputs (a ones column appended for the bias) and ``G`` the gradients
at the outputs: ``J_S J_T^T = (G_S G_T^T) * (A_S A_T^T)``, ``J_S v = rowsum((A_S V^T) * G_S)``
with ``V`` the layer's slice of ``v`` as a matrix, ``J_S^T x = G_S^T diag(x) A_S``
(Goodfellow, 2015, "Efficient per-example gradient computations").
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from natgrad.layers._base import FactorableLayer, LayerCall, register_layer

__all__ = ["LinearFactor", "LinearLayer"]


class LinearFactor(NamedTuple):
    """Inputs ``A`` (``(N, in[+1])``), output gradients ``G`` (``(N, out)``), positions.

    ``positions`` index the flat parameter vector for the ``(out, in[+1])`` matrix
    ``[W | b]``, row-major.
    """

    inputs: Tensor
    output_grads: Tensor
    positions: Tensor

    def take(self, index: Tensor) -> LinearFactor:
        return LinearFactor(self.inputs[index], self.output_grads[index], self.positions)

    def cross_gram(self, other: LinearFactor) -> Tensor:
        return (self.inputs @ other.inputs.T) * (self.output_grads @ other.output_grads.T)

    def matvec(self, v: Tensor) -> Tensor:
        a, g = self.inputs, self.output_grads
        matrix = v[self.positions].reshape(g.shape[1], a.shape[1])
        return ((a @ matrix.T) * g).sum(dim=1)

    def rmatvec(self, x: Tensor) -> Tensor:
        return ((self.output_grads * x[:, None]).T @ self.inputs).reshape(-1)

    def magnitude(self, x: Tensor) -> Tensor:
        return ((self.output_grads.abs() * x.abs()[:, None]).T @ self.inputs.abs()).reshape(-1)

    def squared_norms(self) -> Tensor:
        a_norm = torch.linalg.vector_norm(self.inputs, dim=1).to(torch.float64)
        g_norm = torch.linalg.vector_norm(self.output_grads, dim=1).to(torch.float64)
        return (a_norm * g_norm) ** 2

    def dense_rows(self) -> Tensor:
        a, g = self.inputs, self.output_grads
        return (g[:, :, None] * a[:, None, :]).reshape(a.shape[0], -1)


class LinearLayer(FactorableLayer):
    """Factors plain ``nn.Linear`` layers called once on a ``(N, in)`` input."""

    module_type = nn.Linear

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        return ("weight",) + (("bias",) if module.bias is not None else ())

    def usable(self, call: LayerCall, num_samples: int) -> bool:
        inputs = call.inputs[0]
        return inputs.dim() == 2 and inputs.shape[0] == num_samples

    def factor(
        self,
        module: nn.Module,
        call: LayerCall,
        output_grad: Tensor,
        positions: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> LinearFactor:
        inputs = call.inputs[0].detach()
        out_features, in_features = output_grad.shape[1], inputs.shape[1]
        matrix = positions["weight"].reshape(out_features, in_features)
        if "bias" in positions:
            matrix = torch.cat([matrix, positions["bias"].reshape(out_features, 1)], dim=1)
            inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
        return LinearFactor(inputs.to(dtype), output_grad.to(dtype), matrix.reshape(-1))


register_layer(LinearLayer())
