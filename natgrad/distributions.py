"""Per-sample quantities of a batch of action distributions, summed over action dimensions.

A policy returns one ``torch.distributions.Distribution`` for a batch of ``N``
observations. A factorized distribution (``Normal`` with one scale per action dimension,
a product of ``Categorical`` heads) reports ``log_prob``, ``entropy`` and KL per action
dimension; the joint quantity of a sample is their sum, exactly what
``torch.distributions.Independent`` would give. Every function here returns one value
per sample, shape ``(N,)`` (or a scalar, for the means), so the sum over action
dimensions is written once.

Sampling takes an explicit ``torch.Generator``: ``Distribution.sample`` draws from the
global RNG, which natgrad's library code never touches. Distribution types are looked up
in :data:`SAMPLERS`; a new one needs one function and one line there.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch._C._functorch import get_unwrapped, is_batchedtensor, is_functorch_wrapped_tensor
from torch.distributions import Categorical, Distribution, Independent, Normal, kl_divergence

from natgrad.errors import ArgumentError, ArgumentTypeError

__all__ = [
    "SAMPLERS",
    "entropy",
    "kl",
    "log_prob",
    "mean_kl",
    "mode",
    "sample",
    "sum_action_dims",
]


def sum_action_dims(values: Tensor) -> Tensor:
    """Sum a per-dimension quantity ``(N, *action_shape)`` to one value per sample ``(N,)``.

    A tensor that is already ``(N,)`` is returned as is.
    """
    return values.reshape(values.shape[0], -1).sum(-1) if values.dim() > 1 else values


def _in_support(dist: Distribution, acts: Tensor) -> bool:
    """Whether discrete ``acts`` lie in ``dist``'s support (``True`` if it cannot tell).

    Under ``vmap`` (per-sample scores) the check is data-dependent and cannot run; the
    batched call that comes first has checked the same actions.
    """
    if not isinstance(acts, Tensor) or acts.is_floating_point():
        return True  # continuous actions: no support to look up (TorchRL's TanhNormal fails it)
    support = getattr(dist, "support", None)
    if support is None:
        return True
    try:
        inside = support.check(acts).all()
    except NotImplementedError:  # a custom support without a check
        return True
    return True if _under_vmap(inside) else bool(inside)


def _under_vmap(value: Tensor) -> bool:
    """Whether ``value`` is batched by ``vmap`` at any level of torch.func's wrappers.

    torch has no public test for this; ``grad`` wrappers alone still allow ``bool()``.
    """
    while is_functorch_wrapped_tensor(value):
        if is_batchedtensor(value):
            return True
        value = get_unwrapped(value)
    return False


def log_prob(dist: Distribution, acts: Tensor) -> Tensor:
    """Joint log-probability ``log pi(a_i | s_i)`` of each sample, shape ``(N,)``.

    Raises
    ------
    ArgumentError
        If ``acts`` lies outside the distribution's support, or broadcasts against the
        distribution instead of matching it (discrete actions stored as ``(N, 1)``
        against a ``Categorical`` of batch shape ``(N,)`` give an ``(N, N)`` table of
        every action under every state).
    """
    if not _in_support(dist, acts):  # discrete actions; torch checks only with validation on
        raise ArgumentError(
            f"acts holds actions outside the support of the policy's {type(dist).__name__} "
            f"({dist.support}), so they have no log-probability; pass the actions the policy took"
        )
    try:
        values = dist.log_prob(acts)
    except (RuntimeError, ValueError) as error:  # acts that do not broadcast (3 dims for 2)
        shape = ("must match the size", "not broadcastable")  # unvalidated, validated
        if not isinstance(acts, Tensor) or not any(text in str(error) for text in shape):
            if isinstance(error, ValueError) and "support" in str(error):
                raise ArgumentError(
                    f"acts holds actions outside the support of the policy's "
                    f"{type(dist).__name__} (e.g. a discrete action >= the number of actions, "
                    "or < 0), so they have no log-probability; pass the actions the policy "
                    f"took (torch says: {str(error).splitlines()[0][:200]})"
                ) from error
            raise
        raise ArgumentError(
            f"acts of shape {tuple(acts.shape)} does not match the policy's "
            f"{type(dist).__name__} (batch shape {tuple(dist.batch_shape)}, event shape "
            f"{tuple(dist.event_shape)}); pass the actions the policy took, of shape "
            f"{tuple(dist.batch_shape) + tuple(dist.event_shape)} (torch says: "
            f"{str(error).splitlines()[0][:200]})"
        ) from error
    batch, event = tuple(dist.batch_shape), tuple(dist.event_shape)
    expected = batch + event
    broadcast = tuple(values.shape) != batch
    # a wider acts can broadcast silently too: (N, 3) against a 1-d IndependentNormal (an
    # empty event shape is not checked: TorchRL's OneHotCategorical says () for (N, k) acts)
    if batch and isinstance(acts, Tensor) and (broadcast or event and expected != acts.shape):
        how = (
            f"log_prob broadcast it to shape {tuple(values.shape)}, pairing every action with "
            "every state"
            if broadcast
            else "log_prob broadcast it over the action dimensions and summed them"
        )
        hint = "acts.squeeze(-1)" if tuple(acts.shape) == (*expected, 1) else "acts.reshape"
        raise ArgumentError(
            f"acts of shape {tuple(acts.shape)} does not match the policy's "
            f"{type(dist).__name__} (batch shape {batch}, event shape "
            f"{tuple(dist.event_shape)}): {how}; pass acts of shape {expected} (e.g. {hint})"
        )
    return sum_action_dims(values)


def entropy(dist: Distribution) -> Tensor:
    """Joint entropy of each sample's action distribution, shape ``(N,)``."""
    return sum_action_dims(dist.entropy())


