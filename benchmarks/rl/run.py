"""Env x algo x seed benchmark of natgrad's RL agents beside sb3-contrib's TRPO.

Each run is recorded as ``results/runs/<env>-<algo>-s<seed>/progress.csv`` (same columns
for natgrad and the peer) plus a line in ``results/results.json``; finished runs are
skipped, so the script can be interrupted and restarted: a natgrad run stopped midway
continues from its last checkpoint (``results/partial/``, every 10 updates; sb3-contrib
runs start over). ``--report`` only rebuilds the table (``results/results.md``) and the
curves (``results/<env>.png``).

    python benchmarks/rl/run.py --envs CartPole-v1 Pendulum-v1 --seeds 0 1 2 --steps 100000
    python benchmarks/rl/run.py --envs Hopper-v5 --seeds 0 1 2 3 4 --steps 1000000 --jobs 16

``--jobs K`` trains up to K runs at once, one process (and one torch thread) each; only
this process writes ``results.json``, after each run finishes.

An ``--algos`` entry may be a variant, an algorithm with overrides joined by ``+``
(``rat-npg+rat_fisher=expected``, ``rat-npg+damping=0.01+norm_adv=false``): any
``TrainConfig`` field or option of that algorithm; the spec is the row's name. These are
the ablation rows of ``docs/rl.md``:

    python benchmarks/rl/run.py --envs Hopper-v5 --seeds 0 1 2 3 4 --steps 300000 \
        --algos rat-npg rat-npg+norm_adv=false rat-npg+solver=kaczmarz+rat_max_epochs=2

``benchmarks/rl/protocol.py`` then reports the runs the way the field does (IQM with
stratified-bootstrap intervals).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import multiprocessing
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
PARTIAL = "partial"  # <results>/partial/<run name>/: a run in progress and its checkpoints
PEER = "sb3-trpo"
NATGRAD_ALGOS = ("rat-npg", "rat-trpo", "cg-trpo", "kfac", "ppo", "a2c")
# The same overrides for every natgrad algorithm on an env (peer: its zoo file below).
ENV_OVERRIDES: dict[str, dict] = {"Pendulum-v1": {"gamma": 0.9}}
# rl-baselines3-zoo hyperparams/trpo.yml (tuned entries), as published.
ZOO_TRPO: dict[str, dict] = {
    "CartPole-v1": dict(n_envs=2, n_steps=512, batch_size=512, cg_damping=1e-3,
                        gae_lambda=0.98, gamma=0.99, learning_rate=1e-3, n_critic_updates=20),
    "Pendulum-v1": dict(n_envs=2, n_steps=1024, gamma=0.9, n_critic_updates=15,
                        use_sde=True, sde_sample_freq=4),
    "Acrobot-v1": dict(normalize=True, n_envs=2, n_steps=1024),
}  # fmt: skip
# The zoo tunes MuJoCo on -v4; the same entries are used for -v5.
_MUJOCO = dict(normalize=True, n_envs=2, batch_size=128, n_steps=1024, gamma=0.99,
               gae_lambda=0.95, sub_sampling_factor=1, cg_max_steps=25, cg_damping=0.1,
               n_critic_updates=20, learning_rate=1e-3)  # fmt: skip
ZOO_TRPO.update({
    "Hopper-v5": _MUJOCO,
    "Walker2d-v5": _MUJOCO,
    "HalfCheetah-v5": {**_MUJOCO, "target_kl": 0.04},
})  # fmt: skip


RESERVED_KEYS = ("env", "algo", "seed", "steps", "options")
"""Set by ``run.py``'s own flags, so not variant keys."""


