"""Fast exact scores for factorable layers (``nn.Linear``, ...), without per-sample gradients.

For a linear layer ``y = W a + b`` applied once to a ``(N, in)`` batch, sample ``i``'s score
for ``W`` is the outer product ``g_i a_i^T`` with ``g_i = d log pi_i / d y_i`` -- and all
``g_i`` come out of *one* ordinary backward pass of ``sum_i log pi_i``, because sample ``i``'s
output affects only its own log-probability. So, with ``A`` the layer inputs and ``G`` the
output gradients (a column of ones appended to ``A`` for the bias):

* ``J_S J_T^T = (G_S G_T^T) * (A_S A_T^T)`` (elementwise), ``O(b^2 (in + out))``;
* ``J_S v = rowsum((A_S V^T) * G_S)``, with ``V`` the layer's slice of ``v`` as a matrix;
* ``J_S^T x = G_S^T diag(x) A_S``.

No ``N x P`` (or ``b x P``) matrix is ever formed for these layers. Convolutions and
recurrent layers (weights shared over positions or time steps) form their exact rows once
from their captured factors (:class:`~natgrad.layers.RowsFactor`); the remaining selected
parameters (log-std vectors, embeddings, attention, ...) keep generic per-sample scores.
Each layer kind's factors and products live in its own module of :mod:`natgrad.layers`,
registered for its module type; this module combines whatever kinds are registered.
This is the per-example-gradient factorization of Goodfellow (2015, "Efficient per-example
gradient computations") applied to the kernel ``K = J J^T``.

The factorization is exact only when each such layer is called exactly once on a batched
input and its weights are not used elsewhere; layers that break the first two conditions are
detected and left to the generic path, and the whole factored ``J`` is verified on the
whole batch by a randomized identity (:func:`verify_on_batch`; mismatch: the generic path
is used).
"""

from __future__ import annotations

from functools import cached_property
from typing import NamedTuple

import torch
from torch import Tensor, nn

from natgrad._tree import Tree
from natgrad.layers import (
    FACTORABLE_LAYERS,
    LayerFactor,
    LinearFactor,
    capture_layer_calls,
    output_gradients,
)
from natgrad.operators import BlockFunctions, ScoreBlock, ScoreOperator, working_dtype
from natgrad.scores import LogProbFn, PolicyScores

__all__ = [
    "FACTORED_MISMATCH",
    "FactoredPayload",
    "FactoredScores",
    "LinearFactor",
    "build_factored_scores",
    "capture_factors",
    "verify_on_batch",
]

FACTORED_MISMATCH = "factored linear-layer scores of"
_CHECK_SEED = 1977  # verification draws: fixed, so that they never consume the user's generator


class FactoredPayload(NamedTuple):
    """The compiled path's payload: the layers' factors and the dense rest."""

    layers: tuple[LayerFactor, ...]
    rest: Tensor | None
    rest_positions: Tensor | None
    num_params: int


def _factored_gram(payload: FactoredPayload) -> Tensor:
    return _factored_cross_gram(payload, payload)


def _factored_cross_gram(payload: FactoredPayload, selected: FactoredPayload) -> Tensor:
    """``J J_S^T`` from two payloads (all samples, the selected ones)."""
    total = 0.0
    for layer, layer_s in zip(payload.layers, selected.layers, strict=True):
        total = total + layer.cross_gram(layer_s)
    if payload.rest is not None:
        total = total + payload.rest @ selected.rest.T
    return total


def _factored_matvec(payload: FactoredPayload, v: Tensor) -> Tensor:
    out = 0.0
    for layer in payload.layers:
        out = out + layer.matvec(v)
    if payload.rest is not None:
        out = out + payload.rest @ v[payload.rest_positions]
    return out


def _factored_rmatvec(payload: FactoredPayload, x: Tensor) -> Tensor:
    result = x.new_zeros(payload.num_params)
    for layer in payload.layers:
        result.index_copy_(0, layer.positions, layer.rmatvec(x))
    if payload.rest is not None:
        result.index_copy_(0, payload.rest_positions, payload.rest.T @ x)
    return result


FACTORED_FUNCTIONS = BlockFunctions(_factored_gram, _factored_matvec, _factored_rmatvec)


