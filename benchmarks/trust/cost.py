"""Cost of the trust checks on the reference problems, measured in one process.

For each problem, times ``RATNaturalGradient.natural_gradient`` with the defaults three
ways, interleaved round by round (so machine load affects all alike): as shipped; without
the whole-batch verification of the factored layers; without the conditioning estimate.
Writes ``results/cost.json`` (medians, iterations, machine and versions) and prints a table.

    python benchmarks/trust/cost.py [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "solvers"))

from problems import log_prob_fn, make_problem  # noqa: E402

import natgrad  # noqa: E402
import natgrad.factored as factored  # noqa: E402
import natgrad.solvers.dispatch as dispatch  # noqa: E402
from natgrad import RATNaturalGradient  # noqa: E402
from natgrad.solvers.conditioning import Conditioning  # noqa: E402

VARIANTS = ("shipped", "no_factored_check", "no_conditioning")


def _variant(name: str):
    """Patch one check out (restored by the caller); returns the undo function."""
    if name == "no_factored_check":
        original = factored.verify_on_batch
        factored.verify_on_batch = lambda *args: None
        return lambda: setattr(factored, "verify_on_batch", original)
    if name == "no_conditioning":
        original = dispatch.estimate_conditioning
        dispatch.estimate_conditioning = lambda *a, **k: Conditioning(1.0, 0.0, 0.0, 0.0)
        return lambda: setattr(dispatch, "estimate_conditioning", original)
    return lambda: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for problem_name in args.problems:
        problem = make_problem(problem_name)
        for damping in (1e-2, 1e-3):
            times = {v: [] for v in VARIANTS}
            rat = RATNaturalGradient(log_prob_fn, damping=damping, seed=0)
            rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
            for _ in range(args.repeats):
                for variant in VARIANTS:
                    undo = _variant(variant)
                    try:
                        start = time.perf_counter()
                        rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
                        times[variant].append(time.perf_counter() - start)
                    finally:
                        undo()
            d = rat.diagnostics
            row = {
                "problem": problem_name,
                "damping": damping,
                "solver": d.solver,
                "backend": d.backend,
                "iterations": d.iterations,
                "direction_error": d.direction_error,
                "precision": d.precision,
                **{f"{v}_ms": 1e3 * statistics.median(t) for v, t in times.items()},
            }
            row["factored_check_share"] = 1 - row["no_factored_check_ms"] / row["shipped_ms"]
            row["conditioning_share"] = 1 - row["no_conditioning_ms"] / row["shipped_ms"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    out = HERE / "results" / "cost.json"
    out.parent.mkdir(exist_ok=True)
    record = {
        "command": "python benchmarks/trust/cost.py " + " ".join(sys.argv[1:]),
        "provenance": {
            "commit": commit,
            "natgrad": natgrad.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} thread(s)",
            "note": "shared 2-core CPU; variants interleaved per round, medians",
        },
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print("| problem | damping | solver | iters | shipped ms | factored check | conditioning |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['problem']} | {r['damping']:g} | {r['solver']} | {r['iterations']} | "
            f"{r['shipped_ms']:.1f} | {100 * r['factored_check_share']:.0f}% | "
            f"{100 * r['conditioning_share']:.0f}% |"
        )


if __name__ == "__main__":
    main()