def parse_variant(spec: str) -> tuple[str, dict]:
    """``"rat-npg+damping=0.01+norm_adv=false"`` -> ``("rat-npg", {"damping": 0.01, ...})``.

    Each key must be a :class:`~natgrad.rl.TrainConfig` field or an option of the algorithm
    (a key the algorithm would ignore is an error, not a silent no-op), given once. Values
    are read as the field's type (``true``/``false`` for flags, ``64,64`` for ``hidden``)
    and the resulting configuration is validated, so a bad value fails here, before any
    training.

    Raises
    ------
    ValueError
        Naming the part of ``spec`` that is wrong and what would be accepted.
    """
    from natgrad.rl import ALGORITHMS, TrainConfig
    from natgrad.rl._errors import ConfigError

    algo, *pairs = spec.split("+")
    if algo == PEER:
        raise ValueError(f"--algos {spec!r}: {PEER} runs rl-zoo's tuned hyperparameters and "
                         "takes no overrides")  # fmt: skip
    if algo not in ALGORITHMS:
        raise ValueError(f"--algos {spec!r}: unknown algorithm {algo!r}; one of "
                         f"{', '.join(ALGORITHMS)}, optionally with +KEY=VALUE overrides, "
                         f"or {PEER}")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    fields.update({f.name: f for f in dataclasses.fields(ALGORITHMS[algo].Options)})
    for reserved in RESERVED_KEYS:
        fields.pop(reserved, None)
    overrides: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise ValueError(f"--algos {spec!r}: {pair!r} has no '=' (write KEY=VALUE)")
        if key in RESERVED_KEYS:
            flag = {"env": "--envs", "algo": "--algos", "seed": "--seeds", "steps": "--steps"}
            raise ValueError(f"--algos {spec!r}: {key} is set by run.py's own "
                             f"{flag.get(key, '--algos')} flag, not by a variant")  # fmt: skip
        if key not in fields:
            readers = [name for name, cls in ALGORITHMS.items()
                       if key in {f.name for f in dataclasses.fields(cls.Options)}]  # fmt: skip
            if readers:
                raise ValueError(f"--algos {spec!r}: {key} is an option of "
                                 f"{', '.join(readers)}, which {algo} does not read")  # fmt: skip
            raise ValueError(f"--algos {spec!r}: unknown key {key!r}; {algo} takes "
                             f"{', '.join(sorted(fields))}")  # fmt: skip
        if key in overrides:
            raise ValueError(f"--algos {spec!r}: {key} is given twice")
        overrides[key] = _typed_value(spec, key, text, fields[key])
    try:
        TrainConfig.from_dict({"algo": algo, **overrides}).validate()
    except (ConfigError, TypeError, ValueError) as error:
        raise ValueError(f"--algos {spec!r}: {error}") from None
    return algo, overrides


def _typed_value(spec: str, key: str, text: str, field) -> object:
    """``text`` read as the type of ``field``'s default."""
    default = None if field.default is dataclasses.MISSING else field.default
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false"):
                raise ValueError("write true or false")
            return text.lower() == "true"
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, tuple):
            return tuple(int(part) for part in text.split(","))
    except ValueError as error:
        kind = "comma-separated ints" if isinstance(default, tuple) else type(default).__name__
        raise ValueError(f"--algos {spec!r}: {key}={text!r} is not a {kind} ({error})") from None
    return text


def run_natgrad(
    env: str, algo: str, seed: int, steps: int, out: Path, trust_env_state: bool = False
) -> dict:
    """Train one natgrad run in ``out``, continuing the run a stopped sweep left there.

    ``out`` is continued from its last checkpoint when it holds one of this very run (the
    same resolved config); anything else in it is removed first. With
    ``trust_env_state`` the saved environments are unpickled, so the run continues bit
    for bit (only for folders this script wrote); without it the episodes in progress are
    dropped and the environments re-seeded, and the record says where it resumed.
    """
    from natgrad.rl import CheckpointError, TrainConfig, Trainer

    name, overrides = parse_variant(algo)
    settings = {"env": env, "algo": name, "seed": seed, "steps": steps,
                **ENV_OVERRIDES.get(env, {}), **overrides}  # fmt: skip
    config = TrainConfig.from_dict(settings)
    trainer = None
    if _holds_checkpoint_of(out, config):
        try:
            with warnings.catch_warnings():  # the re-seeding note: recorded as resumed_at
                warnings.simplefilter("ignore", RuntimeWarning)
                trainer = Trainer(None, out, resume=True, tensorboard=False,
                                  trust_env_state=trust_env_state)  # fmt: skip
        except CheckpointError as error:
            print(f"{out.name}: not resumed ({error}); starting over", file=sys.stderr)
    resumed_at = None if trainer is None else trainer.global_step
    if trainer is None:
        shutil.rmtree(out, ignore_errors=True)
        trainer = Trainer(config, out, tensorboard=False)
    try:
        trainer.run(progress=False)
    finally:
        trainer.close()
    record = {"config": trainer.config.to_dict()}  # resolved: the preset values it ran with
    if resumed_at is not None:
        record["resumed_at"] = resumed_at
        record["resumed_bit_for_bit"] = trust_env_state
    return record


