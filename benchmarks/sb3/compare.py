"""natgrad.sb3.RATTRPO vs sb3_contrib.TRPO inside Stable-Baselines3: returns and update time.

Both algorithms train with rl-zoo's hyperparameters for the task, as a user of rl-zoo gets
them (``sb3_contrib.TRPO``: rl_zoo3's ``hyperparams/trpo.yml``; ``RATTRPO``: natgrad's
``natgrad/sb3/hyperparams/rat_trpo.yml``, the same file with ``cg_*`` replaced by
``damping``, not re-tuned), on the same seeds, one thread each, the same number of
environment steps. Neither was tuned on these seeds (no tuning happened at all), so the
seeds are evaluation seeds in the sense of Agarwal et al. (2021).

Per run it records every training episode's return (Monitor, unnormalized), the wall time of
each ``train()`` call (``update_seconds``: one policy update plus the critic epochs; SB3 does
not time the policy step apart) and a final evaluation: 10 deterministic episodes with the
observation normalizer frozen.

    pip install -e ".[sb3,mujoco]"
    python benchmarks/sb3/compare.py                      # Hopper-v5, 5 seeds x 300k steps
    python benchmarks/sb3/compare.py --jobs 4             # runs in parallel processes
    python benchmarks/sb3/compare.py --summarize-only     # table and plot from saved runs

Resumable: each finished run is ``results/runs/<algo>-<env>-s<seed>.json`` and is skipped on
the next call. The summary (``results/results.json``, ``results/<env>.png``) reports, per
algorithm, the interquartile mean over seeds with a 95 % stratified-bootstrap interval of
the final return (mean of the last 20 training episodes), of the evaluation return and of
the area under the learning curve (mean training return over the run), and the median
update time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ALGORITHMS = ("trpo", "rat_trpo")
ZOO_ONLY_KEYS = ("n_timesteps", "policy", "n_envs", "normalize")
LAST_EPISODES = 20
EVAL_EPISODES = 10


def hyperparameters(algo: str, env_id: str) -> tuple[dict, str]:
    """rl-zoo's entry for ``env_id`` (or its ``-v4`` twin) and where it came from."""
    import yaml

    if algo == "trpo":
        import rl_zoo3

        path = Path(rl_zoo3.__file__).parent / "hyperparams" / "trpo.yml"
    else:
        import natgrad.sb3

        path = Path(natgrad.sb3.__file__).parent / "hyperparams" / f"{algo}.yml"
    table = yaml.safe_load(path.read_text())
    key = env_id if env_id in table else env_id.replace("-v5", "-v4")
    if key not in table:
        raise SystemExit(f"{path} has no entry for {env_id} (nor {key})")
    return dict(table[key]), f"{path.name}[{key}]"


def run_path(out: Path, algo: str, env_id: str, seed: int) -> Path:
    return out / "runs" / f"{algo}-{env_id}-s{seed}.json"


