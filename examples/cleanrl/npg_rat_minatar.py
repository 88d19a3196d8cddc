# Natural policy gradient with RAT (natgrad) on MinAtar, in CleanRL's single-file style.
# Docs: docs/cleanrl.md. The update is npg_rat_continuous_action.py's; the policy is categorical
# over MinAtar's actions with the MinAtar network (Conv2d 3x3 x16, ReLU, Linear 128, ReLU).
import os
import random
import time
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
import tyro
from torch.distributions.categorical import Categorical
from torch.utils.tensorboard import SummaryWriter

from natgrad import RATNaturalGradient

try:
    from minatar.gym import register_envs
except ImportError as error:
    raise SystemExit('this script needs MinAtar: pip install "natgrad[minatar]"') from error


@dataclass
class Args:
    """Hyperparameters; tyro turns each field (and its docstring) into a flag."""

    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=False`"""
    cuda: bool = True
    """if toggled, cuda will be enabled by default"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "cleanRL"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    wandb_mode: str | None = None
    """wandb mode: online, offline (`wandb sync` later) or disabled; None follows WANDB_MODE"""

    # Algorithm specific arguments
    env_id: str = "MinAtar/Breakout-v1"
    """the id of the environment"""
    total_timesteps: int = 3000000
    """total timesteps of the experiments"""
    num_envs: int = 8
    """the number of parallel game environments"""
    num_steps: int = 256
    """the number of steps to run in each environment per policy rollout"""
    gamma: float = 0.99
    """the discount factor gamma"""
    gae_lambda: float = 0.95
    """the lambda for the general advantage estimation"""
    norm_adv: bool = True
    """Toggles advantages normalization"""
    max_kl: float = 0.02
    """the KL each natural-gradient step aims for (closed-form step size, no line search)"""
    kl_guard: float = 2.0
    """halve the step while the measured KL exceeds kl_guard * max_kl"""
    damping: float = 0.1
    """Tikhonov damping of the Fisher, in units of F = J^T J / N"""
    solver: str = "auto"
    """RAT's solver of the N x N system: auto, cg, kaczmarz or cholesky"""
    vf_learning_rate: float = 1e-3
    """the learning rate of the critic's optimizer"""
    vf_epochs: int = 10
    """the epochs of critic regression per batch"""
    vf_num_minibatches: int = 32
    """the number of critic mini-batches"""

    # to be filled in runtime
    batch_size: int = 0
    """the batch size (computed in runtime)"""
    minibatch_size: int = 0
    """the critic mini-batch size (computed in runtime)"""
    num_iterations: int = 0
    """the number of iterations (computed in runtime)"""


def make_env(env_id, idx, run_name, gamma):
    """Thunk for one env with episode statistics (MinAtar's rewards and images are kept)."""

    def thunk():
        if env_id not in gym.registry:
            register_envs()
        env = gym.make(env_id)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        return env

    return thunk


def layer_init(layer, std=2**0.5, bias_const=0.0):
    """Orthogonal weights with gain ``std``, constant bias."""
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class Agent(nn.Module):
    """Separate critic and categorical actor, each with the MinAtar network."""

    def __init__(self, envs):
        super().__init__()
        height, width, channels = envs.single_observation_space.shape
        self.critic = nn.Sequential(
            layer_init(nn.Conv2d(channels, 16, 3)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(16 * (height - 2) * (width - 2), 128)),
            nn.ReLU(),
            layer_init(nn.Linear(128, 1), std=1.0),
        )
        self.actor = nn.Sequential(
            layer_init(nn.Conv2d(channels, 16, 3)),
            nn.ReLU(),
            nn.Flatten(),
            layer_init(nn.Linear(16 * (height - 2) * (width - 2), 128)),
            nn.ReLU(),
            layer_init(nn.Linear(128, envs.single_action_space.n), std=0.01),
        )

    def get_value(self, x):
        return self.critic(x.permute(0, 3, 1, 2))

    def get_dist(self, x):
        return Categorical(logits=self.actor(x.permute(0, 3, 1, 2)))

    def get_action_and_value(self, x, action=None):
        probs = self.get_dist(x)
        if action is None:
            action = probs.sample()
        return action, probs.log_prob(action), probs.entropy(), self.get_value(x)

    def actor_parameters(self):
        return list(self.actor.parameters())


def log_prob_fn(agent, obs, actions):
    """Return log pi(a_i | s_i) per sample: what RAT differentiates, sample by sample."""
    return agent.get_dist(obs).log_prob(actions)


if __name__ == "__main__":
    args = tyro.cli(Args)
    args.batch_size = int(args.num_envs * args.num_steps)
    # flags that would crash after the first rollout, or train nothing without a word
    if args.batch_size < 1 or not 1 <= args.vf_num_minibatches <= args.batch_size:
        raise SystemExit(
            f"--vf-num-minibatches={args.vf_num_minibatches} must be in [1, num_envs * num_steps "
            f"= {args.batch_size}]: lower --vf-num-minibatches or raise --num-steps"
        )
    if args.total_timesteps < args.batch_size:
        raise SystemExit(
            f"--total-timesteps={args.total_timesteps} is less than one rollout (num_envs * "
            f"num_steps = {args.batch_size}), so nothing would train: raise --total-timesteps "
            "or lower --num-steps"
        )
    args.minibatch_size = int(args.batch_size // args.vf_num_minibatches)
    args.num_iterations = args.total_timesteps // args.batch_size
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            mode=args.wandb_mode,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n"
        + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )

    # TRY NOT TO MODIFY: seeding
    random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic

    device = torch.device("cuda" if torch.cuda.is_available() and args.cuda else "cpu")

    # env setup
    envs = gym.vector.SyncVectorEnv(
        [make_env(args.env_id, i, run_name, args.gamma) for i in range(args.num_envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )
    assert isinstance(envs.single_action_space, gym.spaces.Discrete), (
        "only discrete action space is supported"
    )

    agent = Agent(envs).to(device)
    critic_optimizer = optim.Adam(agent.critic.parameters(), lr=args.vf_learning_rate, eps=1e-5)
    # RAT: the natural gradient (F + damping I)^-1 g from an N x N solve over the batch
    rat = RATNaturalGradient(log_prob_fn, damping=args.damping, solver=args.solver, seed=args.seed)

    # ALGO Logic: Storage setup
    obs = torch.zeros((args.num_steps, args.num_envs) + envs.single_observation_space.shape).to(
        device
    )
    actions = torch.zeros((args.num_steps, args.num_envs) + envs.single_action_space.shape).to(
        device
    )
    logprobs = torch.zeros((args.num_steps, args.num_envs)).to(device)
    rewards = torch.zeros((args.num_steps, args.num_envs)).to(device)
    dones = torch.zeros((args.num_steps, args.num_envs)).to(device)
    values = torch.zeros((args.num_steps, args.num_envs)).to(device)

    # TRY NOT TO MODIFY: start the game
    global_step = 0
    start_time = time.time()
    next_obs, _ = envs.reset(seed=args.seed)
    next_obs = torch.Tensor(next_obs).to(device)
    next_done = torch.zeros(args.num_envs).to(device)

    for _iteration in range(1, args.num_iterations + 1):
        for step in range(0, args.num_steps):
            global_step += args.num_envs
            obs[step] = next_obs
            dones[step] = next_done

            # ALGO LOGIC: action logic
            with torch.no_grad():
                action, logprob, _, value = agent.get_action_and_value(next_obs)
                values[step] = value.flatten()
            actions[step] = action
            logprobs[step] = logprob

            # TRY NOT TO MODIFY: execute the game and log data.
            next_obs, reward, terminations, truncations, infos = envs.step(action.cpu().numpy())
            next_done = np.logical_or(terminations, truncations)
            rewards[step] = torch.tensor(reward).to(device).view(-1)
            next_obs, next_done = (
                torch.Tensor(next_obs).to(device),
                torch.Tensor(next_done).to(device),
            )

            if "final_info" in infos:
                episodes_over = np.nonzero(infos["final_info"]["_episode"])[0]
                episodic_returns = infos["final_info"]["episode"]["r"][episodes_over]
                episodic_lengths = infos["final_info"]["episode"]["l"][episodes_over]
                for episodic_return, episodic_length in zip(
                    episodic_returns, episodic_lengths, strict=True
                ):
                    print(f"global_step={global_step}, episodic_return={episodic_return}")
                    writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                    writer.add_scalar("charts/episodic_length", episodic_length, global_step)

        # bootstrap value if not done
        with torch.no_grad():
            next_value = agent.get_value(next_obs).reshape(1, -1)
            advantages = torch.zeros_like(rewards).to(device)
            lastgaelam = 0
            for t in reversed(range(args.num_steps)):
                if t == args.num_steps - 1:
                    nextnonterminal = 1.0 - next_done
                    nextvalues = next_value
                else:
                    nextnonterminal = 1.0 - dones[t + 1]
                    nextvalues = values[t + 1]
                delta = rewards[t] + args.gamma * nextvalues * nextnonterminal - values[t]
                advantages[t] = lastgaelam = (
                    delta + args.gamma * args.gae_lambda * nextnonterminal * lastgaelam
                )
            returns = advantages + values

        # flatten the batch
        b_obs = obs.reshape((-1,) + envs.single_observation_space.shape)
        b_logprobs = logprobs.reshape(-1)
        b_actions = actions.reshape((-1,) + envs.single_action_space.shape)
        b_advantages = advantages.reshape(-1)
        b_returns = returns.reshape(-1)
        b_values = values.reshape(-1)
        if args.norm_adv:
            b_advantages = (b_advantages - b_advantages.mean()) / (b_advantages.std() + 1e-8)

        # Natural policy gradient: direction d from RAT, step eta = sqrt(2 max_kl / d^T F d)
        result = rat.natural_gradient(
            agent, b_obs, b_actions, b_advantages, params=agent.actor_parameters()
        )
        step_size = result.step_size(args.max_kl)
        actor_params = [agent.get_parameter(name) for name in result.param_names]  # d's order
        old_params = [p.detach().clone() for p in actor_params]
        with torch.no_grad():
            old_dist = agent.get_dist(b_obs)
            for _ in range(10):  # KL guard: the quadratic model can underestimate the KL
                for p, p_old, d in zip(actor_params, old_params, result.direction, strict=True):
                    p.copy_(p_old + step_size * d)
                newlogprob = log_prob_fn(agent, b_obs, b_actions)
                approx_kl = torch.distributions.kl_divergence(
                    old_dist, agent.get_dist(b_obs)
                ).mean()
                if approx_kl <= args.kl_guard * args.max_kl:
                    break
                step_size *= 0.5
            pg_loss = -(b_advantages * (newlogprob - b_logprobs).exp()).mean()
            entropy_loss = agent.get_dist(b_obs).entropy().mean()

        # Critic: regression on the returns, minibatch Adam
        for _epoch in range(args.vf_epochs):
            b_inds = rng.permutation(args.batch_size)
            for start in range(0, args.batch_size, args.minibatch_size):
                mb_inds = b_inds[start : start + args.minibatch_size]
                newvalue = agent.get_value(b_obs[mb_inds]).view(-1)
                v_loss = 0.5 * ((newvalue - b_returns[mb_inds]) ** 2).mean()
                critic_optimizer.zero_grad()
                v_loss.backward()
                critic_optimizer.step()

        y_pred, y_true = b_values.cpu().numpy(), b_returns.cpu().numpy()
        var_y = np.var(y_true)
        explained_var = np.nan if var_y == 0 else 1 - np.var(y_true - y_pred) / var_y

        # TRY NOT TO MODIFY: record rewards for plotting purposes
        writer.add_scalar("losses/value_loss", v_loss.item(), global_step)
        writer.add_scalar("losses/policy_loss", pg_loss.item(), global_step)
        writer.add_scalar("losses/entropy", entropy_loss.item(), global_step)
        writer.add_scalar("losses/approx_kl", approx_kl.item(), global_step)
        writer.add_scalar("losses/explained_variance", explained_var, global_step)
        writer.add_scalar("rat/step_size", step_size, global_step)
        writer.add_scalar("rat/d_fisher_d", result.d_fisher_d, global_step)
        writer.add_scalar("rat/solver_residual", result.diagnostics.residual, global_step)
        writer.add_scalar("rat/solver_iterations", result.diagnostics.iterations, global_step)
        print("SPS:", int(global_step / (time.time() - start_time)))
        writer.add_scalar("charts/SPS", int(global_step / (time.time() - start_time)), global_step)

    envs.close()
    writer.close()
