"""Per-sample output Jacobians ``J_i = d f(x_i) / d theta`` and Jacobian-vector products.

The supervised Fisher (Gauss-Newton) matrices are built from the output Jacobian of each
sample: ``k`` rows per sample for a model with ``k`` outputs, over the selected parameters
flattened in the model's own order. They are computed with ``torch.func``:
``vmap(jacrev(...))`` over :func:`~torch.func.functional_call`, so the model is never
modified and no ``.grad`` is touched.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from natgrad._checks import consistency_tolerance
from natgrad._guard import functional_call
from natgrad._tree import Tree, take, tree_map, unsqueeze
from natgrad._vmap import raise_unless_vmap_limitation
from natgrad.errors import ArgumentError, NonFiniteError

__all__ = ["ModelJacobians", "output_jacobians", "output_jvp"]


@dataclass(frozen=True)
class ModelJacobians:
    """Outputs and per-sample output Jacobians of a model on one batch.

    Attributes
    ----------
    outputs
        ``f(x_i)`` flattened per sample, shape ``(N, k)``, detached.
    jacobians
        ``J_i``, shape ``(N, k, P)`` in the parameters' dtype.
    path
        ``"vmap"`` (batched) or ``"loop"`` (one sample at a time, when ``vmap`` cannot batch
        an operation of the model).
    fallback_reason
        Why the loop path ran, ``None`` otherwise.
    """

    outputs: Tensor
    jacobians: Tensor
    path: str
    fallback_reason: str | None


def _split_parameters(
    model: nn.Module, param_names: list[str]
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    named = dict(model.named_parameters())
    selected = {n: named[n].detach() for n in param_names}
    constants = {n: p.detach() for n, p in named.items() if n not in selected}
    constants.update(dict(model.named_buffers()))
    return selected, constants


def output_jacobians(
    model: nn.Module,
    inputs: Tree,
    param_names: list[str],
    batched_outputs: Tensor,
    chunk_size: int,
) -> ModelJacobians:
    """Per-sample outputs and output Jacobians over the parameters ``param_names``.

    Parameters
    ----------
    model
        Any ``nn.Module`` mapping a batch of inputs to outputs of shape ``(N, ...)``.
    inputs
        A tensor (or dict/list/tuple of tensors) whose first dimension is the sample.
    param_names
        Names (as in ``model.named_parameters()``) of the parameters ``theta``; all other
        parameters and buffers are held constant.
    batched_outputs
        ``model(inputs)`` reshaped to ``(N, k)``; per-sample outputs must reproduce it,
        otherwise the model couples samples and per-sample Jacobians are meaningless.
    chunk_size
        Samples whose Jacobians are computed at once (peak memory ``chunk_size x k x P``).

    Returns
    -------
    ModelJacobians
        Outputs ``(N, k)`` and Jacobians ``(N, k, P)``.
    """
    params, constants = _split_parameters(model, param_names)
    num_samples = batched_outputs.shape[0]

    def single(p: dict[str, Tensor], x_i: Tree) -> tuple[Tensor, Tensor]:
        out = functional_call(model, {**p, **constants}, (unsqueeze(x_i),)).reshape(-1)
        return out, out

    def flatten(jac: dict[str, Tensor], batch: int, k: int) -> Tensor:
        return torch.cat([jac[n].reshape(batch, k, -1) for n in param_names], dim=2)

    path, reason = "vmap", None
    outs, jacs = [], []
    for index in torch.arange(num_samples, device=batched_outputs.device).split(chunk_size):
        x_s = take(inputs, index)
        if path == "vmap":
            try:
                jac, out = vmap(jacrev(single, has_aux=True), in_dims=(None, 0))(params, x_s)
            except Exception as error:  # noqa: BLE001 - classified just below
                raise_unless_vmap_limitation(
                    error,
                    "the model draws random numbers in forward (e.g. active dropout), so "
                    "per-sample Jacobians are ill-defined; call model.eval() first",
                )
                path, reason = "loop", f"vmap failed ({type(error).__name__}: {error})"
        if path == "loop":
            pieces = [_one_sample(single, params, x_s, i) for i in range(len(index))]
            jac = {n: torch.stack([p[0][n] for p in pieces]) for n in param_names}
            out = torch.stack([p[1] for p in pieces])
        outs.append(out.detach())
        jacs.append(flatten(jac, len(index), out.shape[1]).detach())
    outputs = torch.cat(outs)
    _check_consistent(outputs, batched_outputs)
    jacobians = torch.cat(jacs)
    _check_finite_jacobians(jacobians, {n: params[n].numel() for n in param_names})
    return ModelJacobians(outputs, jacobians, path, reason)


def _check_finite_jacobians(jacobians: Tensor, sizes: dict[str, int]) -> None:
    """Refuse NaN/inf in ``J_i`` (finite outputs), naming the sample and the parameter.

    An operation with an infinite derivative at the current point (``sqrt`` of an exact
    zero) makes ``W`` non-finite, which the solvers would only report as ill-conditioning.
    """
    finite = torch.isfinite(jacobians)
    if bool(finite.all()):
        return
    sample, output, column = (int(i) for i in torch.nonzero(~finite)[0])
    ends = itertools.accumulate(sizes.values())
    name = next(n for n, end in zip(sizes, ends, strict=True) if column < end)
    raise NonFiniteError(
        f"the output Jacobian of sample {sample} (output {output}) with respect to "
        f"model.{name} is NaN or inf although the output itself is finite: an operation in "
        "forward has an infinite derivative at these parameters (e.g. sqrt, pow with an "
        "exponent below 1, or a norm, evaluated at exactly 0); add a small epsilon inside "
        "it (torch.sqrt(z * z + 1e-12)) or use a smooth alternative"
    )


def _one_sample(
    single: Callable[..., tuple[Tensor, Tensor]], params: dict[str, Tensor], x_s: Tree, i: int
) -> tuple[dict[str, Tensor], Tensor]:
    """``jacrev`` of one sample (the loop path); a failure is natgrad's error."""
    try:
        return jacrev(single, has_aux=True)(params, tree_map(lambda t: t[i], x_s))
    except Exception as error:  # noqa: BLE001 - re-raised with the diagnosis
        raise ArgumentError(
            "the model cannot be differentiated one sample at a time with torch.func "
            f"({type(error).__name__}: {str(error)[:200]}) although model(inputs) works on "
            "the batch: a torch.autograd.Function without setup_context/vmap support (see "
            "https://pytorch.org/docs/stable/notes/extending.func.html), leaving torch in "
            "forward (.numpy(), .tolist()), or an operation that fails on a batch of one "
            "sample; make forward a torch.func-compatible function of each sample"
        ) from error


