"""RATNaturalGradient over torch.distributed: the union's answer from each rank's samples.

Each check spawns one gloo group on CPU (``torch.multiprocessing.spawn``, file store) and
runs several checks inside it; a failed assertion in any rank fails the test. The
reference is the single-process result on the concatenated batch, float64, to 1e-10.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from natgrad import RATNaturalGradient
from natgrad.distributed.dispatch import DISTRIBUTED_SOLVERS
from natgrad.errors import (
    ArgumentError,
    ArgumentTypeError,
    GramMemoryError,
    NonFiniteError,
    NotConvergedError,
    ProcessGroupError,
)

RTOL = 1e-10
DAMPING = 5e-2
SOLVERS = {
    "cholesky": {"solver": "cholesky"},
    "cg": {"solver": "cg", "tol": 1e-12, "max_iters": 500, "preconditioner_rank": 3},
    "cg-plain": {"solver": "cg", "tol": 1e-12, "max_iters": 500, "preconditioner_rank": 0},
    # Kaczmarz needs ~350 epochs at damping 0.05 to reach 1e-12 even in one process
    "kaczmarz": {
        "solver": "kaczmarz",
        "tol": 1e-12,
        "block_size": 4,
        "max_epochs": 2000,
        "damping": 0.5,
    },
    "kaczmarz-resample": {
        "solver": "kaczmarz",
        "tol": 1e-12,
        "block_size": 3,
        "max_epochs": 2000,
        "damping": 0.5,
        "resample_blocks": True,
    },
}


class Policy(nn.Module):
    """A small Gaussian MLP policy (P = 60 > N: the kernel form's regime)."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.log_std = nn.Parameter(torch.full((2,), -0.3))

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(obs), self.log_std.exp())


