"""Large batches (massively parallel simulators): time and memory of RAT for N = 4k..64k.

For each policy and batch size, a fresh process builds the batch, then measures (medians
of ``--repeats``):

- ``rat``: ``RATNaturalGradient(log_prob_fn, damping)`` with every default
  (``solver="auto"``, ``backend="auto"``), one ``natural_gradient()`` call (scores,
  checks, preconditioner and solve); its solver, backend and iterations from
  ``diagnostics``;
- ``backward``: one vanilla policy-gradient backward on the same batch;
- the peak resident memory of the process above the batch and policy (``ru_maxrss``),
  next to what dense score rows (``N x P x 4`` bytes) or an ``N x N`` float64 kernel would
  take.

The time per call should grow linearly in N at a fixed iteration count (one product with
``J`` and one with ``J^T`` per iteration, on factors of size ``N x (fan_in + fan_out)`` per
layer): ``rat_us_per_sample`` stays flat.

    OMP_NUM_THREADS=1 python benchmarks/solvers/large_batch.py            # all rows
    OMP_NUM_THREADS=1 python benchmarks/solvers/large_batch.py --sizes 4096 16384

Resumable: finished rows are kept in ``results/large_batch.json`` and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from problems import log_prob_fn, make_problem  # noqa: E402
from run import provenance  # noqa: E402

RESULTS = HERE / "results" / "large_batch.json"
PROBLEMS = ("mlp", "large_mlp")
SIZES = (4096, 16384, 32768, 65536)
DAMPING = 1e-2


def measure(problem_name: str, num_samples: int, repeats: int) -> dict:
    """One row, in this process (run it in a fresh one for the memory figure)."""
    from natgrad import RATNaturalGradient

    problem = make_problem(problem_name, num_samples=num_samples)
    params = sum(p.numel() for p in problem.policy.parameters())
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def backward() -> float:
        problem.policy.zero_grad()
        start = time.perf_counter()
        loss = -(log_prob_fn(problem.policy, problem.obs, problem.acts) * problem.adv).mean()
        loss.backward()
        return time.perf_counter() - start

    rat = RATNaturalGradient(log_prob_fn, damping=DAMPING, seed=0)

    def natural() -> float:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
        return time.perf_counter() - start

    rat_seconds, backward_seconds = [], []
    for _ in range(repeats):  # interleaved, so that both see the same machine load
        rat_seconds.append(natural())
        backward_seconds.append(backward())
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    d = rat.diagnostics
    rat_median = statistics.median(rat_seconds)
    backward_median = statistics.median(backward_seconds)
    return {
        "problem": problem_name,
        "N": num_samples,
        "P": params,
        "solver": d.solver,
        "backend": d.backend,
        "iterations": d.iterations,
        "converged": d.converged,
        "rat_seconds": rat_median,
        "backward_seconds": backward_median,
        "rat_over_backward": rat_median / backward_median,
        "rat_us_per_sample": 1e6 * rat_median / num_samples,
        "peak_extra_bytes": peak_rss - baseline_rss,
        "dense_rows_bytes": num_samples * params * 4,
        "gram_bytes": num_samples * num_samples * 8,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=PROBLEMS)
    parser.add_argument("--sizes", nargs="+", type=int, default=list(SIZES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--load", default="none stated", help="what else ran on the machine (recorded)"
    )
    parser.add_argument("--row", nargs=2, metavar=("PROBLEM", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:  # child process: one row, printed as JSON
        print(json.dumps(measure(args.row[0], int(args.row[1]), args.repeats)))
        return
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"rows": []}
    done = {(r["problem"], r["N"]) for r in data["rows"]}
    for name in args.problems:
        for n in args.sizes:
            if (name, n) in done:
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--row", name, str(n), "--repeats", str(args.repeats)],
                capture_output=True, text=True,
            )  # fmt: skip
            if proc.returncode != 0:
                print(f"{name} N={n}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            data["rows"].append(row)
            data["provenance"] = provenance(
                f"{platform.machine()}, {platform.system()} {platform.release()}, "
                f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch thread(s) per row; "
                f"load: {args.load}"
            )
            RESULTS.write_text(json.dumps(data, indent=1) + "\n")
            print(
                f"{name:9s} N={n:6d} P={row['P']:7d} {row['solver']}/{row['backend']} "
                f"{row['iterations']:3d} it  RAT {row['rat_seconds']:.3f} s "
                f"({row['rat_over_backward']:.1f}x backward), "
                f"{row['rat_us_per_sample']:.1f} us/sample, "
                f"peak +{row['peak_extra_bytes'] / 2**20:.0f} MiB "
                f"(rows {row['dense_rows_bytes'] / 2**20:.0f} MiB, "
                f"kernel {row['gram_bytes'] / 2**20:.0f} MiB)",
                flush=True,
            )


if __name__ == "__main__":
    main()
