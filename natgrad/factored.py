"""Fast exact scores for ``nn.Linear`` layers, without per-sample gradients.

For a linear layer ``y = W a + b`` applied once to a ``(N, in)`` batch, sample ``i``'s score
for ``W`` is the outer product ``g_i a_i^T`` with ``g_i = d log pi_i / d y_i`` -- and all
``g_i`` come out of *one* ordinary backward pass of ``sum_i log pi_i``, because sample ``i``'s
output affects only its own log-probability. So, with ``A`` the layer inputs and ``G`` the
output gradients (a column of ones appended to ``A`` for the bias):

* ``J_S J_T^T = (G_S G_T^T) * (A_S A_T^T)`` (elementwise), ``O(b^2 (in + out))``;
* ``J_S v = rowsum((A_S V^T) * G_S)``, with ``V`` the layer's slice of ``v`` as a matrix;
* ``J_S^T x = G_S^T diag(x) A_S``.

No ``N x P`` (or ``b x P``) matrix is ever formed for these layers; the remaining selected
parameters (convolutions, log-std vectors, embeddings, ...) keep generic per-sample scores.
This is the per-example-gradient factorization of Goodfellow (2015, "Efficient per-example
gradient computations") applied to the kernel ``K = J J^T``.

The factorization is exact only when each such layer is called exactly once on a 2-D input
and its weights are not used elsewhere; layers that break the first two conditions are
detected and left to the generic path, and the whole factored ``J`` is verified on the
whole batch by a randomized identity (:func:`verify_on_batch`; mismatch: the generic path
is used).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from natgrad._tree import Tree
from natgrad.scores import (
    BlockFunctions,
    LogProbFn,
    PolicyScores,
    ScoreBlock,
    ScoreOperator,
    working_dtype,
)

__all__ = [
    "FACTORED_MISMATCH",
    "FactoredScores",
    "LinearFactor",
    "capture_linear_factors",
    "verify_on_batch",
]

FACTORED_MISMATCH = "factored linear-layer scores of"
_CHECK_SEED = 1977  # verification draws: fixed, so that they never consume the user's generator


@dataclass
class LinearFactor:
    """Inputs and output gradients of one linear layer over the batch.

    Attributes
    ----------
    inputs
        ``A``, shape ``(N, in)`` or ``(N, in + 1)`` with a trailing ones column for a bias.
    output_grads
        ``G``, shape ``(N, out)``.
    positions
        Indices into the flat parameter vector of the ``(out, in[+1])`` matrix ``[W | b]``,
        row-major.
    param_names
        Names of the weight and (if any) the bias, as in ``named_parameters()``.
    """

    inputs: Tensor
    output_grads: Tensor
    positions: Tensor
    param_names: tuple[str, ...] = ()


def _factored_gram(payload: tuple) -> Tensor:
    return _factored_cross_gram(payload, payload)


def _factored_cross_gram(payload: tuple, selected: tuple) -> Tensor:
    """``J J_S^T`` from two payloads (all samples, the selected ones)."""
    pairs, rest, _, _ = payload
    pairs_s, rest_s, _, _ = selected
    total = 0.0
    for (a, g, _), (a_s, g_s, _) in zip(pairs, pairs_s, strict=True):
        total = total + (a @ a_s.T) * (g @ g_s.T)
    if rest is not None:
        total = total + rest @ rest_s.T
    return total


def _factored_matvec(payload: tuple, v: Tensor) -> Tensor:
    pairs, rest, rest_positions, _ = payload
    out = 0.0
    for a, g, positions in pairs:
        matrix = v[positions].reshape(g.shape[1], a.shape[1])
        out = out + ((a @ matrix.T) * g).sum(dim=1)
    if rest is not None:
        out = out + rest @ v[rest_positions]
    return out


def _factored_rmatvec(payload: tuple, x: Tensor) -> Tensor:
    pairs, rest, rest_positions, num_params = payload
    result = x.new_zeros(num_params)
    for a, g, positions in pairs:
        result.index_copy_(0, positions, ((g * x[:, None]).T @ a).reshape(-1))
    if rest is not None:
        result.index_copy_(0, rest_positions, rest.T @ x)
    return result


FACTORED_FUNCTIONS = BlockFunctions(_factored_gram, _factored_matvec, _factored_rmatvec)


class _FactoredBlock(ScoreBlock):
    def __init__(self, operator: FactoredScores, index: Tensor | None) -> None:
        self.operator = operator
        self.index = index
        self.dtype = operator.dtype

    def _take(self, tensor: Tensor) -> Tensor:
        return tensor if self.index is None else tensor[self.index]

    @cached_property
    def payload(self) -> tuple:
        """``(((A_S, G_S, positions), ...), rest_S, rest_positions, P)``, gathered once."""
        op = self.operator
        pairs = tuple(
            (self._take(f.inputs), self._take(f.output_grads), f.positions) for f in op.factors
        )
        rest = None if op.rest is None else self._take(op.rest)
        return pairs, rest, op.rest_positions, op.num_params

    def gram(self) -> Tensor:
        return _factored_gram(self.payload)

    def matvec(self, v: Tensor) -> Tensor:
        return _factored_matvec(self.payload, v)

    def rmatvec(self, x: Tensor) -> Tensor:
        return _factored_rmatvec(self.payload, x)

    def functional(self) -> tuple[BlockFunctions, tuple]:
        return FACTORED_FUNCTIONS, self.payload


class FactoredScores(ScoreOperator):
    """``J`` with linear layers held as ``(A, G)`` factors and the rest as dense rows.

    Parameters
    ----------
    factors
        One :class:`LinearFactor` per factored layer.
    rest
        Dense per-sample scores ``(N, P_rest)`` of the other selected parameters, or
        ``None``.
    rest_positions
        Indices of those parameters in the flat parameter vector.
    num_params
        ``P``.
    """

    backend = "factored"

    def __init__(
        self,
        factors: list[LinearFactor],
        rest: Tensor | None,
        rest_positions: Tensor | None,
        num_params: int,
    ) -> None:
        if not factors:
            raise ValueError("FactoredScores needs at least one linear factor")
        self.factors = factors
        self.rest = rest
        self.rest_positions = rest_positions
        self.num_samples = factors[0].inputs.shape[0]
        self.num_params = num_params
        self.dtype = factors[0].inputs.dtype
        self.device = factors[0].inputs.device

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

    def functional(self) -> tuple[BlockFunctions, tuple]:
        return self._whole.functional()

    def cross_gram(self, index: Tensor) -> Tensor:
        return _factored_cross_gram(self._whole.payload, _FactoredBlock(self, index).payload)

    def squared_norms(self) -> Tensor:
        total = torch.zeros(self.num_samples, dtype=torch.float64, device=self.device)
        for factor in self.factors:
            a_norm = torch.linalg.vector_norm(factor.inputs, dim=1).to(torch.float64)
            g_norm = torch.linalg.vector_norm(factor.output_grads, dim=1).to(torch.float64)
            total += (a_norm * g_norm) ** 2
        if self.rest is not None:
            total += torch.linalg.vector_norm(self.rest, dim=1).to(torch.float64) ** 2
        return total

    def dense_rows(self, index: Tensor) -> Tensor:
        """Materialize ``J[index]`` (for verification on a few samples)."""
        rows = torch.zeros(len(index), self.num_params, dtype=self.dtype, device=self.device)
        for factor in self.factors:
            a, g = factor.inputs[index], factor.output_grads[index]
            rows[:, factor.positions] = (g[:, :, None] * a[:, None, :]).reshape(len(index), -1)
        if self.rest is not None:
            rows[:, self.rest_positions] = self.rest[index]
        return rows


def _linear_layers(policy: nn.Module, selected: set[str]) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` modules whose weight (and bias, if any) are all selected."""
    layers = {}
    for name, module in policy.named_modules():
        if type(module) is not nn.Linear:
            continue  # subclasses may reimplement forward (e.g. quantized, attention out-proj)
        prefix = f"{name}." if name else ""
        wanted = [f"{prefix}weight"] + ([f"{prefix}bias"] if module.bias is not None else [])
        if all(n in selected for n in wanted):
            layers[name] = module
    return layers


