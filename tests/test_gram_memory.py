"""An exact solve never tries to form an N x N kernel that cannot fit in free memory."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import natgrad.solvers.memory as memory
from natgrad import GramMemoryError, NotConvergedWarning, RATNaturalGradient


def log_prob(policy: nn.Module, obs: torch.Tensor, acts: torch.Tensor) -> torch.Tensor:
    return torch.distributions.Categorical(logits=policy(obs)).log_prob(acts)


def batch(n: int = 300):
    torch.manual_seed(0)
    policy = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    return (
        policy,
        torch.randn(n, 4, dtype=torch.float64),
        torch.randint(0, 3, (n,)),
        torch.randn(n, dtype=torch.float64),
    )


def test_gram_bytes_counts_the_kernel_and_its_factor() -> None:
    assert memory.gram_bytes(1000, torch.float64) == 2 * 8 * 10**6
    assert memory.gram_bytes(1000, torch.float32) == 2 * 8 * 10**6 + 4 * 10**6


def test_free_memory_is_known_on_this_cpu() -> None:
    free = memory.available_bytes(torch.device("cpu"))
    assert free is None or free > 0


@pytest.fixture
def little_memory(monkeypatch: pytest.MonkeyPatch) -> int:
    free = memory.gram_bytes(300, torch.float64) - 1  # one byte short for N = 300
    monkeypatch.setattr(memory, "available_bytes", lambda device: free)
    return free


def test_cholesky_refuses_before_allocating(little_memory: int) -> None:
    policy, obs, acts, adv = batch()
    before = [p.detach().clone() for p in policy.parameters()]
    rat = RATNaturalGradient(log_prob, damping=0.1, solver="cholesky")
    with pytest.raises(
        GramMemoryError,
        match=r"N=300 needs ~1.37 MiB, 1.37 MiB free on cpu; use an iterative solver",
    ):
        rat(policy, obs, acts, adv)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_fallback_after_a_missed_tol_is_refused_not_attempted(little_memory: int) -> None:
    policy, obs, acts, adv = batch()
    rat = RATNaturalGradient(log_prob, damping=1e-3, solver="cg", max_iters=1, tol=1e-12)
    with pytest.raises(GramMemoryError, match="on_nonconvergence='fallback'") as refused:
        rat(policy, obs, acts, adv)
    # why an exact solve was needed comes first: the solver, its residual, iterations, tol
    message = str(refused.value)
    assert re.match(
        r"solver='cg' stopped at relative residual [0-9.e+-]+ > tol=1e-12 after 1 iterations, "
        r"and the exact solve that on_nonconvergence='fallback' then runs does not fit: an "
        r"exact solve \(solver='cholesky'.*N=300 needs",
        message,
    ), message
    assert message.endswith("loosen tol)")
    assert isinstance(refused.value.__cause__, GramMemoryError)
    warned = RATNaturalGradient(
        log_prob, damping=1e-3, solver="cg", max_iters=1, tol=1e-12, on_nonconvergence="warn"
    )
    with pytest.warns(NotConvergedWarning):
        adv_t = warned(policy, obs, acts, adv)
    assert torch.isfinite(adv_t).all() and warned.diagnostics.solver == "cg"


def test_one_sample_short_of_the_limit_is_solved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memory, "available_bytes", lambda d: memory.gram_bytes(300, torch.float64))
    policy, obs, acts, adv = batch()
    rat = RATNaturalGradient(log_prob, damping=0.1, solver="cholesky")
    rat(policy, obs, acts, adv)
    assert rat.diagnostics.solver == "cholesky" and rat.diagnostics.converged


class _FakeMeminfo:
    def __init__(self, text: str) -> None:
        self.lines = text.splitlines(keepends=True)

    def __enter__(self):
        return iter(self.lines)

    def __exit__(self, *exc: object) -> None:
        return None


def test_free_memory_is_read_from_memavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "MemTotal:  4000 kB\nMemFree:  1 kB\nMemAvailable:  1000 kB\n"
    monkeypatch.setattr(memory, "open", lambda *a, **k: _FakeMeminfo(text), raising=False)
    assert memory.available_bytes(torch.device("cpu")) == 1000 * 1024
    monkeypatch.setattr(
        memory, "open", lambda *a, **k: _FakeMeminfo("MemAvailable:\n"), raising=False
    )
    assert memory.available_bytes(torch.device("cpu")) is None  # malformed: unknown, no check
    monkeypatch.setattr(
        memory, "open", lambda *a, **k: _FakeMeminfo("MemTotal: 1 kB\n"), raising=False
    )
    assert memory.available_bytes(torch.device("cpu")) is None


def test_sizes_are_printed_in_binary_units() -> None:
    assert memory._size(100) == "100 bytes"
    assert memory._size(1536) == "1.5 KiB"
    assert memory._size(3 * 2**20) == "3 MiB"
    assert memory._size(5 * 2**30) == "5 GiB"
    assert memory._size(2**20) == "1 MiB"  # a unit's exact size is printed in that unit


def test_free_cuda_memory_adds_what_the_caching_allocator_holds_unused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # driver free 1000 B, allocator reserved 300 B of which 100 B in use: 1200 B allocatable
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 5000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 300)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 100)
    assert memory.available_bytes(torch.device("cuda", 0)) == 1200
