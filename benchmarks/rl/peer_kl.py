"""How big sb3-contrib TRPO's trust region is in natgrad's units, per MuJoCo env.

sb3-contrib's ``TRPO.train`` constrains ``kl_divergence(distribution, old).mean()``, with
Stable-Baselines3's ``kl_divergence``, which for a diagonal Gaussian policy returns one KL
per action dimension: the mean then runs over samples *and* action dimensions. natgrad's
``max_kl`` (and TRPO's paper) bounds the KL of the whole action distribution, the sum over
dimensions, averaged over samples. So the peer's ``target_kl`` is ``action_dim`` times
larger in natgrad's units. Its conjugate gradient runs on the Hessian of that same mean
plus ``cg_damping`` times the identity, so its damping is ``action_dim`` times larger in
natgrad's units too (``(H / k + c I) s = g`` is ``(H + k c I) (s / k) = g``; the step is
rescaled to the trust region, so only the direction matters). This script measures the
factor on the peer's own policy (built with rl-zoo's settings by ``run.py``), for a few
random perturbations of its actor, and records the trust region and damping each
comparison in docs/rl.md gives the peer:

    python benchmarks/rl/peer_kl.py      # writes benchmarks/rl/results/peer_kl.json

Runs in seconds on a CPU; needs ``sb3-contrib`` and MuJoCo (``pip install -e ".[sb3,mujoco]"``).
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import platform
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from protocol import load_script  # noqa: E402

ZOO_TRPO = load_script("natgrad_bench_rl_run", HERE / "run.py").ZOO_TRPO

RESULTS = HERE / "results" / "peer_kl.json"
ENVS = ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5")


def observations(env_id: str, n: int, seed: int) -> np.ndarray:
    """``n`` observations from random-action rollouts of ``env_id``."""
    import gymnasium as gym

    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = []
    for _ in range(n):
        out.append(obs)
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.asarray(out, dtype=np.float32)


def kl_factor(env_id: str, perturbations: int, seed: int) -> dict:
    """Ratio of the whole-distribution KL to what sb3-contrib's TRPO constrains."""
    from sb3_contrib import TRPO
    from stable_baselines3.common.distributions import kl_divergence

    hp = {k: v for k, v in ZOO_TRPO[env_id].items() if k not in ("n_envs", "normalize")}
    model = TRPO("MlpPolicy", env_id, seed=seed, device="cpu", **hp)
    policy = model.policy
    obs = torch.as_tensor(observations(env_id, 512, seed))
    actor = [p for n, p in policy.named_parameters() if "value" not in n]
    generator = torch.Generator().manual_seed(seed)
    ratios = []
    with torch.no_grad():
        # sb3 reuses one distribution object per policy, so keep a copy (as TRPO.train does)
        old = copy.copy(policy.get_distribution(obs))
        original = [p.clone() for p in actor]
        for _ in range(perturbations):
            for p, p0 in zip(actor, original, strict=True):
                p.copy_(p0 + 0.05 * torch.randn(p.shape, generator=generator))
            new = policy.get_distribution(obs)
            per_dimension = kl_divergence(new, old)  # what TRPO.train averages
            constrained = float(per_dimension.mean())
            whole = float(per_dimension.sum(-1).mean())  # natgrad's mean KL
            ratios.append(whole / constrained)
        for p, p0 in zip(actor, original, strict=True):
            p.copy_(p0)
    action_dim = int(model.action_space.shape[0])
    # where the zoo entry sets none, sb3-contrib's own default applies
    defaults = inspect.signature(TRPO).parameters
    target_kl = float(hp.get("target_kl", defaults["target_kl"].default))
    cg_damping = float(hp.get("cg_damping", defaults["cg_damping"].default))
    factor = float(np.median(ratios))
    return {
        "action_dim": action_dim,
        "per_dimension_kl_shape": list(per_dimension.shape),
        "ratio_min": float(min(ratios)),
        "ratio_max": float(max(ratios)),
        "ratio": factor,
        "zoo_target_kl": target_kl,
        "effective_max_kl": target_kl * factor,
        "zoo_cg_damping": cg_damping,
        "effective_damping": cg_damping * factor,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=list(ENVS))
    parser.add_argument("--perturbations", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import sb3_contrib
    import stable_baselines3
    from sb3_contrib.trpo.trpo import TRPO

    from natgrad.rl.algorithms.base import TrustRegionOptions

    source = inspect.getsource(TRPO.train)
    hvp_source = inspect.getsource(TRPO.hessian_vector_product)
    solvers_run = load_script("natgrad_bench_solvers_run", HERE.parent / "solvers" / "run.py")
    record = solvers_run.provenance(  # the solver benchmarks' record: commit, versions
        f"{platform.machine()}, {platform.system()} {platform.release()}"
    )
    record["versions"].update(
        stable_baselines3=stable_baselines3.__version__, sb3_contrib=sb3_contrib.__version__
    )
    data = {
        "provenance": record,
        "command": " ".join(["python benchmarks/rl/peer_kl.py", *(argv or sys.argv[1:])]),
        "train_constrains_mean_of_kl_divergence": (
            "kl_divergence(distribution, old_distribution).mean()" in source
        ),
        "hessian_vector_product_adds_cg_damping": "+ self.cg_damping * vector" in hvp_source,
        "natgrad_default_max_kl": TrustRegionOptions().max_kl,
        "envs": {env: kl_factor(env, args.perturbations, args.seed) for env in args.envs},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")
    for env, row in data["envs"].items():
        print(
            f"{env}: action_dim {row['action_dim']}, whole/constrained KL {row['ratio']:.3f}, "
            f"zoo target_kl {row['zoo_target_kl']} = max_kl {row['effective_max_kl']:.3f}, "
            f"zoo cg_damping {row['zoo_cg_damping']} = damping {row['effective_damping']:.3f}"
        )
    return data


if __name__ == "__main__":
    main()
