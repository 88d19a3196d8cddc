"""What a factorable layer provides, the registry, and the per-layer capture.

A layer kind is *factorable* when every sample's score for its parameters follows from
tensors captured in one ordinary forward and backward pass of ``sum_i log pi_i`` (its
inputs and the gradients at its outputs), so that ``J J^T``, ``J v`` and ``J^T x`` over its
parameters never need per-sample gradients. Each kind is one module of
:mod:`natgrad.layers` with a :class:`FactorableLayer` registered for its module type.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple, Protocol, TypeVar

import torch
from torch import Tensor, nn

__all__ = [
    "FACTORABLE_LAYERS",
    "FactorableLayer",
    "LayerCall",
    "LayerFactor",
    "capture_layer_calls",
    "output_gradients",
    "register_layer",
    "unregister_layer",
]

T = TypeVar("T")


class LayerCall(NamedTuple):
    """One recorded call of a layer: its positional inputs and its output."""

    inputs: tuple[Tensor, ...]
    output: Tensor


class LayerFactor(Protocol):
    """The captured factors of one layer over a batch: a ``NamedTuple`` with these methods.

    Its first field is a per-sample tensor (shape ``(N, ...)``, the rows' dtype); it is the
    payload of the compiled path, so it holds tensors only and its methods are pure.
    """

    positions: Tensor
    """Indices of the layer's parameters in the flat parameter vector, in the order of
    :meth:`rmatvec`'s output."""

    def take(self, index: Tensor) -> LayerFactor:
        """The factors of the samples ``index``."""

    def cross_gram(self, other: LayerFactor) -> Tensor:
        """``J_L(self) J_L(other)^T`` over this layer's parameters (``(n, m)``)."""

    def matvec(self, v: Tensor) -> Tensor:
        """``J_L v[positions]`` for the full flat ``v``; shape ``(n,)``."""

    def rmatvec(self, x: Tensor) -> Tensor:
        """``J_L^T x``, shape ``(len(positions),)``."""

    def magnitude(self, x: Tensor) -> Tensor:
        """``|J_L|^T |x|`` entrywise (the size of the summed terms), like :meth:`rmatvec`."""

    def squared_norms(self) -> Tensor:
        """``|J_L[i]|^2`` per sample, float64."""

    def dense_rows(self) -> Tensor:
        """``J_L`` materialized, ``(n, len(positions))`` (for checks only)."""


class FactorableLayer(ABC):
    """How to capture one module type's factors; registered with :func:`register_layer`.

    Only modules of exactly :attr:`module_type` are factored (a subclass may change
    ``forward``); a layer whose weights are used elsewhere, or that samples interact
    through, is caught by the whole-batch check (:func:`natgrad.factored.verify_on_batch`).
    """

    module_type: ClassVar[type[nn.Module]]

    @abstractmethod
    def parameter_names(self, module: nn.Module) -> tuple[str, ...]:
        """The module's own names of the parameters it factors (e.g. ``("weight", "bias")``)."""

    @abstractmethod
    def usable(self, call: LayerCall, num_samples: int) -> bool:
        """Whether the recorded call can be factored (e.g. a ``(N, in)`` input)."""

    @abstractmethod
    def factor(
        self,
        module: nn.Module,
        call: LayerCall,
        output_grad: Tensor,
        positions: dict[str, Tensor],
        dtype: torch.dtype,
    ) -> LayerFactor:
        """The factors of the batch, in ``dtype``.

        ``output_grad`` is the gradient at the output; ``positions`` maps each name of
        :meth:`parameter_names` to its indices in the flat parameter vector.
        """


FACTORABLE_LAYERS: dict[type[nn.Module], FactorableLayer] = {}


def register_layer(layer: FactorableLayer) -> FactorableLayer:
    """Factor every module of exactly ``layer.module_type`` from now on; returns ``layer``."""
    FACTORABLE_LAYERS[layer.module_type] = layer
    return layer


def unregister_layer(module_type: type[nn.Module]) -> None:
    """Stop factoring ``module_type`` (tests and examples clean up with it)."""
    FACTORABLE_LAYERS.pop(module_type, None)


def capture_layer_calls(
    modules: dict[str, nn.Module], run: Callable[[], T]
) -> tuple[T, dict[str, list[LayerCall]]]:
    """Return ``run()`` and every call of ``modules`` it made (inputs and output, in order).

    The hooks are removed afterwards, whatever happens. The recorded outputs stay in the
    autograd graph: :func:`output_gradients` differentiates through them.
    """
    calls: dict[str, list[LayerCall]] = {name: [] for name in modules}

    def recorder(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            calls[name].append(LayerCall(inputs, output))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in modules.items()]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, calls


def output_gradients(total: Tensor, outputs: list[Tensor]) -> list[Tensor]:
    """``d total / d output`` for each layer output (zeros for an output ``total`` ignores).

    With ``total = sum_i log pi_i``, row ``i`` of each is sample ``i``'s gradient at the
    layer's output: one backward pass gives every sample's, since sample ``i``'s output
    affects only its own log-probability.
    """
    grads = torch.autograd.grad(total, outputs, allow_unused=True)
    return [
        torch.zeros_like(out) if grad is None else grad
        for out, grad in zip(outputs, grads, strict=True)
    ]
