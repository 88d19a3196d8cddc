"""Exactness of RATNaturalGradient against the dense float64 reference."""

from __future__ import annotations

import pytest
import torch
from cases import CASES, build
from reference import dense_natural_gradient, dense_scores, reference_log_prob

from natgrad import RATNaturalGradient

N = 24
# Every named solver must reach tol=1e-12 on its own (on_nonconvergence="raise"): a
# fallback to Cholesky would hide a broken iterative solver. CG runs unpreconditioned here
# (the Nystrom preconditioner has its own test below). Block Kaczmarz contracts at a rate
# set by the conditioning of K / N + lam I, so it gets the larger dampings: the slowest
# case (transformer at lam = 0.1) needs about 400 epochs.
SOLVERS = {
    "cholesky": {"preconditioner_rank": 0},
    "cg": {"max_iters": 400, "preconditioner_rank": 0},
    "kaczmarz": {"block_size": 12, "max_epochs": 1000},
    "accelerated_kaczmarz": {"block_size": 12, "max_epochs": 1000},
}
DAMPINGS = {
    "cholesky": (1e-1, 1e-3),
    "cg": (1e-1, 1e-3),
    "kaczmarz": (1.0, 1e-1),
    "accelerated_kaczmarz": (1.0, 1e-1),
}
ACCELERATED = "accelerated_kaczmarz"
ALL_DAMPINGS = sorted({d for pair in DAMPINGS.values() for d in pair})
BACKENDS = {
    "materialized": {"backend": "materialized"},
    "streaming": {"backend": "streaming"},
    "factored": {"backend": "factored"},
}
# The streaming backend recomputes score rows on every product, so an iterative solve costs
# tens of vmap (or per-sample loop) passes: those runs use the cheap cases below (and skip
# the accelerated Kaczmarz, whose block products are the plain Kaczmarz's). Its rows
# and products are solver-independent and checked on every case by the Cholesky runs.
STREAMING_ITERATIVE_CASES = {
    "gaussian_mlp",
    "tanh_gaussian",
    "multi_discrete",
    "dict_obs",
    "shared_trunk_subset",
}


def exactness_table():
    for case in CASES:
        for solver in SOLVERS:
            for backend in BACKENDS:
                if (
                    backend == "streaming"
                    and solver != "cholesky"
                    and (case.name not in STREAMING_ITERATIVE_CASES or solver == ACCELERATED)
                ):
                    continue
                for which in ("large", "small"):
                    yield pytest.param(
                        case, solver, backend, which, id=f"{case.name}-{solver}-{backend}-{which}"
                    )


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


@pytest.fixture(scope="module")
def references():
    """Dense reference direction for every case and damping, computed once."""
    table = {}
    for case in CASES:
        policy, obs, acts, adv = build(case, N)
        params = (
            case.params(policy)
            if case.params
            else [p for p in policy.parameters() if p.requires_grad]
        )
        log_prob_fn = case.log_prob_fn or reference_log_prob
        scores = dense_scores(policy, log_prob_fn, obs, acts, params, N)
        for damping in ALL_DAMPINGS:
            table[case.name, damping] = dense_natural_gradient(scores, adv, damping)
    return table


