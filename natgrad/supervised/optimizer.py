"""A training step that descends along the natural gradient, with damping schedules."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from natgrad._checks import check_choice, check_positive_float, select_parameters
from natgrad._tree import Tree
from natgrad.errors import ArgumentError, ArgumentTypeError
from natgrad.results import Diagnostics
from natgrad.solvers import SUPERVISED, OnNonConvergence, SolverName
from natgrad.supervised.fisher import FisherName, LossName, exact_fisher_quadratic, mean_loss
from natgrad.supervised.jacobians import output_jvp
from natgrad.supervised.natural_gradient import SupervisedNaturalGradient, SupervisedResult

DampingScheduleName = Literal["fixed", "levenberg_marquardt"]
DAMPING_SCHEDULES: tuple[str, ...] = ("fixed", "levenberg_marquardt")

__all__ = ["DAMPING_SCHEDULES", "DampingScheduleName", "NaturalGradientOptimizer", "StepInfo"]


@dataclass(frozen=True)
class StepInfo:
    """What one :meth:`NaturalGradientOptimizer.step` did.

    Attributes
    ----------
    loss
        Mean loss on the batch before the step.
    damping
        ``lam`` used for this step.
    next_damping
        ``lam`` the next step will use.
    loss_after
        Mean loss on the same batch after the step (Levenberg-Marquardt only, else ``None``).
    predicted_change
        Change of the loss predicted by the quadratic model
        ``g^T delta + delta^T F delta / 2`` of the actual update ``delta`` (LM only).
    reduction_ratio
        ``rho = (loss_after - loss) / predicted_change`` (LM only; ``None`` when the update
        was not a predicted decrease, e.g. momentum overshooting).
    diagnostics
        The solve's :class:`~natgrad.Diagnostics`.
    """

    loss: float
    damping: float
    next_damping: float
    loss_after: float | None
    predicted_change: float | None
    reduction_ratio: float | None
    diagnostics: Diagnostics


class NaturalGradientOptimizer:
    r"""Train any ``nn.Module`` with natural-gradient (damped Gauss-Newton) steps.

    Each :meth:`step` computes ``d = (F + lam I)^{-1} g`` on the batch with
    :class:`~natgrad.supervised.SupervisedNaturalGradient`, hands ``d`` to a base torch
    optimizer as the gradient (plain SGD with ``lr``/``momentum`` by default, so
    ``theta -= lr * d``), and updates ``lam`` according to ``damping_schedule``.

    Parameters
    ----------
    model
        The model to train.
    loss
        ``"mse"`` (per-sample ``0.5 |f(x) - y|^2``) or ``"cross_entropy"``.
    lr
        Step size of the default SGD base optimizer; ``1.0`` is the full Gauss-Newton step.
    momentum
        Momentum of the default SGD base optimizer.
    damping
        Initial ``lam > 0`` (units of the per-sample Fisher).
    damping_schedule
        ``"fixed"``; ``"levenberg_marquardt"``: after each step compare the actual change of
        the batch loss with the change predicted by the quadratic model
        ``g^T delta + delta^T F delta / 2`` (exact Fisher, actual update ``delta``) and
        multiply ``lam`` by ``lm_factor`` when the ratio ``rho < 1/4``, divide when
        ``rho > 3/4`` (Martens 2010), and multiply it too when the update was not a
        predicted decrease and the loss rose; or a callable ``step -> lam`` (``step`` from 0).
        LM costs one extra forward and one Jacobian-vector product per step. It only
        adapts ``lam``: a step whose loss rose is kept, not undone (the next one is more
        damped); the initial ``damping`` must lie in ``[min_damping, max_damping]``. A
        step that raises (a schedule's error, an operation without forward-mode autodiff
        under LM) is undone: parameters and the base optimizer's state are restored.
    fisher
        ``"exact"`` or ``"sampled"``.
    solver
        ``"kaczmarz"``, ``"cholesky"`` or ``"cg"``.
    params
        Parameters to train; ``None``: every parameter with ``requires_grad=True``.
    seed
        Seed for sampled targets and Kaczmarz blocks.
    base_optimizer
        A ``torch.optim.Optimizer`` over (a subset of) the trained parameters to apply
        ``d`` with, instead of the default SGD; ``lr`` and ``momentum`` are then unused.
    lm_factor
        Multiplicative damping change of the LM schedule (``> 1``).
    min_damping, max_damping
        Bounds of the LM schedule.
    block_size, max_epochs, tol, max_iters, on_nonconvergence, resample_blocks, chunk_size
        Solver keywords as in :class:`~natgrad.supervised.SupervisedNaturalGradient`.
    preconditioner_rank, compile
        Also as there.

    Attributes
    ----------
    damping
        ``lam`` for the next step.
    steps
        Steps taken so far.
    transform
        The :class:`~natgrad.supervised.SupervisedNaturalGradient` computing ``d``.
    base_optimizer
        The optimizer that applies ``d``.

    Notes
    -----
    :meth:`state_dict` / :meth:`load_state_dict` save and restore ``steps``, ``damping``,
    the generator and the base optimizer's state (not the model's).

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from natgrad.supervised import NaturalGradientOptimizer
    >>> model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> x = torch.randn(64, 2)
    >>> y = x.prod(dim=1, keepdim=True)
    >>> opt = NaturalGradientOptimizer(model, loss="mse", damping=1e-2, seed=0,
    ...                                damping_schedule="levenberg_marquardt")
    >>> first = opt.step(x, y).loss
    >>> for _ in range(9):
    ...     info = opt.step(x, y)
    >>> info.loss < first
    True
    """

    def __init__(
        self,
        model: nn.Module,
        loss: LossName = "mse",
        lr: float = 1.0,
        momentum: float = 0.0,
        damping: float = SUPERVISED.damping,
        damping_schedule: DampingScheduleName | Callable[[int], float] = "fixed",
        fisher: FisherName = "exact",
        solver: SolverName = SUPERVISED.solver,  # type: ignore[assignment]
        params: Iterable[Tensor] | None = None,
        seed: int | None = None,
        *,
        base_optimizer: torch.optim.Optimizer | None = None,
        lm_factor: float = 1.5,
        min_damping: float = 1e-8,
        max_damping: float = 1e4,
        block_size: int = SUPERVISED.block_size,
        max_epochs: int = SUPERVISED.max_epochs,
        tol: float = SUPERVISED.tol,
        max_iters: int = SUPERVISED.max_iters,
        on_nonconvergence: OnNonConvergence = SUPERVISED.on_nonconvergence,  # type: ignore[assignment]
        resample_blocks: bool = SUPERVISED.resample_blocks,
        chunk_size: int = 256,
        preconditioner_rank: int = SUPERVISED.preconditioner_rank,
        compile: bool = SUPERVISED.compile,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        options = SUPERVISED.pick(locals())
        self.transform = SupervisedNaturalGradient.from_options(
            options, loss, fisher, seed, chunk_size
        )
        if callable(damping_schedule):
            self._schedule: Callable[[int], float] | None = damping_schedule
            self.damping_schedule = "callable"
        else:
            self._schedule = None
            self.damping_schedule = check_choice(
                "damping_schedule", damping_schedule, DAMPING_SCHEDULES
            )
        self.lm_factor = check_positive_float("lm_factor", lm_factor, "; e.g. 1.5")
        if self.lm_factor <= 1.0:
            raise ArgumentError(f"lm_factor must be > 1, got {lm_factor!r}; e.g. 1.5")
        self.min_damping = check_positive_float("min_damping", min_damping)
        self.max_damping = check_positive_float("max_damping", max_damping)
        if self.min_damping > self.max_damping:
            raise ArgumentError(
                f"min_damping={min_damping!r} exceeds max_damping={max_damping!r}; swap them"
            )
        self.param_names = select_parameters(model, params, "model")
        named = dict(model.named_parameters())
        self._params = [named[n] for n in self.param_names]
        if base_optimizer is None:
            lr = check_positive_float("lr", lr, "; 1.0 is the full Gauss-Newton step")
            if (
                isinstance(momentum, bool)
                or not isinstance(momentum, (int, float))
                or not (0.0 <= momentum < 1.0)
            ):
                raise ArgumentError(f"momentum must be a float in [0, 1), got {momentum!r}")
            base_optimizer = torch.optim.SGD(self._params, lr=lr, momentum=float(momentum))
        elif not isinstance(base_optimizer, torch.optim.Optimizer):
            raise ArgumentTypeError(
                "base_optimizer must be a torch.optim.Optimizer (e.g. "
                f"torch.optim.SGD(model.parameters(), lr=1.0)), got {type(base_optimizer).__name__}"
            )
        else:
            trained = {id(p) for p in self._params}
            for group in base_optimizer.param_groups:
                for p in group["params"]:
                    if id(p) not in trained:
                        raise ArgumentError(
                            f"base_optimizer holds a parameter (shape {tuple(p.shape)}) that "
                            "is not among the trained params; build it over the same "
                            "parameters as params (or model.parameters() when params=None)"
                        )
        self.base_optimizer = base_optimizer
        self.steps = 0
        self.damping = self.transform.damping
        if self.damping_schedule == "levenberg_marquardt" and not (
            self.min_damping <= self.damping <= self.max_damping
        ):
            raise ArgumentError(
                f"damping={self.damping!r} lies outside [min_damping, max_damping] = "
                f"[{self.min_damping!r}, {self.max_damping!r}], the range Levenberg-Marquardt "
                "keeps it in; start inside it or widen the range"
            )

    @property
    def loss(self) -> str:
        """The loss name (``"mse"`` or ``"cross_entropy"``)."""
        return self.transform.loss

    def step(self, inputs: Tree, targets: Tensor) -> StepInfo:
        """Take one natural-gradient step on a batch.

        Parameters
        ----------
        inputs
            The batch inputs (first dimension the sample).
        targets
            Regression targets or class indices, as in
            :func:`~natgrad.supervised.natural_gradient`.

        Returns
        -------
        StepInfo
            Loss before (and, for LM, after) the step, the damping and the solve diagnostics.
        """
        damping = self._current_damping()
        # The solve reads its damping from the options: change it there.
        self.transform.options = self.transform.options.replace(damping=damping)
        result = self.transform(self.model, inputs, targets, self._params)
        before = [p.detach().clone() for p in self._params]
        optimizer_state = copy.deepcopy(self.base_optimizer.state_dict())
        saved = [p.grad for p in self._params]
        for p, d in zip(self._params, result.direction, strict=True):
            p.grad = d.clone()
        try:
            self.base_optimizer.step()
        finally:
            for p, g in zip(self._params, saved, strict=True):
                p.grad = g
        try:  # a step that cannot be completed is undone: parameters, optimizer, counters
            return self._finish_step(inputs, targets, result, damping, before)
        except BaseException:
            with torch.no_grad():
                for p, b in zip(self._params, before, strict=True):
                    p.copy_(b)
            self.base_optimizer.load_state_dict(optimizer_state)
            raise

    def _finish_step(
        self,
        inputs: Tree,
        targets: Tensor,
        result: SupervisedResult,
        damping: float,
        before: list[Tensor],
    ) -> StepInfo:
        """Levenberg-Marquardt's reading of the step taken and the next damping."""
        steps = self.steps + 1
        loss_after = predicted = ratio = None
        next_damping = damping
        if self.damping_schedule == "levenberg_marquardt":
            delta = [p.detach() - b for p, b in zip(self._params, before, strict=True)]
            try:
                outputs, jt = output_jvp(self.model, inputs, self.param_names, delta, before)
            except NotImplementedError as error:
                raise ArgumentError(
                    "damping_schedule='levenberg_marquardt' predicts the loss change with "
                    "forward-mode autodiff through the model, which one of its operations "
                    f"does not support ({str(error).splitlines()[0][:160]}); the step was "
                    "undone; use a fixed damping or a callable damping_schedule"
                ) from error
            grad_dot = sum(
                float((g.to(torch.float64) * t.to(torch.float64)).sum())
                for g, t in zip(result.gradient, delta, strict=True)
            )
            predicted = grad_dot + 0.5 * exact_fisher_quadratic(outputs, jt, self.loss)
            with torch.no_grad():
                new_outputs = self.model(inputs)
                new_outputs = new_outputs.reshape(new_outputs.shape[0], -1)
                loss_after = float(
                    mean_loss(
                        new_outputs, _loss_targets(targets, new_outputs, self.loss), self.loss
                    )
                )
            if predicted < 0.0 and math.isfinite(loss_after):
                ratio = (loss_after - result.loss) / predicted
                if ratio < 0.25:
                    next_damping = damping * self.lm_factor
                elif ratio > 0.75:
                    next_damping = damping / self.lm_factor
            elif not math.isfinite(loss_after) or loss_after > result.loss:
                # no decrease was predicted (e.g. momentum or lr > 2 overshooting) and the
                # loss rose: the quadratic model failed as badly as at a poor ratio
                next_damping = damping * self.lm_factor
            next_damping = min(max(next_damping, self.min_damping), self.max_damping)
        if self._schedule is not None:
            next_damping = self._scheduled_damping(steps)
        self.steps, self.damping = steps, next_damping
        return StepInfo(
            result.loss, damping, self.damping, loss_after, predicted, ratio, result.diagnostics
        )

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs besides the model.

        ``steps``, ``damping`` (as Levenberg-Marquardt left it), the state of the generator
        behind sampled targets and Kaczmarz blocks, and the base optimizer's state.
        """
        return {
            "steps": self.steps,
            "damping": self.damping,
            "generator": self.transform.generator.get_state(),
            "base_optimizer": self.base_optimizer.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict` (validated before anything changes).

        Raises
        ------
        ArgumentError
            ``state`` lacks a key, or holds a negative ``steps`` or a ``damping`` that is
            not a finite float > 0.
        ArgumentTypeError
            ``state`` is not a dict, or ``generator`` is not a ``torch.ByteTensor``.
        """
        if not isinstance(state, dict):
            raise ArgumentTypeError(
                f"state must be the dict from NaturalGradientOptimizer.state_dict(), got "
                f"{type(state).__name__}"
            )
        missing = [k for k in ("steps", "damping", "generator", "base_optimizer") if k not in state]
        if missing:
            raise ArgumentError(
                f"state lacks {', '.join(missing)}; pass the dict from "
                "NaturalGradientOptimizer.state_dict()"
            )
        steps = state["steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ArgumentError(f"state['steps'] must be an int >= 0, got {steps!r}")
        damping = check_positive_float("state['damping']", state["damping"])
        generator = state["generator"]
        if not isinstance(generator, Tensor) or generator.dtype != torch.uint8:
            raise ArgumentTypeError(
                "state['generator'] must be the torch.ByteTensor of Generator.get_state(), "
                f"got {type(generator).__name__}"
            )
        self.base_optimizer.load_state_dict(state["base_optimizer"])
        self.transform.generator.set_state(generator)
        self.steps, self.damping = steps, damping

    def _current_damping(self) -> float:
        if self._schedule is None:
            return self.damping
        return self._scheduled_damping(self.steps)

    def _scheduled_damping(self, step: int) -> float:
        return check_positive_float(
            "damping_schedule(step)",
            self._schedule(step),
            f" at step {step}; the schedule must return a finite float > 0",
        )


def _loss_targets(targets: Tensor, outputs: Tensor, loss: str) -> Tensor:
    return targets.reshape(outputs.shape).to(outputs.dtype) if loss == "mse" else targets
