"""Supervised natural gradient / damped Gauss-Newton direction through the RAT solvers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natgrad._checks import (
    check_batch,
    check_choice,
    check_finite_parameters,
    check_policy,
    check_positive_int,
    parameter_device_dtype,
    representable,
    require_finite,
    select_parameters,
)
from natgrad._guard import differentiable_paths, unchanged_inputs, unchanged_module
from natgrad._tree import Tree, tree_leaves, unflatten
from natgrad.errors import ArgumentError, ArgumentTypeError, NonFiniteError
from natgrad.fisher.solve import Form, damped_direction
from natgrad.results import Diagnostics
from natgrad.solvers import (
    SUPERVISED,
    OnNonConvergence,
    SolveResult,
    SolverName,
    SolverOptions,
    seeded_generator,
)
from natgrad.solvers.options import OptionsView
from natgrad.supervised.fisher import (
    FISHERS,
    LOSSES,
    FisherName,
    FisherRows,
    LossName,
    fisher_rows,
)
from natgrad.supervised.jacobians import output_jacobians

__all__ = ["SupervisedNaturalGradient", "SupervisedResult", "natural_gradient"]


@dataclass(frozen=True)
class SupervisedResult:
    """The natural-gradient direction of one batch and what came with it.

    Attributes
    ----------
    direction
        ``d = (F + lam I)^{-1} g``, one tensor per selected parameter (same shapes and
        dtype). A *descent* direction: update with ``theta -= lr * d``.
    gradient
        ``g``, the gradient of the mean loss, shaped like ``direction``.
    param_names
        Names of the selected parameters, matching ``direction``.
    loss
        Mean loss on the batch at the current parameters.
    g_dot_d
        ``g^T d``: first-order decrease of the loss per unit step along ``-d``.
    d_fisher_d
        ``d^T F d`` with the Fisher used for the solve.
    form
        ``"kernel"`` (``g`` in the row space: ``d = W^T (W W^T/N + lam I)^{-1} u / N``) or
        ``"push_through"`` (``d = (g - W^T (W W^T/N + lam I)^{-1} W g / N) / lam``).
    num_rows
        ``R``, rows of the score matrix (``N k`` for an exact Fisher, ``N`` sampled).
    sampled_targets
        The targets drawn from the model for ``fisher="sampled"``, else ``None``.
    diagnostics
        Solver, residual, iterations, wall time, fallbacks; ``num_samples`` is ``N``.
    """

    direction: tuple[Tensor, ...]
    gradient: tuple[Tensor, ...]
    param_names: tuple[str, ...]
    loss: float
    g_dot_d: float
    d_fisher_d: float
    form: Form
    num_rows: int
    sampled_targets: Tensor | None
    diagnostics: Diagnostics


class SupervisedNaturalGradient(OptionsView):
    r"""Natural gradient (damped Gauss-Newton) of a supervised loss, via the RAT solvers.

    For ``N`` samples with per-sample output Jacobians ``J_i`` (``k x P``) the direction is

    * primal: ``d = (F + lam I)^{-1} g`` -- a ``P x P`` system;
    * kernel (Woodbury): ``F = W^T W / N`` with ``R`` score rows ``W`` (``R = N k`` for the
      exact Fisher), ``g = W^T u / N`` and ``d = W^T (W W^T / N + lam I)^{-1} u / N`` -- an
      ``R x R`` system, cheaper whenever ``R < P``.

    For ``loss="mse"`` (per-sample ``0.5 |f(x) - y|^2``) the exact Fisher is the Gauss-Newton
    matrix ``mean_i J_i^T J_i`` and the residuals play the role of advantages. For
    ``loss="cross_entropy"`` it is ``mean_i J_i^T (diag p_i - p_i p_i^T) J_i``. With
    ``fisher="sampled"`` targets are drawn from the model (one per sample), ``F`` is the
    Monte-Carlo Fisher of their scores and, since ``g`` is then outside the rows' span, the
    push-through form ``d = (g - W^T (W W^T / N + lam I)^{-1} W g / N) / lam`` is used.

    Parameters
    ----------
    loss
        ``"mse"`` or ``"cross_entropy"`` (outputs are logits, targets class indices).
    damping
        ``lam > 0`` in the units of ``F`` (per-sample Fisher of the mean loss).
    fisher
        ``"exact"`` (output-space Fisher, ``k`` rows per sample) or ``"sampled"``.
    solver
        ``"kaczmarz"`` (randomized block Kaczmarz), ``"cholesky"`` (exact) or ``"cg"``.
    block_size
        Kaczmarz block size, in score rows (``k`` per sample for an exact Fisher).
    max_epochs
        Kaczmarz sweeps before giving up.
    tol
        Relative residual at which iterative solvers stop, in ``(0, 1)``.
    max_iters
        CG iteration cap.
    seed
        Seeds the generator that draws sampled targets (first) and Kaczmarz blocks (then):
        an integer in ``[0, 2**64 - 1]``, or ``None`` to seed from the operating system.
    on_nonconvergence
        ``"fallback"`` (exact Cholesky solve, noted in the diagnostics), ``"warn"`` or
        ``"raise"`` when an iterative solver stops above ``tol``.
    resample_blocks
        Draw a new Kaczmarz paving each epoch.
    chunk_size
        Samples whose Jacobians are computed in one ``vmap`` call.
    preconditioner_rank
        Rank of CG's Nystrom preconditioner (``0``, the default, turns it off).
    compile
        Run the iterative solvers' fused ``torch.compile`` step.

    Attributes
    ----------
    generator
        The ``torch.Generator`` behind all randomness of this object.
    diagnostics
        :class:`~natgrad.Diagnostics` of the latest call, ``None`` before the first.

    Notes
    -----
    ``W`` is held in memory (``R x P`` in the parameters' dtype) alongside the Jacobians
    (``N x k x P``); use mini-batches so that fits.
    """

    def __init__(
        self,
        loss: LossName = "mse",
        damping: float = SUPERVISED.damping,
        fisher: FisherName = "exact",
        solver: SolverName = SUPERVISED.solver,  # type: ignore[assignment]
        block_size: int = SUPERVISED.block_size,
        max_epochs: int = SUPERVISED.max_epochs,
        tol: float = SUPERVISED.tol,
        max_iters: int = SUPERVISED.max_iters,
        seed: int | None = None,
        *,
        on_nonconvergence: OnNonConvergence = SUPERVISED.on_nonconvergence,  # type: ignore[assignment]
        resample_blocks: bool = SUPERVISED.resample_blocks,
        chunk_size: int = 256,
        preconditioner_rank: int = SUPERVISED.preconditioner_rank,
        compile: bool = SUPERVISED.compile,
    ) -> None:
        self.loss = check_choice("loss", loss, LOSSES)
        self.fisher = check_choice("fisher", fisher, FISHERS)
        self.options = SUPERVISED.pick(locals())  # every solver keyword, validated
        self.seed = seed
        self.chunk_size = check_positive_int("chunk_size", chunk_size, "; try 256")
        self.generator = seeded_generator(seed)
        self.diagnostics: Diagnostics | None = None

    @classmethod
    def from_options(
        cls,
        options: SolverOptions,
        loss: LossName = "mse",
        fisher: FisherName = "exact",
        seed: int | None = None,
        chunk_size: int = 256,
    ) -> SupervisedNaturalGradient:
        """Build from a :class:`~natgrad.solvers.SolverOptions` instead of solver keywords."""
        return cls(loss, fisher=fisher, seed=seed, chunk_size=chunk_size, **options.keywords())

    def __repr__(self) -> str:
        return (
            f"SupervisedNaturalGradient(loss={self.loss!r}, damping={self.damping}, "
            f"fisher={self.fisher!r}, solver={self.solver!r}, block_size={self.block_size}, "
            f"max_epochs={self.max_epochs}, tol={self.tol}, max_iters={self.max_iters}, "
            f"seed={self.seed})"
        )

    def __call__(
        self,
        model: nn.Module,
        inputs: Tree,
        targets: Tensor,
        params: Iterable[Tensor] | None = None,
    ) -> SupervisedResult:
        """Compute ``d = (F + lam I)^{-1} g`` on one batch.

        Parameters
        ----------
        model
            Any ``nn.Module``; ``model(inputs)`` has shape ``(N, ...)`` (flattened to
            ``(N, k)``; logits ``(N, C)`` for cross-entropy). Neither its parameters nor their
            ``.grad`` are touched.
        inputs
            A tensor (or dict/list/tuple of tensors) whose first dimension is the sample.
        targets
            Regression targets shaped like the outputs (mse) or class indices ``(N,)``.
        params
            Parameters ``theta`` the Fisher is taken over; ``None``: all trainable ones.

        Returns
        -------
        SupervisedResult
            The direction, the gradient, the loss and diagnostics.
        """
        start = time.perf_counter()
        if not isinstance(model, nn.Module):
            raise ArgumentTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_policy(model, "model")
        names = select_parameters(model, params, "model")
        device, dtype = parameter_device_dtype(model, names, "model")
        check_finite_parameters(model, "model")
        n = _check_inputs(inputs, device, dtype)
        with unchanged_module(model, "model"), differentiable_paths():
            with torch.no_grad(), unchanged_inputs({"inputs": inputs}, "model(inputs)"):
                raw = model(inputs)
            outputs = _check_outputs(raw, n, self.loss)
            _check_targets(targets, outputs, raw, self.loss)
            jac = output_jacobians(model, inputs, names, outputs, self.chunk_size)
        if self.loss == "mse":
            targets = targets.reshape(outputs.shape)
        built = fisher_rows(
            jac.outputs, jac.jacobians, targets.detach(), self.loss, self.fisher, self.generator
        )
        direction, form, result, solver_used, fallbacks = self._direction(built)
        if jac.fallback_reason is not None:
            fallbacks.insert(0, f"per-sample Jacobians one sample at a time: {jac.fallback_reason}")
        rows = built.rows
        fisher_d = (rows @ direction.to(rows.dtype)).to(torch.float64)
        numels = [p.numel() for p in _selected(model, names)]
        shapes = [p.shape for p in _selected(model, names)]
        self.diagnostics = Diagnostics(
            solver=solver_used,
            backend="materialized",
            score_path=jac.path,
            residual=result.residual,
            iterations=result.iterations,
            converged=result.converged,
            seconds=time.perf_counter() - start,
            fallbacks=tuple(fallbacks),
            num_samples=n,
            num_params=int(sum(numels)),
            compiled=result.compiled,
            direction_error=result.direction_error,
            condition=result.condition,
            precision=result.precision,
        )
        require_finite("the natural-gradient direction", direction, "it overflows float64")
        representable("the natural-gradient direction", direction, dtype)
        return SupervisedResult(
            direction=unflatten(direction.to(dtype), shapes),
            gradient=unflatten(built.gradient.to(dtype), shapes),
            param_names=tuple(names),
            loss=built.loss,
            g_dot_d=float(built.gradient @ direction),
            d_fisher_d=float(fisher_d @ fisher_d) / n,
            form=form,
            num_rows=int(rows.shape[0]),
            sampled_targets=built.sampled_targets,
            diagnostics=self.diagnostics,
        )

    # -- internals ----------------------------------------------------------------------
    def _direction(self, built: FisherRows) -> tuple[Tensor, Form, SolveResult, str, list[str]]:
        return damped_direction(
            built.rows,
            built.num_samples,
            built.gradient,
            self.options,
            self.generator,
            coefficients=built.coefficients,
        )


def natural_gradient(
    model: nn.Module,
    inputs: Tree,
    targets: Tensor,
    loss: LossName = "mse",
    damping: float = SUPERVISED.damping,
    fisher: FisherName = "exact",
    solver: SolverName = SUPERVISED.solver,  # type: ignore[assignment]
    params: Iterable[Tensor] | None = None,
    seed: int | None = None,
    *,
    block_size: int = SUPERVISED.block_size,
    max_epochs: int = SUPERVISED.max_epochs,
    tol: float = SUPERVISED.tol,
    max_iters: int = SUPERVISED.max_iters,
    on_nonconvergence: OnNonConvergence = SUPERVISED.on_nonconvergence,  # type: ignore[assignment]
    resample_blocks: bool = SUPERVISED.resample_blocks,
    chunk_size: int = 256,
    preconditioner_rank: int = SUPERVISED.preconditioner_rank,
    compile: bool = SUPERVISED.compile,
) -> tuple[Tensor, ...]:
    """Natural-gradient direction ``d = (F + lam I)^{-1} g`` of a supervised loss.

    One-call form of :class:`SupervisedNaturalGradient`; see it for the mathematics and
    every keyword. ``g`` is the gradient of the *mean* loss over the batch (per-sample
    ``0.5 |f(x) - y|^2`` summed over outputs for ``"mse"``, ``-log softmax(f(x))_y`` for
    ``"cross_entropy"``), and ``damping`` is in the units of ``F`` (mean over samples).

    Parameters
    ----------
    model
        Any ``nn.Module``; not modified, ``.grad`` untouched.
    inputs
        Tensor (or dict/list/tuple of tensors), first dimension the sample.
    targets
        Shaped like ``model(inputs)`` for ``"mse"``; class indices ``(N,)`` for
        ``"cross_entropy"``.
    loss
        ``"mse"`` or ``"cross_entropy"``.
    damping
        ``lam > 0``.
    fisher
        ``"exact"`` or ``"sampled"`` (targets drawn from the model with ``seed``).
    solver
        ``"kaczmarz"``, ``"cholesky"`` or ``"cg"``.
    params
        Parameters the Fisher is taken over; ``None``: all with ``requires_grad=True``.
    seed
        Seed for sampled targets and Kaczmarz blocks; same seed, same result.
    block_size, max_epochs, tol, max_iters, on_nonconvergence, resample_blocks, chunk_size
        Solver keywords, as in :class:`SupervisedNaturalGradient`.
    preconditioner_rank, compile
        Also as in :class:`SupervisedNaturalGradient`.

    Returns
    -------
    tuple of Tensor
        ``d``, one tensor per selected parameter, shaped like it, in the order of
        ``params`` (of ``model.parameters()`` when ``params`` is ``None``). Descend with
        ``p -= lr * d``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from natgrad.supervised import natural_gradient
    >>> model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    >>> x, y = torch.randn(32, 3), torch.randn(32, 2)
    >>> d = natural_gradient(model, x, y, loss="mse", damping=1e-2, seed=0)
    >>> [t.shape for t in d] == [p.shape for p in model.parameters()]
    True
    """
    options = SUPERVISED.pick(locals())
    transform = SupervisedNaturalGradient.from_options(options, loss, fisher, seed, chunk_size)
    if params is None:
        return transform(model, inputs, targets).direction
    params = list(params)
    result = transform(model, inputs, targets, params)
    # A bare tuple: in the order given, so that zip(params, d) pairs each with its own.
    by_name = dict(zip(result.param_names, result.direction, strict=True))
    names = {id(p): n for n, p in model.named_parameters()}
    return tuple(by_name[names[id(p)]] for p in params)


# -- validation and small helpers --------------------------------------------------------
def _selected(model: nn.Module, names: list[str]) -> list[Tensor]:
    named = dict(model.named_parameters())
    return [named[name] for name in names]


def _check_inputs(inputs: Tree, device: torch.device, dtype: torch.dtype) -> int:
    """Every leaf is a tensor with the same number of rows ``N >= 1``; returns ``N``."""
    leaves = list(tree_leaves(inputs, "inputs"))
    if not leaves:
        raise ArgumentError("inputs holds no tensors; pass a tensor of shape (N, ...)")
    first_path, first = leaves[0]
    num_samples = 1  # placeholder until a first tensor with a sample dimension is seen
    if isinstance(first, Tensor) and first.dim() > 0:
        num_samples = int(first.shape[0])
        check_batch(
            "inputs", inputs, num_samples, device, dtype, counted_by=first_path, owner="model"
        )
    else:  # let check_batch name the problem with the first leaf
        check_batch("inputs", inputs, 1, device, dtype, counted_by="inputs", owner="model")
    if num_samples == 0:
        raise ArgumentError("inputs is empty (N = 0): the natural gradient needs samples")
    return num_samples


def _check_outputs(raw: object, n: int, loss: str) -> Tensor:
    if not isinstance(raw, Tensor):
        raise ArgumentTypeError(
            f"model(inputs) must return a tensor of shape (N, ...), got {type(raw).__name__}; "
            "wrap the model so forward returns the predictions (regression) or logits"
        )
    if raw.dim() == 0 or raw.shape[0] != n:
        raise ArgumentError(
            f"model(inputs) has shape {tuple(raw.shape)} but inputs have N = {n} samples; "
            "the first output dimension must be the sample"
        )
    if loss == "cross_entropy" and (raw.dim() != 2 or raw.shape[1] < 2):
        raise ArgumentError(
            f"loss='cross_entropy' needs logits of shape (N, C) with C >= 2 classes, got "
            f"model output shape {tuple(raw.shape)}; for a binary problem output 2 logits"
        )
    if raw[0].numel() == 0:
        raise ArgumentError(
            f"model(inputs) has shape {tuple(raw.shape)}: no outputs per sample, so there is "
            "no loss to differentiate; check the model's last layer (or a slice in forward)"
        )
    outputs = raw.reshape(n, -1)
    if not bool(torch.isfinite(outputs).all()):
        bad = int(torch.nonzero(~torch.isfinite(outputs))[0, 0])
        raise NonFiniteError(
            f"model(inputs) is not finite for sample {bad}; check the model and the inputs"
        )
    return outputs


def _check_targets(targets: object, outputs: Tensor, raw: Tensor, loss: str) -> None:
    if not isinstance(targets, Tensor):
        kind = "class indices (torch.long)" if loss == "cross_entropy" else "values"
        raise ArgumentTypeError(
            f"targets must be a torch.Tensor of {kind}, got {type(targets).__name__}; convert "
            "it with torch.as_tensor(targets) on the model's device"
        )
    if targets.device != outputs.device:
        raise ArgumentError(
            f"targets is on {targets.device} but the model outputs are on {outputs.device}; "
            f"move it with targets.to({str(outputs.device)!r})"
        )
    n, k = outputs.shape
    if loss == "mse":
        if tuple(targets.shape) != tuple(raw.shape):
            hint = ""
            if targets.numel() == raw.numel():
                hint = f"; reshape it with targets.reshape({', '.join(map(str, raw.shape))})"
            raise ArgumentError(
                f"loss='mse' needs targets shaped like model(inputs) {tuple(raw.shape)}, got "
                f"{tuple(targets.shape)}{hint}"
            )
        if not targets.is_floating_point():
            raise ArgumentTypeError(
                f"loss='mse' needs floating-point targets, got {targets.dtype}; for class "
                "labels use loss='cross_entropy'"
            )
        if not bool(torch.isfinite(targets).all()):
            raise NonFiniteError(
                "targets contains NaN or inf; drop or repair those samples before the step"
            )
        return
    if targets.is_floating_point() or targets.dtype == torch.bool:
        hint = "; for one-hot targets pass targets.argmax(1)" if targets.dim() == 2 else ""
        raise ArgumentTypeError(
            f"loss='cross_entropy' needs integer class indices, got dtype {targets.dtype}{hint}"
        )
    if tuple(targets.shape) != (n,):
        raise ArgumentError(
            f"loss='cross_entropy' needs class indices of shape (N,) = ({n},), got "
            f"{tuple(targets.shape)}"
        )
    if bool(((targets < 0) | (targets >= k)).any()):
        bad = targets[(targets < 0) | (targets >= k)][0]
        hint = ""
        if int(bad) < 0:
            hint = (
                "; ignore_index is not supported: drop those samples (targets >= 0) before the step"
            )
        raise ArgumentError(
            f"targets contains class index {int(bad)} outside [0, {k}) for logits with {k} "
            f"classes{hint}"
        )