def _holds_checkpoint_of(out: Path, config) -> bool:
    """Whether ``out`` has a checkpoint of the run ``config`` describes (same resolved config)."""
    if not (out / "checkpoint.pt").exists() or not (out / "config.json").exists():
        return False
    try:
        saved = json.loads((out / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(config.resolved().to_dict()))


def run_peer(env: str, seed: int, steps: int, out: Path) -> dict:
    from sb3_contrib import TRPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    from natgrad.rl.envs import make_env

    make_env(env).close()  # registers MinAtar ids in this process
    hp = dict(ZOO_TRPO.get(env, {}))  # not in the zoo: sb3-contrib's defaults
    n_envs, normalize = hp.pop("n_envs", 1), hp.pop("normalize", False)
    venv = make_vec_env(env, n_envs=n_envs, seed=seed)
    if normalize:
        venv = VecNormalize(venv, gamma=hp.get("gamma", 0.99))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    class Log(BaseCallback):
        def _on_training_start(self) -> None:
            self.recent: deque = deque(maxlen=20)
            self.handle = open(out / "progress.csv", "w", newline="")  # noqa: SIM115
            self.writer = csv.writer(self.handle)
            self.writer.writerow(["step", "episodic_return_mean", "wall_time"])

        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    self.recent.append(info["episode"]["r"])
            return True

        def _on_rollout_end(self) -> None:
            mean = float(np.mean(self.recent)) if self.recent else ""
            self.writer.writerow([self.num_timesteps, mean, time.perf_counter() - start])
            self.handle.flush()

        def _on_training_end(self) -> None:
            self.handle.close()

    if env.startswith("MinAtar/"):  # the same MinAtar torso as natgrad's CNN policy
        hp["policy_kwargs"] = minatar_policy_kwargs()
    model = TRPO("MlpPolicy", venv, seed=seed, device="cpu", verbose=0, **hp)
    hp.pop("policy_kwargs", None)
    model.learn(total_timesteps=steps, callback=Log())
    return {"config": {"algo": PEER, "env": env, "seed": seed, "steps": steps,
                       "n_envs": n_envs, "normalize": normalize, **hp}}  # fmt: skip


def minatar_policy_kwargs() -> dict:
    """sb3 policy kwargs for MinAtar: Conv(C->16, 3x3) -> ReLU -> Linear(->128) -> ReLU.

    sb3's NatureCNN needs images of at least 36x36; MinAtar frames are 10x10 with channels
    last, so the peer gets the MinAtar baseline torso that natgrad's CNN policy uses.
    """
    from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

    class MinAtarExtractor(BaseFeaturesExtractor):
        def __init__(self, observation_space, features_dim: int = 128) -> None:
            super().__init__(observation_space, features_dim)
            height, width, channels = observation_space.shape
            self.conv = torch.nn.Conv2d(channels, 16, 3)
            self.linear = torch.nn.Linear(16 * (height - 2) * (width - 2), features_dim)

        def forward(self, obs: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.conv(obs.float().permute(0, 3, 1, 2)))
            return torch.relu(self.linear(hidden.flatten(1)))

    return {"features_extractor_class": MinAtarExtractor, "net_arch": []}


def run_name(env: str, algo: str, seed: int, steps: int) -> str:
    """Directory name of a run; budgets other than the 100k default are part of it."""
    if steps == 100_000:
        budget = ""
    else:  # whole thousands as "300k"; any other budget in full, so no two budgets share
        budget = f"-{steps // 1000}k" if steps % 1000 == 0 else f"-{steps}"
    return f"{env.replace('/', '_')}-{algo}-s{seed}{budget}"


def budget_steps(suffix: str) -> int:
    """The budget a :func:`run_name` suffix stands for (``"300k"`` -> 300000, ``"1024"``)."""
    return int(suffix[:-1]) * 1000 if suffix.endswith("k") else int(suffix)


def summarize(run_dir: Path, threshold: float | None, until: float | None = None) -> dict:
    """Final return (last 10% of the steps reached, or of ``until``), steps to threshold."""
    with open(run_dir / "progress.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["episodic_return_mean"] not in ("", None)]
    if until is not None:
        rows = [r for r in rows if float(r["step"]) <= until]
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r["episodic_return_mean"]) for r in rows])
    tail = values[steps >= 0.9 * steps[-1]] if len(steps) else values
    solved = None
    if threshold is not None and (values >= threshold).any():
        solved = float(steps[np.argmax(values >= threshold)])
    return {
        "final_return": float(tail.mean()) if len(tail) else math.nan,
        "steps_to_threshold": solved,
        "wall_time": float(rows[-1]["wall_time"]) if rows else math.nan,
    }


