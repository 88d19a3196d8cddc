"""The per-sample score matrix ``J`` of a policy, as a linear operator.

Row ``i`` of ``J`` is the score ``psi_i = grad_theta log pi_theta(a_i | s_i)`` over the
selected parameters, flattened in a fixed order. Solvers only ever see the
:class:`~natgrad.operators.ScoreOperator` interface (:mod:`natgrad.operators`): block
rows ``J_S``, products ``J v`` and ``J^T x`` and the Gram matrix ``K = J J^T``.
:class:`PolicyScores` computes rows with ``torch.func``; two backends hold them:

* :class:`MaterializedScores` holds ``J`` (``N x P``) in memory; every product is a matmul.
* :class:`StreamingScores` recomputes the rows of a block on demand, so peak extra memory
  is two chunks of rows, ``O(chunk_size x P)``, and never ``O(N x P)``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import grad_and_value, vjp, vmap

from natgrad import distributions
from natgrad._checks import consistency_tolerance
from natgrad._guard import functional_call
from natgrad._rnn import (
    PackedSequenceError,
    batched_recurrent,
    packed_input,
    packed_sequence_message,
)
from natgrad._tree import Tree, take, unflatten, unsqueeze
from natgrad._vmap import raise_unless_vmap_limitation
from natgrad.errors import ArgumentError, ArgumentTypeError, SampleCouplingError
from natgrad.operators import (  # the interface, re-exported where scores are built
    BlockFunctions,
    DenseBlock,
    DenseOperator,
    ScoreBlock,
    ScoreOperator,
    bytes_for_matrix,  # noqa: F401
    working_dtype,
)

LogProbFn = Callable[[nn.Module, Tree, Tree], Tensor]

__all__ = [
    "BlockFunctions",
    "DenseBlock",
    "LogProbFn",
    "MaterializedScores",
    "PolicyScores",
    "ScoreBlock",
    "ScoreOperator",
    "StreamingScores",
    "default_log_prob",
]


def default_log_prob(policy: nn.Module, obs: Tree, acts: Tree) -> Tensor:
    """Log-probability ``policy(obs).log_prob(acts)``, summed over action dimensions.

    A factorized distribution (e.g. ``Normal`` with one scale per action dimension)
    returns one log-probability per dimension; the joint log-probability is their sum,
    exactly as ``torch.distributions.Independent`` would give.
    """
    dist = policy(obs)
    if not hasattr(dist, "log_prob"):
        raise ArgumentTypeError(
            "log_prob_fn=None expects policy(obs) to return a torch.distributions."
            f"Distribution, but it returned {type(dist).__name__}; pass "
            "log_prob_fn=lambda policy, obs, acts: ... returning log pi(acts | obs) of shape (N,)"
        )
    return distributions.log_prob(dist, acts)


class _LogProbModule(nn.Module):
    """Wraps ``log_prob_fn(policy, obs, acts)`` so ``functional_call`` can swap parameters.

    Any method of the policy that ``log_prob_fn`` calls (not only ``forward``) then sees
    the substituted parameters.
    """

    def __init__(self, policy: nn.Module, log_prob_fn: LogProbFn) -> None:
        super().__init__()
        self.policy = policy
        self.__dict__["log_prob_fn"] = log_prob_fn  # not registered as a submodule

    def forward(self, obs: Tree, acts: Tree) -> Tensor:
        return self.__dict__["log_prob_fn"](self.policy, obs, acts)


class PolicyScores:
    """Per-sample scores of one policy on one batch, computed with ``torch.func``.

    Parameters
    ----------
    policy
        The policy module. It is never modified.
    log_prob_fn
        ``log_prob_fn(policy, obs, acts) -> Tensor[N]``.
    obs, acts
        Tensors (or dicts/lists/tuples of tensors) whose first dimension is the sample.
    param_names
        Names (as in ``policy.named_parameters()``) of the parameters that form ``theta``;
        every other parameter and buffer is held constant.
    log_probs
        The batched log-probabilities ``log pi(a_i | s_i)`` (shape ``(N,)``), used to check
        that per-sample evaluation reproduces the batched one.

    Notes
    -----
    Rows are computed by ``vmap(grad(...))`` over samples. When ``vmap`` cannot batch an
    operation (some recurrent kernels, data-dependent control flow), the rows are computed
    one sample at a time instead; :attr:`path` then reads ``"loop"`` and
    :attr:`fallback_reason` says why.
    """

    def __init__(
        self,
        policy: nn.Module,
        log_prob_fn: LogProbFn,
        obs: Tree,
        acts: Tree,
        param_names: list[str],
        log_probs: Tensor,
    ) -> None:
        self._module = _LogProbModule(policy, log_prob_fn)
        selected = set(param_names)
        named = dict(policy.named_parameters())
        self.param_names = list(param_names)
        self.shapes = [named[name].shape for name in param_names]
        self.numels = [named[name].numel() for name in param_names]
        self._params = {f"policy.{n}": named[n].detach() for n in param_names}
        self._constants = {f"policy.{n}": p.detach() for n, p in named.items() if n not in selected}
        self._constants.update({f"policy.{n}": b for n, b in policy.named_buffers()})
        self._obs = obs
        self._acts = acts
        self.log_probs = log_probs
        first = named[param_names[0]]
        self.dtype = first.dtype
        self.device = first.device
        self.num_samples = int(log_probs.shape[0])
        self.num_params = int(sum(self.numels))
        self.path = "vmap"
        self.fallback_reason: str | None = None
        # Batched and per-sample evaluation round differently: allow that, and no more.
        self._consistency_tol = consistency_tolerance(self.dtype)

    # -- single-sample log-probability -------------------------------------------------
    def _log_prob_single(self, params: dict[str, Tensor], obs_i: Tree, acts_i: Tree) -> Tensor:
        out = functional_call(
            self._module, {**params, **self._constants}, (unsqueeze(obs_i), unsqueeze(acts_i))
        )
        return out.reshape(())

    def _flatten(self, grads: dict[str, Tensor], batch: int) -> Tensor:
        return torch.cat([grads[k].reshape(batch, -1) for k in self._params], dim=1)

    def _rows_vmap(self, obs_s: Tree, acts_s: Tree) -> tuple[Tensor, Tensor]:
        # Recurrent modules run unrolled: the fused kernels have no batching rule.
        with warnings.catch_warnings(), batched_recurrent(self._module):
            # vmap's generic fallback for ops without a batching rule is slower but exact.
            warnings.filterwarnings("ignore", message="There is a performance drop")
            grads, values = vmap(grad_and_value(self._log_prob_single), in_dims=(None, 0, 0))(
                self._params, obs_s, acts_s
            )
        return self._flatten(grads, values.shape[0]), values

    def _rows_loop(self, obs_s: Tree, acts_s: Tree, batch: int) -> tuple[Tensor, Tensor]:
        rows, values = [], []
        for i in range(batch):
            index = torch.tensor(i)
            grads, value = grad_and_value(self._log_prob_single)(
                self._params, take(obs_s, index), take(acts_s, index)
            )
            rows.append(self._flatten({k: g.unsqueeze(0) for k, g in grads.items()}, 1))
            values.append(value)
        return torch.cat(rows), torch.stack(values)

    def rows(self, index: Tensor) -> Tensor:
        """Per-sample scores ``J[index]`` of shape ``(len(index), P)``."""
        obs_s, acts_s = take(self._obs, index), take(self._acts, index)
        if self.path == "vmap":
            try:
                rows, values = self._rows_vmap(obs_s, acts_s)
            except Exception as error:  # noqa: BLE001 - classified just below
                raise_unless_vmap_limitation(
                    error,
                    "the policy draws random numbers while computing log-probabilities "
                    "(e.g. active dropout or sampling inside forward), so per-sample "
                    "scores are ill-defined; make log_prob_fn deterministic "
                    "(policy.eval(), no sampling)",
                )
                self.path = "loop"
                self.fallback_reason = f"vmap failed ({type(error).__name__}: {error})"
                rows, values = self._rows_loop_checked(obs_s, acts_s, index)
        else:
            rows, values = self._rows_loop_checked(obs_s, acts_s, index)
        self._check(rows, values, index)
        return rows

    def check_values(self, chunk_size: int) -> None:
        """Compare every sample's log-probability alone with its value in the batch.

        One forward pass per sample (vectorized, no gradients): a policy whose samples
        interact anywhere in the batch is refused (:class:`SampleCouplingError`), not only
        at the samples whose scores were computed.
        """
        # No torch.no_grad() here: the parameters are detached already (no graph is built).
        single = vmap(self._log_prob_single, in_dims=(None, 0, 0))
        index = torch.arange(self.num_samples, device=self.device)
        for chunk in index.split(chunk_size):
            obs_s, acts_s = take(self._obs, chunk), take(self._acts, chunk)
            if self.path == "vmap":
                with warnings.catch_warnings(), batched_recurrent(self._module):
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    values = single(self._params, obs_s, acts_s)
            else:
                values = torch.stack(
                    [
                        self._log_prob_single(self._params, take(obs_s, i), take(acts_s, i))
                        for i in torch.arange(len(chunk))
                    ]
                )
            self._check_values(values.detach(), chunk)

    def _rows_loop_checked(self, obs_s: Tree, acts_s: Tree, index: Tensor) -> tuple[Tensor, Tensor]:
        """The per-sample loop; a failure on one sample alone is natgrad's error."""
        try:
            return self._rows_loop(obs_s, acts_s, len(index))
        except Exception as error:  # noqa: BLE001 - re-raised with the diagnosis
            kind = packed_input(self._module, lambda: self._module(self._obs, self._acts))
            if kind is not None:
                raise PackedSequenceError(packed_sequence_message(kind)) from error
            try:  # the batch itself, through torch.func: fails too unless samples couple
                self.vjp(index, torch.ones(len(index), device=self.device))
            except Exception as batch_error:  # noqa: BLE001 - re-raised with the diagnosis
                raise ArgumentError(
                    "log_prob_fn cannot be differentiated with torch.func, even on the whole "
                    f"batch ({type(batch_error).__name__}: {str(batch_error)[:200]}), and "
                    "per-sample scores need it: torch.utils.checkpoint, a "
                    "torch.autograd.Function without setup_context (see https://pytorch.org/"
                    "docs/stable/notes/extending.func.html) or leaving torch (.numpy(), "
                    ".item()) in the policy's forward cause this; evaluate log_prob_fn "
                    "without them (e.g. checkpoint only outside log_prob_fn)"
                ) from error
            raise SampleCouplingError(
                "log_prob_fn fails on a single sample although it works on the batch "
                f"({type(error).__name__}: {str(error)[:200]}), so the policy couples samples "
                "within a batch (e.g. it normalizes observations with batch statistics such "
                "as obs.std(0), which is NaN for one sample; BatchNorm in train mode); make "
                "each sample's log-probability depend on that sample only (running "
                "statistics held fixed, policy.eval()); or it leaves torch on one sample "
                "(.numpy(), .item(), .tolist()), which per-sample gradients cannot trace: "
                "keep log_prob_fn in torch operations"
            ) from error

    def _check(self, rows: Tensor, values: Tensor, index: Tensor) -> None:
        self._check_values(values, index)
        if not bool(torch.isfinite(rows).all()):
            bad = int(torch.nonzero(~torch.isfinite(rows).all(dim=1))[0, 0])
            raise ArgumentError(
                f"the score (gradient of log pi) of sample {int(index[bad])} is not finite; "
                "check the policy for saturating outputs (e.g. a std that reaches 0, "
                "actions on the boundary of a Beta or tanh-squashed distribution)"
            )

    def _check_values(self, values: Tensor, index: Tensor) -> None:
        expected = self.log_probs[index]
        gap = (values.detach() - expected).abs()
        allowed = self._consistency_tol * (1.0 + expected.abs())
        if not bool((gap <= allowed).all()):  # NaN != NaN: written so that NaN fails too
            worst = int(torch.argmax(torch.nan_to_num(gap - allowed, nan=torch.inf)))
            raise SampleCouplingError(
                "per-sample log-probabilities differ from the batched ones (sample "
                f"{int(index[worst])}: {float(values[worst]):.6g} alone vs "
                f"{float(expected[worst]):.6g} in the batch), so the policy couples samples "
                "within a batch (BatchNorm in train mode, normalization or attention across "
                "the batch dimension, a recurrent state carried between samples); make each "
                "sample's log-probability depend on that sample only, e.g. policy.eval()"
            )

    def vjp(self, index: Tensor, weights: Tensor) -> Tensor:
        """``J[index]^T weights`` with one batched backward pass (shape ``(P,)``)."""
        obs_s, acts_s = take(self._obs, index), take(self._acts, index)

        def batched(params: dict[str, Tensor]) -> Tensor:
            return functional_call(self._module, {**params, **self._constants}, (obs_s, acts_s))

        # The solvers call this under no_grad: modules that pick their kernel by the grad
        # mode (nn.LSTM's float32 CPU kernel keeps no workspace for a backward) need it on.
        with torch.enable_grad():
            _, pullback = vjp(batched, self._params)
            (grads,) = pullback(weights.to(self.dtype))
        return torch.cat([grads[k].reshape(-1) for k in self._params])

    def unflatten(self, flat: Tensor) -> tuple[Tensor, ...]:
        """Split a flat ``(P,)`` vector into tensors shaped like the selected parameters."""
        return unflatten(flat, self.shapes)