def train_one(out: Path, algo: str, env_id: str, seed: int, steps: int) -> dict:
    """Train one run and return its record (also written to its run file)."""
    import torch
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from natgrad.sb3 import RATTRPO

    torch.set_num_threads(1)
    params, source = hyperparameters(algo, env_id)
    n_envs = int(params.get("n_envs", 1))
    normalize = bool(params.get("normalize", False))
    kwargs = {k: v for k, v in params.items() if k not in ZOO_ONLY_KEYS}
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    if normalize:
        env = VecNormalize(env, gamma=float(kwargs.get("gamma", 0.99)))
    cls = TRPO if algo == "trpo" else RATTRPO
    model = cls(params.get("policy", "MlpPolicy"), env, seed=seed, device="cpu", **kwargs)

    episodes: list[tuple[int, float]] = []
    update_seconds: list[float] = []

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    episodes.append((self.num_timesteps, float(info["episode"]["r"])))
            return True

    train = model.train

    def timed_train() -> None:
        start = time.perf_counter()
        train()
        update_seconds.append(time.perf_counter() - start)

    model.train = timed_train
    start = time.perf_counter()
    model.learn(steps, callback=Record())
    wall = time.perf_counter() - start

    eval_env = make_vec_env(env_id, n_envs=1, seed=10_000 + seed)
    if normalize:
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
        eval_env.obs_rms = env.obs_rms
    from stable_baselines3.common.evaluation import evaluate_policy

    eval_returns, _ = evaluate_policy(
        model,
        eval_env,
        n_eval_episodes=EVAL_EPISODES,
        deterministic=True,
        return_episode_rewards=True,
    )
    returns = [r for _, r in episodes]
    record = {
        "algo": algo,
        "env": env_id,
        "seed": seed,
        "steps": steps,
        "hyperparameters": params,
        "hyperparameters_from": source,
        "episodes": episodes,
        "final_return": float(np.mean(returns[-LAST_EPISODES:])) if returns else None,
        "auc_return": float(np.mean(returns)) if returns else None,
        "eval_returns": [float(r) for r in eval_returns],
        "update_seconds": update_seconds,
        "wall_seconds": wall,
        "provenance": provenance(),
    }
    path = run_path(out, algo, env_id, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    return record


def provenance() -> dict:
    """Commit, versions and machine (the solver benchmarks' record, plus SB3's versions)."""
    import sb3_contrib
    import stable_baselines3

    sys.path.insert(0, str(HERE.parent / "solvers"))
    from run import provenance as solver_provenance

    record = solver_provenance(
        f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs, one torch thread per run"
    )
    record["versions"].update(
        stable_baselines3=stable_baselines3.__version__, sb3_contrib=sb3_contrib.__version__
    )
    return record


def commit_time(commit: str) -> int:
    proc = subprocess.run(
        ["git", "log", "-1", "--format=%ct", commit], capture_output=True, text=True, cwd=HERE
    )
    return int(proc.stdout.strip() or 0)


def learning_curve(episodes: list, steps: int, points: int = 60) -> np.ndarray:
    """Mean return of the episodes finished in each of ``points`` equal step windows
    (carried forward over windows with none)."""
    edges = np.linspace(0, steps, points + 1)
    curve = np.full(points, np.nan)
    for i in range(points):
        inside = [r for t, r in episodes if edges[i] < t <= edges[i + 1]]
        if inside:
            curve[i] = np.mean(inside)
        elif i:
            curve[i] = curve[i - 1]
    return curve


def summarize(out: Path, env_id: str, steps: int, seeds: list[int]) -> dict:
    from natgrad.rl.stats import stratified_bootstrap

    summary: dict = {"env": env_id, "steps": steps, "seeds": seeds, "algorithms": {}}
    curves = {}
    for algo in ALGORITHMS:
        runs = [
            json.loads(run_path(out, algo, env_id, s).read_text())
            for s in seeds
            if run_path(out, algo, env_id, s).exists()
        ]
        if not runs:
            continue
        row: dict = {"runs": len(runs), "seeds": [r["seed"] for r in runs]}
        for key in ("final_return", "auc_return"):
            values = [r[key] for r in runs]
            row[key] = {"per_seed": values, "iqm": vars(stratified_bootstrap({env_id: values}))}
        evals = [float(np.mean(r["eval_returns"])) for r in runs]
        row["eval_return"] = {"per_seed": evals, "iqm": vars(stratified_bootstrap({env_id: evals}))}
        updates = [t for r in runs for t in r["update_seconds"]]
        row["update_seconds_median"] = statistics.median(updates)
        row["wall_seconds_median"] = statistics.median(r["wall_seconds"] for r in runs)
        row["hyperparameters_from"] = runs[0]["hyperparameters_from"]
        row["provenance"] = runs[0]["provenance"]
        summary["algorithms"][algo] = row
        curves[algo] = np.array([learning_curve(r["episodes"], steps) for r in runs])
    # natgrad's code matters only to the RATTRPO runs: their (oldest) commit is the one shown.
    records = [
        json.loads(run_path(out, "rat_trpo", env_id, s).read_text())["provenance"]
        for s in seeds
        if run_path(out, "rat_trpo", env_id, s).exists()
    ]
    if records:
        commits = sorted({r["commit"] for r in records}, key=commit_time)
        summary["provenance"] = dict(records[0], commit=commits[0])
        if len(commits) > 1:
            summary["provenance"]["commit_source"] = (
                "recorded per run; the RATTRPO runs span commits "
                + ", ".join(c[:7] for c in commits)
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot(out, env_id, steps, curves)
    return summary


def plot(out: Path, env_id: str, steps: int, curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {"trpo": "sb3_contrib.TRPO", "rat_trpo": "natgrad.sb3.RATTRPO"}
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for algo, runs in curves.items():
        x = np.linspace(0, steps, runs.shape[1] + 1)[1:]
        mean = np.nanmean(runs, axis=0)
        ax.plot(x, mean, label=f"{labels[algo]} ({len(runs)} seeds)")
        ax.fill_between(x, np.nanmin(runs, axis=0), np.nanmax(runs, axis=0), alpha=0.2)
    ax.set_xlabel("environment steps")
    ax.set_ylabel("training episode return")
    ax.set_title(f"{env_id}: mean over seeds (band: min-max)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(out / f"{env_id}.png", dpi=110)
    plt.close(fig)


def print_table(summary: dict) -> None:
    print(f"{summary['env']}, {summary['steps']} steps, seeds {summary['seeds']}")
    for algo, row in summary["algorithms"].items():
        iqm = row["final_return"]["iqm"]
        ev = row["eval_return"]["iqm"]
        print(
            f"  {algo:9s} runs {row['runs']}  final IQM {iqm['estimate']:.0f} "
            f"[{iqm['low']:.0f}, {iqm['high']:.0f}]  eval IQM {ev['estimate']:.0f} "
            f"[{ev['low']:.0f}, {ev['high']:.0f}]  "
            f"update {1e3 * row['update_seconds_median']:.0f} ms"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--env", default="Hopper-v5")
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--summarize-only", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not args.summarize_only:
        from tqdm import tqdm

        todo = [
            (args.out, algo, args.env, seed, args.steps)
            for seed in args.seeds
            for algo in ALGORITHMS
            if not run_path(args.out, algo, args.env, seed).exists()
        ]
        with ProcessPoolExecutor(args.jobs) as pool, tqdm(total=len(todo), desc="runs") as bar:
            for record in pool.map(train_one, *zip(*todo, strict=True)) if todo else []:
                bar.update()
                bar.write(
                    f"{record['algo']} seed {record['seed']}: final {record['final_return']:.0f}, "
                    f"{record['wall_seconds']:.0f} s"
                )
    print_table(summarize(args.out, args.env, args.steps, args.seeds))


if __name__ == "__main__":
    main()
