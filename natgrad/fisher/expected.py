"""The natural policy gradient with the expected Fisher (``fisher="expected"``).

``F = mean_i E_{a ~ pi(.|s_i)}[psi psi^T]`` -- the Hessian of the mean KL divergence that
TRPO's Fisher-vector products use -- written as ``m`` rows per sample (``R = N m`` rows
``W``, ``F = W^T W / N``; :mod:`natgrad.fisher.families`), while the gradient stays the
policy gradient of the taken actions, ``g = J^T A / N``. ``g`` is not in the row space of
``W``, so the direction is the push-through form ``d = (g - W^T y) / lam`` with
``(W W^T / N + lam I) y = W g / N`` (:mod:`natgrad.fisher.solve`), solved by the same solvers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.func import jvp

from natgrad import distributions
from natgrad._checks import (
    check_step_terms,
    consistency_tolerance,
    representable,
    require_finite,
)
from natgrad._guard import functional_call
from natgrad._tree import Tree
from natgrad.errors import FisherError
from natgrad.fisher.families import FisherFamily, family_of
from natgrad.fisher.operator import ExpectedFisherRows
from natgrad.fisher.solve import damped_direction, solve_damped
from natgrad.results import Diagnostics, NaturalGradient
from natgrad.scores import LogProbFn, PolicyScores, _LogProbModule, default_log_prob
from natgrad.solvers import SolverOptions
from natgrad.supervised.jacobians import output_jacobians

FISHERS: tuple[str, ...] = ("sampled", "expected")

__all__ = ["FISHERS", "check_fisher", "expected_natural_gradient"]


def check_fisher(fisher: object) -> str:
    """Return ``fisher`` if it is ``"sampled"`` or ``"expected"``, else raise ``FisherError``."""
    if fisher not in FISHERS:
        raise FisherError(
            f"fisher must be 'sampled' (scores of the taken actions, the default) or "
            f"'expected' (E over actions of psi psi^T, the KL Hessian), got {fisher!r}"
        )
    return str(fisher)


class _DistributionOutputs(nn.Module):
    """``obs -> z``: the parameters of ``policy(obs)`` as one row per sample."""

    def __init__(self, policy: nn.Module, family: FisherFamily) -> None:
        super().__init__()
        self.policy = policy
        self.__dict__["family"] = family  # not a submodule

    def forward(self, obs: Tree) -> Tensor:
        return self.__dict__["family"].outputs(self.policy(obs))


def _check_same_distribution(
    dist: Distribution, acts: Tree, log_probs: Tensor, log_prob_fn: LogProbFn
) -> None:
    """A custom ``log_prob_fn`` must describe the distribution ``policy(obs)`` returns."""
    try:
        own = distributions.log_prob(dist, acts).detach()  # type: ignore[arg-type]
    except Exception as error:  # noqa: BLE001 - re-raised with the diagnosis
        raise FisherError(
            "fisher='expected' takes the Fisher of policy(obs), but policy(obs).log_prob(acts) "
            f"fails ({type(error).__name__}: {str(error)[:200]}); return the action "
            "distribution from forward, or use fisher='sampled'"
        ) from error
    tol = consistency_tolerance(log_probs.dtype)
    if own.shape != log_probs.shape or not bool(
        ((own - log_probs).abs() <= tol * (1.0 + log_probs.abs())).all()
    ):
        raise FisherError(
            "fisher='expected' takes the Fisher of policy(obs), but log_prob_fn gives other "
            "log-probabilities than policy(obs).log_prob(acts) summed over action dimensions; "
            "make forward return the distribution log_prob_fn evaluates, or use "
            "fisher='sampled'"
        )


def _sampled_jd(
    policy: nn.Module,
    obs: Tree,
    acts: Tree,
    scores: PolicyScores,
    log_prob_fn: LogProbFn,
    direction: Tensor,
) -> Tensor:
    """``J d`` of the taken actions' scores: one forward-mode pass (rows if it fails)."""
    module = _LogProbModule(policy, log_prob_fn)
    named = dict(policy.named_parameters())
    primals = {f"policy.{n}": named[n].detach() for n in scores.param_names}
    tangents = dict(zip(primals, scores.unflatten(direction.to(scores.dtype)), strict=True))

    def batched(params: dict[str, Tensor]) -> Tensor:
        return functional_call(module, params, (obs, acts))

    try:
        _, jd = jvp(batched, (primals,), (tangents,))
        return jd.detach().to(torch.float64).reshape(-1)
    except (RuntimeError, NotImplementedError):  # an op without forward-mode AD
        index = torch.arange(scores.num_samples, device=scores.device)
        rows = [scores.rows(chunk).to(torch.float64) @ direction for chunk in index.split(256)]
        return torch.cat(rows)