def kl(old: Distribution, new: Distribution) -> Tensor:
    """``KL(old || new)`` of each sample, summed over action dimensions, shape ``(N,)``."""
    return sum_action_dims(kl_divergence(old, new))


def mean_kl(old: Distribution, new: Distribution) -> Tensor:
    """Mean over samples of ``KL(old || new)``, summed over action dimensions (a scalar)."""
    return kl(old, new).mean()


def mode(dist: Distribution) -> Tensor:
    """The most likely action of each sample (argmax for ``Categorical``, mean for ``Normal``).

    Raises
    ------
    TypeError
        If the distribution has no closed-form mode.
    """
    try:
        return dist.mode
    except NotImplementedError:
        raise ArgumentTypeError(
            f"no deterministic action for {type(dist).__name__}: it has no closed-form mode; "
            "evaluate it with sampled actions instead"
        ) from None


def _sample_categorical(dist: Categorical, generator: torch.Generator) -> Tensor:
    probs = dist.probs
    flat = probs.reshape(-1, probs.shape[-1])  # multinomial takes 1-D or 2-D only
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def _sample_normal(dist: Normal, generator: torch.Generator) -> Tensor:
    noise = torch.randn(dist.loc.shape, generator=generator, dtype=dist.loc.dtype)
    return dist.loc + dist.scale * noise


def _sample_independent(dist: Independent, generator: torch.Generator) -> Tensor:
    return sample(dist.base_dist, generator)


SAMPLERS: dict[type[Distribution], Callable[[Any, torch.Generator], Tensor]] = {
    Categorical: _sample_categorical,
    Normal: _sample_normal,
    Independent: _sample_independent,
}
"""``sample`` functions by distribution type: ``fn(dist, generator) -> actions``."""


def sample(dist: Distribution, generator: torch.Generator) -> Tensor:
    """Draw one action per sample from ``dist`` using ``generator`` (not the global RNG).

    Raises
    ------
    TypeError
        If the distribution type has no entry in :data:`SAMPLERS`.
    """
    for kind in type(dist).__mro__:
        if kind in SAMPLERS:
            return SAMPLERS[kind](dist, generator)
    raise ArgumentTypeError(
        f"cannot sample from {type(dist).__name__} with an explicit generator; register a "
        f"sampler: natgrad.distributions.SAMPLERS[{type(dist).__name__}] = fn(dist, generator)"
    )
