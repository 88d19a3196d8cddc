"""``rat-npg`` and ``rat-trpo``: the natural gradient from :class:`natgrad.RATNaturalGradient`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from natgrad import NaturalGradient, RATNaturalGradient
from natgrad._guard import functional_call
from natgrad.distributions import log_prob
from natgrad.fisher.expected import FISHERS
from natgrad.rl._errors import ConfigError
from natgrad.rl.algorithms.base import PolicyUpdate, TrustRegionOptions
from natgrad.rl.algorithms.linesearch import LineSearchOptions, backtracking_line_search
from natgrad.rl.options import (
    at_least_one_or_off,
    nonnegative_int,
    open_unit_interval,
    option,
    positive,
)
from natgrad.solvers import RL_AGENT, solver_names
from natgrad.solvers.options import ON_NONCONVERGENCE

__all__ = ["RatNPG", "RatNPGOptions", "RatOptions", "RatTRPO", "RatTRPOOptions"]

# Shrinks of the KL guard; each at least halves the step, so 10 reach < 1e-3 of it.
_MAX_SHRINKS = 10


def _rat_log_prob(policy: nn.Module, obs: Tensor, acts: Tensor) -> Tensor:
    return log_prob(policy(obs), acts)


@dataclasses.dataclass
class RatOptions(TrustRegionOptions):
    """Options of the RAT natural gradient shared by ``rat-npg`` and ``rat-trpo``.

    The defaults are the solver preset :data:`natgrad.solvers.RL_AGENT`.
    """

    damping: float = option(
        RL_AGENT.damping, "RAT Tikhonov damping lambda, in units of F = J^T J / N.", positive
    )
    solver: str = option(
        RL_AGENT.solver,
        "RAT solver for the N x N system: auto (Cholesky on GPU for N <= 4096 and on CPU "
        "below 2 x the preconditioner rank, else CG), kaczmarz, accelerated_kaczmarz, "
        "cholesky or cg.",
        choices=solver_names,
    )
    block_size: int = option(RL_AGENT.block_size, "RAT Kaczmarz block size.", positive)
    rat_max_epochs: int = option(
        RL_AGENT.max_epochs,
        "RAT Kaczmarz epochs before --rat-on-nonconvergence applies (CG is capped at 200 "
        "iterations).",
        positive,
    )
    rat_tol: float = option(
        RL_AGENT.tol, "RAT relative residual tolerance, in (0, 1).", open_unit_interval
    )
    rat_preconditioner_rank: int = option(
        RL_AGENT.preconditioner_rank,
        "Rank of the Nystrom preconditioner of RAT's CG (0 turns it off).",
        nonnegative_int(" (0 turns it off)"),
    )
    rat_on_nonconvergence: str = option(
        RL_AGENT.on_nonconvergence,
        "When the RAT solver stops above rat_tol: fallback (solve exactly with Cholesky), "
        "warn (step along the inexact iterate, e.g. a few Kaczmarz epochs as in the paper) "
        "or raise (reject the update).",
        choices=lambda: ON_NONCONVERGENCE,
    )
    rat_fisher: str = option(
        "sampled",
        "Fisher of the RAT natural gradient: sampled (scores of the taken actions) or "
        "expected (E over actions, TRPO's KL Hessian; Categorical and Normal policies).",
        choices=lambda: FISHERS,
    )


@dataclasses.dataclass
class RatNPGOptions(RatOptions):
    """Options of ``rat-npg``: RAT's and the KL guard."""

    kl_guard: float = option(
        2.0, "Shrink a step whose measured KL exceeds kl_guard * max_kl (0 disables).",
        at_least_one_or_off,
    )  # fmt: skip


@dataclasses.dataclass
class RatTRPOOptions(RatOptions, LineSearchOptions):
    """Options of ``rat-trpo``: RAT's and the line search's."""


