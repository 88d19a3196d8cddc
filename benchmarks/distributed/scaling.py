"""Weak scaling of distributed RAT on gloo CPU ranks: time per solve, calls and bytes.

Each rank holds a fixed number of samples (``--per-rank``); the group grows from 1 to
``--max-ranks`` ranks, and the policy width sets ``P``. For every solver it records, on
rank 0, the median wall time of a ``natural_gradient`` call, its iterations, and the
collectives it issued (calls and payload bytes by phase, counted by natgrad's
``Communicator``), next to the time of one process on the concatenated batch.

    python benchmarks/distributed/scaling.py            # writes results/scaling.json
    python benchmarks/distributed/scaling.py --render   # rewrites the table in the docs

The ranks are forked processes on one machine talking through gloo over loopback: on a
machine with fewer cores than ranks they share cores, so the times measure the overhead
of the algorithm and of the collectives, not a speed-up.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scaling.json"
DOCS = HERE.parent.parent / "docs" / "distributed.md"
BEGIN, END = "<!-- scaling-table:begin -->", "<!-- scaling-table:end -->"

SOLVERS = {
    "cg": {"solver": "cg", "tol": 1e-4, "max_iters": 500},
    "kaczmarz": {"solver": "kaczmarz", "tol": 1e-4, "block_size": 64, "max_epochs": 200},
    "cholesky": {"solver": "cholesky", "block_size": 256},
}


class Policy(nn.Module):
    """Gaussian MLP, 16 observations, two hidden layers of ``width``, 4 actions."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.mean = nn.Sequential(
            nn.Linear(16, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 4)
        )
        self.log_std = nn.Parameter(torch.zeros(4))

    def forward(self, obs: torch.Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(self.mean(obs), self.log_std.exp())


def batch(width: int, total: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    policy = Policy(width)
    obs = torch.randn(total, 16)
    with torch.no_grad():
        acts = policy(obs).sample()
    return policy, obs, acts, torch.randn(total)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def measure(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    from natgrad import RATNaturalGradient

    rows = []
    group = dist.group.WORLD
    for width in args.widths:
        total = args.per_rank * world
        policy, obs, acts, adv = batch(width, total)
        mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
        num_params = sum(p.numel() for p in policy.parameters())
        for name, options in SOLVERS.items():
            rat = RATNaturalGradient(damping=args.damping, seed=0, process_group=group, **options)
            local = (policy, obs[mine], acts[mine], adv[mine])
            seconds = timed(functools.partial(rat.natural_gradient, *local), args.repeats)
            stats = rat.communication
            single_seconds = None
            if rank == 0:
                single = RATNaturalGradient(damping=args.damping, seed=0, **options)
                whole = functools.partial(single, policy, obs, acts, adv)
                single_seconds = timed(whole, args.repeats)
            dist.barrier()
            rows.append(
                {
                    "ranks": world,
                    "per_rank": args.per_rank,
                    "samples": total,
                    "params": num_params,
                    "solver": name,
                    "seconds": seconds,
                    "single_process_seconds": single_seconds,
                    "iterations": rat.diagnostics.iterations,
                    "steps": stats.iterations,
                    "residual": rat.diagnostics.residual,
                    "converged": rat.diagnostics.converged,
                    "calls": stats.total_calls(),
                    "bytes": stats.total_bytes(),
                    "solve_calls": stats.total_calls("solve"),
                    "solve_bytes": stats.total_bytes("solve"),
                    "by_phase": stats.as_dict(),
                }
            )
    if rank == 0:
        Path(out).write_text(json.dumps(rows))


def _worker(rank: int, world: int, path: str, args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=world)
    try:
        measure(rank, world, args, out)
    finally:
        dist.destroy_process_group()


def run(args: argparse.Namespace) -> list[dict]:
    import torch._dynamo  # noqa: F401 - imported once, inherited by the forked ranks

    rows: list[dict] = []
    for world in range(1, args.max_ranks + 1):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.start_processes(
                _worker,
                args=(world, os.path.join(tmp, "store"), args, out),
                nprocs=world,
                join=True,
                start_method="fork",
            )
            rows += json.loads(Path(out).read_text())
        print(f"{world} rank(s) done", file=sys.stderr)
    return rows


def provenance() -> dict:
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], capture_output=True, text=True).stdout.strip()

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "natgrad")),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "date": time.strftime("%Y-%m-%d"),
    }


def table(data: dict) -> str:
    """The markdown table the docs page shows, from the results file."""
    lines = [
        "| P | ranks | N | solver | iterations | ms per solve (one process on N) "
        "| collective calls per solve | payload MiB per solve | payload bytes per step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        iterative = row["solver"] != "cholesky"
        setup = 24 if row["solver"] == "cg" else 16  # |A| and r.z / factor agreement
        per_step = f"{(row['solve_bytes'] - setup) / max(row['steps'], 1):,.0f}"
        single = row["single_process_seconds"]
        lines.append(
            f"| {row['params']:,} | {row['ranks']} | {row['samples']} | {row['solver']} "
            f"| {row['iterations']} | {1e3 * row['seconds']:,.0f} ({1e3 * single:,.0f}) "
            f"| {row['calls']} | {row['bytes'] / 2**20:,.2f} "
            f"| {per_step if iterative else '-'} |"
        )
    return "\n".join(lines)


def render(data: dict) -> None:
    text = DOCS.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{table(data)}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-rank", type=int, default=256)
    parser.add_argument("--max-ranks", type=int, default=4)
    parser.add_argument("--widths", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only rewrite the docs table")
    args = parser.parse_args()
    if args.render:
        render(json.loads(RESULTS.read_text()))
        return
    settings = {k: v for k, v in vars(args).items() if k != "render"}
    data = {"provenance": provenance(), "settings": settings, "solvers": SOLVERS}
    data["rows"] = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(table(data))


if __name__ == "__main__":
    main()