def train_and_record(env: str, algo: str, seed: int, steps: int, results_dir: Path,
                     label: str, trust_env_state: bool = False) -> dict:  # fmt: skip
    """Train one run, keep its ``progress.csv`` and ``config.json``, return its record.

    Trains in ``results_dir/partial/<run_name>/`` (a natgrad run found there from a
    stopped sweep is continued from its last checkpoint: :func:`run_natgrad`), then keeps
    ``results_dir/runs/<run_name>/`` and removes the partial folder. Never writes
    ``results.json``, so several of these can run at once in separate processes.

    Parameters
    ----------
    env, algo, seed, steps
        The run (``algo`` is a natgrad algorithm or :data:`PEER`).
    results_dir
        Results folder; the run is kept in its ``runs/`` subfolder.
    label
        Machine label recorded with the run (:func:`machine_label`).
    trust_env_state
        Continue a stopped natgrad run bit for bit (unpickles the environments this
        script saved in the partial folder).

    Returns
    -------
    dict
        The line of ``results.json`` for this run (with ``resumed_at``, the step it was
        continued from, when it was).
    """
    name = run_name(env, algo, seed, steps)
    threshold = reward_threshold(env)
    work = results_dir / PARTIAL / name
    if algo == PEER:  # sb3 runs cannot be continued: always from the start
        shutil.rmtree(work, ignore_errors=True)
        extra = run_peer(env, seed, steps, work)
    else:
        extra = run_natgrad(env, algo, seed, steps, work, trust_env_state)
    keep = results_dir / "runs" / name
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "progress.csv", keep / "progress.csv")
    (keep / "config.json").write_text(json.dumps(extra["config"], indent=2))
    shutil.rmtree(work, ignore_errors=True)
    resumed = {key: extra[key] for key in ("resumed_at", "resumed_bit_for_bit") if key in extra}
    return {"name": name, "env": env, "algo": algo, "seed": seed,
            "steps": steps, "machine": label, **resumed,
            **summarize(keep, threshold), "commit": git_commit()}  # fmt: skip


def _one_thread() -> None:
    """Worker initializer: one torch thread per run, as in the sequential mode."""
    torch.set_num_threads(1)


def run_parallel(
    pending: list[tuple[str, str, int]],
    steps: int,
    results_dir: Path,
    label: str,
    jobs: int,
    record_run: Callable[[dict], None],
    trust_env_state: bool = False,
) -> None:
    """Train ``pending`` runs, up to ``jobs`` at a time, one spawned process per run.

    Workers only write their own run folder; ``record_run`` (which writes
    ``results.json``) is called in this process as each run finishes, so an interrupted
    sweep keeps every finished run. A failed run does not stop the others; the failures
    are listed at the end and the script exits with an error.

    Parameters
    ----------
    pending
        ``(env, algo, seed)`` of the runs to train.
    steps, results_dir, label, trust_env_state
        As for :func:`train_and_record`.
    jobs
        Most runs at a time (processes).
    record_run
        Called with each finished run's record, in this process.
    """
    failed: list[str] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_one_thread, max_tasks_per_child=1
    ) as pool:
        futures = {
            pool.submit(
                train_and_record, env, algo, seed, steps, results_dir, label, trust_env_state
            ): run_name(env, algo, seed, steps)
            for env, algo, seed in pending
        }
        for future in as_completed(futures):
            try:
                record = future.result()
            except Exception as error:  # noqa: BLE001 - reported below, the others go on
                failed.append(f"{futures[future]}: {type(error).__name__}: {error}")
                print(f"run {futures[future]} failed: {error!r}", file=sys.stderr, flush=True)
                continue
            record_run(record)
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