def capture_linear_factors(
    policy: nn.Module,
    log_prob_fn: LogProbFn,
    obs: Tree,
    acts: Tree,
    param_names: list[str],
    num_samples: int,
) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """Run one forward and one backward pass and collect ``(A, G)`` of factorable layers.

    Returns
    -------
    factors, log_probs
        Layer name -> (inputs ``A`` without the ones column, output gradients ``G``) for
        every plain linear layer called exactly once on an ``(N, in)`` input; and the
        batched log-probabilities.
    """
    layers = _linear_layers(policy, set(param_names))
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}

    def recorder(name: str):
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            calls[name].append((inputs[0], output))

        return hook

    handles = [m.register_forward_hook(recorder(n)) for n, m in layers.items()]
    try:
        with torch.enable_grad():
            log_probs = log_prob_fn(policy, obs, acts)
    finally:
        for handle in handles:
            handle.remove()
    usable = {
        name: record[0]
        for name, record in calls.items()
        if len(record) == 1
        and record[0][0].dim() == 2
        and record[0][0].shape[0] == num_samples
        and record[0][1].requires_grad
    }
    if not usable:
        return {}, log_probs.detach()
    outputs = [output for _, output in usable.values()]
    grads = torch.autograd.grad(log_probs.sum(), outputs, allow_unused=True)
    factors = {}
    for (name, (inputs, output)), grad in zip(usable.items(), grads, strict=True):
        factors[name] = (inputs.detach(), torch.zeros_like(output) if grad is None else grad)
    return factors, log_probs.detach()


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
    captured, _ = capture_linear_factors(policy, log_prob_fn, obs, acts, names, scores.num_samples)
    if not captured:
        return None, "no nn.Linear layer called once on a (N, features) input"
    offsets, start = {}, 0
    for name, numel in zip(names, scores.numels, strict=True):
        offsets[name] = torch.arange(start, start + numel, device=scores.device)
        start += numel
    covered: list[str] = []
    factors = []
    work = working_dtype(scores.dtype)
    for layer, (inputs, grads) in captured.items():
        prefix = f"{layer}." if layer else ""
        out_features, in_features = grads.shape[1], inputs.shape[1]
        weight = offsets[f"{prefix}weight"].reshape(out_features, in_features)
        layer_names = [f"{prefix}weight"]
        if f"{prefix}bias" in offsets:
            bias = offsets[f"{prefix}bias"].reshape(out_features, 1)
            weight = torch.cat([weight, bias], dim=1)
            inputs = torch.cat([inputs, torch.ones_like(inputs[:, :1])], dim=1)
            layer_names.append(f"{prefix}bias")
        covered += layer_names
        factors.append(
            LinearFactor(inputs.to(work), grads.to(work), weight.reshape(-1), tuple(layer_names))
        )
    rest_names = [n for n in names if n not in covered]
    rest = rest_positions = None
    if rest_names:
        rest_scores = PolicyScores(policy, log_prob_fn, obs, acts, rest_names, scores.log_probs)
        index = torch.arange(scores.num_samples, device=scores.device)
        rest = torch.cat([rest_scores.rows(chunk) for chunk in index.split(chunk_size)])
        rest = rest.to(working_dtype(scores.dtype))
        rest_positions = torch.cat([offsets[n] for n in rest_names])
    operator = FactoredScores(factors, rest, rest_positions, scores.num_params)
    operator.score_dtype = scores.dtype
    # Per-sample evaluation of a few random samples: catches policies that couple samples.
    scores.rows(_random_samples(scores.num_samples, check_samples, scores.device))
    factored_names = [n for n in names if n in covered]
    factored_scores = PolicyScores(policy, log_prob_fn, obs, acts, factored_names, scores.log_probs)
    mismatch = verify_on_batch(operator, factored_scores)
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


