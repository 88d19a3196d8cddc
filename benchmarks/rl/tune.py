"""Hyperparameter search for natgrad's RAT agents on an environment family (issue 13).

Optuna's TPE sampler proposes the RAT agents' main settings (algorithm, KL target,
damping, batch size, GAE lambda, critic fitting). A trial trains one run per (env, tuning
seed) at a fixed step budget and scores each run by its final return (the mean episodic
return over the last 10 % of its steps, as ``benchmarks/rl/run.py`` reports it), divided by
the final return of natgrad's plain defaults (``--preset none``) on the same env and seed;
the trial's objective is the mean of those ratios, so every env weighs the same. The
defaults are enqueued as the first trial.

Tuning seeds (>= 100; 1000 and 1001 by default) are disjoint from the evaluation seeds of
``benchmarks/rl/run.py`` (below 100): presets are never scored on the seeds that chose them.

Resumable: the study is an SQLite file (``results/tune/<family>.db``) with heartbeats, so
a trial stopped mid-way is retried with the same settings, and every finished run is kept
in ``results/tune/runs/<config hash>/`` and reused.

    python benchmarks/rl/tune.py --family mujoco --envs Hopper-v5 Walker2d-v5 \\
        --steps 300000 --trials 12 --jobs 2
    python benchmarks/rl/tune.py --family mujoco --report   # table, best trial, preset values

``--study NAME`` keeps a second search of a family in its own files
(``results/tune/<NAME>.db``, ``.json``, ``.md``); ``--space`` picks the settings searched
(``mujoco-narrow``: damping, KL target, batch layout, critic epochs) and ``--enqueue JSON``
settings a new study tries first, after the defaults.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import machine, summarize  # noqa: E402

RESULTS = HERE / "results" / "tune"
TUNING_SEEDS = (1000, 1001)
# The settings searched, per family: (kind, choices or (low, high)).
SPACES: dict[str, dict[str, tuple]] = {
    "mujoco": {
        "algo": ("categorical", ("rat-npg", "rat-trpo")),
        "max_kl": ("log", (0.005, 0.05)),
        "damping": ("log", (1e-3, 1.0)),
        "num_steps": ("categorical", (128, 256, 512)),  # x 8 envs: 1024-4096 samples
        "gae_lambda": ("categorical", (0.9, 0.95, 0.97, 0.99)),
        "critic_epochs": ("categorical", (5, 10, 20)),
        "critic_lr": ("log", (3e-4, 3e-3)),
    },
}
SPACES["minatar"] = dict(SPACES["mujoco"])
SPACES["classic"] = dict(SPACES["mujoco"])
# The second MuJoCo search (HalfCheetah included): the directions the 300k ablations left
# open, around the defaults. ``layout`` splits a fixed 2,048-sample batch into
# num_envs x num_steps (sb3-contrib's zoo TRPO uses 2 x 1,024).
SPACES["mujoco-narrow"] = {
    "damping": ("log", (0.1, 1.0)),
    "max_kl": ("categorical", (0.01, 0.02, 0.04)),
    "layout": ("categorical", ("8x256", "4x512", "2x1024")),
    "critic_epochs": ("categorical", (10, 20)),
}


def expand(params: dict) -> dict:
    """Trial parameters as TrainConfig fields: ``layout="2x1024"`` becomes
    ``num_envs=2, num_steps=1024``; every other parameter is a field already."""
    out = dict(params)
    layout = out.pop("layout", None)
    if layout is not None:
        num_envs, num_steps = (int(part) for part in layout.split("x"))
        out.update(num_envs=num_envs, num_steps=num_steps)
    return out


def run_key(settings: dict) -> str:
    """Directory name of one run: a hash of everything that defines it (runs never use a
    preset, so ``preset`` is left out)."""
    text = json.dumps({k: v for k, v in settings.items() if k != "preset"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def train_one(settings: dict, results: Path = RESULTS) -> float:
    """Train one run (or reuse a finished one) and return its final return."""
    out = results / "runs" / run_key(settings)
    done = out / "result.json"
    if done.exists():
        return json.loads(done.read_text())["final_return"]
    import torch

    from natgrad.rl import TrainConfig, Trainer

    torch.set_num_threads(1)
    config = TrainConfig(**settings)
    if out.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(out)
    start = time.perf_counter()
    trainer = Trainer(config, out, tensorboard=False)
    try:
        trainer.run(progress=False)
    finally:
        trainer.close()
    summary = summarize(out, None)
    summary["seconds"] = time.perf_counter() - start
    summary["settings"] = settings
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary["final_return"]


def base_settings(env: str, seed: int, steps: int) -> dict:
    """The plain defaults of one run (no preset), the reference every trial is divided by."""
    from natgrad.rl import TrainConfig

    settings = {"env": env, "seed": seed, "steps": steps}
    if "preset" in TrainConfig.__dataclass_fields__:
        settings["preset"] = "none"
    return settings


def suggest(trial, space: str) -> dict:
    """The trial's parameters (in the space's own names, e.g. ``layout``)."""
    settings = {}
    for name, (kind, values) in SPACES[space].items():
        if kind == "categorical":
            settings[name] = trial.suggest_categorical(name, list(values))
        else:
            settings[name] = trial.suggest_float(name, *values, log=True)
    return settings


def objective_for(args: argparse.Namespace, pool: ProcessPoolExecutor):
    defaults = expand(defaults_as_trial(args.space))

    def objective(trial) -> float:
        # Settings at their default value are left out: the defaults' trial is the base run.
        proposed = expand(suggest(trial, args.space))
        settings = {k: v for k, v in proposed.items() if defaults[k] != v}
        jobs = {}
        for env in args.envs:
            for seed in args.seeds:
                base = base_settings(env, seed, args.steps)
                default = pool.submit(train_one, base, args.results)
                jobs[(env, seed, "default")] = default
                jobs[(env, seed, "trial")] = (
                    pool.submit(train_one, {**base, **settings}, args.results)
                    if settings
                    else default
                )
        results = {key: future.result() for key, future in jobs.items()}
        ratios = []
        for env in args.envs:
            for seed in args.seeds:
                ratio = results[(env, seed, "trial")] / abs(results[(env, seed, "default")])
                trial.set_user_attr(f"{env}/s{seed}", results[(env, seed, "trial")])
                ratios.append(ratio)
        value = sum(ratios) / len(ratios)
        return value if math.isfinite(value) else -math.inf

    return objective


def defaults_as_trial(space: str) -> dict:
    """The searched settings at natgrad's defaults (the study's first trial)."""
    from natgrad.rl import TrainConfig

    config = TrainConfig()
    flat = {**config.to_dict(), **config.to_dict()["options"]}
    flat["layout"] = f"{config.num_envs}x{config.num_steps}"
    return {name: flat[name] for name in SPACES[space]}


def _retry_stale_trials(optuna) -> dict:
    """Retry a trial whose process died (up to 3 times), in this optuna's spelling."""
    if hasattr(optuna.storages, "RetryHeartbeatStaleTrialCallback"):  # optuna >= 4.9
        callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
        return {"heartbeat_stale_trial_callback": callback}
    return {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=3)}