def _check_consistent(per_sample: Tensor, batched: Tensor) -> None:
    """Refuse per-sample outputs that differ from the (finite) batched ones.

    A per-sample output that is NaN where the batched one is finite (``x.std(0)`` of one
    sample) differs too: ``~(gap <= allowed)`` rather than ``gap > allowed``, which NaN passes.
    """
    scale = consistency_tolerance(batched.dtype)
    gap = (per_sample - batched).abs()
    # Equal infinities agree (a logit masked with -inf, alone and in the batch).
    differs = ~((gap <= scale * (1.0 + batched.abs())) | (per_sample == batched))
    if bool(differs.any()):
        worst = int(torch.nonzero(differs)[0, 0])
        how = "differs when computed alone and in the batch"
        if not bool(torch.isfinite(per_sample[worst]).all()):
            how = "is not finite when computed alone but finite in the batch"
        raise ArgumentError(
            f"the model's output for sample {worst} {how}, so the model couples samples "
            "(BatchNorm in train mode, "
            "normalization across the batch dimension such as x.std(0), state carried "
            "between calls); per-sample Jacobians are then ill-defined: call model.eval() or "
            "make each output depend on its own sample only"
        )


def output_jvp(
    model: nn.Module,
    inputs: Tree,
    param_names: list[str],
    tangents: list[Tensor],
    primals: list[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Return the outputs and ``J t`` for all samples at once (one forward-mode pass).

    Parameters
    ----------
    model
        The model.
    inputs
        The batch.
    param_names
        Names of the parameters ``tangents`` refers to, in order.
    tangents
        One tensor per parameter of ``param_names`` (same shapes).
    primals
        Values of those parameters to linearize at; ``None``: their current values.

    Returns
    -------
    tuple of Tensor
        ``f(x)`` and ``J t``, both of shape ``(N, k)`` and detached.
    """
    params, constants = _split_parameters(model, param_names)
    if primals is not None:
        params = {n: p.detach() for n, p in zip(param_names, primals, strict=True)}

    def batched(p: dict[str, Tensor]) -> Tensor:
        out = functional_call(model, {**p, **constants}, (inputs,))
        return out.reshape(out.shape[0], -1)

    tangent = {
        n: t.detach().to(params[n].dtype) for n, t in zip(param_names, tangents, strict=True)
    }
    out, out_tangent = jvp(batched, (params,), (tangent,))
    return out.detach(), out_tangent.detach()
