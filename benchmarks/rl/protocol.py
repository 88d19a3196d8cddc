"""The field's evaluation protocol over the runs of ``benchmarks/rl/run.py`` (issue 13).

For each env x algo, over its evaluation seeds (Agarwal et al., 2021):

- the interquartile mean (IQM) of the final return (mean episodic return over the last
  10 % of the steps, as ``run.py``'s ``summarize`` computes it), with a 95 %
  stratified-bootstrap interval;
- the IQM of the normalized area under the learning curve (the mean episodic return
  averaged over the whole budget: each run's curve is linearly interpolated on a common
  grid of steps from 0 to the budget, held at its first logged value before its first
  point and at its last one after its last point, and integrated by the trapezoid rule
  divided by the budget), with its interval;
- the interquartile range of the final return across seeds (the seed spread);
- the median wall time per run;
- with ``--reference ALGO``, each algo's mean final return over seeds divided by the
  reference's, per env and averaged over the envs, with 95 % bootstrap intervals (envs
  where the reference's mean return is not positive are left out);

and a performance profile over all envs: per algo, the fraction of runs whose final
return, min-max normalized per env over all the selected runs of that env, exceeds tau,
for tau in [0, 1], with a 95 % stratified-bootstrap band (runs resampled within each env).

Writes ``protocol.md`` (table), ``protocol.json`` (figures, per-seed scores, missing runs,
provenance), ``performance_profile.png`` and ``curves-<env>.png`` (matplotlib needed;
``--no-plot`` skips them) to ``--out`` (default ``<results>/protocol-<budget>k``).

    python benchmarks/rl/run.py --envs Hopper-v5 Walker2d-v5 --seeds 0 1 2 3 4 \\
        --steps 1000000 --jobs 16
    python benchmarks/rl/protocol.py --steps 1000000 --seeds 0 1 2 3 4

Seeds 100 and up are tuning seeds (``benchmarks/rl/tune.py``) and are refused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

from natgrad.rl.stats import iqm, stratified_bootstrap

HERE = Path(__file__).resolve().parent


def load_script(name: str, path: Path) -> ModuleType:
    """Import a benchmark script by path under ``name`` (``benchmarks/rl`` and
    ``benchmarks/solvers`` both have a ``run.py``, so neither is imported as ``run``)."""
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(path.parent))  # the script's own sibling imports
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_rl_run = load_script("natgrad_bench_rl_run", HERE / "run.py")
run_name, summarize = _rl_run.run_name, _rl_run.summarize

TUNING_SEED_START = 100  # benchmarks/rl/tune.py uses seeds from here up (default 1000)
MIN_SEEDS = 5
GRID_POINTS = 201
TAUS = np.linspace(0.0, 1.0, 101)


def normalized_auc(run_dir: Path, budget: int, points: int = GRID_POINTS) -> float:
    """Mean episodic return averaged over the whole budget (area under the curve / budget).

    Parameters
    ----------
    run_dir
        Run folder holding ``progress.csv`` (``step`` and ``episodic_return_mean``).
    budget
        Step budget of the run: the grid spans ``[0, budget]``.
    points
        Grid points (uniform); the curve is linearly interpolated on them, held at its first
        and last logged values outside the logged steps, then integrated by the trapezoid
        rule.

    Returns
    -------
    float
        The normalized area, in return units; NaN when the run logged no return.
    """
    steps, values = read_curve(run_dir)
    if not len(steps):
        return math.nan
    grid = np.linspace(0.0, float(budget), points)
    curve = np.interp(grid, steps, values)
    return float(np.trapezoid(curve, grid) / budget)


def read_curve(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Steps and mean episodic returns of a run's ``progress.csv`` (rows without a return
    dropped, as :func:`run.summarize` drops them)."""
    import csv

    with open(run_dir / "progress.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["episodic_return_mean"] not in ("", None)]
    steps = np.array([float(r["step"]) for r in rows])
    values = np.array([float(r["episodic_return_mean"]) for r in rows])
    return steps, values


def collect(
    results_dir: Path,
    envs: Sequence[str],
    algos: Sequence[str],
    seeds: Sequence[int],
    steps: int,
) -> tuple[dict[tuple[str, str], list[dict]], list[dict]]:
    """The recorded runs of every env x algo x seed, and the ones that are missing.

    A run is found when ``results.json`` records it (by :func:`run.run_name`) and its
    ``runs/<name>/progress.csv`` exists.

    Returns
    -------
    cells
        ``(env, algo)`` -> one dict per found seed: ``seed``, ``name``, ``final_return``,
        ``auc``, ``wall_time``, ``steps_reached`` (below the budget for runs stopped
        early, e.g. adopted by ``run.py --adopt``) and ``commit`` (that trained it).
    missing
        ``{"env", "algo", "seed", "name", "reason"}`` for each run not found.
    """
    data = json.loads((results_dir / "results.json").read_text())
    recorded = {r["name"]: r for r in data["runs"]}
    cells: dict[tuple[str, str], list[dict]] = {}
    missing: list[dict] = []
    for env in envs:
        for algo in algos:
            cell = cells.setdefault((env, algo), [])
            for seed in seeds:
                name = run_name(env, algo, seed, steps)
                run_dir = results_dir / "runs" / name
                reason = None
                if name not in recorded:
                    reason = "not in results.json"
                elif not (run_dir / "progress.csv").exists():
                    reason = f"no runs/{name}/progress.csv"
                if reason is not None:
                    missing.append(dict(env=env, algo=algo, seed=seed, name=name, reason=reason))
                    continue
                summary = summarize(run_dir, None)
                cell.append({
                    "seed": seed,
                    "name": name,
                    "final_return": summary["final_return"],
                    "auc": normalized_auc(run_dir, steps),
                    "wall_time": summary["wall_time"],
                    "steps_reached": recorded[name].get("steps_reached", steps),
                    "commit": recorded[name].get("commit"),
                })  # fmt: skip
    return cells, missing


SOLVER_COLUMNS = ("solver_converged", "solver_seconds")


def pooled_columns(
    results_dir: Path, runs: Sequence[dict], columns: Sequence[str]
) -> dict[str, list[float]]:
    """Every non-empty value of ``columns`` in the runs' ``progress.csv``, pooled by column."""
    pooled: dict[str, list[float]] = {column: [] for column in columns}
    for record in pooled_rows(results_dir, runs, columns):
        for column, value in record.items():
            pooled[column].append(value)
    return pooled


def pooled_rows(
    results_dir: Path, runs: Sequence[dict], columns: Sequence[str]
) -> list[dict[str, float]]:
    """One dict per update of every run: its non-empty ``columns`` as floats (one read)."""
    import csv

    out = []
    for run in runs:
        with open(results_dir / "runs" / run["name"] / "progress.csv", newline="") as handle:
            for record in csv.DictReader(handle):
                row = {c: float(record[c]) for c in columns if record.get(c) not in ("", None)}
                if row:
                    out.append(row)
    return out


def solver_summary(results_dir: Path, runs: Sequence[dict]) -> dict | None:
    """Pooled solver figures of a row's runs, over every update of every seed.

    ``converged_fraction`` is the mean of ``progress.csv``'s ``solver_converged`` column
    and ``median_solver_seconds`` the median of ``solver_seconds``; ``updates`` counts the
    rows that carry the column. None when no run records a solver (the peers, PPO, ...).
    Kept in ``protocol.json``: run folders of earlier benchmarks were not committed.
    """
    pooled = pooled_columns(results_dir, runs, SOLVER_COLUMNS)
    converged, seconds = pooled["solver_converged"], pooled["solver_seconds"]
    if not converged and not seconds:
        return None
    return {
        "updates": len(seconds),
        "converged_fraction": float(np.mean(converged)) if converged else None,
        "median_solver_seconds": float(np.median(seconds)) if seconds else None,
    }


def step_summary(results_dir: Path, runs: Sequence[dict]) -> dict | None:
    """How far a row's policy updates moved, pooled over every update of every seed.

    ``median_kl_ratio`` is the median of the measured KL of an update over its target
    (``kl / kl_target`` in ``progress.csv``, over the updates that record both) and
    ``backtracked_fraction`` the share of updates whose line search shrank the step at
    least once (``None`` without a line search). None when no run records a KL target
    (the peers, PPO, ...). Kept in ``protocol.json``: earlier run folders were not committed.
    """
    rows = pooled_rows(results_dir, runs, ("kl", "kl_target", "backtracks"))
    moved = [r["kl"] / r["kl_target"] for r in rows if "kl" in r and "kl_target" in r]
    if not moved:
        return None
    backtracks = [r["backtracks"] for r in rows if "backtracks" in r]
    return {
        "updates": len(moved),
        "median_kl_ratio": float(np.median(moved)),
        "backtracked_fraction": float(np.mean(np.asarray(backtracks) > 0)) if backtracks else None,
    }


def interval(env: str, values: list[float], reps: int) -> dict | None:
    """IQM with its 95 % stratified-bootstrap interval (one task: the env), or None."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    return vars(stratified_bootstrap({env: finite}, iqm, reps=reps))


def performance_profile(
    cells: dict[tuple[str, str], list[dict]], reps: int, seed: int = 0
) -> dict[str, dict[str, list[float]]]:
    """Per algo, the fraction of runs with a min-max normalized final return above tau.

    Final returns are normalized per env by the min and max over all its runs (every algo);
    an env whose runs all score the same maps them to 1. The band is the 2.5 and 97.5
    percentiles over ``reps`` stratified bootstrap replicates (runs resampled with
    replacement within each env).

    Returns
    -------
    dict
        ``algo -> {"tau", "fraction", "low", "high"}`` (lists over :data:`TAUS`).
    """
    by_env: dict[str, list[float]] = {}
    for (env, _), runs in cells.items():
        by_env.setdefault(env, []).extend(
            r["final_return"] for r in runs if math.isfinite(r["final_return"])
        )
    rng = np.random.default_rng(seed)
    profiles: dict[str, dict[str, list[float]]] = {}
    for algo in sorted({algo for _, algo in cells}):
        tasks = []
        for (env, cell_algo), runs in sorted(cells.items()):
            scores = np.array([r["final_return"] for r in runs if math.isfinite(r["final_return"])])
            if cell_algo != algo or not scores.size:
                continue
            low, high = min(by_env[env]), max(by_env[env])
            tasks.append((scores - low) / (high - low) if high > low else np.ones_like(scores))
        if not tasks:
            continue
        pooled = np.concatenate(tasks)
        fraction = (pooled[:, None] > TAUS[None, :]).mean(axis=0)
        replicates = np.empty((reps, TAUS.size))
        for i in range(reps):
            sample = np.concatenate([t[rng.integers(0, t.size, t.size)] for t in tasks])
            replicates[i] = (sample[:, None] > TAUS[None, :]).mean(axis=0)
        band_low, band_high = np.percentile(replicates, [2.5, 97.5], axis=0)
        profiles[algo] = {
            "tau": TAUS.tolist(),
            "fraction": fraction.tolist(),
            "low": band_low.tolist(),
            "high": band_high.tolist(),
        }
    return profiles


def plot_profile(profiles: dict[str, dict[str, list[float]]], path: Path, title: str) -> None:
    """Write the performance profile as a PNG (matplotlib imported here, lazily)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise SystemExit(
            "protocol.py: the performance profile plot needs matplotlib "
            '(pip install "natgrad[rl]" or pip install matplotlib); '
            "pass --no-plot to write only the table and the JSON"
        ) from error
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, profile in profiles.items():
        (line,) = ax.plot(profile["tau"], profile["fraction"], label=algo)
        ax.fill_between(profile["tau"], profile["low"], profile["high"],
                        color=line.get_color(), alpha=0.2, linewidth=0)  # fmt: skip
    ax.set_xlabel("tau (final return, min-max normalized per env)")
    ax.set_ylabel("fraction of runs with score > tau")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(result: dict, results_dir: Path, out: Path) -> list[Path]:
    """``curves-<env>.png``: the learning curves of the evaluated runs, one mean curve with
    a 95 % band per algo (variants apart), written next to the table."""
    from natgrad.rl.plotting import plot_runs

    written = []
    for env in result["envs"]:
        runs = [r for r in result["runs"] if r["env"] == env]
        if not runs:
            continue
        path = out / f"curves-{env.replace('/', '_')}.png"
        plot_runs([results_dir / "runs" / r["name"] for r in runs], path,
                  title=f"{env}, {result['steps']:,} steps, seeds {result['seeds']}",
                  labels=[r["algo"] for r in runs])  # fmt: skip
        written.append(path)
    return written


def provenance(results_dir: Path) -> dict:
    """Commit and versions (``benchmarks/solvers/run.py``'s record) plus the runs' machines."""
    solvers_run = load_script("natgrad_bench_solvers_run", HERE.parent / "solvers" / "run.py")
    record = solvers_run.provenance(
        f"protocol computed on {platform.machine()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPUs; the runs' machines are under runs_machines"
    )
    data = json.loads((results_dir / "results.json").read_text())
    record["runs_machines"] = data.get("machines", {})
    record["results"] = str(results_dir)
    return record


def fmt_ratio(figure: dict | None) -> str:
    """``ratio [low, high]`` for the ratio table."""
    if figure is None:
        return "n/a"
    return f"{figure['ratio']:.2f} [{figure['low']:.2f}, {figure['high']:.2f}]"


def fmt(figure: dict | None) -> str:
    """``IQM [low, high]`` for the table."""
    if figure is None:
        return "n/a"
    return f"{figure['estimate']:.1f} [{figure['low']:.1f}, {figure['high']:.1f}]"


def evaluate(
    results_dir: Path,
    envs: Sequence[str],
    algos: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    reps: int = 5000,
    reference: str | None = None,
) -> dict:
    """All the protocol's figures (the content of ``protocol.json`` without provenance).

    With ``reference`` (an algo), also each algo's mean final return divided by the
    reference's on each env, and the mean of those ratios over the envs
    (:func:`ratios_to`).

    Raises
    ------
    ValueError
        If a seed is a tuning seed (>= 100).
    """
    tuning = sorted(s for s in seeds if s >= TUNING_SEED_START)
    if tuning:
        raise ValueError(
            f"seeds {tuning} are tuning seeds (>= {TUNING_SEED_START}, used by "
            "benchmarks/rl/tune.py to choose the presets); evaluate on seeds below "
            f"{TUNING_SEED_START}, which the presets were never scored on"
        )
    cells, missing = collect(results_dir, envs, algos, seeds, steps)
    rows = []
    for (env, algo), runs in cells.items():
        finals = [r["final_return"] for r in runs]
        aucs = [r["auc"] for r in runs]
        walls = [r["wall_time"] for r in runs if math.isfinite(r["wall_time"])]
        rows.append({
            "env": env,
            "algo": algo,
            "seeds": [r["seed"] for r in runs],
            "final_return": interval(env, finals, reps),
            "auc": interval(env, aucs, reps),
            "mean_final_return": float(np.mean(finals)) if finals else None,
            "iqr_final_return": iqr_spread(finals),
            "median_wall_time": float(np.median(walls)) if walls else None,
            "stopped_early": [r["seed"] for r in runs if r["steps_reached"] < steps],
            "solver": solver_summary(results_dir, runs),
            "update": step_summary(results_dir, runs),
            "per_seed": runs,
        })  # fmt: skip
    return {
        "steps": steps,
        "envs": list(envs),
        "algos": list(algos),
        "seeds": list(seeds),
        "bootstrap_reps": reps,
        "grid_points": GRID_POINTS,
        "rows": rows,
        # every run evaluated, with the commit that trained it (docs provenance reads these)
        "runs": [
            {
                "name": r["name"],
                "env": env,
                "algo": algo,
                "seed": r["seed"],
                "steps": steps,
                "commit": r["commit"],
            }
            for (env, algo), runs in cells.items()
            for r in runs
        ],  # fmt: skip
        "missing": missing,
        "performance_profile": performance_profile(cells, reps=min(reps, 2000)),
        "reference": reference,
        "ratios": ratios_to(cells, reference, reps=min(reps, 2000)) if reference else {},
    }


def iqr_spread(values: Sequence[float]) -> float | None:
    """Interquartile range (75th minus 25th percentile, linear interpolation) of the finite
    values: the spread across seeds."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return None
    low, high = np.percentile(finite, [25, 75])
    return float(high - low)


def ratios_to(
    cells: dict[tuple[str, str], list[dict]], reference: str, reps: int, seed: int = 0
) -> dict[str, dict]:
    """Per algo: its mean final return over seeds divided by ``reference``'s, per env and
    averaged over the envs both have, with 95 % bootstrap intervals.

    Each replicate resamples the seeds of both algos with replacement, independently per
    env and per algo; the interval is the 2.5 and 97.5 percentiles of the replicated
    ratios (and of their mean over envs). A ratio reads as "fraction of the reference's
    return", so it is only meaningful where the reference's mean return is positive; envs
    where it is not are left out (and listed under ``skipped``).

    Returns
    -------
    dict
        ``algo -> {"per_env": {env: {"ratio", "low", "high"}}, "mean": {...}, "skipped"}``.
    """
    rng = np.random.default_rng(seed)

    def finals(env: str, algo: str) -> np.ndarray:
        runs = cells.get((env, algo), [])
        return np.array([r["final_return"] for r in runs if math.isfinite(r["final_return"])])

    out: dict[str, dict] = {}
    envs = sorted({env for env, _ in cells})
    for algo in sorted({algo for _, algo in cells} - {reference}):
        per_env, replicated, skipped = {}, [], []
        for env in envs:
            mine, theirs = finals(env, algo), finals(env, reference)
            if not mine.size or not theirs.size:
                continue
            if theirs.mean() <= 0:
                skipped.append(env)
                continue
            draws = np.array([
                mine[rng.integers(0, mine.size, mine.size)].mean()
                / max(theirs[rng.integers(0, theirs.size, theirs.size)].mean(), 1e-12)
                for _ in range(reps)
            ])  # fmt: skip
            low, high = np.percentile(draws, [2.5, 97.5])
            per_env[env] = {"ratio": float(mine.mean() / theirs.mean()),
                            "low": float(low), "high": float(high)}  # fmt: skip
            replicated.append(draws)
        if not per_env:
            continue
        mean_draws = np.mean(replicated, axis=0)
        low, high = np.percentile(mean_draws, [2.5, 97.5])
        mean = float(np.mean([r["ratio"] for r in per_env.values()]))
        out[algo] = {"per_env": per_env, "mean": {"ratio": mean, "low": float(low),
                     "high": float(high)}, "skipped": skipped}  # fmt: skip
    return out


def markdown(result: dict) -> str:
    """The table, the warnings and the missing runs, as markdown."""
    lines = [
        f"# RL evaluation protocol, {result['steps']:,} steps",
        "",
        f"Seeds {result['seeds']}. IQM over seeds with a 95 % stratified-bootstrap interval "
        f"({result['bootstrap_reps']} replicates). Final return: mean episodic return over the "
        "last 10 % of the steps. AUC: mean episodic return averaged over the whole budget "
        f"(curve interpolated on {result['grid_points']} steps from 0 to the budget). IQR: "
        "75th minus 25th percentile of the final return across seeds. Wall time: median "
        "per run; compare it only between runs of the same machine.",
        "",
        "| env | algo | seeds | final return IQM [95 % CI] | final return IQR | "
        "AUC IQM [95 % CI] | median wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        wall = "n/a" if row["median_wall_time"] is None else f"{row['median_wall_time']:.1f}"
        stopped = f" ({len(row['stopped_early'])} stopped early)" if row["stopped_early"] else ""
        spread = row.get("iqr_final_return")
        spread_text = "n/a" if spread is None else f"{spread:.1f}"
        lines.append(
            f"| {row['env']} | {row['algo']} | {len(row['seeds'])}{stopped} | "
            f"{fmt(row['final_return'])} | {spread_text} | {fmt(row['auc'])} | {wall} |"
        )
    if result.get("ratios"):
        envs = result["envs"]
        lines += [
            "",
            f"Mean final return over seeds relative to {result['reference']} "
            "(95 % bootstrap interval):",
            "",
            "| algo | " + " | ".join(envs) + " | mean over envs |",
            "|---|" + "---|" * (len(envs) + 1),
        ]
        for algo, ratio in result["ratios"].items():
            cells = [fmt_ratio(ratio["per_env"].get(env)) for env in envs]
            lines.append(f"| {algo} | " + " | ".join(cells) + f" | {fmt_ratio(ratio['mean'])} |")
    warnings = warnings_of(result)
    if warnings:
        lines += ["", "Warnings:", "", *[f"- {w}" for w in warnings]]
    if result["missing"]:
        lines += ["", f"Missing runs ({len(result['missing'])}):", ""]
        lines += [f"- `{m['name']}`: {m['reason']}" for m in result["missing"]]
    return "\n".join(lines) + "\n"


def warnings_of(result: dict) -> list[str]:
    """One line per env x algo with fewer than :data:`MIN_SEEDS` seeds."""
    return [
        f"{row['env']} {row['algo']}: {len(row['seeds'])} seed(s); the protocol asks for "
        f">= {MIN_SEEDS} per env x algo"
        for row in result["rows"]
        if len(row["seeds"]) < MIN_SEEDS
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--steps", type=int, default=100_000, help="the budget to evaluate")
    parser.add_argument("--envs", nargs="+", help="default: every env recorded at --steps")
    parser.add_argument("--algos", nargs="+", help="default: every algo recorded at --steps")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="evaluation seeds (< 100); default: every one recorded at "
                             "--steps")  # fmt: skip
    parser.add_argument("--out", type=Path, help="default: <results>/protocol-<budget>k")
    parser.add_argument("--reps", type=int, default=5000, help="bootstrap replicates")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument("--reference", help="an algo: report every algo's mean final return "
                        "relative to it (e.g. sb3-trpo)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.seeds and any(s >= TUNING_SEED_START for s in args.seeds):
        tuning = sorted(s for s in args.seeds if s >= TUNING_SEED_START)
        parser.error(
            f"--seeds {tuning}: seeds >= {TUNING_SEED_START} are tuning seeds of "
            "benchmarks/rl/tune.py (they chose the presets); evaluate on seeds below "
            f"{TUNING_SEED_START}"
        )
    results_dir: Path = args.results
    if not (results_dir / "results.json").exists():
        parser.error(f"--results {results_dir}: no results.json (run benchmarks/rl/run.py)")
    runs = json.loads((results_dir / "results.json").read_text())["runs"]
    at_budget = [r for r in runs if r["steps"] == args.steps]
    envs = args.envs or sorted({r["env"] for r in at_budget})
    algos = args.algos or sorted({r["algo"] for r in at_budget})
    seeds = args.seeds or sorted({r["seed"] for r in at_budget if r["seed"] < TUNING_SEED_START})
    if not (envs and algos and seeds):
        parser.error(f"no runs of {args.steps} steps in {results_dir / 'results.json'}")
    if args.reference is not None and args.reference not in algos:
        parser.error(f"--reference {args.reference}: not among the algos {algos}")
    result = evaluate(results_dir, envs, algos, seeds, args.steps, reps=args.reps,
                      reference=args.reference)  # fmt: skip
    result["provenance"] = provenance(results_dir)
    out: Path = args.out or results_dir / f"protocol-{args.steps // 1000}k"
    out.mkdir(parents=True, exist_ok=True)
    (out / "protocol.json").write_text(json.dumps(result, indent=1))
    (out / "protocol.md").write_text(markdown(result))
    for warning in warnings_of(result):
        print(f"warning: {warning}", file=sys.stderr)
    for m in result["missing"]:
        print(f"missing: {m['name']} ({m['reason']})", file=sys.stderr)
    if not args.no_plot:
        title = f"Performance profile, {args.steps:,} steps, {len(envs)} env(s)"
        plot_profile(result["performance_profile"], out / "performance_profile.png", title)
        plot_curves(result, results_dir, out)
    print(markdown(result))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
