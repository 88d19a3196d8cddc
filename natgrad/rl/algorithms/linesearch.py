"""Backtracking line search on KL and surrogate, shared by ``rat-trpo`` and ``cg-trpo``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

from natgrad._guard import functional_call
from natgrad.distributions import kl as kl_divergence
from natgrad.distributions import log_prob, mean_kl
from natgrad.rl.algorithms.base import surrogate
from natgrad.rl.options import AlgorithmOptions, open_unit_interval, option, positive

__all__ = ["LineSearchOptions", "LineSearchResult", "backtracking_line_search"]


@dataclasses.dataclass
class LineSearchOptions(AlgorithmOptions):
    """Options of the backtracking line search (``rat-trpo``, ``cg-trpo``)."""

    backtrack_iters: int = option(10, "Candidates tried by the line search.", positive)
    backtrack_coeff: float = option(0.5, "Shrink factor between line-search candidates, in (0, 1).",
                                    open_unit_interval)  # fmt: skip


@dataclass(frozen=True)
class LineSearchResult:
    """Outcome of :func:`backtracking_line_search`.

    Attributes
    ----------
    accepted
        Whether a step was taken (``False``: parameters untouched).
    fraction
        Fraction of the full step taken (``0.0`` if rejected).
    backtracks
        Number of halvings tried before acceptance (``max_backtracks`` if rejected).
    kl, improvement
        KL and surrogate improvement of the accepted (or the last tried) candidate.
    """

    accepted: bool
    fraction: float
    backtracks: int
    kl: float
    improvement: float


@torch.no_grad()
def backtracking_line_search(
    policy: nn.Module,
    names: Sequence[str],
    step: Sequence[Tensor],
    obs: Tensor,
    acts: Tensor,
    old_log_probs: Tensor,
    adv: Tensor,
    old_dist: Distribution,
    max_kl: float,
    max_backtracks: int,
    coeff: float,
    mean: Callable[[Tensor], Tensor] | None = None,
) -> LineSearchResult:
    """Try ``theta + coeff**j * step`` for ``j = 0, 1, ...``; keep the first safe improvement.

    A candidate is accepted when its mean KL from the old policy is at most ``max_kl`` and
    the surrogate ``mean(pi/pi_old * A)`` strictly improves. Candidates are evaluated with
    ``functional_call`` on copies, and the policy's parameters are written only on
    acceptance, so a search that rejects every step leaves them bit-identical.

    Parameters
    ----------
    policy
        The policy (evaluated, written only on acceptance).
    names, step
        Parameter names (as in ``named_parameters``) and the full step for each.
    obs, acts, old_log_probs, adv
        The batch; ``adv`` normalized.
    old_dist
        ``policy(obs)`` before the update (detached).
    max_kl
        KL trust-region radius.
    max_backtracks, coeff
        Number of candidates tried and the shrink factor between them.
    mean
        Mean of per-sample KLs and surrogate terms (``None``: over this batch). A
        data-parallel run passes the mean over every rank's samples, so every rank
        accepts the same candidate.
    """
    params = dict(policy.named_parameters())
    extra = () if mean is None else (mean,)
    base = surrogate(old_log_probs, old_log_probs, adv, *extra).item()
    kl = improvement = float("nan")
    for j in range(max_backtracks):
        fraction = coeff**j
        candidate = {n: params[n] + fraction * s for n, s in zip(names, step, strict=True)}
        dist = functional_call(policy, candidate, (obs,))
        if mean is None:
            kl = mean_kl(old_dist, dist).item()
        else:
            kl = mean(kl_divergence(old_dist, dist)).item()
        improvement = surrogate(log_prob(dist, acts), old_log_probs, adv, *extra).item() - base
        if kl <= max_kl and improvement > 0.0:
            for n in names:
                params[n].copy_(candidate[n])
            return LineSearchResult(True, fraction, j, kl, improvement)
    return LineSearchResult(False, 0.0, max_backtracks, kl, improvement)
