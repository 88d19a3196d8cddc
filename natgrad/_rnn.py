"""``nn.RNN``/``nn.GRU``/``nn.LSTM`` unrolled in plain tensor operations.

The fused recurrent kernels have no ``torch.func.vmap`` batching rule, and they hide the
per-step gate pre-activations that exact per-sample scores are built from. This module
computes the same function step by step with PyTorch's documented equations and gate
order (``r, z, n`` for the GRU, ``i, f, g, o`` for the LSTM), reading the parameters from
the module at call time, so that ``functional_call`` substitutes them:

* :func:`unrolled_forward` is the module's forward (1 or more layers, bidirectional,
  ``batch_first``, initial states, unbatched inputs); with a :class:`Trace` it also keeps
  each layer's inputs, hidden states and pre-activations ``x W_ih^T + b_ih`` and
  ``h W_hh^T + b_hh`` -- the time-indexed factors of the per-sample scores
  (:mod:`natgrad.layers.recurrent`).
* :func:`batched_recurrent` swaps it in for the fused forward while ``vmap`` computes
  per-sample scores, so recurrent policies take the vectorized path, not a Python loop.

It depends on ``torch`` and :mod:`natgrad.errors` only, so that :mod:`natgrad.scores` can use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from natgrad.errors import NatgradError

__all__ = [
    "RECURRENT_TYPES",
    "LayerTrace",
    "PackedSequenceError",
    "Trace",
    "batched_recurrent",
    "packed_input",
    "packed_sequence_message",
    "parameter_names",
    "unrolled_forward",
    "unsupported_reason",
]

RECURRENT_TYPES: tuple[type[nn.RNNBase], ...] = (nn.RNN, nn.GRU, nn.LSTM)


class PackedSequenceError(NatgradError, RuntimeError):
    """A recurrent layer of the policy got a ``PackedSequence``.

    ``torch.func`` cannot differentiate ``pack_padded_sequence`` per sample, so neither
    the factored nor the generic per-sample scores can be computed.
    """


def packed_sequence_message(kind: str) -> str:
    """What :class:`PackedSequenceError` says about layer ``kind`` (problem and fix)."""
    return (
        f"{kind} got a PackedSequence: per-sample scores cannot "
        "differentiate through packed sequences (torch.func has no rule for "
        "pack_padded_sequence); pass a padded tensor (N, T, features) instead and handle "
        "the lengths in the policy, e.g. gather each sequence's output at its last valid "
        "step (exact for a unidirectional layer)"
    )


def packed_input(root: nn.Module, run: Callable[[], object]) -> str | None:
    """The first recurrent module type of ``root`` that ``run()`` feeds a ``PackedSequence``.

    ``None`` when none does; one evaluation without gradients.

    Under ``torch.func`` packing fails before the module sees its input, with an error that
    names neither; this tells the per-sample paths what to report.
    """
    found: list[str] = []

    def hook(module: nn.Module, inputs: tuple[object, ...]) -> None:
        if inputs and isinstance(inputs[0], PackedSequence):
            found.append(type(module).__name__)

    handles = [
        m.register_forward_pre_hook(hook) for m in root.modules() if isinstance(m, nn.RNNBase)
    ]
    if not handles:
        return None
    try:
        with torch.no_grad():
            run()
    except Exception:  # noqa: BLE001, S110 - only the hook's finding matters here
        pass
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


@dataclass
class LayerTrace:
    """One layer and direction of an unrolled forward: its time-indexed factors.

    All tensors are ``(T, N, .)`` in processing order of the sequence positions ``0..T-1``
    (the reverse direction's steps are stored at their sequence positions too).
    """

    inputs: Tensor
    """The layer's input sequence ``x_t`` (detached)."""
    input_preacts: Tensor
    """``x_t W_ih^T + b_ih`` (in the graph)."""
    hidden: list[Tensor] = field(default_factory=list)
    """The previous hidden state ``h_{t-1}`` used at each position (detached)."""
    hidden_preacts: list[Tensor] = field(default_factory=list)
    """``h_{t-1} W_hh^T + b_hh`` at each position (in the graph)."""


@dataclass
class Trace:
    """What :func:`unrolled_forward` keeps: one :class:`LayerTrace` per layer and direction."""

    layers: list[LayerTrace] = field(default_factory=list)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be unrolled here (``None`` when it can).

    Unrolled: exactly ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` without LSTM projections
    (``proj_size``) and without active inter-layer dropout.
    """
    if type(module) not in RECURRENT_TYPES:
        return f"{type(module).__name__} is not exactly nn.RNN, nn.GRU or nn.LSTM"
    if getattr(module, "proj_size", 0):
        return "nn.LSTM with proj_size > 0"
    if module.dropout > 0 and module.training and module.num_layers > 1:
        return "inter-layer dropout is active (train mode)"
    return None


def parameter_names(module: nn.RNNBase) -> tuple[str, ...]:
    """The module's parameter names, layer by layer and direction by direction.

    Order: ``weight_ih, weight_hh[, bias_ih, bias_hh]`` of each layer and direction,
    as in ``module._flat_weights_names``.
    """
    names = []
    for layer in range(module.num_layers):
        for direction in range(2 if module.bidirectional else 1):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            names += [f"weight_ih{suffix}", f"weight_hh{suffix}"]
            if module.bias:
                names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
    return tuple(names)


def _cell(
    mode: str, nonlinearity: str, gi: Tensor, gh: Tensor, h: Tensor, c: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """One step from the pre-activations (PyTorch's equations and gate order)."""
    if mode == "RNN":
        total = gi + gh
        return (torch.tanh(total) if nonlinearity == "tanh" else torch.relu(total)), None
    if mode == "GRU":
        i_r, i_z, i_n = gi.chunk(3, dim=-1)
        h_r, h_z, h_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return (1 - z) * n + z * h, None
    i, f, g, o = (gi + gh).chunk(4, dim=-1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


def _mode(module: nn.RNNBase) -> str:
    return {nn.RNN: "RNN", nn.GRU: "GRU", nn.LSTM: "LSTM"}[type(module)]


def unrolled_forward(
    module: nn.RNNBase,
    input: Tensor,
    hx: Tensor | tuple[Tensor, Tensor] | None = None,
    trace: Trace | None = None,
    params: Mapping[str, Tensor] | None = None,
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """``module(input, hx)`` computed step by step (same outputs, same structure).

    Parameters
    ----------
    module
        An ``nn.RNN``, ``nn.GRU`` or ``nn.LSTM`` (see :func:`unsupported_reason`).
    input
        ``(N, T, in)`` with ``batch_first``, else ``(T, N, in)``; or unbatched ``(T, in)``.
    hx
        The initial hidden state (``(h_0, c_0)`` for the LSTM), or ``None`` for zeros.
    trace
        If given, receives each layer's and direction's factors (:class:`LayerTrace`).
    params
        Parameter name -> tensor to use instead of the module's own (all of
        :func:`parameter_names`), or ``None``.

    Returns
    -------
    output, h_n
        As the module returns them (``h_n`` is ``(h_n, c_n)`` for the LSTM).
    """
    if isinstance(input, PackedSequence):
        raise PackedSequenceError(packed_sequence_message(type(module).__name__))

    def weight(name: str) -> Tensor:
        return getattr(module, name) if params is None else params[name]

    mode = _mode(module)
    nonlinearity = getattr(module, "nonlinearity", "tanh")
    directions = 2 if module.bidirectional else 1
    batched = input.dim() == 3
    x = input if batched else input.unsqueeze(1)
    if batched and module.batch_first:
        x = x.transpose(0, 1)  # (T, N, in)
    steps, size = x.shape[0], module.hidden_size
    h0, c0 = hx if mode == "LSTM" and hx is not None else (hx, None)
    if h0 is None:
        h0 = x.new_zeros(module.num_layers * directions, x.shape[1], size)
    elif not batched:
        h0 = h0.unsqueeze(1)
    if mode == "LSTM":
        c0 = h0.new_zeros(h0.shape) if c0 is None else (c0 if batched else c0.unsqueeze(1))
    final_h, final_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            w_ih, w_hh = weight(f"weight_ih{suffix}"), weight(f"weight_hh{suffix}")
            gi = x @ w_ih.T
            if module.bias:
                gi = gi + weight(f"bias_ih{suffix}")
            record = LayerTrace(x.detach(), gi) if trace is not None else None
            state = layer * directions + direction
            h = h0[state]
            c = c0[state] if c0 is not None else None
            out: list[Tensor | None] = [None] * steps
            hidden: list[Tensor | None] = [None] * steps
            hidden_pre: list[Tensor | None] = [None] * steps
            per_step = gi.unbind(0)  # one backward node for all steps (not one gi-sized zero each)
            order = range(steps - 1, -1, -1) if direction else range(steps)
            for t in order:
                gh = h @ w_hh.T
                if module.bias:
                    gh = gh + weight(f"bias_hh{suffix}")
                hidden[t], hidden_pre[t] = h.detach(), gh
                h, c = _cell(mode, nonlinearity, per_step[t], gh, h, c)
                out[t] = h
            if record is not None:
                record.hidden, record.hidden_preacts = hidden, hidden_pre
                trace.layers.append(record)
            outputs.append(torch.stack(out))
            final_h.append(h)
            final_c.append(c)
        x = outputs[0] if directions == 1 else torch.cat(outputs, dim=-1)
    output = x.transpose(0, 1) if batched and module.batch_first else x
    h_n = torch.stack(final_h)
    c_n = torch.stack(final_c) if mode == "LSTM" else None
    if not batched:
        output, h_n = output.squeeze(1), h_n.squeeze(1)
        c_n = c_n.squeeze(1) if c_n is not None else None
    return output, ((h_n, c_n) if mode == "LSTM" else h_n)


@contextlib.contextmanager
def batched_recurrent(root: nn.Module) -> Iterator[None]:
    """Within the block, every unrollable recurrent module of ``root`` runs unrolled.

    The fused forward is restored afterwards, whatever happens. Modules that
    :func:`unsupported_reason` refuses keep the fused forward.
    """
    patched = []
    for module in root.modules():
        if type(module) in RECURRENT_TYPES and unsupported_reason(module) is None:
            if "forward" in module.__dict__:
                continue  # already replaced (by the user or an outer block): left alone

            def forward(input, hx=None, _module=module):  # noqa: A002 - nn.RNNBase's name
                return unrolled_forward(_module, input, hx)

            module.forward = forward
            patched.append(module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