def make_problem(total: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same policy and concatenated batch on every rank (seeded)."""
    torch.manual_seed(0)
    policy = Policy().double()
    obs = torch.randn(total, 4, dtype=torch.float64)
    with torch.no_grad():
        acts = policy(obs).sample()
    adv = torch.randn(total, dtype=torch.float64)
    return policy, obs, acts, adv


def flat(tensors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def close(actual: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor, what: str) -> None:
    error = float((actual - expected).norm() / scale.norm())
    assert error <= RTOL, f"{what}: relative error {error:.3g} > {RTOL}"


def _worker(rank: int, world: int, path: str, check: Callable[..., None], args: tuple) -> None:
    torch.set_num_threads(1)
    # a rank left waiting in a collective fails the test in a minute instead of hanging it
    dist.init_process_group(
        "gloo",
        init_method=f"file://{path}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        check(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(world: int, check: Callable[..., None], *args: object) -> None:
    """Run ``check(rank, world, *args)`` on ``world`` gloo ranks; any rank's failure fails.

    The ranks are forked from this process after it has imported what a first call of
    ``torch.func`` imports (``torch._dynamo``, seconds per process), so each group costs
    well under a second to start; the rendezvous is a file store.
    """
    import torch._dynamo  # noqa: F401 - imported once here, inherited by the forked ranks

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "store")
        mp.start_processes(
            _worker, args=(world, path, check, args), nprocs=world, join=True, start_method="fork"
        )


def local_slice(sizes: list[int], rank: int) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def summed_gradient(policy: nn.Module, obs, acts, adv_t, total: int) -> torch.Tensor:
    """Gradient of sum(A~ log pi) / N_total on this rank, all-reduced over ranks."""
    policy.zero_grad()
    log_prob = policy(obs).log_prob(acts).sum(-1)
    ((adv_t * log_prob).sum() / total).backward()
    grad = flat(tuple(p.grad for p in policy.parameters())).clone()
    dist.all_reduce(grad)
    policy.zero_grad()
    return grad


# -- the equality checks, run inside one spawned group ------------------------------------
def check_equal_to_concatenated_batch(rank: int, world: int, sizes: list[int], cases) -> None:
    total = sum(sizes)
    policy, obs, acts, adv = make_problem(total)
    mine = local_slice(sizes, rank)
    for name, backend in cases:
        options = {"damping": DAMPING, **SOLVERS[name]}
        single = RATNaturalGradient(seed=0, backend=backend, **options)
        reference = single.natural_gradient(policy, obs, acts, adv)
        expected_adv, expected_dir = reference.advantages, flat(reference.direction)
        rat = RATNaturalGradient(
            seed=0,
            backend=backend,
            on_nonconvergence="raise",
            process_group=dist.group.WORLD,
            **options,
        )
        label = f"{name}/{backend} rank {rank} of {sizes}"
        result = rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine])
        direction = flat(result.direction)
        close(direction, expected_dir, expected_dir, f"{label}: direction")
        close(result.advantages, expected_adv[mine], expected_adv, f"{label}: A~ rows")
        close(result.jd, reference.jd[mine], reference.jd, f"{label}: J d rows")
        assert abs(result.g_dot_d - reference.g_dot_d) <= RTOL * abs(reference.g_dot_d)
        assert abs(result.d_fisher_d - reference.d_fisher_d) <= RTOL * reference.d_fisher_d
        diagnostics = rat.diagnostics
        assert diagnostics.converged and diagnostics.solver == options["solver"], label
        assert diagnostics.fallbacks == (), label
        assert diagnostics.num_samples == total and diagnostics.residual <= max(
            options.get("tol", 1e-12), 1e-12
        )
        # the direction is the same on every rank, bit for bit
        gathered = [torch.empty_like(direction) for _ in range(world)]
        dist.all_gather(gathered, direction)
        assert all(torch.equal(g, gathered[0]) for g in gathered), f"{label}: ranks differ"
        # __call__: the local rows; the all-reduced gradient of sum(A~ log pi) / N is d
        adv_t = rat(policy, obs[mine], acts[mine], adv[mine])
        close(adv_t, expected_adv[mine], expected_adv, f"{label}: __call__ rows")
        grad = summed_gradient(policy, obs[mine], acts[mine], adv_t, total)
        close(grad, expected_dir, expected_dir, f"{label}: summed gradient")


ALL_CASES = [
    ("cholesky", "factored"),
    ("cholesky", "materialized"),
    ("cholesky", "streaming"),
    ("cg", "auto"),
    ("cg-plain", "auto"),
    ("kaczmarz", "auto"),
]


def test_three_ranks_unequal_batches_reproduce_the_concatenated_batch() -> None:
    spawn(3, check_equal_to_concatenated_batch, [7, 12, 5], ALL_CASES)


def test_two_ranks_reproduce_the_concatenated_batch() -> None:
    cases = [
        ("cholesky", "auto"),
        ("cg", "streaming"),
        ("kaczmarz", "materialized"),
        ("kaczmarz-resample", "auto"),
    ]
    spawn(2, check_equal_to_concatenated_batch, [9, 4], cases)


# -- communication, counted by wrapping the collectives ----------------------------------
def check_communication(rank: int, world: int, sizes: list[int]) -> None:
    total = sum(sizes)
    policy, obs, acts, adv = make_problem(total)
    mine = local_slice(sizes, rank)
    num_params = sum(p.numel() for p in policy.parameters())
    seen: list[int] = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        seen.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        for name in ("cg", "kaczmarz"):
            seen.clear()
            options = {"damping": DAMPING, **SOLVERS[name]}
            rat = RATNaturalGradient(seed=0, process_group=dist.group.WORLD, **options)
            rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine])
            stats = rat.communication
            # every all-reduce went through the counted wrapper, with the recorded bytes
            reduced = {k: v for k, v in stats.bytes.items() if k.endswith("/all_reduce")}
            assert len(seen) == sum(stats.calls[k] for k in reduced)
            assert sum(seen) == sum(reduced.values())
            # nothing of size N x P or N x N: a P-vector and 1 (CG) or 3 scalars at most
            assert max(seen) == 8 * (num_params + (1 if name == "cg" else 3))
            solve_calls = stats.calls["solve/all_reduce"]
            steps = stats.iterations
            assert steps > 0
            if name == "cg":
                # one (P + 1)-float all-reduce and one of 2 floats per iteration (+2 to start)
                assert solve_calls == 2 * steps + 2
                assert stats.bytes["solve/all_reduce"] == steps * 8 * (num_params + 3) + 8 * 3
            else:
                # one (P + 3)-float all-reduce per block step (+2: |A|, factor agreement)
                assert solve_calls == steps + 2
                assert stats.bytes["solve/all_reduce"] == steps * 8 * (num_params + 3) + 16
            # the exact final check: one P-vector and one scalar
            assert stats.calls["check/all_reduce"] == 2
            assert stats.bytes["check/all_reduce"] == 8 * (num_params + 1)
    finally:
        dist.all_reduce = original


def test_communication_per_iteration_is_one_p_vector() -> None:
    spawn(2, check_communication, [9, 6])


# -- errors: the same decision on every rank, natgrad's own errors -------------------------
def check_errors(rank: int, world: int) -> None:
    policy, obs, acts, adv = make_problem(10)
    mine = slice(5 * rank, 5 * rank + 5)
    group = dist.group.WORLD
    # ranks disagree on damping
    rat = RATNaturalGradient(damping=0.1 * (rank + 1), process_group=group)
    with pytest.raises(ProcessGroupError, match="disagree on damping"):
        rat(policy, obs[mine], acts[mine], adv[mine])
    # ranks disagree on the parameters
    params = list(policy.parameters())[: 2 + rank]
    rat = RATNaturalGradient(damping=0.1, process_group=group)
    with pytest.raises(ProcessGroupError, match="disagree on parameters"):
        rat(policy, obs[mine], acts[mine], adv[mine], params=params)
    # one rank's bad input: it raises its own error, the others natgrad's, nobody hangs
    bad = adv[mine].clone()
    if rank == 1:
        bad[0] = float("nan")
    expected = NonFiniteError if rank == 1 else ProcessGroupError
    with pytest.raises(expected, match="non-finite" if rank == 1 else "rank 1"):
        rat(policy, obs[mine], acts[mine], bad)
    # a solver without a distributed form
    from natgrad.solvers import Solver, register_solver, unregister_solver

    register_solver(Solver("noop", lambda *a, **k: None))
    try:
        rat = RATNaturalGradient(damping=0.1, solver="noop", process_group=group)
        with pytest.raises(ProcessGroupError, match="no distributed form"):
            rat(policy, obs[mine], acts[mine], adv[mine])
    finally:
        unregister_solver("noop")
    # an iterative solver stopping above tol falls back to the distributed Cholesky
    rat = RATNaturalGradient(damping=0.1, solver="cg", tol=1e-10, max_iters=1, process_group=group)
    result = rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine])
    exact = RATNaturalGradient(damping=0.1, solver="cholesky").natural_gradient(
        policy, obs, acts, adv
    )
    assert rat.diagnostics.solver == "cholesky" and "instead" in rat.diagnostics.fallbacks[0]
    close(flat(result.direction), flat(exact.direction), flat(exact.direction), "fallback")
    rat = RATNaturalGradient(
        damping=0.1, solver="cg", tol=1e-10, max_iters=1, on_nonconvergence="raise",
        process_group=group,
    )  # fmt: skip
    with pytest.raises(NotConvergedError, match="distributed"):
        rat(policy, obs[mine], acts[mine], adv[mine])
    # one rank short of memory for the exact solve: every rank raises before allocating,
    # from an explicit cholesky and from the fallback of an iterative solver alike
    import natgrad.distributed.cholesky as distributed_cholesky_module

    free = distributed_cholesky_module.available_bytes
    needed = distributed_cholesky_module.distributed_gram_bytes(10, 5)
    assert needed == 8 * (5 * 10 + 10 * 11 + 2 * 100)
    short = {0: None, 1: needed - 1}  # rank 0 cannot tell; rank 1 lacks one byte
    distributed_cholesky_module.available_bytes = lambda device: short[rank]
    try:
        for options in ({"solver": "cholesky"}, {"solver": "cg", "tol": 1e-10, "max_iters": 1}):
            rat = RATNaturalGradient(damping=0.1, process_group=group, **options)
            message = r"N=10 needs ~2\.81 KiB per rank, 1 bytes more than a rank has free"
            with pytest.raises(GramMemoryError, match=message):
                rat(policy, obs[mine], acts[mine], adv[mine])
        # exactly enough on rank 1: the exact solve runs, with one scalar all-reduce more
        short[1] = needed
        rat = RATNaturalGradient(damping=0.1, solver="cholesky", process_group=group)
        rat(policy, obs[mine], acts[mine], adv[mine])
        stats = rat.communication
        assert stats.calls["solve/all_reduce"] == 2
        assert stats.bytes["solve/all_reduce"] == 8 + 8 * 10 * 11
    finally:
        distributed_cholesky_module.available_bytes = free
    # the group still works after every error: a good call succeeds
    assert rat.__class__(damping=0.1, process_group=group)(
        policy, obs[mine], acts[mine], adv[mine]
    ).shape == (5,)


def check_not_converged_warning_points_at_the_caller(rank: int, world: int) -> None:
    import warnings

    from natgrad.errors import NotConvergedWarning

    total = 16
    policy, obs, acts, adv = make_problem(total)
    mine = local_slice([8, 8], rank)
    rat = RATNaturalGradient(damping=1e-3, solver="cg", max_iters=1, tol=1e-12,
                             on_nonconvergence="warn", process_group=dist.group.WORLD)  # fmt: skip
    for call in (rat, rat.natural_gradient):  # the two entry points reach it at other depths
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            call(policy, obs[mine], acts[mine], adv[mine])
        located = [w.filename for w in caught if issubclass(w.category, NotConvergedWarning)]
        assert located == [__file__], (call, located)


def test_not_converged_warning_points_at_the_callers_line() -> None:
    spawn(2, check_not_converged_warning_points_at_the_caller)


def check_zero_scores(rank: int, world: int) -> None:
    """J = 0 on every rank: A~ = A / lam and d = 0, converged, without the iterative solve
    (whose relative bound on the error of d = 0 was infinite: NotConvergedError here)."""
    policy, obs, acts, adv = make_problem(16)
    policy.unused = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    mine = local_slice([7, 9], rank)
    for solver in DISTRIBUTED_SOLVERS:
        rat = RATNaturalGradient(damping=0.1, solver=solver, tol=1e-10, on_nonconvergence="raise",
                                 process_group=dist.group.WORLD)  # fmt: skip
        result = rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine], [policy.unused])
        close(result.advantages, adv[mine] / 0.1, adv[mine] / 0.1, f"{solver}: A~")
        assert torch.count_nonzero(result.direction[0]) == 0, solver
        diag = rat.diagnostics
        assert diag.converged and diag.solver == solver and diag.residual <= 1e-15, diag
        assert diag.direction_error == (None if solver == "cholesky" else 0.0), diag


def test_all_zero_scores_are_solved_exactly_on_every_rank() -> None:
    spawn(2, check_zero_scores)


def test_errors_are_raised_on_every_rank_alike() -> None:
    spawn(2, check_errors)


def check_adv_that_is_not_a_vector_on_one_rank(rank: int, world: int) -> None:
    """A list or a 0-d tensor for adv on rank 1: natgrad's errors on every rank, no hang."""
    policy, obs, acts, adv = make_problem(10)
    mine = slice(5 * rank, 5 * rank + 5)
    rat = RATNaturalGradient(damping=0.1, process_group=dist.group.WORLD)
    for bad, error, message in (
        (adv[mine].tolist(), ArgumentTypeError, "adv must be a torch.Tensor"),
        (adv[mine][0], ArgumentError, r"adv must be 1-D of shape \(N,\), got shape \(\)"),
    ):
        mine_adv = bad if rank == 1 else adv[mine]
        expected = error if rank == 1 else ProcessGroupError
        with pytest.raises(expected, match=message if rank == 1 else "rank 1: " + error.__name__):
            rat.natural_gradient(policy, obs[mine], acts[mine], mine_adv)
    # the group still works: a good call succeeds on every rank
    assert rat(policy, obs[mine], acts[mine], adv[mine]).shape == (5,)


def test_adv_that_is_not_a_vector_on_one_rank_stops_every_rank() -> None:
    spawn(2, check_adv_that_is_not_a_vector_on_one_rank)


def check_auto_solver_with_other_backends_per_rank(rank: int, world: int) -> None:
    """solver='auto' resolves alike on every rank when the ranks' backends differ.

    Rank 0 materializes its rows (Cholesky would be cheap), rank 1 streams them (it would
    pick CG): every rank must run the same solver, else their collectives do not match.
    """
    sizes = [4, 12]
    total = sum(sizes)
    policy, obs, acts, adv = make_problem(total)
    mine = local_slice(sizes, rank)
    exact = RATNaturalGradient(damping=0.1, solver="cholesky").natural_gradient(
        policy, obs, acts, adv
    )
    for backends in (("materialized", "streaming"), ("factored", "materialized")):
        rat = RATNaturalGradient(
            damping=0.1, tol=1e-12, max_iters=500, backend=backends[rank],
            on_nonconvergence="raise", process_group=dist.group.WORLD,
        )  # fmt: skip
        result = rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine])
        expected_solver = "cg" if "streaming" in backends else "cholesky"
        assert rat.diagnostics.solver == expected_solver, (backends, rat.diagnostics.solver)
        label = f"{backends} rank {rank}"
        close(flat(result.direction), flat(exact.direction), flat(exact.direction), label)
        close(result.advantages, exact.advantages[mine], exact.advantages, label)


