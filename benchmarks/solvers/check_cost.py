"""What natgrad's refusal checks cost inside one default call.

Two checks guard every call against silent wrong answers:

- ``differentiable``: ``log_prob_fn`` must carry a graph to the parameters (one forward
  and backward pass on one sample; a detached ``log_prob_fn`` would give ``A / damping``);
- ``value_check``: under the factored backend, every sample's log-probability alone must
  equal its value in the batch (one vectorized forward pass over all ``N`` samples,
  without gradients; a policy coupling samples would give a wrong direction).

For each reference problem, one process times the default
``RATNaturalGradient(log_prob_fn, damping).natural_gradient(...)`` call with both checks,
without the value check, and without the differentiability check (each replaced by a
no-op), interleaved call by call; medians of ``--repeats``. The checks' share is
``1 - (time without) / (time with)``.

    python benchmarks/solvers/check_cost.py                   # every row, 2 threads
    python benchmarks/solvers/check_cost.py --problems mlp --sizes 256

Resumable: finished rows are kept in ``results/check_cost.json`` and skipped.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resumable  # noqa: E402
from problems import log_prob_fn, make_problem  # noqa: E402

RESULTS = HERE / "results" / "check_cost.json"
ROWS = (("mlp", 256), ("mlp", 2048), ("cnn", 1024), ("transformer", 512))
DAMPING = 1e-3
VARIANTS = ("with_checks", "without_value_check", "without_differentiable_check")


@contextmanager
def disabled(check: str) -> Iterator[None]:
    """Replace one check by a no-op for the block."""
    import natgrad.rat as rat
    import natgrad.scores as scores

    owner, name = {
        "value_check": (scores.PolicyScores, "check_values"),
        "differentiable_check": (rat, "check_log_probs_differentiable"),
    }[check]
    original = getattr(owner, name)
    setattr(owner, name, lambda *args, **kwargs: None)
    try:
        yield
    finally:
        setattr(owner, name, original)


def one_call(problem, variant: str) -> tuple[float, str]:
    from natgrad import RATNaturalGradient

    with ExitStack() as stack:
        if variant != "with_checks":
            stack.enter_context(disabled(variant.removeprefix("without_")))
        rat = RATNaturalGradient(log_prob_fn, damping=DAMPING, seed=0)
        start = time.perf_counter()
        result = rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
        return time.perf_counter() - start, result.diagnostics.backend


def measure(name: str, num_samples: int, repeats: int) -> dict:
    problem = make_problem(name, num_samples=num_samples)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    backend = ""
    for repeat in range(repeats + 1):  # the first round warms up allocators and vmap
        for variant in VARIANTS:
            seconds, backend = one_call(problem, variant)
            if repeat:
                times[variant].append(seconds)
    medians = {v: statistics.median(t) for v, t in times.items()}
    full = medians["with_checks"]
    return {
        "problem": name,
        "N": num_samples,
        "P": sum(p.numel() for p in problem.policy.parameters()),
        "backend": backend,
        "seconds": medians,
        "value_check_share": 1 - medians["without_value_check"] / full,
        "differentiable_check_share": 1 - medians["without_differentiable_check"] / full,
    }


def report(row: dict) -> str:
    return (
        f"{row['problem']} N={row['N']} ({row['backend']}): "
        f"{row['seconds']['with_checks'] * 1e3:.1f} ms with both checks; value check "
        f"{row['value_check_share']:.1%}, differentiability check "
        f"{row['differentiable_check_share']:.1%} of the call"
    )


def main() -> None:
    args = resumable.parse_args(__doc__.splitlines()[0], RESULTS, repeats=15)
    resumable.measure_rows(args, ROWS, measure, report)


if __name__ == "__main__":
    main()