def study_for(study: str, results: Path = RESULTS):
    import optuna

    results.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(
        f"sqlite:///{results / f'{study}.db'}",
        heartbeat_interval=60,
        grace_period=180,
        **_retry_stale_trials(optuna),
    )
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=5)
    return optuna.create_study(
        study_name=study,
        storage=storage,
        sampler=sampler,
        direction="maximize",
        load_if_exists=True,
    )


def _provenance() -> dict:
    """Commit and versions of the search (``benchmarks/solvers/run.py``'s record)."""
    from protocol import load_script

    solvers_run = load_script("natgrad_bench_solvers_run", HERE.parent / "solvers" / "run.py")
    info = machine()
    return solvers_run.provenance(f"{info['cpu_count']} CPUs, 1 torch thread per run")


def search(args: argparse.Namespace) -> None:
    import optuna

    study = study_for(args.study, args.results)
    meta = args.results / f"{args.study}.json"
    info = json.loads(meta.read_text()) if meta.exists() else {}
    info.update(
        {
            "family": args.family,
            "study": args.study,
            "envs": args.envs,
            "tuning_seeds": args.seeds,
            "steps": args.steps,
            "space_name": args.space,
            "space": {k: [kind, list(v)] for k, (kind, v) in SPACES[args.space].items()},
            "machine": machine(),
            "command": " ".join(sys.argv),
            "provenance": _provenance(),
        }
    )
    meta.write_text(json.dumps(info, indent=1) + "\n")
    if not study.trials:  # a new study: the defaults first, then the --enqueue'd settings
        study.enqueue_trial(defaults_as_trial(args.space))
        for params in args.enqueue:
            study.enqueue_trial({**defaults_as_trial(args.space), **params})
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    remaining = args.trials - len(complete)
    if remaining <= 0:
        print(f"{args.family}: {len(complete)} trials complete")
        return
    with ProcessPoolExecutor(args.jobs) as pool:
        study.optimize(objective_for(args, pool), n_trials=remaining)
    report(args)