def expected_natural_gradient(
    policy: nn.Module,
    obs: Tree,
    acts: Tree,
    scores: PolicyScores,
    log_prob_fn: LogProbFn,
    adv: Tensor,
    options: SolverOptions,
    generator: torch.Generator,
    chunk_size: int,
    notes: list[str],
    start: float,
    materialize: bool = False,
) -> NaturalGradient:
    """``d = (F + lam I)^{-1} g`` with the expected Fisher ``F`` and ``g = J^T A / N``.

    Parameters
    ----------
    policy, obs, acts
        The policy (returning a supported distribution) and the batch.
    scores
        The checked per-sample score computation of the batch (gives ``g`` by one backward
        pass and ``J d`` by one forward-mode pass; no per-sample scores are formed).
    log_prob_fn
        The ``log_prob_fn`` of the transform (must agree with ``policy(obs).log_prob``).
    adv
        Advantages ``A``, shape ``(N,)``.
    options, generator
        Solver options and the source of randomness.
    chunk_size
        Samples whose distribution Jacobians are computed in one ``vmap`` call.
    notes
        Notes to put first in ``diagnostics.fallbacks``.
    start
        ``time.perf_counter()`` at the start of the call.
    materialize
        Hold the ``N m x P`` rows in memory (``backend="materialized"``); otherwise the rows
        stay matrix-free (:class:`~natgrad.fisher.operator.ExpectedFisherRows`: ``W v`` by
        a double backward and ``W^T x`` by a backward pass, on one recorded forward pass).

    Returns
    -------
    NaturalGradient
        With ``advantages=None`` (no ``A~`` exists: ``d`` is not in the span of the sampled
        scores) and ``d_fisher_d`` with the expected Fisher.

    Raises
    ------
    FisherError
        If ``policy(obs)`` is not a supported distribution or disagrees with ``log_prob_fn``.
    """
    n = scores.num_samples
    with torch.no_grad():
        dist = policy(obs)
    family = family_of(dist)
    if log_prob_fn is not default_log_prob:
        _check_same_distribution(dist, acts, scores.log_probs, log_prob_fn)
    batched = family.outputs(dist).detach().reshape(n, -1)
    wrapper = _DistributionOutputs(policy, family)
    names = [f"policy.{name}" for name in scores.param_names]
    index = torch.arange(n, device=scores.device)
    gradient = scores.vjp(index, adv.detach()).to(torch.float64) / n
    fallbacks = list(notes)
    if materialize:
        jac = output_jacobians(wrapper, obs, names, batched, chunk_size)
        rows = family.rows(dist, jac.jacobians).reshape(-1, scores.num_params)
        require_finite(
            "the expected-Fisher rows", rows, "a scale or probability of policy(obs) reaches 0"
        )
        direction, _, result, solver_used, more = damped_direction(
            rows, n, gradient, options, generator
        )
        fisher_d = rows.to(torch.float64) @ direction
        if jac.fallback_reason is not None:
            fallbacks.append(f"distribution Jacobians one sample at a time: {jac.fallback_reason}")
        score_path, backend = jac.path, "materialized"
    else:
        m = family.rows(dist, torch.zeros_like(batched)[..., None]).reshape(n, -1).shape[1]
        scale = math.sqrt(m)
        operator = ExpectedFisherRows(
            wrapper, policy, obs, names, scores.shapes, dist, family, m, scale, chunk_size * m
        )
        operator.score_dtype = scores.dtype
        operator.check_per_sample(chunk_size)
        rhs = operator.matvec(gradient.to(operator.dtype)).to(torch.float64) / scale
        require_finite(
            "the expected-Fisher products", rhs, "a scale or probability of policy(obs) reaches 0"
        )
        direction, _, result, solver_used, more = solve_damped(
            operator, scale, gradient, options, generator, rhs
        )
        fisher_d = operator.matvec(direction.to(operator.dtype)).to(torch.float64) / scale
        fallbacks.extend(operator.notes())
        score_path, backend = operator.jacobian_path, operator.backend
    require_finite("the natural-gradient direction", direction, "it overflows float64")
    jd = _sampled_jd(policy, obs, acts, scores, log_prob_fn, direction)
    fallbacks.extend(more)
    diagnostics = Diagnostics.of_solve(
        result,
        solver=solver_used,
        backend=backend,
        score_path=score_path,
        fallbacks=fallbacks,
        num_samples=n,
        num_params=scores.num_params,
        started=start,
    )
    g_dot_d, d_fisher_d = float(gradient @ direction), float(fisher_d @ fisher_d) / n
    check_step_terms(g_dot_d, d_fisher_d, direction)
    return NaturalGradient(
        advantages=None,
        direction=scores.unflatten(
            representable("the natural-gradient direction", direction, scores.dtype)
        ),
        param_names=tuple(scores.param_names),
        jd=jd.to(adv.dtype),
        g_dot_d=g_dot_d,
        d_fisher_d=d_fisher_d,
        diagnostics=diagnostics,
    )