def machine() -> dict:
    import gymnasium

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": __import__("os").cpu_count(),
        "torch": torch.__version__,
        "torch_threads": 1,
        "numpy": np.__version__,
        "gymnasium": gymnasium.__version__,
    }
    try:
        import sb3_contrib
        import stable_baselines3

        info["sb3_contrib"] = sb3_contrib.__version__
        info["stable_baselines3"] = stable_baselines3.__version__
    except ImportError:
        pass
    return info


def reward_threshold(env: str) -> float | None:
    """Gymnasium's solved threshold for an env id (registering MinAtar ids first)."""
    import gymnasium

    from natgrad.rl.envs import _ensure_registered

    _ensure_registered(env)
    return gymnasium.spec(env).reward_threshold


def git_commit() -> str:
    """HEAD of the checkout running the benchmark (recorded with every run)."""
    proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip()


def machine_label(info: dict) -> str:
    """Short name of a machine for the table, e.g. ``2 CPU, torch 2.13.0+cpu``."""
    return f"{info['cpu_count']} CPU, torch {info['torch']}"


def merge_results(
    data: dict,
    results_dir: Path,
    other: Path,
    algos: Sequence[str] | None = None,
    envs: Sequence[str] | None = None,
) -> None:
    """Add the runs recorded in another results folder (e.g. made on another machine).

    ``algos`` keeps only those rows (e.g. the peer's, whose runs do not depend on
    natgrad's code or presets) and ``envs`` only those environments; ``None`` merges
    every run. Runs already recorded here are left alone.
    """
    theirs = json.loads((other / "results.json").read_text())
    data.setdefault("machines", {}).update(theirs.get("machines", {}))
    done = {r["name"] for r in data["runs"]}
    for run in theirs["runs"]:
        if (
            run["name"] in done
            or (algos is not None and run["algo"] not in algos)
            or (envs is not None and run["env"] not in envs)
        ):
            continue
        shutil.copytree(other / "runs" / run["name"], results_dir / "runs" / run["name"],
                        dirs_exist_ok=True)  # fmt: skip
        data["runs"].append(run)
    data.setdefault("commands", []).extend(
        c for c in theirs.get("commands", []) if c not in data.get("commands", [])
    )


def adopt_stopped_runs(data: dict, results_dir: Path, folder: Path, machine: str) -> None:
    """Record runs stopped before their budget (e.g. at a time limit) from their progress.csv.

    ``folder`` holds run folders named like :func:`run_name`; the record keeps the budget
    and adds ``steps_reached``. Runs already recorded are left alone.
    """
    done = {r["name"] for r in data["runs"]}
    for run_dir in sorted(folder.iterdir()):
        if run_dir.name in done or not (run_dir / "progress.csv").exists():
            continue
        stem, _, budget = run_dir.name.rpartition("-")
        stem, _, seed = stem.rpartition("-s")
        env, algo = re.fullmatch(r"(.*?-v\d+)-(.+)", stem).groups()  # ids end in -vN
        env = env.replace("MinAtar_", "MinAtar/")
        keep = results_dir / "runs" / run_dir.name
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(run_dir / "progress.csv", keep / "progress.csv")
        config = {"env": env, "algo": algo, "seed": int(seed)}
        (keep / "config.json").write_text(json.dumps(config, indent=2))
        with open(keep / "progress.csv", newline="") as handle:
            reached = max(int(float(r["step"])) for r in csv.DictReader(handle))
        record = {"name": run_dir.name, "env": env, "algo": algo, "seed": int(seed),
                  "steps": budget_steps(budget), "steps_reached": reached,
                  "machine": machine, **summarize(keep, reward_threshold(env))}  # fmt: skip
        data["runs"].append(record)


def common_step_table(results_dir: Path, runs: list[dict], stopped: list[dict]) -> list[str]:
    """Compare every algorithm of an env at the fewest steps any of its runs reached."""
    lines = [
        "",
        "Some runs were stopped by a time limit before their budget. For a like-for-like "
        "reading, every run of such an env and budget is also summarized at the fewest "
        "steps any of them reached (final return = mean over the last 10% of those steps):",
        "",
        "| env | budget | common steps | algo | seeds | return at common steps (mean ± s.e.) |",
        "|---|---|---|---|---|---|",
    ]
    for env, steps in sorted({(r["env"], r["steps"]) for r in stopped}):
        group = [r for r in runs if r["env"] == env and r["steps"] == steps]
        common = min(r.get("steps_reached", r["steps"]) for r in group)
        for algo in sorted({r["algo"] for r in group}):
            values = [
                summarize(results_dir / "runs" / r["name"], None, until=common)["final_return"]
                for r in group
                if r["algo"] == algo
            ]
            se = np.std(values, ddof=1) / math.sqrt(len(values)) if len(values) > 1 else math.nan
            lines.append(
                f"| {env} | {steps} | {common} | {algo} | {len(values)} | "
                f"{np.mean(values):.1f} ± {se:.1f} |"
            )
    return lines