class _RatBase(PolicyUpdate):
    options: RatOptions

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        super().__init__(policy, options, seed)
        config = self.options
        options = RL_AGENT.replace(
            damping=config.damping,
            solver=config.solver,
            block_size=config.block_size,
            max_epochs=config.rat_max_epochs,
            tol=config.rat_tol,
            preconditioner_rank=config.rat_preconditioner_rank,
            on_nonconvergence=config.rat_on_nonconvergence,
        )
        self.rat = RATNaturalGradient.from_options(
            options, _rat_log_prob, seed, fisher=config.rat_fisher
        )

    def _direction(
        self, obs: Tensor, acts: Tensor, adv: Tensor
    ) -> tuple[NaturalGradient, dict[str, float]]:
        # Scores are per-sample gradients: autograd must be on even if the caller disabled it.
        with torch.enable_grad():
            ng = self.rat.natural_gradient(self.policy, obs, acts, adv)
        diag = ng.diagnostics
        stats = {
            "g_dot_d": ng.g_dot_d,
            "d_fisher_d": ng.d_fisher_d,
            "solver_residual": diag.residual,
            "solver_iterations": float(diag.iterations),
            "solver_seconds": diag.seconds,
            "solver_fallbacks": float(len(diag.fallbacks)),  # every note, see docs/rl.md
            "solver_converged": float(diag.converged),
        }
        return ng, stats

    def use_process_group(self, group: Any, mean: Callable[[Tensor], Tensor]) -> None:
        """Solve for the natural gradient of the union of every rank's batch.

        The RAT object is rebuilt with ``process_group=group`` (same options and seed);
        the KL guard and the line search measure global means with ``mean``.

        Raises
        ------
        ConfigError
            The sampled Fisher is not the one asked for (only it has a distributed form).
        """
        rat = self.rat
        fisher = getattr(rat, "fisher", "sampled")
        if fisher != "sampled":
            raise ConfigError(
                f"--rat-fisher {fisher} has no data-parallel form; use --rat-fisher sampled "
                "with --nproc (or torchrun), or train in one process"
            )
        self.rat = RATNaturalGradient(
            rat.log_prob_fn,
            seed=rat.seed,
            backend=rat.backend,
            memory_budget=rat.memory_budget,
            process_group=group,
            **rat.options.keywords(),
        )
        self.sample_mean = mean

    def state_dict(self) -> dict[str, Any]:
        """The block-sampling generator of the RAT solver."""
        return {"rat_generator": self.rat.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the block-sampling generator."""
        self.rat.generator.set_state(state["rat_generator"])


class RatNPG(_RatBase):
    """Natural policy gradient with RAT and the closed-form KL step (no line search).

    ``theta += eta * d`` with ``eta = sqrt(2 max_kl / d^T F d)``, where ``d`` and
    ``d^T F d`` come from one RAT solve (``docs/derivation.md``). The trainer logs the KL
    actually taken next to ``kl_target`` on every update.

    The quadratic KL model can fail far from it (a nearly deterministic policy): if the
    measured KL exceeds ``kl_guard * max_kl``, the step is shrunk by
    ``sqrt(max_kl / KL)`` (the model refitted to the measured KL) until it does not. This
    costs one forward pass per update, looks only at the KL (not at the surrogate, unlike
    ``rat-trpo``) and is off with ``kl_guard=0``.
    """

    Options = RatNPGOptions
    options: RatNPGOptions

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """Take one natural-gradient step of KL ``max_kl`` (to second order)."""
        cfg = self.options
        ng, stats = self._direction(obs, acts, adv)
        eta = ng.step_size(cfg.max_kl)
        params = dict(self.policy.named_parameters())
        shrinks = 0
        with torch.no_grad():
            old_dist = self.policy(obs) if cfg.kl_guard > 0 else None
            while True:
                candidate = {
                    n: params[n] + eta * d
                    for n, d in zip(ng.param_names, ng.direction, strict=True)
                }
                if old_dist is None or shrinks == _MAX_SHRINKS:
                    break
                new_dist = functional_call(self.policy, candidate, (obs,))
                kl = float(self.measured_kl(old_dist, new_dist))
                if kl <= cfg.kl_guard * cfg.max_kl:
                    break
                eta *= min(0.5, math.sqrt(cfg.max_kl / kl))
                shrinks += 1
            for name in ng.param_names:
                params[name].copy_(candidate[name])
        return {**stats, "step_size": eta, "kl_target": cfg.max_kl, "kl_guard_shrinks": shrinks}


class RatTRPO(_RatBase):
    """TRPO with the RAT natural gradient in place of conjugate gradient.

    Full step as :class:`RatNPG`, then backtracking on KL and surrogate
    (:func:`~natgrad.rl.algorithms.linesearch.backtracking_line_search`).
    """

    Options = RatTRPOOptions
    options: RatTRPOOptions

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """Natural-gradient direction, backtracked until KL and surrogate are acceptable."""
        ng, stats = self._direction(obs, acts, adv)
        eta = ng.step_size(self.options.max_kl)
        with torch.no_grad():
            old_dist = self.policy(obs)
        result = backtracking_line_search(
            self.policy,
            ng.param_names,
            [eta * d for d in ng.direction],
            obs,
            acts,
            old_log_probs,
            adv,
            old_dist,
            self.options.max_kl,
            self.options.backtrack_iters,
            self.options.backtrack_coeff,
            self.sample_mean,
        )
        return {
            **stats,
            "step_size": eta * result.fraction,
            "kl_target": self.options.max_kl,
            "backtracks": float(result.backtracks),
            "step_accepted": float(result.accepted),
            "surrogate_improvement": result.improvement,
        }
