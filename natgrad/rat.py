"""The public object: Randomized Advantage Transformation (RAT)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Literal

import torch
from torch import Tensor, nn

from natgrad._checks import (
    check_advantages,
    check_batch,
    check_choice,
    check_finite_parameters,
    check_log_probs,
    check_log_probs_differentiable,
    check_policy,
    check_positive_int,
    check_step_terms,
    parameter_device_dtype,
    representable,
    require_finite,
    select_parameters,
)
from natgrad._guard import differentiable_paths, unchanged_inputs, unchanged_module
from natgrad._tree import Tree
from natgrad.distributed import (
    CommunicationStats,
    ProcessGroup,
    check_process_group,
    distributed_natural_gradient,
)
from natgrad.errors import ArgumentTypeError, FisherError
from natgrad.factored import FACTORED_MISMATCH, build_factored_scores
from natgrad.fisher.expected import check_fisher, expected_natural_gradient
from natgrad.results import Diagnostics, NaturalGradient
from natgrad.scores import (
    LogProbFn,
    MaterializedScores,
    PolicyScores,
    ScoreOperator,
    StreamingScores,
    bytes_for_matrix,
    default_log_prob,
)
from natgrad.solvers import (
    OnNonConvergence,
    SolveResult,
    SolverName,
    SolverOptions,
    seeded_generator,
    solve,
)
from natgrad.solvers.options import OptionsView

_DEFAULT = SolverOptions()  # the defaults below are SolverOptions' own

BackendName = Literal["auto", "factored", "materialized", "streaming"]
BACKENDS: tuple[str, ...] = ("auto", "factored", "materialized", "streaming")
FisherName = Literal["sampled", "expected"]


class RATNaturalGradient(OptionsView):
    r"""Natural policy gradients by transforming advantages.

    For a batch of ``N`` on-policy samples with scores ``psi_i = grad log pi(a_i|s_i)``
    stacked in ``J`` (``N x P``), the Tikhonov-damped natural gradient has two forms:

    * primal (parameter space): ``d = (F + lam I)^{-1} g`` with ``F = J^T J / N`` and
      ``g = J^T A / N`` -- a ``P x P`` system, what TRPO solves by conjugate gradient;
    * kernel (sample space, Woodbury): ``d = J^T A~ / N`` with
      ``A~ = (J J^T / N + lam I)^{-1} A`` -- an ``N x N`` system.

    They are equal. The kernel form is cheaper whenever ``N < P`` (the usual case for
    neural policies) and turns the natural gradient into an ordinary one: the gradient of
    ``mean(A~ * log pi)`` *is* ``d``. Calling this object returns ``A~``; use it in place
    of the advantages in the usual loss.

    Parameters
    ----------
    log_prob_fn
        ``log_prob_fn(policy, obs, acts) -> Tensor[N]`` giving ``log pi(a_i | s_i)``. It may
        call any method of ``policy``. ``None`` uses ``policy(obs).log_prob(acts)`` (summed
        over trailing action dimensions).
    damping
        ``lam > 0``, in the units of ``F = J^T J / N`` (per-sample Fisher). Typical values
        are ``1e-4`` to ``1e-1``; see the docs page on choosing it.
    solver
        ``"auto"`` (the default) uses ``"cholesky"`` with the factored or materialized backend
        for ``N <= 4096`` on CUDA and ``N < 2 * preconditioner_rank`` on CPU, else ``"cg"``
        (measured in ``benchmarks/solvers``; see the performance page for the crossover).
        ``"cg"``: conjugate gradient on the ``N x N`` system; ``"kaczmarz"``: randomized
        block Kaczmarz over minibatches (RAT); ``"accelerated_kaczmarz"``: the same block
        steps with Nesterov momentum, for ill-conditioned systems where ``"kaczmarz"``
        stalls (single process only); ``"cholesky"``: exact, one ``N x N`` factorization.
        ``diagnostics.solver`` names the solver that ran.
    block_size
        Kaczmarz block (minibatch) size ``b``; also the chunk size for computing scores.
    max_epochs
        Kaczmarz sweeps over all blocks before giving up.
    tol
        Accuracy target of the iterative solvers. They stop once both the relative
        residual ``|A - (K/N + lam I) A~| / |A|`` and a guaranteed bound on the relative
        error of the direction (``diagnostics.direction_error``) are at most ``tol``, so
        ``diagnostics.converged`` means ``|d - d*| <= tol |d*|`` for the exact solution
        ``d*`` of the damped system, rounding aside (``diagnostics.precision``). In
        ``(0, 1)``: the default ``5e-2`` is a cheap setting for RL updates; use ``1e-8`` for
        verification.
    max_iters
        CG iteration cap.
    seed
        Seed of the generator used for block sampling and the preconditioner's sample. A
        new object with the same seed gives the same result on the same inputs (the
        generator advances from call to call). An integer in ``[0, 2**64 - 1]`` (torch's
        seeds); ``None`` seeds from the operating system.
    backend
        ``"factored"`` keeps plain ``nn.Linear`` layers as (inputs, output-gradients) factors
        from one backward pass -- exact, and no per-sample gradients for those layers;
        ``"materialized"`` holds ``J`` in memory; ``"streaming"`` recomputes block rows on
        demand (extra memory ``O(c x P)``, ``c`` the larger of ``block_size`` and the
        number of rows that fit in ``memory_budget / 8`` bytes); ``"auto"`` uses
        ``"factored"`` when the policy has such layers, else materializes when ``J`` fits
        in ``memory_budget`` bytes, else streams.
    memory_budget
        Bytes ``J`` may occupy under ``backend="auto"``.
    on_nonconvergence
        When an iterative solver stops above ``tol``: ``"fallback"`` solves exactly with
        Cholesky (noted in ``diagnostics.fallbacks``), ``"warn"`` returns the iterate with a
        :class:`NotConvergedWarning`, ``"raise"`` raises :class:`NotConvergedError`.
    resample_blocks
        Draw a new random paving of the samples every Kaczmarz epoch instead of reusing
        the first one (reusing lets block factorizations be cached).
    preconditioner_rank
        Rank ``r`` of the Nystrom preconditioner of CG: ``r`` kernel columns ``K[:, S]`` of
        random samples make the few large eigenvalues of ``K`` cheap for CG (see the
        performance page for iteration counts). It holds an ``N x r`` float64 matrix.
        ``0`` turns it off; ``r >= N`` uses every sample (then CG converges in one or
        two iterations; ``solver="auto"`` then solves exactly on CPU).
    compile
        Run the iterative solvers' inner step (Kaczmarz: the whole per-block projection;
        CG: the kernel product ``J (J^T x) / N``) as one ``torch.compile`` graph. Same
        results as eager within floating-point tolerance; the first call pays the
        compilation. Used with the factored and materialized backends (the streaming
        backend runs eagerly, noted in ``diagnostics.fallbacks``). Whether it is faster
        depends on the device and problem; see the performance page for measurements.
    process_group
        A ``torch.distributed`` process group: every rank calls with its *own* samples
        (local batch sizes may differ) and gets the natural gradient of the union of all
        ranks' samples -- ``natural_gradient(...).direction`` is the same on every rank,
        ``__call__`` returns this rank's rows of ``A~`` (the gradient of
        ``sum(A~ * log pi) / N_total``, summed over ranks, is the direction). Solvers
        ``"cg"`` (block-Jacobi preconditioned), ``"cholesky"`` and ``"kaczmarz"`` (averaged
        block Kaczmarz); see the docs page *Distributed*. ``None``: one process.
    fisher
        ``"sampled"`` (the default): ``F = J^T J / N`` from the scores of the taken
        actions. ``"expected"``: ``F = mean_i E_{a ~ pi(.|s_i)}[psi psi^T]``, the Hessian of
        the mean KL divergence (TRPO's curvature), exact for ``Categorical`` (also
        multi-discrete), ``Normal`` and ``Independent`` of them, read from
        ``policy(obs)``; ``g`` stays ``J^T A / N``. Only :meth:`natural_gradient` supports
        it (its ``advantages`` is ``None``: ``d`` is not in the span of the sampled scores,
        so no ``A~`` exists); ``__call__`` raises :class:`~natgrad.errors.FisherError`. The
        ``m`` rows per sample (``m`` classes, or 2 per action dimension) stay matrix-free
        (products by backward passes on one recorded forward pass; ``"auto"`` then sets the
        Nystrom rank to 0) unless ``backend="materialized"``. See the derivation page, *Sampled or
        expected Fisher*.

    Attributes
    ----------
    diagnostics
        :class:`~natgrad.Diagnostics` of the latest call, ``None`` before the first and
        after a call that raised.
    communication
        With a ``process_group``: the collectives of the latest call
        (:class:`~natgrad.distributed.CommunicationStats`), else ``None``.
    generator
        The ``torch.Generator`` driving block sampling.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> from natgrad import RATNaturalGradient
    >>> class Policy(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.logits = nn.Linear(4, 2)
    ...     def forward(self, obs):
    ...         return torch.distributions.Categorical(logits=self.logits(obs))
    >>> policy = Policy()
    >>> obs, acts, adv = torch.randn(64, 4), torch.randint(0, 2, (64,)), torch.randn(64)
    >>> rat = RATNaturalGradient(damping=1e-2, seed=0)
    >>> adv_t = rat(policy, obs, acts, adv)
    >>> loss = -(adv_t * policy(obs).log_prob(acts)).mean()
    >>> loss.backward()  # .grad now holds minus the natural gradient
    >>> rat.diagnostics.converged
    True
    """

    def __init__(
        self,
        log_prob_fn: LogProbFn | None = None,
        damping: float = _DEFAULT.damping,
        solver: SolverName = _DEFAULT.solver,  # type: ignore[assignment]
        block_size: int = _DEFAULT.block_size,
        max_epochs: int = _DEFAULT.max_epochs,
        tol: float = _DEFAULT.tol,
        max_iters: int = _DEFAULT.max_iters,
        seed: int | None = None,
        *,
        backend: BackendName = "auto",
        memory_budget: int = 2**30,
        on_nonconvergence: OnNonConvergence = _DEFAULT.on_nonconvergence,  # type: ignore[assignment]
        resample_blocks: bool = _DEFAULT.resample_blocks,
        compile: bool = _DEFAULT.compile,
        preconditioner_rank: int = _DEFAULT.preconditioner_rank,
        process_group: ProcessGroup | None = None,
        fisher: FisherName = "sampled",
    ) -> None:
        if log_prob_fn is not None and not callable(log_prob_fn):
            raise ArgumentTypeError(
                "log_prob_fn must be callable(policy, obs, acts) -> Tensor[N] or None, "
                f"got {type(log_prob_fn).__name__}"
            )
        self.log_prob_fn: LogProbFn = log_prob_fn or default_log_prob
        self.options = _DEFAULT.pick(locals())  # every solver keyword, validated
        self.generator = seeded_generator(seed)
        self.seed = seed
        self.backend = check_choice("backend", backend, BACKENDS)
        self.memory_budget = check_positive_int("memory_budget", memory_budget, " bytes")
        self.diagnostics: Diagnostics | None = None
        self.process_group = check_process_group(process_group)
        self.fisher = check_fisher(fisher)
        if self.fisher == "expected" and self.process_group is not None:
            raise FisherError(
                "fisher='expected' has no distributed form; use fisher='sampled' with a "
                "process_group, or drop process_group"
            )
        self.communication: CommunicationStats | None = None

    @classmethod
    def from_options(
        cls,
        options: SolverOptions,
        log_prob_fn: LogProbFn | None = None,
        seed: int | None = None,
        *,
        backend: BackendName = "auto",
        memory_budget: int = 2**30,
        process_group: ProcessGroup | None = None,
        fisher: FisherName = "sampled",
    ) -> RATNaturalGradient:
        """Build from a :class:`~natgrad.solvers.SolverOptions` instead of solver keywords.

        The other keywords are the constructor's (``process_group``: the union of every
        rank's samples, as ``natgrad train --nproc`` uses it).

        Examples
        --------
        >>> from natgrad.solvers import RL_AGENT
        >>> RATNaturalGradient.from_options(RL_AGENT.replace(damping=0.05), seed=0).damping
        0.05
        """
        return cls(
            log_prob_fn,
            seed=seed,
            backend=backend,
            memory_budget=memory_budget,
            process_group=process_group,
            fisher=fisher,
            **options.keywords(),
        )

    def __repr__(self) -> str:
        return (
            f"RATNaturalGradient(damping={self.damping}, solver={self.solver!r}, "
            f"block_size={self.block_size}, max_epochs={self.max_epochs}, tol={self.tol}, "
            f"max_iters={self.max_iters}, seed={self.seed}, backend={self.backend!r}, "
            f"compile={self.compile}, preconditioner_rank={self.preconditioner_rank}, "
            f"fisher={self.fisher!r})"
        )

    def __call__(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None = None,
    ) -> Tensor:
        """Transform advantages: return ``A~ = (J J^T / N + lam I)^{-1} A``.

        Parameters
        ----------
        policy
            The policy; neither its parameters nor their ``.grad`` are touched.
        obs, acts
            Tensors (or dicts/lists/tuples of tensors) with the sample as first dimension.
        adv
            Advantages, shape ``(N,)``.
        params
            The parameters ``theta`` the Fisher is taken over; ``None`` means all
            parameters with ``requires_grad=True``. Results follow the policy's
            ``named_parameters()`` order, whatever the order given here
            (``NaturalGradient.param_names`` names them).

        Returns
        -------
        Tensor
            ``A~``, detached, with the shape, dtype and device of ``adv``. The gradient of
            ``mean(A~ * log pi)`` over ``params`` is the natural gradient ``d``. With a
            ``process_group``: this rank's rows (see the class docstring).

        Raises
        ------
        FisherError
            With ``fisher="expected"``: use :meth:`natural_gradient` (no ``A~`` exists).
        """
        self.diagnostics = None  # a call that raises leaves none, not the previous call's
        if self.fisher == "expected":
            raise FisherError(
                "fisher='expected' has no transformed advantages: the direction is not in the "
                "span of the sampled scores, so no A~ makes mean(A~ * log pi) its gradient; "
                "call rat.natural_gradient(policy, obs, acts, adv) and step along .direction, "
                "or use fisher='sampled'"
            )
        if self.process_group is not None:
            return distributed_natural_gradient(self, policy, obs, acts, adv, params).advantages
        advantages, _, _ = self._run(policy, obs, acts, adv, params)
        return advantages

    def natural_gradient(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None = None,
    ) -> NaturalGradient:
        """Return the direction ``d`` itself with ``A~`` and the step-size by-products.

        Same arguments as :meth:`__call__`. ``J d``, ``g^T d`` and ``d^T F d`` come from the
        solve without extra passes (Cholesky: ``J d = A - lam A~``; iterative solvers: the
        ``J v`` of the final residual check). With a ``process_group``, ``advantages`` and
        ``jd`` are this rank's rows; the rest is global and the same on every rank. With
        ``fisher="expected"``, ``advantages`` is ``None`` and ``d_fisher_d`` uses the
        expected Fisher.
        """
        self.diagnostics = None  # a call that raises leaves none, not the previous call's
        if self.process_group is not None:
            return distributed_natural_gradient(self, policy, obs, acts, adv, params)
        if self.fisher == "expected":
            with differentiable_paths():
                return self._expected(policy, obs, acts, adv, params)
        advantages, result, scores = self._run(policy, obs, acts, adv, params)
        assert self.diagnostics is not None
        n = scores.num_samples
        rhs = adv.detach().to(torch.float64)
        jd = result.jv
        direction = scores.unflatten(
            representable("the natural-gradient direction", result.v, scores.dtype)
        )
        g_dot_d, d_fisher_d = float(rhs @ jd) / n, float(jd @ jd) / n
        require_finite("J d", jd, "it overflows float64")
        check_step_terms(g_dot_d, d_fisher_d, result.v)
        return NaturalGradient(
            advantages=advantages,
            direction=direction,
            param_names=tuple(scores.param_names),
            jd=jd.to(adv.dtype),
            g_dot_d=g_dot_d,
            d_fisher_d=d_fisher_d,
            diagnostics=self.diagnostics,
        )

    # -- internals ----------------------------------------------------------------------
    def _run(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None,
    ) -> tuple[Tensor, SolveResult, PolicyScores]:
        start = time.perf_counter()
        scores, operator, backend_note = self._prepare(policy, obs, acts, adv, params)
        n = adv.shape[0]
        rhs = adv.detach().to(device=scores.device, dtype=torch.float64)
        with torch.no_grad():  # solvers only combine detached tensors
            result, solver_used, notes = solve(operator, rhs, self.options, self.generator)
        fallbacks: list[str] = []
        if scores.fallback_reason is not None:
            fallbacks.append(
                f"per-sample scores computed one sample at a time: {scores.fallback_reason}"
            )
        if backend_note:
            fallbacks.append(backend_note)
        fallbacks.extend(notes)
        require_finite(
            "the transformed advantages A~",
            result.x,
            f"|A~| reaches |A| / damping = {float(rhs.abs().max()) / self.damping:.3g}, "
            "beyond float64",
        )
        advantages = representable("the transformed advantages A~", result.x, adv.dtype)
        advantages = advantages.to(adv.device).reshape(adv.shape)
        self.diagnostics = Diagnostics.of_solve(
            result,
            solver=solver_used,
            backend=operator.backend,
            score_path=scores.path,
            fallbacks=fallbacks,
            num_samples=n,
            num_params=scores.num_params,
            started=start,
        )
        return advantages, result, scores

    def _expected(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None,
    ) -> NaturalGradient:
        """``natural_gradient`` with ``fisher="expected"`` (:mod:`natgrad.fisher.expected`)."""
        start = time.perf_counter()
        scores = self._scores(policy, obs, acts, adv, params)
        notes: list[str] = []
        options = self.options
        if self.backend == "factored":
            notes.append("backend='factored' unused: fisher='expected' streams its rows")
        if self.backend == "auto" and options.preconditioner_rank > 0 and self.solver != "kaczmarz":
            # Matrix-free rows: each Nystrom column costs a pass of the policy, about half a
            # CG iteration, so a rank-256 sample outweighs the iterations it saves.
            options = dataclasses.replace(options, preconditioner_rank=0)
            notes.append(
                "preconditioner_rank=0 under backend='auto' with fisher='expected' (a Nystrom "
                "column costs a forward pass of the policy); backend='streaming' keeps it"
            )
        with unchanged_module(policy), torch.enable_grad():
            result = expected_natural_gradient(
                policy, obs, acts, scores, self.log_prob_fn, adv, options,
                self.generator, self._chunk_size(scores), notes, start,
                materialize=self.backend == "materialized",
            )  # fmt: skip
        self.diagnostics = result.diagnostics
        return result

    def _prepare(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None,
    ) -> tuple[PolicyScores, ScoreOperator, str]:
        """Check the inputs and build the scores and their operator (no solve)."""
        with differentiable_paths():
            scores = self._scores(policy, obs, acts, adv, params)
            with unchanged_module(policy), torch.enable_grad():  # factored: one backward pass
                operator, backend_note = self._operator(scores, policy, obs, acts)
        return scores, operator, backend_note

    def _scores(
        self,
        policy: nn.Module,
        obs: Tree,
        acts: Tree,
        adv: Tensor,
        params: Iterable[Tensor] | None,
    ) -> PolicyScores:
        """Check the inputs; the per-sample score computation of the batch (lazy)."""
        check_policy(policy)
        names = select_parameters(policy, params)
        device, dtype = parameter_device_dtype(policy, names)
        check_finite_parameters(policy)
        check_advantages(adv, device)
        n = adv.shape[0]
        check_batch("obs", obs, n, device, dtype)
        check_batch("acts", acts, n, device, dtype)
        inputs = {"obs": obs, "acts": acts}
        with unchanged_module(policy), torch.no_grad():
            with unchanged_inputs(inputs, "log_prob_fn(policy, obs, acts)"):
                values = self.log_prob_fn(policy, obs, acts)
            log_probs = check_log_probs(values, n, device)
        with unchanged_module(policy), torch.enable_grad():
            check_log_probs_differentiable(self.log_prob_fn, policy, obs, acts, names)
        return PolicyScores(policy, self.log_prob_fn, obs, acts, names, log_probs.detach())

    def _operator(
        self, scores: PolicyScores, policy: nn.Module, obs: Tree, acts: Tree
    ) -> tuple[ScoreOperator, str]:
        """Pick the backend; returns the operator and a note if the request was not met."""
        note = ""
        needed = bytes_for_matrix(scores.num_samples, scores.num_params, scores.dtype)
        fits = needed <= self.memory_budget
        if self.backend in ("auto", "factored"):
            operator, reason = build_factored_scores(
                scores, policy, self.log_prob_fn, obs, acts, self._chunk_size(scores)
            )
            if operator is not None:
                return operator, ""
            if self.backend == "factored" or reason.startswith(FACTORED_MISMATCH):
                note = f"backend='factored' unavailable ({reason}); used the generic scores"
        if self.backend == "materialized" or (self.backend != "streaming" and fits):
            return MaterializedScores.from_policy(scores, self._chunk_size(scores)), note
        return StreamingScores(scores, self._chunk_size(scores)), note

    def _chunk_size(self, scores: PolicyScores) -> int:
        """Samples per vectorized score computation: large (fewer calls), within budget."""
        row_bytes = bytes_for_matrix(1, scores.num_params, scores.dtype)
        return max(self.block_size, min(scores.num_samples, self.memory_budget // 8 // row_bytes))