def report(results_dir: Path) -> None:
    data = json.loads((results_dir / "results.json").read_text())
    runs = data["runs"]
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for run in runs:
        groups.setdefault((run["env"], run["steps"], run["algo"]), []).append(run)
    lines = [
        "| env | algo | seeds | budget (steps) | final return (mean ± s.e.) | "
        "threshold: mean steps to reach it (solved/seeds) | wall time s (mean ± s.e.) | machine |",
        "|---|---|---|---|---|---|---|---|",
    ]
    stopped = [r for r in runs if r.get("steps_reached", r["steps"]) < r["steps"]]

    def mse(xs: list[float]) -> str:
        xs = [x for x in xs if x is not None and math.isfinite(x)]
        if not xs:
            return "n/a"
        se = np.std(xs, ddof=1) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
        return f"{np.mean(xs):.1f} ± {se:.1f}"

    for (env, _, algo), rs in sorted(groups.items()):
        threshold = reward_threshold(env)
        solved = [r["steps_to_threshold"] for r in rs if r["steps_to_threshold"] is not None]
        count = f"({len(solved)}/{len(rs)})"
        to_threshold = f"{np.mean(solved):.0f} {count}" if solved else f"— {count}"
        if threshold is None:
            to_threshold = "n/a (no threshold)"
        else:
            to_threshold = f"{threshold:g}: {to_threshold}"
        budget = str(rs[0]["steps"])
        reached = [r.get("steps_reached", r["steps"]) for r in rs]
        if min(reached) < rs[0]["steps"]:
            budget += f" (stopped at {min(reached) // 1000}k-{max(reached) // 1000}k)"
        lines.append(
            f"| {env} | {algo} | {len(rs)} | {budget} | "
            f"{mse([r['final_return'] for r in rs])} | {to_threshold} | "
            f"{mse([r['wall_time'] for r in rs])} | "
            f"{', '.join(sorted({r['machine'] for r in rs}))} |"
        )
    if stopped:
        lines += common_step_table(results_dir, runs, stopped)
    header = [
        "# natgrad RL benchmark",
        "",
        "Commands (runs recorded so far; finished runs are skipped on re-runs):",
        "",
        *[f"    {c}" for c in data["commands"]],
        "",
        "Final return: mean over the last 10% of the budget of the training-time mean return "
        "of the last 20 episodes, then mean ± standard error across seeds. Wall time: training "
        "time per run (torch threads = 1) on the machine the row names; compare wall times only "
        "between rows of the same machine. The 2-CPU machine ran one or two runs at a time "
        "beside other jobs; the 16-CPU machine ran up to 16 at a time, one per core.",
        "",
        "Machines:",
        "",
        "```json",
        json.dumps(data["machines"], indent=2),
        "```",
        "",
    ]
    (results_dir / "results.md").write_text("\n".join(header + lines) + "\n")
    from natgrad.rl.plotting import plot_runs

    on_disk = [r for r in runs if (results_dir / "runs" / r["name"] / "progress.csv").exists()]
    if len(on_disk) < len(runs):  # recorded before run folders were committed
        print(f"plots leave out {len(runs) - len(on_disk)} recorded runs whose runs/<name>/"
              "progress.csv is not on disk", file=sys.stderr)  # fmt: skip
    for env, steps in sorted({(r["env"], r["steps"]) for r in on_disk}):
        chosen = [r for r in on_disk if r["env"] == env and r["steps"] == steps]
        dirs = [results_dir / "runs" / r["name"] for r in chosen]
        labels = [f"{env} / {r['algo']}" for r in chosen]  # variants are rows of their own
        budget = "" if steps == 100_000 else f"-{steps // 1000}k"
        title = f"{env}, {steps:,} steps"
        plot_runs(dirs, results_dir / f"{env.replace('/', '_')}{budget}.png", title=title,
                  labels=labels)  # fmt: skip
    print((results_dir / "results.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", nargs="+", default=["CartPole-v1", "Acrobot-v1", "Pendulum-v1"],
                        help="gymnasium env ids (MinAtar/<Game>-v1 too)")  # fmt: skip
    parser.add_argument("--algos", nargs="+", default=[*NATGRAD_ALGOS, PEER],
                        help=f"rows: natgrad algorithms, {PEER}, or variants "
                             "ALGO+KEY=VALUE[+KEY=VALUE...] of any TrainConfig field or "
                             "option of ALGO (hidden=64,64; flags true/false)")  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2],
                        help="evaluation seeds (100 and up: tune.py's tuning seeds)")  # fmt: skip
    parser.add_argument("--steps", type=int, default=100_000, help="budget of every run")
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--report", action="store_true", help="only rebuild table and plots")
    parser.add_argument("--merge", nargs="*", type=Path, default=[],
                        help="results folders of runs made elsewhere to add")  # fmt: skip
    parser.add_argument("--merge-algos", nargs="+", default=None, metavar="ALGO",
                        help="merge only these rows (e.g. sb3-trpo: peer runs that "
                             "natgrad's presets do not change)")  # fmt: skip
    parser.add_argument("--merge-envs", nargs="+", default=None, metavar="ENV",
                        help="merge only the runs of these envs")  # fmt: skip
    parser.add_argument("--adopt", type=Path, help="folder of runs stopped before their budget")
    parser.add_argument("--adopt-machine", default="", help="machine label of --adopt runs")
    parser.add_argument("--trust-env-state", action="store_true",
                        help="continue runs a stopped sweep left in <results>/partial bit for "
                             "bit: unpickles the environments saved there, which can run "
                             "code; only for folders this script wrote (without it they "
                             "continue with re-seeded environments)")  # fmt: skip
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs trained at once, one process each (default 1: in this "
                             "process, one after the other)")  # fmt: skip
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be >= 1")
    torch.set_num_threads(1)
    results_dir: Path = args.results
    (results_dir / "runs").mkdir(parents=True, exist_ok=True)
    path = results_dir / "results.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    label = machine_label(machine())
    data.setdefault("machines", {})
    if not args.report:
        data["machines"][label] = machine()
    if "machine" in data:  # files written before runs named their machine
        old = data.pop("machine")
        data["machines"].setdefault(machine_label(old), old)
        for run in data["runs"]:
            run.setdefault("machine", machine_label(old))
    for other in args.merge:
        merge_results(data, results_dir, other, args.merge_algos, args.merge_envs)
    if args.adopt:
        adopt_stopped_runs(data, results_dir, args.adopt, args.adopt_machine)
    commands = data.setdefault("commands", [])
    if "command" in data:  # files written before commands were a list
        commands.insert(0, data.pop("command"))
    if not args.report:
        commands.append("python benchmarks/rl/run.py " + " ".join(sys.argv[1:]))
    for spec in args.algos:
        if spec != PEER:
            try:
                algo, overrides = parse_variant(spec)
            except ValueError as error:
                parser.error(str(error))
            from natgrad.rl import TrainConfig

            batch = TrainConfig.from_dict({"algo": algo, **overrides}).batch_size
            if args.steps <= batch:
                print(f"warning: --steps {args.steps} is at most one update of {spec} "
                      f"({batch} samples per update): its rows show the initial policy",
                      file=sys.stderr)  # fmt: skip
    if not args.report:
        done = {r["name"] for r in data["runs"]}
        pending = [
            (env, algo, seed)
            for env in args.envs
            for algo in args.algos
            for seed in args.seeds
            if run_name(env, algo, seed, args.steps) not in done
        ]

        def record_run(record: dict) -> None:
            data["runs"].append(record)
            path.write_text(json.dumps(data, indent=2))
            print(json.dumps(record), flush=True)

        if args.jobs == 1:
            for env, algo, seed in pending:
                record_run(train_and_record(env, algo, seed, args.steps, results_dir, label,
                                            args.trust_env_state))  # fmt: skip
        else:
            run_parallel(pending, args.steps, results_dir, label, args.jobs, record_run,
                         args.trust_env_state)  # fmt: skip
    path.write_text(json.dumps(data, indent=2))
    report(results_dir)


if __name__ == "__main__":
    main()
