"""What one ``fisher="expected"`` call costs on an RL batch, matrix-free and materialized.

For Gaussian MLP policies of natgrad's agents (``natgrad.rl.policies.GaussianPolicy``,
hidden 64-64, float32) with the MuJoCo observation and action sizes of Hopper and
HalfCheetah / Walker2d, and a batch of ``N`` samples (the agents' 8 x 256 = 2,048), in one
process with ``--threads`` torch threads, medians of ``--repeats`` calls after one warm-up:

- ``sampled``: the default ``RATNaturalGradient`` call (the agents' solver options);
- ``expected``: ``fisher="expected"`` with ``backend="auto"`` (matrix-free rows);
- ``expected_materialized``: ``fisher="expected"``, ``backend="materialized"`` (the
  ``N m x P`` rows held in memory, the only form before the matrix-free operator);
- ``trpo_kl_cg``: TRPO's step direction, 10 CG iterations on Hessian-vector products of
  the mean KL (double backward), the same curvature as ``expected``;
- ``backward``: one vanilla policy-gradient backward, the unit of the ratios.

Each row also records the solver's iterations and whether it converged, and the relative
difference between the matrix-free and the materialized directions.

    python benchmarks/solvers/expected_fisher_cost.py            # both policies
    python benchmarks/solvers/expected_fisher_cost.py --fresh    # forget finished rows

Resumable: finished rows are kept in ``results/expected_fisher_cost.json`` and skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributions import kl_divergence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import provenance  # noqa: E402

RESULTS = HERE / "results" / "expected_fisher_cost.json"
POLICIES = {"hopper": (11, 3), "halfcheetah": (17, 6)}
AGENT_OPTIONS = dict(damping=0.1, block_size=256, max_epochs=20, tol=1e-3)
TRPO_CG_ITERATIONS = 10


def make_batch(obs_dim: int, act_dim: int, n: int, seed: int = 0):
    from natgrad.rl.policies import GaussianPolicy

    torch.manual_seed(seed)
    policy = GaussianPolicy((obs_dim,), act_dim, (64, 64))
    obs = torch.randn(n, obs_dim)
    with torch.no_grad():
        acts = policy(obs).sample()
    adv = torch.randn(n)
    return policy, obs, acts, (adv - adv.mean()) / adv.std()


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def trpo_kl_cg(policy, obs, acts, adv, damping: float) -> torch.Tensor:
    """TRPO's direction: CG on (H_KL + damping I) d = g with double-backward products
    (natgrad's ``cg-trpo`` baseline CG)."""
    from natgrad.rl.algorithms.trpo import conjugate_gradient

    params = list(policy.parameters())
    log_prob = policy(obs).log_prob(acts).sum(-1)
    g = flat(torch.autograd.grad((adv * log_prob).mean(), params)).detach()
    with torch.no_grad():
        old = policy(obs)
    kl = kl_divergence(old, policy(obs)).sum(-1).mean()
    grad_kl = flat(torch.autograd.grad(kl, params, create_graph=True))

    def hvp(v: torch.Tensor) -> torch.Tensor:
        product = flat(torch.autograd.grad(grad_kl @ v, params, retain_graph=True))
        return product + damping * v

    return conjugate_gradient(hvp, g, TRPO_CG_ITERATIONS)


def vanilla_backward(policy, obs, acts, adv) -> None:
    policy.zero_grad(set_to_none=True)
    (-(adv * policy(obs).log_prob(acts).sum(-1)).mean()).backward()


def median_seconds(call: Callable[[], object], repeats: int) -> tuple[float, object]:
    call()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def measure(name: str, n: int, repeats: int) -> dict:
    from natgrad import RATNaturalGradient

    policy, obs, acts, adv = make_batch(*POLICIES[name], n)
    row: dict = {"policy": name, "obs_dim": POLICIES[name][0], "act_dim": POLICIES[name][1]}
    row["num_samples"], row["num_params"] = n, sum(p.numel() for p in policy.parameters())
    variants = {
        "sampled": RATNaturalGradient(**AGENT_OPTIONS, seed=0),
        "expected": RATNaturalGradient(**AGENT_OPTIONS, seed=0, fisher="expected"),
        "expected_materialized": RATNaturalGradient(
            **AGENT_OPTIONS, seed=0, fisher="expected", backend="materialized"
        ),
    }
    directions = {}
    for key, rat in variants.items():
        seconds, result = median_seconds(
            lambda rat=rat: rat.natural_gradient(policy, obs, acts, adv), repeats
        )
        info = result.diagnostics
        row[key] = {
            "seconds": seconds,
            "solver": info.solver,
            "backend": info.backend,
            "iterations": info.iterations,
            "converged": info.converged,
        }
        directions[key] = flat(result.direction).double()
        print(f"{name} N={n} {key}: {seconds * 1e3:.1f} ms", flush=True)
    row["trpo_kl_cg"] = {
        "seconds": median_seconds(
            lambda: trpo_kl_cg(policy, obs, acts, adv, AGENT_OPTIONS["damping"]), repeats
        )[0],
        "iterations": TRPO_CG_ITERATIONS,
    }
    row["backward"] = {
        "seconds": median_seconds(lambda: vanilla_backward(policy, obs, acts, adv), repeats)[0]
    }
    gap = directions["expected"] - directions["expected_materialized"]
    row["matrix_free_vs_materialized"] = float(
        gap.norm() / directions["expected_materialized"].norm()
    )
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[2048])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fresh", action="store_true", help="forget the finished rows")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--load", default="", help="what else ran on the machine (recorded with the results)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = {"rows": []}
    if args.results.exists() and not args.fresh:
        data = json.loads(args.results.read_text())
    done = {(r["policy"], r["num_samples"]) for r in data["rows"]}
    machine = (
        f"{platform.machine()}, {platform.system()} {platform.release()}, {os.cpu_count()} "
        f"CPUs, {torch.get_num_threads()} torch thread(s); load average "
        f"{os.getloadavg()[0]:.1f} at the start" + (f" ({args.load})" if args.load else "")
    )
    for name in args.policies:
        for n in args.sizes:
            if (name, n) in done:
                continue
            data["rows"].append(measure(name, n, args.repeats))
            data.update(
                command="python benchmarks/solvers/expected_fisher_cost.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                repeats=args.repeats,
                provenance=provenance(machine),
            )
            args.results.parent.mkdir(parents=True, exist_ok=True)
            args.results.write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