class MaterializedScores(DenseOperator):
    """Policy scores ``J`` held in memory as an ``(N, P)`` tensor.

    Parameters
    ----------
    matrix
        The score matrix, one row per sample.
    """

    @classmethod
    def from_policy(cls, scores: PolicyScores, chunk_size: int) -> MaterializedScores:
        """Compute every row of ``scores`` in chunks of ``chunk_size`` samples.

        The chunks are written into one preallocated ``(N, P)`` tensor, so the peak is
        ``J`` plus one chunk rather than two copies of ``J``.
        """
        index = torch.arange(scores.num_samples, device=scores.device)
        matrix = torch.empty(
            scores.num_samples,
            scores.num_params,
            dtype=working_dtype(scores.dtype),
            device=scores.device,
        )
        for chunk in index.split(chunk_size):
            matrix[chunk[0] : chunk[-1] + 1] = scores.rows(chunk)
        operator = cls(matrix)
        operator.score_dtype = scores.dtype
        return operator


class StreamingScores(ScoreOperator):
    """``J`` recomputed block by block; never holds more than ``chunk_size`` rows.

    Parameters
    ----------
    scores
        The per-sample score computation.
    chunk_size
        Rows computed at once for whole-matrix products (``J v``, ``K``).
    """

    backend = "streaming"

    def __init__(self, scores: PolicyScores, chunk_size: int) -> None:
        self.scores = scores
        self.chunk_size = chunk_size
        self.num_samples = scores.num_samples
        self.num_params = scores.num_params
        self.dtype = working_dtype(scores.dtype)
        self.device = scores.device
        self.score_dtype = scores.dtype

    def _chunks(self) -> list[Tensor]:
        return list(torch.arange(self.num_samples, device=self.device).split(self.chunk_size))

    def _rows(self, index: Tensor) -> Tensor:
        return self.scores.rows(index).to(self.dtype)

    def block(self, index: Tensor) -> ScoreBlock:
        return DenseBlock(self._rows(index))

    def matvec(self, v: Tensor) -> Tensor:
        return torch.cat([self._rows(chunk) @ v for chunk in self._chunks()])

    def rmatvec(self, x: Tensor) -> Tensor:
        total = torch.zeros(self.num_params, dtype=self.dtype, device=self.device)
        for chunk in self._chunks():
            total += self.scores.vjp(chunk, x[chunk])
        return total

    def cross_gram(self, index: Tensor) -> Tensor:
        columns = torch.empty(self.num_samples, len(index), dtype=self.dtype, device=self.device)
        start = 0
        for selected in index.split(self.chunk_size):  # never more than two chunks of rows
            rows = self._rows(selected)
            for chunk in self._chunks():
                columns[chunk, start : start + len(selected)] = self._rows(chunk) @ rows.T
            start += len(selected)
        return columns

    def squared_norms(self) -> Tensor:
        return (
            torch.cat([torch.linalg.vector_norm(self._rows(c), dim=1) for c in self._chunks()]).to(
                torch.float64
            )
            ** 2
        )

    def gram(self) -> Tensor:
        chunks = self._chunks()
        n = self.num_samples
        kernel = torch.empty(n, n, dtype=self.dtype, device=self.device)
        for i, rows_i in enumerate(chunks):
            block_i = self._rows(rows_i)
            for rows_j in chunks[i:]:
                block_j = block_i if rows_j is rows_i else self._rows(rows_j)
                product = block_i @ block_j.T
                kernel[rows_i[:, None], rows_j[None, :]] = product
                kernel[rows_j[:, None], rows_i[None, :]] = product.T
        return kernel