def test_auto_solver_agrees_across_ranks_with_other_backends() -> None:
    spawn(2, check_auto_solver_with_other_backends_per_rank)


def check_streamed_scores_failing_on_one_rank(rank: int, world: int) -> None:
    """backend='streaming' computes the score rows inside the solve: one rank's infinite
    score must stop every rank with natgrad's errors, not leave the others waiting."""
    policy, obs, acts, adv = make_problem(10)
    mine = slice(5 * rank, 5 * rank + 5)

    def log_prob(policy, obs, acts):
        values = policy(obs).log_prob(acts).sum(-1)
        if rank == 0:
            return values
        kink = (policy.log_std[0] - policy.log_std[0].detach()).abs().sqrt()  # 0, gradient inf
        return values + torch.where(torch.arange(len(values)) == 0, kink, 0.0)

    for solver in DISTRIBUTED_SOLVERS:
        rat = RATNaturalGradient(
            log_prob, damping=0.1, solver=solver, backend="streaming",
            process_group=dist.group.WORLD,
        )  # fmt: skip
        expected = ArgumentError if rank == 1 else ProcessGroupError
        message = "score .* of sample 0 is not finite" if rank == 1 else "1 other rank"
        with pytest.raises(expected, match=message):
            rat.natural_gradient(policy, obs[mine], acts[mine], adv[mine])
    # the group still works: a good call succeeds on every rank
    rat = RATNaturalGradient(damping=0.1, backend="streaming", process_group=dist.group.WORLD)
    assert rat(policy, obs[mine], acts[mine], adv[mine]).shape == (5,)