class _FactoredBlock(ScoreBlock):
    def __init__(self, operator: FactoredScores, index: Tensor | None) -> None:
        self.operator = operator
        self.index = index
        self.dtype = operator.dtype

    @cached_property
    def payload(self) -> FactoredPayload:
        """The factors and rest rows of the block's samples, gathered once."""
        op, index = self.operator, self.index
        if index is None:
            return FactoredPayload(tuple(op.factors), op.rest, op.rest_positions, op.num_params)
        layers = tuple(factor.take(index) for factor in op.factors)
        rest = None if op.rest is None else op.rest[index]
        return FactoredPayload(layers, rest, op.rest_positions, op.num_params)

    def gram(self) -> Tensor:
        return _factored_gram(self.payload)

    def matvec(self, v: Tensor) -> Tensor:
        return _factored_matvec(self.payload, v)

    def rmatvec(self, x: Tensor) -> Tensor:
        return _factored_rmatvec(self.payload, x)

    def functional(self) -> tuple[BlockFunctions, FactoredPayload]:
        return FACTORED_FUNCTIONS, self.payload


class FactoredScores(ScoreOperator):
    """``J`` with factorable layers held as captured factors and the rest as dense rows.

    Parameters
    ----------
    factors
        One factor per factored layer (e.g. :class:`~natgrad.layers.LinearFactor`).
    rest
        Dense per-sample scores ``(N, P_rest)`` of the other selected parameters, or
        ``None``.
    rest_positions
        Indices of those parameters in the flat parameter vector.
    num_params
        ``P``.
    param_positions
        Each factored parameter's indices in the flat vector (for :func:`verify_on_batch`).
    """

    backend = "factored"

    def __init__(
        self,
        factors: list[LayerFactor],
        rest: Tensor | None,
        rest_positions: Tensor | None,
        num_params: int,
        param_positions: dict[str, Tensor] | None = None,
    ) -> None:
        if not factors:
            raise ValueError("FactoredScores needs at least one layer factor")
        self.factors = factors
        self.rest = rest
        self.rest_positions = rest_positions
        self.param_positions = dict(param_positions or {})
        first = factors[0][0]  # each factor's first field is a per-sample tensor
        self.num_samples = first.shape[0]
        self.num_params = num_params
        self.dtype = first.dtype
        self.device = first.device

    @cached_property
    def _whole(self) -> _FactoredBlock:
        return _FactoredBlock(self, None)

    def block(self, index: Tensor) -> ScoreBlock:
        return _FactoredBlock(self, index)

    def matvec(self, v: Tensor) -> Tensor:
        return self._whole.matvec(v)

    def rmatvec(self, x: Tensor) -> Tensor:
        return self._whole.rmatvec(x)

    def gram(self) -> Tensor:
        return self._whole.gram()

    def functional(self) -> tuple[BlockFunctions, FactoredPayload]:
        return self._whole.functional()

    def cross_gram(self, index: Tensor) -> Tensor:
        return _factored_cross_gram(self._whole.payload, _FactoredBlock(self, index).payload)

    def squared_norms(self) -> Tensor:
        total = torch.zeros(self.num_samples, dtype=torch.float64, device=self.device)
        for factor in self.factors:
            total += factor.squared_norms()
        if self.rest is not None:
            total += torch.linalg.vector_norm(self.rest, dim=1).to(torch.float64) ** 2
        return total

    def dense_rows(self, index: Tensor) -> Tensor:
        """Materialize ``J[index]`` (for verification on a few samples)."""
        rows = torch.zeros(len(index), self.num_params, dtype=self.dtype, device=self.device)
        for factor in self.factors:
            rows[:, factor.positions] = factor.take(index).dense_rows()
        if self.rest is not None:
            rows[:, self.rest_positions] = self.rest[index]
        return rows


def _factorable_modules(policy: nn.Module, selected: set[str]) -> dict[str, nn.Module]:
    """Modules of a registered type whose factored parameters are all selected."""
    modules = {}
    for name, module in policy.named_modules():
        kind = FACTORABLE_LAYERS.get(type(module))  # exact type: subclasses may differ
        if kind is None:
            continue
        prefix = f"{name}." if name else ""
        if all(f"{prefix}{p}" in selected for p in kind.parameter_names(module)):
            modules[name] = module
    return modules