@pytest.mark.parametrize(("case", "solver", "backend", "which"), list(exactness_table()))
def test_direction_matches_dense_reference(case, solver, backend, which, references):
    damping = DAMPINGS[solver][0 if which == "large" else 1]
    policy, obs, acts, adv = build(case, N)
    params = case.params(policy) if case.params else None
    rat = RATNaturalGradient(
        case.log_prob_fn,
        damping=damping,
        solver=solver,
        tol=1e-12,
        seed=0,
        on_nonconvergence="raise",
        **SOLVERS[solver],
        **BACKENDS[backend],
    )
    expected = references[case.name, damping]

    result = rat.natural_gradient(policy, obs, acts, adv, params=params)
    assert result.diagnostics.solver == solver  # no fallback answered for it
    assert result.diagnostics.compiled is False
    direction = flat(result.direction)
    assert torch.linalg.vector_norm(direction - expected) <= 1e-8 * torch.linalg.vector_norm(
        expected
    )

    # The user-facing path: backprop mean(A~ * log pi) and read -d from .grad. __call__
    # runs the same solve; it is called for the exact solver only (an iterative solve
    # would only be repeated).
    adv_t = (
        rat(policy, obs, acts, adv, params=params) if solver == "cholesky" else result.advantages
    )
    chosen = (
        list(params) if params is not None else [p for p in policy.parameters() if p.requires_grad]
    )
    log_prob_fn = case.log_prob_fn or reference_log_prob
    loss = -(adv_t * log_prob_fn(policy, obs, acts)).mean()
    grads = torch.autograd.grad(loss, chosen)
    assert torch.linalg.vector_norm(-flat(grads) - expected) <= 1e-8 * torch.linalg.vector_norm(
        expected
    )
    assert rat.diagnostics.backend == backend
    assert rat.diagnostics.solver == solver
    assert rat.diagnostics.converged
    assert rat.diagnostics.residual <= 1e-12


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_identities_of_design_section_1(case):
    """J d = A - lam A~, g^T d = A^T(A - lam A~)/N, d^T F d = |A - lam A~|^2 / N."""
    policy, obs, acts, adv = build(case, N)
    params = case.params(policy) if case.params else None
    damping = 1e-2
    rat = RATNaturalGradient(case.log_prob_fn, damping=damping, solver="cholesky")
    result = rat.natural_gradient(policy, obs, acts, adv, params=params)
    chosen = params or [p for p in policy.parameters() if p.requires_grad]
    scores = dense_scores(policy, case.log_prob_fn or reference_log_prob, obs, acts, chosen, N)
    d = flat(result.direction)
    jd = scores @ d
    a = adv.to(torch.float64)
    g = scores.T @ a / N
    fisher = scores.T @ scores / N
    assert torch.allclose(result.jd, jd, rtol=1e-9, atol=1e-12)
    assert torch.allclose(result.jd, a - damping * result.advantages, rtol=1e-9, atol=1e-12)
    assert result.g_dot_d == pytest.approx(float(g @ d), rel=1e-9)
    assert result.d_fisher_d == pytest.approx(float(d @ fisher @ d), rel=1e-9)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nystrom_preconditioned_cg_matches_dense_reference(case, backend, references):
    """CG with the Nystrom preconditioner (rank 8 < N) on every policy and backend."""
    policy, obs, acts, adv = build(case, N)
    params = case.params(policy) if case.params else None
    rat = RATNaturalGradient(
        case.log_prob_fn,
        damping=1e-3,
        solver="cg",
        tol=1e-12,
        max_iters=400,
        seed=0,
        preconditioner_rank=8,
        on_nonconvergence="raise",
        **BACKENDS[backend],
    )
    expected = references[case.name, 1e-3]
    direction = flat(rat.natural_gradient(policy, obs, acts, adv, params=params).direction)
    assert torch.linalg.vector_norm(direction - expected) <= 1e-8 * torch.linalg.vector_norm(
        expected
    )
    assert rat.diagnostics.solver == "cg"


class _PaddedTransformer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(
            4, 2, dim_feedforward=6, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, obs):
        hidden = self.encoder(obs["x"], src_key_padding_mask=obs["mask"])
        return torch.distributions.Categorical(logits=self.head(hidden.mean(1)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(
    ("fisher", "backend"),
    [("sampled", "factored"), ("sampled", "materialized"), ("expected", "materialized")],
)
def test_transformer_encoder_with_padding_mask_in_eval_mode(backend, fisher):
    """Without gradients nn.TransformerEncoder takes its nested-tensor fast path, which
    zeroes the padded positions: natgrad's no-grad evaluations must not use it (they were
    refused as coupling samples), the scores are those of the differentiable path."""
    torch.manual_seed(0)
    n = 8
    policy = _PaddedTransformer().double().eval()
    mask = torch.zeros(n, 4, dtype=torch.bool)
    mask[:, -1] = True
    mask[::2, -2] = True
    obs = {"x": torch.randn(n, 4, 4, dtype=torch.float64), "mask": mask}
    acts, adv = torch.randint(0, 3, (n,)), torch.randn(n, dtype=torch.float64)
    rat = RATNaturalGradient(
        damping=1e-2, solver="cholesky", tol=1e-12, backend=backend, fisher=fisher
    )
    result = rat.natural_gradient(policy, obs, acts, adv)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is put back
    if fisher == "sampled":
        params = list(policy.parameters())
        scores = dense_scores(policy, reference_log_prob, obs, acts, params, n)
        expected = dense_natural_gradient(scores, adv, 1e-2)
        gap = torch.linalg.vector_norm(flat(result.direction) - expected)
        assert gap <= 1e-8 * torch.linalg.vector_norm(expected)