def test_streamed_scores_failing_on_one_rank_stop_every_rank() -> None:
    spawn(2, check_streamed_scores_failing_on_one_rank)


def check_subgroup_without_this_rank(rank: int, world: int) -> None:
    group = dist.new_group([0])
    if rank == 1:
        with pytest.raises(ProcessGroupError, match="does not contain this rank"):
            RATNaturalGradient(process_group=group)
        return
    policy, obs, acts, adv = make_problem(5)
    assert RATNaturalGradient(damping=0.1, process_group=group)(policy, obs, acts, adv).shape == (
        5,
    )


def test_subgroup_without_this_rank_is_refused_with_a_clear_message() -> None:
    spawn(2, check_subgroup_without_this_rank)


def test_process_group_needs_an_initialized_torch_distributed() -> None:
    assert not dist.is_initialized()
    with pytest.raises(ProcessGroupError, match="init_process_group"):
        RATNaturalGradient(process_group=object())


def test_process_group_none_is_the_single_process_call() -> None:
    policy, obs, acts, adv = make_problem(24)
    for options in SOLVERS.values():
        options = {"damping": DAMPING, **options}
        plain = RATNaturalGradient(seed=3, **options)
        explicit = RATNaturalGradient(seed=3, process_group=None, **options)
        a = plain.natural_gradient(policy, obs, acts, adv)
        b = explicit.natural_gradient(policy, obs, acts, adv)
        assert torch.equal(a.advantages, b.advantages)
        assert torch.equal(flat(a.direction), flat(b.direction))
        assert explicit.communication is None and explicit.process_group is None


def test_docs_scaling_table_is_rendered_from_the_committed_results() -> None:
    """docs/distributed.md shows exactly the table of benchmarks/distributed/results."""
    import importlib.util
    import json
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    path = root / "benchmarks" / "distributed" / "scaling.py"
    spec = importlib.util.spec_from_file_location("distributed_scaling", path)
    scaling = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(scaling)
    data = json.loads(scaling.RESULTS.read_text())
    text = scaling.DOCS.read_text()
    shown = text.split(scaling.BEGIN, 1)[1].split(scaling.END, 1)[0].strip()
    assert shown == scaling.table(data), "run: python benchmarks/distributed/scaling.py --render"
    rows = data["rows"]
    assert {row["ranks"] for row in rows} == {1, 2, 3, 4} and all(r["converged"] for r in rows)
    for row in rows:  # the payload per step is 8 (P + 3) bytes, whatever the ranks
        if row["solver"] != "cholesky":
            setup = 24 if row["solver"] == "cg" else 16
            assert row["solve_bytes"] - setup == row["steps"] * 8 * (row["params"] + 3)