def capture_factors(
    policy: nn.Module,
    log_prob_fn: LogProbFn,
    obs: Tree,
    acts: Tree,
    param_names: list[str],
    offsets: dict[str, Tensor],
    dtype: torch.dtype,
) -> tuple[dict[str, tuple[LayerFactor, tuple[str, ...]]], dict[str, Tensor], Tensor]:
    """One forward and one backward pass: the factors of every factorable layer.

    The same graph also gives the autograd side of :func:`verify_on_batch`: the gradient
    of ``sum_i w_i log pi_i`` with respect to the factored parameters, for the check's
    random weights ``w`` (a second backward pass that stops at those layers; no forward).

    Returns
    -------
    factors, reference, log_probs
        Layer name -> (its factors, the full names of the parameters they cover) for every
        registered layer called exactly once in a way its kind accepts; parameter name ->
        the autograd gradient of ``sum_i w_i log pi_i`` for each factored parameter; and
        the batched log-probabilities.
    """
    modules = _factorable_modules(policy, set(param_names))
    with torch.enable_grad():
        log_probs, calls = capture_layer_calls(modules, lambda: log_prob_fn(policy, obs, acts))
    num_samples = int(log_probs.shape[0])
    usable = {
        name: records[0]
        for name, records in calls.items()
        if len(records) == 1
        and FACTORABLE_LAYERS[type(modules[name])].usable(records[0], num_samples)
        and any(t.requires_grad for t in _output_tensors(records[0].output))
    }
    if not usable:
        return {}, {}, log_probs.detach()
    covered = {}
    for name in usable:
        prefix = f"{name}." if name else ""
        local = FACTORABLE_LAYERS[type(modules[name])].parameter_names(modules[name])
        covered[name] = tuple(f"{prefix}{p}" for p in local)
    named = dict(policy.named_parameters())
    checked = [n for layer_names in covered.values() for n in layer_names]
    weights = check_weights(num_samples, log_probs.device).to(log_probs.dtype)
    reference = torch.autograd.grad(
        (weights * log_probs).sum(),
        [named[n] for n in checked],
        retain_graph=True,
        allow_unused=True,
    )
    grads = _grouped_output_gradients(log_probs.sum(), [call.output for call in usable.values()])
    factors = {}
    for (name, call), grad in zip(usable.items(), grads, strict=True):
        module = modules[name]
        kind = FACTORABLE_LAYERS[type(module)]
        prefix = f"{name}." if name else ""
        positions = {p: offsets[f"{prefix}{p}"] for p in kind.parameter_names(module)}
        factors[name] = (kind.factor(module, call, grad, positions, dtype), covered[name])
    expected = {
        n: torch.zeros_like(named[n]) if g is None else g.detach()
        for n, g in zip(checked, reference, strict=True)
    }
    return factors, expected, log_probs.detach()