def report(args: argparse.Namespace) -> None:
    """Write ``results/tune/<family>.json`` and ``.md``: every trial, the best, its preset."""
    import optuna

    from natgrad.rl import TrainConfig

    study = study_for(args.study, args.results)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not trials:
        print("no complete trial yet")
        return
    best = max(trials, key=lambda t: t.value)
    defaults = TrainConfig()
    flat_defaults = {**defaults.to_dict(), **defaults.to_dict()["options"]}
    preset = {k: v for k, v in expand(best.params).items() if flat_defaults.get(k) != v}
    meta = args.results / f"{args.study}.json"
    info = json.loads(meta.read_text()) if meta.exists() else {"family": args.family}
    info["trials"] = [
        {"number": t.number, "value": t.value, "params": t.params, "returns": t.user_attrs}
        for t in trials
    ]
    info["best"] = {"number": best.number, "value": best.value, "params": best.params}
    info["preset_values"] = preset
    meta.write_text(json.dumps(info, indent=1) + "\n")
    names = list(SPACES[args.space])
    lines = [
        f"# Search for the `{args.family}` preset ({args.study})",
        "",
        f"Objective: mean over {info.get('envs')} and tuning seeds {info.get('tuning_seeds')} "
        f"of final return / final return of the defaults, {info.get('steps')} steps per run.",
        "",
        "| trial | objective | " + " | ".join(names) + " |",
        "|---" * (2 + len(names)) + "|",
    ]
    for t in sorted(trials, key=lambda t: -t.value):
        cells = [f"{t.params[n]:.3g}" if isinstance(t.params[n], float) else str(t.params[n])
                 for n in names]  # fmt: skip
        lines.append(f"| {t.number} | {t.value:.3f} | " + " | ".join(cells) + " |")
    lines += ["", f"Best: trial {best.number}; preset values: `{preset}`", ""]
    (args.results / f"{args.study}.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=("classic", "mujoco", "minatar"))
    parser.add_argument("--study", help="name of the study and its files (default: the family)")
    parser.add_argument(
        "--space", choices=sorted(SPACES), help="settings searched (default: the family's)"
    )
    parser.add_argument(
        "--enqueue",
        type=json.loads,
        action="append",
        default=[],
        metavar="JSON",
        help="settings tried first in a new study, e.g. '{\"damping\": 1.0}' (repeatable)",
    )
    parser.add_argument("--envs", nargs="+", default=["Hopper-v5", "Walker2d-v5"])
    parser.add_argument("--seeds", nargs="+", type=int, default=list(TUNING_SEEDS))
    parser.add_argument("--steps", type=int, default=300_000)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--jobs", type=int, default=2, help="runs trained in parallel")
    parser.add_argument("--report", action="store_true", help="only rewrite the report")
    parser.add_argument("--results", type=Path, default=RESULTS, help="study and runs folder")
    args = parser.parse_args()
    args.study = args.study or args.family
    args.space = args.space or args.family
    unknown = sorted({k for params in args.enqueue for k in params} - set(SPACES[args.space]))
    if unknown:
        parser.error(f"--enqueue: {unknown} not in the space {args.space!r}")
    if min(args.seeds) < 100:
        parser.error("tuning seeds must be >= 100 (seeds below 100 are evaluation seeds)")
    if args.report:
        report(args)
    else:
        search(args)


if __name__ == "__main__":
    main()
