"""Block Kaczmarz, plain and accelerated, beside the default solver (issue 12, deliver 2).

For each reference problem and damping: the time and epochs each Kaczmarz variant needs to
reach a cosine >= 0.99 with the exact direction (the smallest epoch budget of a doubling
grid that reaches it, ``tol`` out of the way), and one call of the default
``RATNaturalGradient(log_prob_fn, damping)`` (CG with the Nystrom preconditioner on CPU),
medians of ``--repeats`` interleaved calls in one process.

    OMP_NUM_THREADS=1 python benchmarks/solvers/kaczmarz_variants.py

Writes ``results/kaczmarz.json`` (rows are kept: a rerun skips the finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from problems import log_prob_fn, make_problem  # noqa: E402
from run import cosine, exact_direction, flat, median_time, provenance  # noqa: E402

from natgrad import RATNaturalGradient  # noqa: E402

RESULTS = HERE / "results" / "kaczmarz.json"
VARIANTS = ("kaczmarz", "accelerated_kaczmarz")
BUDGETS = (5, 10, 20, 40, 80, 160, 320)
BLOCK_SIZE = 256


def direction(problem, damping: float, **settings) -> tuple[torch.Tensor, object]:
    rat = RATNaturalGradient(
        log_prob_fn, damping=damping, seed=0, on_nonconvergence="warn", **settings
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
    return flat(result.direction), result.diagnostics


def row(name: str, damping: float, repeats: int) -> dict:
    problem = make_problem(name)
    exact = exact_direction(problem, damping)
    out: dict = {"problem": name, "damping": damping, "block_size": BLOCK_SIZE}
    seconds, (d, diagnostics) = median_time(lambda: direction(problem, damping), repeats)
    out["default"] = {
        "seconds": seconds,
        "cosine": cosine(d, exact),
        "solver": diagnostics.solver,
        "iterations": diagnostics.iterations,
    }
    for variant in VARIANTS:
        out[variant] = {"reached": False}
        for budget in BUDGETS:
            settings = dict(solver=variant, block_size=BLOCK_SIZE, max_epochs=budget, tol=1e-12)
            seconds, (d, _) = median_time(lambda s=settings: direction(problem, damping, **s), 1)
            c = cosine(d, exact)
            out[variant] = {"reached": c >= 0.99, "epochs": budget, "cosine": c}
            if c >= 0.99:
                seconds, _ = median_time(
                    lambda s=settings: direction(problem, damping, **s), repeats
                )
                out[variant]["seconds"] = seconds
                out[variant]["ratio_to_default"] = seconds / out["default"]["seconds"]
                break
        print(name, damping, variant, out[variant], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-2, 1e-3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load", default="none stated", help="what else ran (recorded)")
    args = parser.parse_args()
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    done = {(r["problem"], r["damping"]) for r in data["rows"]}
    for name in args.problems:
        for damping in args.dampings:
            if (name, damping) in done:
                continue
            data["rows"].append(row(name, damping, args.repeats))
            data["provenance"] = provenance(
                f"{platform.machine()}, {platform.system()} {platform.release()}, "
                f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s); "
                f"load: {args.load}"
            )
            RESULTS.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
