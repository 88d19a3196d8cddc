"""Where the time of one default natgrad call goes, beside TRPO-CG and a vanilla backward.

For each reference problem and batch size, in one process with ``--threads`` torch threads
(medians of ``--repeats``):

- ``phases``: one ``RATNaturalGradient(log_prob_fn, damping).natural_gradient(...)`` call
  with every default, split by timers wrapped around natgrad's own functions: input checks
  and the no-grad forward (``validate``), the forward and backward that capture layer
  factors (``capture``), per-sample rows by ``torch.func`` for parameters outside
  factorable layers and the 8-sample consistency check (``per_sample_rows``), the
  whole-batch verification of the factored scores (``verify``), the Nystrom
  preconditioner (``preconditioner``), the solve itself (``solve``: CG's iterations with
  their final residual check, or Cholesky's kernel and factorization) and the rest
  (``other``: conditioning estimate, dispatch, result assembly);
- ``backward``: one vanilla policy-gradient backward on the same batch;
- ``trpo``: TRPO-style CG on autograd Fisher-vector products of the same sampled Fisher,
  with the smallest iteration count of a grid that reaches cosine 0.99 with the
  exact direction (or the largest tried, marked not reached); the grid has steps of 5 up
  to 20 iterations, of 10 up to 100, then of 20.

The fixed part of a call (``validate + capture + per_sample_rows + verify +
preconditioner``) against the part that scales with the iterations shows what "less fixed
overhead" can buy (issue 12, item 3).

``crossover``: explicit ``solver="cg"`` (the Nystrom-preconditioned CG) against
``solver="cholesky"`` for small batches, the evidence for ``solver="auto"``'s CPU rule
(``AUTO_CHOLESKY_CPU_RANKS`` in ``natgrad/solvers/dispatch.py``).

    python benchmarks/solvers/call_profile.py                      # every row, 2 threads
    python benchmarks/solvers/call_profile.py --problems mlp --sizes 256

Resumable: finished rows are kept in ``results/call_profile.json`` and skipped.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import resumable  # noqa: E402
from problems import log_prob_fn, make_problem  # noqa: E402
from run import cosine, exact_direction, flat, trpo_cg, vanilla_backward  # noqa: E402

RESULTS = HERE / "results" / "call_profile.json"
ROWS = (("mlp", 256), ("mlp", 2048), ("cnn", 1024), ("transformer", 512))
CROSSOVER = {"mlp": (128, 256, 384, 512, 1024), "cnn": (256, 512, 1024), "transformer": (256, 512)}
DAMPING = 1e-3
# Steps of 5 up to 20, of 10 up to 100, then of 20: the first point reaching 0.99 is at most
# one step (25 % above 20 iterations) above what TRPO-CG needs.
TRPO_GRID = (*range(5, 20, 5), *range(20, 100, 10), *range(100, 401, 20))
PHASES = ("validate", "capture", "per_sample_rows", "verify", "preconditioner", "solve")
FIXED = ("validate", "capture", "per_sample_rows", "verify", "preconditioner")


def _targets() -> dict[str, tuple[object, str]]:
    """The functions timed, by phase: (owner, attribute name) looked up at call time."""
    import natgrad.factored as factored
    import natgrad.rat as rat
    import natgrad.scores as scores
    import natgrad.solvers.cg as cg
    import natgrad.solvers.cholesky as cholesky

    return {
        "validate": (rat.RATNaturalGradient, "_scores"),
        "capture": (factored, "capture_factors"),
        "per_sample_rows": (scores.PolicyScores, "rows"),
        "verify": (factored, "verify_on_batch"),
        "preconditioner": (cg, "nystrom_preconditioner"),
        "solve": (cg, "cg_solve"),
        "exact_solve": (cholesky, "cholesky_solve"),
    }


@contextmanager
def phase_timers(totals: dict[str, float]) -> Iterator[None]:
    """Accumulate the wall time of each phase's function into ``totals`` (seconds)."""
    originals = {}

    def timed(phase: str, function: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[phase] += time.perf_counter() - start

        return wrapper

    for key, (owner, name) in _targets().items():
        originals[key] = getattr(owner, name)
        setattr(owner, name, timed(key.removeprefix("exact_"), originals[key]))
    try:
        yield
    finally:
        for key, (owner, name) in _targets().items():
            setattr(owner, name, originals[key])


def profile_call(problem, repeats: int) -> dict:
    """Median total and per-phase times of one default call, its diagnostics and cosine."""
    from natgrad import RATNaturalGradient

    exact = exact_direction(problem, DAMPING)
    runs = []
    for _ in range(repeats + 1):  # the first call warms up allocators and vmap
        totals: dict[str, float] = defaultdict(float)
        rat = RATNaturalGradient(log_prob_fn, damping=DAMPING, seed=0)
        with phase_timers(totals):
            start = time.perf_counter()
            result = rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
            total = time.perf_counter() - start
        runs.append((total, dict(totals), result))
    runs = runs[1:]
    median_run = sorted(runs, key=lambda r: r[0])[len(runs) // 2]
    total, totals, result = median_run
    phases = {p: totals.get(p, 0.0) for p in PHASES}
    phases["other"] = max(total - sum(phases.values()), 0.0)
    diag = result.diagnostics
    return {
        "seconds": total,
        "phases": phases,
        "fixed_seconds": sum(phases[p] for p in FIXED),
        "solver": diag.solver,
        "backend": diag.backend,
        "score_path": diag.score_path,
        "iterations": diag.iterations,
        "cosine": cosine(flat(result.direction), exact),
        "exact": exact,
    }


def trpo_to_target(problem, exact: torch.Tensor, repeats: int) -> dict:
    """TRPO-CG's time at the first iteration count of the grid that reaches cosine 0.99.

    Each grid point is run once for its cosine; the first that reaches 0.99 (or the last)
    is then timed as the median of ``repeats``.
    """
    for iterations in TRPO_GRID:
        cos = cosine(trpo_cg(problem, DAMPING, iterations), exact)
        if cos >= 0.99:
            break
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trpo_cg(problem, DAMPING, iterations)
        times.append(time.perf_counter() - start)
    return {
        "iterations": iterations,
        "seconds": statistics.median(times),
        "cosine": cos,
        "reached": cos >= 0.99,
    }


def backward_seconds(problem, repeats: int) -> float:
    vanilla_backward(problem)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        vanilla_backward(problem)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(name: str, num_samples: int, repeats: int) -> dict:
    problem = make_problem(name, num_samples=num_samples)
    call = profile_call(problem, repeats)
    exact = call.pop("exact")
    backward = backward_seconds(problem, repeats)
    trpo = trpo_to_target(problem, exact, repeats)
    return {
        "problem": name,
        "N": num_samples,
        "P": sum(p.numel() for p in problem.policy.parameters()),
        "damping": DAMPING,
        "natgrad": call,
        "backward_seconds": backward,
        "trpo": trpo,
        "natgrad_over_backward": call["seconds"] / backward,
        "natgrad_over_trpo": call["seconds"] / trpo["seconds"],
        "fixed_share": call["fixed_seconds"] / call["seconds"],
    }


def crossover_row(name: str, num_samples: int, repeats: int) -> dict:
    """Median time of one call with ``solver="cg"`` and with ``solver="cholesky"``."""
    from natgrad import RATNaturalGradient

    problem = make_problem(name, num_samples=num_samples)
    row = {"problem": name, "N": num_samples}
    for solver in ("cg", "cholesky"):
        times = []
        for _ in range(repeats + 1):
            rat = RATNaturalGradient(log_prob_fn, damping=DAMPING, seed=0, solver=solver)
            start = time.perf_counter()
            result = rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
            times.append(time.perf_counter() - start)
        row[solver] = {
            "seconds": statistics.median(times[1:]),
            "iterations": result.diagnostics.iterations,
        }
    row["cholesky_over_cg"] = row["cholesky"]["seconds"] / row["cg"]["seconds"]
    return row


def report(row: dict) -> str:
    phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in row["natgrad"]["phases"].items())
    return (
        f"{row['problem']} N={row['N']}: natgrad {row['natgrad']['seconds'] * 1e3:.1f} ms "
        f"({phases}); {row['natgrad_over_backward']:.1f}x backward; "
        f"{row['natgrad_over_trpo']:.2f}x TRPO-CG ({row['trpo']['iterations']} it, "
        f"cos {row['trpo']['cosine']:.4f})"
    )


def main() -> None:
    args = resumable.parse_args(__doc__.splitlines()[0], RESULTS, repeats=5)
    data = resumable.measure_rows(args, ROWS, measure, report)
    crossover = data.setdefault("crossover", [])
    finished = {(r["problem"], r["N"]) for r in crossover}
    for name, sizes in CROSSOVER.items():
        if args.problems is not None and name not in args.problems:
            continue
        for n in sizes:
            if (name, n) in finished:
                continue
            row = crossover_row(name, n, args.repeats)
            crossover.append(row)
            resumable.save(args, data)
            print(
                f"crossover {name} N={n}: cg {row['cg']['seconds'] * 1e3:.1f} ms "
                f"({row['cg']['iterations']} it), cholesky {row['cholesky']['seconds'] * 1e3:.1f}"
                f" ms ({row['cholesky_over_cg']:.2f}x)"
            )


if __name__ == "__main__":
    main()
