"""A2C with natural policy gradients in TorchRL: one ``RATAdvantage`` between GAE and the loss.

The pipeline is TorchRL's own (``Collector``, ``GAE``, ``A2CLoss``); the only change from
plain A2C is the line ``rat(data)``, which rewrites ``data["advantage"]`` so that one SGD
step (lr = 1) on the actor is the natural-gradient step whose quadratic KL model equals
``--max-kl``. The critic keeps its own Adam optimizer.

Run: ``python examples/torchrl/a2c_rat.py --frames 50000`` (needs ``natgrad[torchrl]``
and gymnasium).
"""

from __future__ import annotations

import argparse
import time

import torch
from tensordict.nn import TensorDictModule
from torch import nn
from torchrl.collectors import Collector
from torchrl.envs import GymEnv, RewardSum, TransformedEnv
from torchrl.modules import ProbabilisticActor, ValueOperator
from torchrl.objectives import A2CLoss
from torchrl.objectives.value import GAE

from natgrad.torchrl import RATAdvantage


def main(
    env_id: str = "CartPole-v1",
    frames: int = 50_000,
    frames_per_batch: int = 2048,
    max_kl: float = 0.02,
    damping: float = 0.1,
    seed: int = 0,
    verbose: bool = True,
) -> list[float]:
    """Train and return the mean episode return of each batch's finished episodes."""
    torch.manual_seed(seed)
    env = TransformedEnv(GymEnv(env_id, categorical_action_encoding=True), RewardSum())
    env.set_seed(seed)
    n_obs, n_act = env.observation_spec["observation"].shape[-1], env.action_spec.space.n

    logits = nn.Sequential(nn.Linear(n_obs, 64), nn.Tanh(), nn.Linear(64, n_act))
    actor = ProbabilisticActor(
        TensorDictModule(logits, in_keys=["observation"], out_keys=["logits"]),
        in_keys=["logits"],
        distribution_class=torch.distributions.Categorical,
        spec=env.action_spec,
        return_log_prob=True,
    )
    value = nn.Sequential(nn.Linear(n_obs, 64), nn.Tanh(), nn.Linear(64, 1))
    critic = ValueOperator(value, in_keys=["observation"])

    collector = Collector(
        env,
        actor,
        frames_per_batch=frames_per_batch,
        total_frames=frames,
        auto_register_policy_transforms=False,
    )
    gae = GAE(gamma=0.99, lmbda=0.95, value_network=critic, average_gae=True)
    rat = RATAdvantage(actor, damping=damping, max_kl=max_kl, seed=seed)  # the RAT line
    loss_module = A2CLoss(actor, critic, entropy_bonus=False)
    actor_optim = torch.optim.SGD(actor.parameters(), lr=1.0)  # the step is in A~
    critic_optim = torch.optim.Adam(critic.parameters(), lr=1e-3)

    returns, steps, start = [], 0, time.time()
    for data in collector:
        steps += data.numel()
        with torch.no_grad():
            gae(data)
        rat(data)
        loss = loss_module(data)
        actor_optim.zero_grad()
        critic_optim.zero_grad()
        (loss["loss_objective"] + loss["loss_critic"]).backward()
        actor_optim.step()
        critic_optim.step()

        done = data["next", "done"].reshape(-1)
        finished = data["next", "episode_reward"].reshape(-1)[done] if done.any() else None
        if finished is not None:
            returns.append(float(finished.mean()))
            if verbose:
                print(
                    f"step={steps} episodic_return={returns[-1]:.1f} "
                    f"step_size={rat.step_size:.3g} SPS={int(steps / (time.time() - start))}"
                )
    collector.shutdown()
    return returns


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-id", default="CartPole-v1")
    parser.add_argument("--frames", type=int, default=50_000)
    parser.add_argument("--frames-per-batch", type=int, default=2048)
    parser.add_argument("--max-kl", type=float, default=0.02)
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.env_id, args.frames, args.frames_per_batch, args.max_kl, args.damping, args.seed)
