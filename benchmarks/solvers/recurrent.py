"""Recurrent policies (issue 12): default RAT vs TRPO-style CG vs one vanilla backward.

GRU and LSTM policies over an observation history, float32, normalized advantages. For
each problem and damping: the smallest TRPO-CG iteration budget that reaches cosine
>= 0.99 with the exact float64 direction is found first (untimed); then every method is
timed in one process, interleaved (one call of each per round), and the medians of the
rounds are reported. Writes results/recurrent.json.

    OMP_NUM_THREADS=2 python benchmarks/solvers/recurrent.py --repeats 7
    OMP_NUM_THREADS=1 python benchmarks/solvers/recurrent.py --repeats 5 --threads 1

"rat before issue 12" is the generic per-sample path as it was: the fused kernels, which
vmap cannot batch for the GRU (per-sample loop) and can for this LSTM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import torch
from problems import Problem
from run import (
    RESULTS,
    TARGET,
    cosine,
    exact_direction,
    flat,
    provenance,
    trpo_cg,
    vanilla_backward,
)
from torch import Tensor, nn
from torch.distributions import Categorical

import natgrad.scores
from natgrad import RATNaturalGradient

BUDGETS = [2, 3, 5, 8, 10, 15, 20, 30, 45, 70, 100]


class RecurrentPolicy(nn.Module):
    """A recurrent cell over ``T`` observations (batch first), logits from the last state."""

    def __init__(self, cell: type[nn.RNNBase], obs_dim: int, hidden: int, actions: int):
        super().__init__()
        self.rnn = cell(obs_dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, actions)

    def forward(self, obs: Tensor) -> Categorical:
        out, _ = self.rnn(obs)
        return Categorical(logits=self.head(out[:, -1]))


PROBLEMS = {  # name: (cell, N, T, obs_dim, hidden, actions)
    "gru": (nn.GRU, 384, 12, 8, 48, 4),
    "lstm": (nn.LSTM, 256, 10, 8, 40, 4),
}


def make_recurrent_problem(name: str, seed: int = 0) -> Problem:
    """The policy, an on-policy batch and normalized advantages (as ``problems.py``)."""
    cell, n, steps, obs_dim, hidden, actions = PROBLEMS[name]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    policy = RecurrentPolicy(cell, obs_dim, hidden, actions)
    obs = torch.randn(n, steps, obs_dim, generator=gen)
    with torch.no_grad():
        dist = policy(obs)
        acts = dist.sample()
        log_prob = dist.log_prob(acts)
    returns = log_prob + torch.randn(n, generator=gen) * log_prob.std()
    adv = (returns - returns.mean()) / returns.std()
    return Problem(name, policy, obs, acts, adv)


def rat_direction(problem: Problem, damping: float, **settings) -> tuple[Tensor, object]:
    rat = RATNaturalGradient(damping=damping, seed=0, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv)
    return flat(result.direction), result.diagnostics


def fused_direction(problem: Problem, damping: float) -> tuple[Tensor, object]:
    """The generic scores with the fused kernels: what natgrad did before issue 12.

    vmap cannot batch the fused GRU kernel, so the GRU's scores are taken one sample at a
    time; the LSTM's here can be batched (the reported ``score_path`` says which ran).
    """
    unrolled = natgrad.scores.batched_recurrent
    natgrad.scores.batched_recurrent = lambda module: contextlib.nullcontext()
    try:
        return rat_direction(problem, damping, backend="materialized")
    finally:
        natgrad.scores.batched_recurrent = unrolled


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def run(name: str, damping: float, repeats: int) -> dict:
    problem = make_recurrent_problem(name)
    exact = exact_direction(problem, damping)
    budget = None
    for k in BUDGETS:  # untimed: the smallest budget that reaches the target
        if cosine(trpo_cg(problem, damping, k), exact) >= TARGET:
            budget = k
            break
    budget = budget or BUDGETS[-1]
    methods = {
        "rat default": lambda: rat_direction(problem, damping),
        "rat materialized (vmap, unrolled cell)": lambda: rat_direction(
            problem, damping, backend="materialized"
        ),
        "rat before issue 12 (materialized, fused kernel)": lambda: fused_direction(
            problem, damping
        ),
        f"trpo-cg ({budget} iterations)": lambda: (trpo_cg(problem, damping, budget), None),
        "vanilla backward": lambda: (vanilla_backward(problem), None),
    }
    times: dict[str, list[float]] = {m: [] for m in methods}
    outputs: dict[str, tuple[Tensor, object]] = {}
    for method in methods.values():  # warm-up round, untimed
        method()
    for _ in range(repeats):
        for label, method in methods.items():
            seconds, outputs[label] = timed(method)
            times[label].append(seconds)
    record = {
        "problem": name,
        "num_samples": int(problem.adv.shape[0]),
        "steps": int(problem.obs.shape[1]),
        "num_params": sum(p.numel() for p in problem.policy.parameters()),
        "damping": damping,
        "trpo_budget_to_target": budget,
        "methods": {},
    }
    for label in methods:
        direction, diagnostics = outputs[label]
        entry = {
            "median_s": statistics.median(times[label]),
            "times_s": times[label],
        }
        if label != "vanilla backward":
            entry["cosine"] = cosine(direction, exact)
        if diagnostics is not None:
            entry["backend"] = diagnostics.backend
            entry["score_path"] = diagnostics.score_path
            entry["solver"] = diagnostics.solver
        record["methods"][label] = entry
        extra = "" if "cosine" not in entry else f" cos={entry['cosine']:.5f}"
        where = "" if diagnostics is None else f" [{diagnostics.backend}, {diagnostics.score_path}]"
        print(
            f"  {name} lam={damping:g} {label:52s} {entry['median_s'] * 1e3:8.1f} ms{extra}{where}",
            flush=True,
        )
    rat_s = record["methods"]["rat default"]["median_s"]
    trpo_s = record["methods"][f"trpo-cg ({budget} iterations)"]["median_s"]
    record["ratio_rat_to_trpo"] = rat_s / trpo_s
    print(
        f"  {name} lam={damping:g} ratio default RAT / TRPO-CG = {rat_s / trpo_s:.2f}", flush=True
    )
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    parser.add_argument("--dampings", nargs="+", type=float, default=[0.01, 0.001])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "recurrent.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    records = [run(n, d, args.repeats) for n in args.problems for d in args.dampings]
    machine = (
        f"{platform.processor() or platform.machine()}, {platform.system()} "
        f"{platform.release()}, {os.cpu_count()} CPUs shared with other jobs (mutation "
        f"testing): timings are noisy, compare ratios within one run"
    )
    data = {
        "records": records,
        "repeats": args.repeats,
        "interleaved": True,
        "threads": torch.get_num_threads(),
        "provenance": provenance(machine),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