def verify_on_batch(operator: FactoredScores, scores: PolicyScores) -> str | None:
    """Check the factored layers' ``J^T w`` against autograd for random weights ``w``.

    A randomized identity over the whole batch (Freivalds, 1977): with ``w`` Gaussian, the
    factored ``J^T w`` equals the gradient of ``sum_i w_i log pi_i`` -- one ordinary
    backward pass of the batched log-probability -- for every ``w`` exactly when the
    factored rows are the true rows (a mismatch passes with probability 0). Only the
    factored layers are checked (the other scores come from ``torch.func`` per sample), so
    the backward pass stops at them. Each parameter tensor is compared separately, against
    the rounding level of its own terms, so a small layer is not hidden behind a large one.

    Parameters
    ----------
    operator
        The factored operator.
    scores
        Per-sample scores of exactly the factored layers' parameters (for the autograd side).

    Returns
    -------
    str or None
        The first parameter that disagrees, or ``None`` when all agree.
    """
    n = operator.num_samples
    generator = torch.Generator().manual_seed(_CHECK_SEED)
    weights = torch.randn(n, generator=generator, dtype=torch.float64).to(operator.device)
    index = torch.arange(n, device=operator.device)
    reference = scores.vjp(index, weights).to(torch.float64).split(scores.numels)
    expected = dict(zip(scores.param_names, reference, strict=True))
    work = weights.to(operator.dtype)
    eps = torch.finfo(scores.dtype).eps
    for factor in operator.factors:
        g, a = factor.output_grads, factor.inputs
        factored = ((g * work[:, None]).T @ a).to(torch.float64)
        # |G|^T |w| |A|: the size of the summed terms, hence of their rounding. Compared as
        # norms over the tensor, so entries whose exact gradient is zero are judged by the
        # tensor's scale, not by their own rounding noise.
        size = ((g.abs() * work.abs()[:, None]).T @ a.abs()).to(torch.float64)
        allowed = 64 * eps * n**0.5
        weight, *bias = factor.param_names
        width = a.shape[1] - len(bias)
        layer = [(weight, slice(0, width))] + [(b, slice(width, width + 1)) for b in bias]
        for name, columns in layer:
            mine = factored[:, columns]
            gap = torch.linalg.vector_norm(mine - expected[name].reshape(mine.shape))
            if not float(gap) <= allowed * float(torch.linalg.vector_norm(size[:, columns])):
                return name
    return None
