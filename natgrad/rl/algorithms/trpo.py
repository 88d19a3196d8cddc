"""``cg-trpo``: classic TRPO, conjugate gradient on autograd Fisher-vector products."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from natgrad._tree import unflatten
from natgrad.distributions import log_prob, mean_kl
from natgrad.rl.algorithms.base import PolicyUpdate, TrustRegionOptions, surrogate
from natgrad.rl.algorithms.linesearch import LineSearchOptions, backtracking_line_search
from natgrad.rl.options import nonnegative, option, positive

__all__ = ["CGTRPO", "CGTRPOOptions", "conjugate_gradient"]


def conjugate_gradient(
    fvp: Callable[[Tensor], Tensor], b: Tensor, iters: int, tol: float = 1e-10
) -> Tensor:
    """Solve ``F x = b`` approximately by ``iters`` conjugate-gradient steps from ``x = 0``.

    This is classic TRPO's fixed-iteration CG on Fisher-vector products, kept apart from
    :func:`natgrad.solvers.cg_solve` on purpose: ``cg-trpo`` is the peer baseline and must
    do what TRPO implementations do (no tolerance, no preconditioner, no fallback).
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rr = r @ r
    for _ in range(iters):
        fp = fvp(p)
        alpha = rr / (p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = r @ r
        if rr_new < tol:
            break
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


@dataclasses.dataclass
class CGTRPOOptions(TrustRegionOptions, LineSearchOptions):
    """Options of ``cg-trpo``: the trust region, CG and the line search."""

    cg_iters: int = option(10, "Conjugate-gradient iterations of cg-trpo.", positive)
    cg_damping: float = option(
        0.1, "Damping added to the Fisher-vector products of cg-trpo.", nonnegative
    )


class CGTRPO(PolicyUpdate):
    """Trust region policy optimization (Schulman et al., 2015), as in Stable-Baselines3.

    The Fisher is the Hessian of the mean KL (exact expectation over actions), applied by
    double backprop; ``cg_iters`` CG steps with ``cg_damping`` give the direction ``s``,
    scaled to ``sqrt(2 max_kl / s^T F s)``, then the shared backtracking line search.
    """

    Options = CGTRPOOptions
    options: CGTRPOOptions

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """CG natural-gradient direction, backtracked on KL and surrogate."""
        cfg = self.options
        named = [(n, p) for n, p in self.policy.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        params = [p for _, p in named]
        with torch.no_grad():
            old_dist = self.policy(obs)
        dist = self.policy(obs)
        grads = torch.autograd.grad(
            surrogate(log_prob(dist, acts), old_log_probs, adv), params, retain_graph=True
        )
        g = torch.cat([x.reshape(-1) for x in grads])
        kl_grads = torch.autograd.grad(mean_kl(old_dist, dist), params, create_graph=True)
        flat_kl_grad = torch.cat([x.reshape(-1) for x in kl_grads])

        def fvp(v: Tensor) -> Tensor:
            hv = torch.autograd.grad(flat_kl_grad @ v, params, retain_graph=True)
            return torch.cat([x.reshape(-1) for x in hv]) + cfg.cg_damping * v

        s = conjugate_gradient(fvp, g, cfg.cg_iters)
        shs = float(s @ fvp(s))
        eta = (2.0 * cfg.max_kl / shs) ** 0.5 if shs > 0 else 0.0
        full = (eta * s).detach()
        steps = list(unflatten(full, [p.shape for p in params]))
        result = backtracking_line_search(
            self.policy,
            names,
            steps,
            obs,
            acts,
            old_log_probs,
            adv,
            old_dist,
            cfg.max_kl,
            cfg.backtrack_iters,
            cfg.backtrack_coeff,
        )
        return {
            "step_size": eta * result.fraction,
            "kl_target": cfg.max_kl,
            "backtracks": float(result.backtracks),
            "step_accepted": float(result.accepted),
            "surrogate_improvement": result.improvement,
        }
