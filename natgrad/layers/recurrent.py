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
rows then come from one batched matrix product per weight (:class:`RowsFactor`).

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

__all__ = ["GRULayer", "LSTMLayer", "RNNLayer", "RecurrentLayer"]


def _tensors(tree: object) -> list[Tensor]:
    """The tensors of a module output (nested tuples), in order."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _time_rows(grads: Tensor, inputs: Tensor) -> Tensor:
    """``sum_t grads[t, i] inputs[t, i]^T`` per sample, flattened: ``(N, G * in)``."""
    return torch.bmm(grads.permute(1, 2, 0), inputs.permute(1, 0, 2)).flatten(1)


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
        steps = len(trace.layers[0].hidden_preacts)
        input_grads = pulled[: len(trace.layers)]
        hidden_grads = pulled[len(trace.layers) :]
        rows = []
        for k, record in enumerate(trace.layers):
            g_i = input_grads[k]
            g_h = torch.stack(hidden_grads[k * steps : (k + 1) * steps])
            rows += [_time_rows(g_i, record.inputs), _time_rows(g_h, torch.stack(record.hidden))]
            if module.bias:
                rows += [g_i.sum(0), g_h.sum(0)]
        matrix = torch.cat(rows, dim=1).to(dtype)
        index = torch.cat([positions[n].reshape(-1) for n in names])
        return RowsFactor(matrix, index)


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
