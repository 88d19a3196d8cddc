"""Wall time of one update: natgrad.sb3.RATTRPO / RATNPG vs sb3_contrib.TRPO, same process.

Each algorithm collects one rollout with TRPO's defaults (n_steps=2048, one env), then
its ``train()`` runs ``--repeats`` times on that buffer, each from the same parameters;
the medians are printed, for the whole update (policy step + 10 critic epochs) and for
the policy step alone (``n_critic_updates=0``)::

    OMP_NUM_THREADS=1 python examples/sb3/update_time.py --envs CartPole-v1 Pendulum-v1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
from sb3_contrib import TRPO

from natgrad.sb3 import RATNPG, RATTRPO


def median_train_seconds(cls: type, env: str, repeats: int, n_critic_updates: int) -> float:
    """Median seconds of ``model.train()`` on one rollout, from the same parameters."""
    model = cls("MlpPolicy", env, n_critic_updates=n_critic_updates, seed=0, device="cpu")
    model.learn(model.n_steps)  # one rollout (and one update, not timed)
    state = copy.deepcopy(model.policy.state_dict())
    optimizer = copy.deepcopy(model.policy.optimizer.state_dict())
    times = []
    for _ in range(repeats):  # every repeat starts from the same parameters
        model.policy.load_state_dict(state)
        model.policy.optimizer.load_state_dict(optimizer)
        start = time.perf_counter()
        model.train()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Print the table of medians."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Pendulum-v1"])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore", RuntimeWarning)  # TRPO's value-loss mean of []
    print("| env | algorithm | update (ms) | policy step only (ms) |")
    print("|---|---|---|---|")
    for env in args.envs:
        for cls in (TRPO, RATTRPO, RATNPG):
            full = median_train_seconds(cls, env, args.repeats, 10)
            step = median_train_seconds(cls, env, args.repeats, 0)
            print(f"| {env} | {cls.__name__} | {1e3 * full:.1f} | {1e3 * step:.1f} |")


if __name__ == "__main__":
    main()
