"""Wall time of one update: natgrad.sb3.RATTRPO / RATNPG vs sb3_contrib.TRPO, same process.

Each algorithm collects one rollout with TRPO's defaults (n_steps=2048, one env), then
its ``train()`` runs ``--repeats`` times on that buffer, each from the same parameters,
the algorithms interleaved so that they share the machine's load; the medians are
printed, for the whole update (policy step + 10 critic epochs) and for the policy step
alone (``n_critic_updates=0``)::

    OMP_NUM_THREADS=1 python examples/sb3/update_time.py --envs CartPole-v1 Pendulum-v1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from sb3_contrib import TRPO

from natgrad.sb3 import RATNPG, RATTRPO

ALGORITHMS = (TRPO, RATTRPO, RATNPG)


def timed_update(cls: type, env: str, n_critic_updates: int) -> Callable[[], float]:
    """One rollout, then a function timing ``train()`` from the post-rollout parameters."""
    model = cls("MlpPolicy", env, n_critic_updates=n_critic_updates, seed=0, device="cpu")
    model.learn(model.n_steps)  # one rollout (and one update, not timed)
    state = copy.deepcopy(model.policy.state_dict())
    optimizer = copy.deepcopy(model.policy.optimizer.state_dict())

    def run() -> float:
        model.policy.load_state_dict(state)
        model.policy.optimizer.load_state_dict(optimizer)
        start = time.perf_counter()
        model.train()
        return time.perf_counter() - start

    return run


def main() -> None:
    """Print the table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # TRPO's value-loss mean of []
    print("| env | algorithm | update (ms) | policy step only (ms) |")
    print("|---|---|---|---|")
    for env in args.envs:
        runs = {
            (cls.__name__, critic): timed_update(cls, env, critic)
            for cls in ALGORITHMS
            for critic in (10, 0)
        }
        times: dict[tuple[str, int], list[float]] = {key: [] for key in runs}
        for _ in range(args.repeats):
            for key, run in runs.items():
                times[key].append(run())
        for cls in ALGORITHMS:
            full, step = (1e3 * statistics.median(times[cls.__name__, c]) for c in (10, 0))
            print(f"| {env} | {cls.__name__} | {full:.1f} | {step:.1f} |")


if __name__ == "__main__":
    main()