def _output_tensors(output: object) -> list[Tensor]:
    """The tensors of a layer's output (a tensor, or nested tuples such as an LSTM's)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _output_tensors(item)]
    return []


def _grouped_output_gradients(
    total: Tensor, outputs: list[object]
) -> list[Tensor | tuple[Tensor, ...]]:
    """:func:`output_gradients` per layer: a tensor, or a tuple for a tuple output.

    A tuple output (``nn.GRU``'s ``(output, h_n)``) gets the gradients at its tensors in
    order (zeros for those that do not require grad).
    """
    groups = [_output_tensors(output) for output in outputs]
    live = [t for group in groups for t in group if t.requires_grad]
    found = dict(zip(map(id, live), output_gradients(total, live), strict=True))
    grads = [tuple(found.get(id(t), torch.zeros_like(t)) for t in group) for group in groups]
    return [
        grad[0] if isinstance(output, Tensor) else grad
        for output, grad in zip(outputs, grads, strict=True)
    ]


def check_weights(num_samples: int, device: torch.device) -> Tensor:
    """The random sample weights ``w`` of :func:`verify_on_batch` (fixed seed, float64)."""
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.randn(num_samples, generator=generator, dtype=torch.float64).to(device)


def build_factored_scores(
    scores: PolicyScores,
    policy: nn.Module,
    log_prob_fn: LogProbFn,
    obs: Tree,
    acts: Tree,
    chunk_size: int,
    check_samples: int = 8,
) -> tuple[FactoredScores | None, str]:
    """Build a :class:`FactoredScores` for the parameters of ``scores``, if worthwhile.

    Returns
    -------
    operator, reason
        The operator, or ``None`` with the reason the generic path must be used.
    """
    names = scores.param_names
    offsets, start = {}, 0
    for name, numel in zip(names, scores.numels, strict=True):
        offsets[name] = torch.arange(start, start + numel, device=scores.device)
        start += numel
    work = working_dtype(scores.dtype)
    captured, reference, _ = capture_factors(policy, log_prob_fn, obs, acts, names, offsets, work)
    if not captured:
        return None, "no factorable layer (nn.Linear, ...) called once on a (N, features) input"
    covered = [n for _, layer_names in captured.values() for n in layer_names]
    factors = [factor for factor, _ in captured.values()]
    rest_names = [n for n in names if n not in covered]
    rest = rest_positions = None
    if rest_names:
        rest_scores = PolicyScores(policy, log_prob_fn, obs, acts, rest_names, scores.log_probs)
        index = torch.arange(scores.num_samples, device=scores.device)
        rest = torch.cat([rest_scores.rows(chunk) for chunk in index.split(chunk_size)])
        rest = rest.to(work)
        rest_positions = torch.cat([offsets[n] for n in rest_names])
    positions = {n: offsets[n] for n in covered}
    operator = FactoredScores(factors, rest, rest_positions, scores.num_params, positions)
    operator.score_dtype = scores.dtype
    # Per-sample scores of a few random samples (they pick the vmap or loop path and check
    # the rows are finite), then every sample's log-probability alone against the batch:
    # catches policies that couple samples anywhere in the batch.
    scores.rows(_random_samples(scores.num_samples, check_samples, scores.device))
    scores.check_values(chunk_size)
    mismatch = verify_on_batch(operator, reference, scores.dtype)
    if mismatch is not None:
        return None, (
            f"{FACTORED_MISMATCH} {mismatch} disagree with autograd on the whole "
            "batch (a layer's weights are also used outside its forward, or samples "
            "interact through it)"
        )
    return operator, ""


def _random_samples(num_samples: int, count: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    return torch.randperm(num_samples, generator=generator)[:count].sort().values.to(device)


def verify_on_batch(
    operator: FactoredScores, reference: dict[str, Tensor], score_dtype: torch.dtype
) -> str | None:
    """Check the factored layers' ``J^T w`` against autograd for random weights ``w``.

    A randomized identity over the whole batch (Freivalds, 1977): with ``w`` Gaussian, the
    factored ``J^T w`` equals the gradient of ``sum_i w_i log pi_i`` -- one ordinary
    backward pass of the batched log-probability -- for every ``w`` exactly when the
    factored rows are the true rows (a mismatch passes with probability 0). Only the
    factored layers are checked (the other scores come from ``torch.func`` per sample).
    Each parameter tensor is compared separately, against the rounding level of its own
    terms, so a small layer is not hidden behind a large one.

    Parameters
    ----------
    operator
        The factored operator (its ``param_positions`` locate each parameter).
    reference
        Parameter name -> autograd gradient of ``sum_i w_i log pi_i`` with ``w`` from
        :func:`check_weights` (computed by :func:`capture_factors` from its own graph).
    score_dtype
        The dtype the policy computes in (its rounding sets the tolerance).

    Returns
    -------
    str or None
        The first parameter that disagrees, or ``None`` when all agree.
    """
    n = operator.num_samples
    work = check_weights(n, operator.device).to(operator.dtype)
    eps = torch.finfo(score_dtype).eps
    factored = torch.zeros(operator.num_params, dtype=torch.float64, device=operator.device)
    # |J|^T |w|: the size of the summed terms, hence of their rounding. Compared as norms
    # over each tensor, so entries whose exact gradient is zero are judged by the tensor's
    # scale, not by their own rounding noise.
    size = torch.zeros_like(factored)
    for factor in operator.factors:
        factored[factor.positions] = factor.rmatvec(work).to(torch.float64)
        size[factor.positions] = factor.magnitude(work).to(torch.float64)
    allowed = 64 * eps * n**0.5
    for name, expected in reference.items():
        where = operator.param_positions[name]
        gap = torch.linalg.vector_norm(factored[where] - expected.reshape(-1).to(torch.float64))
        if not float(gap) <= allowed * float(torch.linalg.vector_norm(size[where])):
            return name
    return None
