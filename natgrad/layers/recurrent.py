"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM``: exact per-sample scores from time-indexed factors.

A recurrent weight is shared over the ``T`` steps, so sample ``i``'s score for it is a sum
over time of outer products: ``sum_t dgi_t[i] x_t[i]^T`` for ``W_ih`` and
``sum_t dgh_t[i] h_{t-1}[i]^T`` for ``W_hh`` (``sum_t dgi_t[i]``, ``sum_t dgh_t[i]`` for the
biases), where ``gi_t = x_t W_ih^T + b_ih`` and ``gh_t = h_{t-1} W_hh^T + b_hh`` are the
step's pre-activations and ``dgi_t``, ``dgh_t`` the gradients of ``sum_i log pi_i`` at them.
The fused kernel hides the pre-activations, so the layer's forward is recomputed unrolled
(:func:`natgrad._rnn.unrolled_forward`, PyTorch's equations) from the recorded inputs,
and the gradients at the module's outputs (one ordinary backward pass) are pulled back to
every step's pre-activations by one more backward pass through that recomputation; the
rows then come from one batched matrix product per layer and direction
(:class:`RowsFactor`).

Multi-layer, bidirectional and ``batch_first`` modules and initial states passed
positionally are factored; ``proj_size > 0`` is left to the generic scores, and a
``PackedSequence`` input raises :class:`~natgrad._rnn.PackedSequenceError` (no per-sample
scores can differentiate through packing). The factors of a module in train mode with
inter-layer dropout, or called with an initial state passed by keyword (which the forward
hook does not see), fail the whole-batch check (:func:`natgrad.factored.verify_on_batch`)
and the generic scores are used.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from natgrad._rnn import (
    PackedSequenceError,
    Trace,
    packed_sequence_message,
    parameter_names,
    unrolled_forward,
)
from natgrad.layers._base import FactorableLayer, LayerCall, register_layer
from natgrad.layers.rows import RowsFactor

__all__ = ["GRULayer", "LSTMLayer", "PackedSequenceError", "RNNLayer", "RecurrentLayer"]


def _tensors(tree: object) -> list[Tensor]:
    """The tensors of a module output (nested tuples), in order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _block_rows(
    g_i: Tensor, g_h: list[Tensor], inputs: Tensor, hidden: list[Tensor], bias: bool
) -> Tensor:
    """One layer and direction's rows, ``(N, G * Z)``, in one batched matrix product.

    ``g_i``, ``inputs``: ``(T, N, .)``; ``g_h``, ``hidden``: one ``(N, .)`` per step. Per
    gate row the columns are ``[W_ih | b_ih | W_hh | b_hh]``: the product of
    ``[G_i, G_h]^T`` (``(N, G, 2T)``) with the block-diagonal ``[[X, 1, 0, 0], [0, 0, H, 1]]``
    (``(N, 2T, Z)``) sums both weights' outer products over time at once, written straight
    into the rows (no concatenation of per-weight pieces).
    """
    steps, n, gates = g_i.shape
    width, size = inputs.shape[2] + bias, hidden[0].shape[1]
    left = g_i.new_empty(n, 2 * steps, gates)
    left[:, :steps] = g_i.transpose(0, 1)
    right = inputs.new_zeros(n, 2 * steps, width + size + bias)
    right[:, :steps, : inputs.shape[2]] = inputs.transpose(0, 1)
    for t in range(steps):
        left[:, steps + t] = g_h[t]
        right[:, steps + t, width : width + size] = hidden[t]
    if bias:
        right[:, :steps, width - 1] = 1
        right[:, steps:, -1] = 1
    return torch.bmm(left.transpose(1, 2), right).flatten(1)


def _block_positions(module: nn.Module, names: list[str], positions: dict[str, Tensor]) -> Tensor:
    """The flat-vector indices of :func:`_block_rows`' columns.

    ``names`` are one layer and direction's ``weight_ih, weight_hh[, bias_ih, bias_hh]``.
    """
    gates = getattr(module, names[0]).shape[0]
    order = [names[0], names[2], names[1], names[3]] if len(names) == 4 else names
    return torch.cat([positions[n].reshape(gates, -1) for n in order], dim=1).reshape(-1)


class RecurrentLayer(FactorableLayer):
    """Factors a recurrent module called once on a padded ``(N, T, in)``/``(T, N, in)`` batch."""

    module_type: ClassVar[type[nn.Module]] = nn.RNNBase

    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        return parameter_names(module)

    def usable(self, call: LayerCall, num_samples: int) -> bool:
        module_input = call.inputs[0] if call.inputs else None
        if isinstance(module_input, PackedSequence):
            raise PackedSequenceError(packed_sequence_message(self.module_type.__name__))
        if not isinstance(module_input, Tensor) or module_input.dim() != 3:
            return False  # an unbatched sequence
        if not isinstance(call.output, tuple) or len(call.output) != 2:
            return False
        states = _tensors(call.output[1])  # h_n (and c_n): (layers * directions, N, .)
        if any(state.dim() != 3 for state in states):
            return False
        if len(states) == 2 and states[0].shape[-1] != states[1].shape[-1]:
            return False  # nn.LSTM with proj_size: not unrolled
        return states[0].shape[1] == num_samples

    def factor(
        self,
        module: nn.Module,
        call: LayerCall,
        output_grad: Tensor | tuple[Tensor, ...],
        positions: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> RowsFactor:
        grads = _tensors(output_grad)
        names = parameter_names(module)
        params = {n: getattr(module, n).detach().requires_grad_(True) for n in names}
        inputs = [t.detach() if isinstance(t, Tensor) else t for t in call.inputs]
        if len(inputs) > 1 and isinstance(inputs[1], tuple):
            inputs[1] = tuple(t.detach() for t in inputs[1])
        trace = Trace()
        with torch.enable_grad():
            outputs = _tensors(unrolled_forward(module, *inputs, trace=trace, params=params))
            total = sum((out * grad).sum() for out, grad in zip(outputs, grads, strict=True))
            wanted = [r.input_preacts for r in trace.layers]
            wanted += [gh for r in trace.layers for gh in r.hidden_preacts]
            pulled = torch.autograd.grad(total, wanted, allow_unused=True)
        pulled = [
            torch.zeros_like(w) if g is None else g for w, g in zip(wanted, pulled, strict=True)
        ]
        blocks, steps = len(trace.layers), len(trace.layers[0].hidden_preacts)
        per_block = len(names) // blocks
        rows, index = [], []
        for k, record in enumerate(trace.layers):
            g_h = pulled[blocks + k * steps : blocks + (k + 1) * steps]
            rows.append(_block_rows(pulled[k], g_h, record.inputs, record.hidden, module.bias))
            block = list(names[k * per_block : (k + 1) * per_block])
            index.append(_block_positions(module, block, positions))
        matrix = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
        return RowsFactor(matrix.to(dtype), torch.cat(index))


class RNNLayer(RecurrentLayer):
    """``nn.RNN`` (tanh or ReLU)."""

    module_type = nn.RNN


class GRULayer(RecurrentLayer):
    """``nn.GRU``."""

    module_type = nn.GRU


class LSTMLayer(RecurrentLayer):
    """``nn.LSTM`` (without ``proj_size``)."""

    module_type = nn.LSTM


register_layer(RNNLayer())
register_layer(GRULayer())
register_layer(LSTMLayer())
