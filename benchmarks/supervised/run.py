"""Supervised experiments: SGD, Adam, K-FAC, dense exact NG and RAT-NG on small problems.

Tasks: scikit-learn's bundled ``load_digits`` (10-class classification) and
``load_diabetes`` (regression), and a synthetic 2-D function fit. Every method gets the same
mini-batches; learning rates are picked from a small grid on a tuning seed, then the chosen
setting runs on fresh seeds. Writes ``results/results.json`` (raw curves, machine, versions,
command), ``results/results.md`` (table) and ``results/curves.png``.

    python benchmarks/supervised/run.py            # full run (a few minutes on one core)
    python benchmarks/supervised/run.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kfac import KFAC  # noqa: E402

import natgrad  # noqa: E402
from natgrad.supervised import NaturalGradientOptimizer, mean_loss  # noqa: E402
from natgrad.supervised.fisher import fisher_rows  # noqa: E402
from natgrad.supervised.jacobians import output_jacobians  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Config:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    tuning_seed: int = 0
    steps: int = 200
    eval_every: int = 10
    batch_size: int = 128
    threads: int = 1
    quick: bool = False


@dataclass
class Task:
    name: str
    loss: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    make_model: Callable[[], nn.Module]
    metric: str


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(0), train.std(0) + 1e-8
    return (train - mean) / std, (test - mean) / std


def mlp(sizes: list[int]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        return nn.Sequential(*layers)

    return make


def make_tasks(seed: int) -> list[Task]:
    from sklearn.datasets import load_diabetes, load_digits
    from sklearn.model_selection import train_test_split

    tasks = []
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    xtr, xte = standardize(xtr, xte)
    tasks.append(
        Task(
            "digits",
            "cross_entropy",
            torch.tensor(xtr, dtype=torch.float32),
            torch.tensor(ytr),
            torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte),
            mlp([64, 16, 10]),
            "test accuracy",
        )
    )
    x, y = load_diabetes(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed)
    xtr, xte = standardize(xtr, xte)
    ytr, yte = standardize(ytr[:, None], yte[:, None])
    tasks.append(
        Task(
            "diabetes",
            "mse",
            torch.tensor(xtr, dtype=torch.float32),
            torch.tensor(ytr, dtype=torch.float32),
            torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte, dtype=torch.float32),
            mlp([10, 32, 1]),
            "test MSE",
        )
    )
    rng = np.random.default_rng(seed)

    def target(z: np.ndarray) -> np.ndarray:
        return np.sin(3 * z[:, :1]) * np.cos(2 * z[:, 1:]) + 0.5 * z[:, :1] * z[:, 1:]

    ztr, zte = rng.uniform(-1, 1, (1024, 2)), rng.uniform(-1, 1, (512, 2))
    tasks.append(
        Task(
            "synthetic",
            "mse",
            torch.tensor(ztr, dtype=torch.float32),
            torch.tensor(target(ztr) + 0.05 * rng.normal(size=(1024, 1)), dtype=torch.float32),
            torch.tensor(zte, dtype=torch.float32),
            torch.tensor(target(zte), dtype=torch.float32),
            mlp([2, 32, 32, 1]),
            "test MSE",
        )
    )
    return tasks


# -- methods: each returns a step(x, y) callable ------------------------------------------
def torch_optimizer_step(model: nn.Module, loss: str, optimizer: torch.optim.Optimizer):
    def step(x: Tensor, y: Tensor) -> None:
        optimizer.zero_grad()
        mean_loss(model(x).reshape(x.shape[0], -1), y, loss).backward()
        optimizer.step()

    return step


def dense_ng_step(model: nn.Module, loss: str, lr: float, damping: float):
    """Exact NG in parameter space: form F (P x P) from the same rows and solve densely."""
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    generator = torch.Generator().manual_seed(0)

    def step(x: Tensor, y: Tensor) -> None:
        with torch.no_grad():
            out = model(x).reshape(x.shape[0], -1)
        jac = output_jacobians(model, x, names, out, 256)
        rows = fisher_rows(jac.outputs, jac.jacobians, y, loss, "exact", generator)
        fisher = (rows.rows.T @ rows.rows).to(torch.float64) / x.shape[0]
        fisher.diagonal().add_(damping)
        d = torch.cholesky_solve(rows.gradient[:, None], torch.linalg.cholesky(fisher))
        with torch.no_grad():
            for p, piece in zip(
                params, torch.split(d.squeeze(1), [p.numel() for p in params]), strict=True
            ):
                p -= lr * piece.reshape(p.shape).to(p.dtype)

    return step


def ng_optimizer_step(model: nn.Module, loss: str, lr: float, seed: int, **kwargs):
    opt = NaturalGradientOptimizer(model, loss=loss, lr=lr, seed=seed, **kwargs)

    def step(x: Tensor, y: Tensor) -> None:
        opt.step(x, y)

    return step


DAMPING = 1e-2  # natural-gradient and K-FAC Tikhonov damping (units of the per-sample Fisher)
NG_LR = "RAT-NG (exact, CG)"  # the NG methods with the same direction share its tuned lr
METHODS: dict[str, dict] = {
    "SGD (momentum 0.9)": {"grid": [0.03, 0.1, 0.3]},
    "Adam": {"grid": [0.003, 0.01, 0.03]},
    "K-FAC": {"grid": [0.1, 0.3, 1.0]},
    "NG dense (exact)": {"grid": None, "same_lr_as": NG_LR},
    "RAT-NG (exact, Kaczmarz)": {"grid": None, "same_lr_as": NG_LR},
    NG_LR: {"grid": [0.1, 0.3, 1.0]},
    "RAT-NG (exact, CG, LM)": {"grid": [0.3, 1.0]},
    "RAT-NG (sampled, Kaczmarz)": {"grid": [0.1, 0.3, 1.0]},
}
SOLVE = {"tol": 1e-3, "on_nonconvergence": "fallback"}
KACZMARZ = {"solver": "kaczmarz", "block_size": 128, "max_epochs": 50, **SOLVE}
CG = {"solver": "cg", "max_iters": 200, **SOLVE}


def make_step(method: str, model: nn.Module, loss: str, lr: float, seed: int):
    if method.startswith("SGD"):
        optimizer = torch.optim.SGD(model.parameters(), lr, momentum=0.9)
        return torch_optimizer_step(model, loss, optimizer)
    if method == "Adam":
        return torch_optimizer_step(model, loss, torch.optim.Adam(model.parameters(), lr))
    if method == "K-FAC":
        return KFAC(model, loss, lr, damping=DAMPING, seed=seed).step
    if method == "NG dense (exact)":
        return dense_ng_step(model, loss, lr, DAMPING)
    options = {
        "RAT-NG (exact, Kaczmarz)": KACZMARZ,
        "RAT-NG (exact, CG)": CG,
        "RAT-NG (exact, CG, LM)": {**CG, "damping_schedule": "levenberg_marquardt"},
        "RAT-NG (sampled, Kaczmarz)": {**KACZMARZ, "fisher": "sampled"},
    }[method]
    return ng_optimizer_step(model, loss, lr, seed, damping=DAMPING, **options)


def evaluate(task: Task, model: nn.Module) -> dict[str, float]:
    with torch.no_grad():
        train = float(
            mean_loss(model(task.x_train).reshape(len(task.x_train), -1), task.y_train, task.loss)
        )
        out = model(task.x_test).reshape(len(task.x_test), -1)
        test = float(mean_loss(out, task.y_test, task.loss))
        if task.loss == "cross_entropy":
            metric = float((out.argmax(1) == task.y_test).float().mean())
        else:
            metric = float((out - task.y_test).pow(2).mean())
    if not math.isfinite(train):
        train = float("inf")
    return {"train_loss": train, "test_loss": test, "metric": metric}


def run(task: Task, method: str, lr: float, seed: int, config: Config) -> dict:
    torch.manual_seed(seed)
    model = task.make_model()
    step = make_step(method, model, task.loss, lr, seed)
    batches = torch.Generator().manual_seed(10_000 + seed)
    n = len(task.x_train)
    curve = {"step": [0], "seconds": [0.0], **{k: [v] for k, v in evaluate(task, model).items()}}
    elapsed = 0.0
    perm = torch.randperm(n, generator=batches)
    cursor = 0
    for t in range(1, config.steps + 1):
        if cursor + config.batch_size > n:
            perm, cursor = torch.randperm(n, generator=batches), 0
        index = perm[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        start = time.perf_counter()
        try:
            step(task.x_train[index], task.y_train[index])
        except (RuntimeError, ValueError) as error:  # divergence (NaN) ends the run
            curve["error"] = f"step {t}: {type(error).__name__}: {error}"[:300]
            break
        elapsed += time.perf_counter() - start
        if t % config.eval_every == 0 or t == config.steps:
            metrics = evaluate(task, model)
            curve["step"].append(t)
            curve["seconds"].append(elapsed)
            for k, v in metrics.items():
                curve[k].append(v)
            if not math.isfinite(metrics["train_loss"]):
                curve["error"] = f"step {t}: loss diverged"
                break
    return curve


def final(curve: dict, key: str) -> float:
    value = curve[key][-1]
    return value if "error" not in curve and math.isfinite(value) else float("inf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, one seed (smoke test)")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--replot", action="store_true", help="rebuild the table and plot from results/results.json"
    )
    args = parser.parse_args()
    if args.replot:
        saved = json.loads((RESULTS / "results.json").read_text())
        runs = saved.pop("runs")
        (RESULTS / "results.md").write_text(table(runs, saved))
        plot(runs, RESULTS / "curves.png")
        return
    config = Config(quick=args.quick)
    if args.quick:
        config.steps, config.seeds, config.eval_every = 20, [1], 5
    if args.steps:
        config.steps = args.steps
    torch.set_num_threads(config.threads)
    warm_up()
    started = time.perf_counter()
    records = []
    for task_seedless in make_tasks(0):
        chosen: dict[str, float] = {}
        tuning: dict[str, dict[str, float]] = {}
        for method, spec in METHODS.items():
            if spec["grid"] is None:
                continue
            scores = {}
            for lr in spec["grid"]:
                curve = run(task_seedless, method, lr, config.tuning_seed, config)
                scores[str(lr)] = final(curve, "train_loss")
            tuning[method] = scores
            chosen[method] = float(min(scores, key=lambda k: scores[k]))
            print(
                f"[tune] {task_seedless.name:9s} {method:20s} {scores} -> {chosen[method]}",
                flush=True,
            )
        for method, spec in METHODS.items():
            if spec["grid"] is None:
                chosen[method] = chosen[spec["same_lr_as"]]
        for seed in config.seeds:
            task = next(t for t in make_tasks(seed) if t.name == task_seedless.name)
            for method in METHODS:
                curve = run(task, method, chosen[method], seed, config)
                records.append(
                    {
                        "task": task.name,
                        "method": method,
                        "seed": seed,
                        "lr": chosen[method],
                        "curve": curve,
                        "tuning": tuning.get(method),
                    }
                )
                print(
                    f"[run]  {task.name:9s} {method:20s} seed {seed} "
                    f"train {curve['train_loss'][-1]:.4g} {task.metric} "
                    f"{curve['metric'][-1]:.4g} time {curve['seconds'][-1]:.2f}s",
                    flush=True,
                )
    total = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    suffix = "_quick" if config.quick else ""
    meta = metadata(config, total)
    (RESULTS / f"results{suffix}.json").write_text(json.dumps({**meta, "runs": records}, indent=1))
    (RESULTS / f"results{suffix}.md").write_text(table(records, meta))
    plot(records, RESULTS / f"curves{suffix}.png")
    print(f"done in {total:.0f}s -> {RESULTS}")


def warm_up() -> None:
    """Pay torch.func's one-off lazy initialization before any timed step."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    for schedule in ("fixed", "levenberg_marquardt"):
        opt = NaturalGradientOptimizer(model, "cross_entropy", damping_schedule=schedule, seed=0)
        opt.step(x, y)


def metadata(config: Config, total: float) -> dict:
    import sklearn

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = ""
    provenance = {
        "commit": commit,
        "commit_source": "recorded by the script (HEAD when it started)",
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": f"{platform.platform()}, {__import__('os').cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch thread(s)",
    }
    return {
        "provenance": provenance,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": asdict(config),
        "damping": DAMPING,
        "methods": METHODS,
        "seconds_total": total,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
            "natgrad": natgrad.__version__,
            "git_commit": commit,
        },
    }


def table(records: list[dict], meta: dict) -> str:
    lines = [
        "| task | method | lr | final train loss | final test loss | test metric | "
        "ms / step | diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    tasks = list(dict.fromkeys(r["task"] for r in records))
    for task in tasks:
        for method in METHODS:
            runs = [r for r in records if r["task"] == task and r["method"] == method]
            if not runs:
                continue
            ok = [r for r in runs if "error" not in r["curve"]]

            def stat(key: str, runs=ok) -> str:
                values = np.array([r["curve"][key][-1] for r in runs])
                if len(values) == 0:
                    return "n/a"
                return f"{values.mean():.4g} ± {values.std():.2g}"

            metric_name = "acc" if task == "digits" else "MSE"
            per_step = np.mean(
                [1e3 * r["curve"]["seconds"][-1] / max(r["curve"]["step"][-1], 1) for r in runs]
            )
            lines.append(
                f"| {task} | {method} | {runs[0]['lr']:g} | {stat('train_loss')} | "
                f"{stat('test_loss')} | {metric_name} {stat('metric')} | {per_step:.1f} | "
                f"{len(runs) - len(ok)}/{len(runs)} |"
            )
    cfg = meta["config"]
    lines += [
        "",
        f"Mean ± std over seeds {cfg['seeds']} ({cfg['steps']} steps, batch {cfg['batch_size']}, "
        f"{meta['machine']['torch_threads']} torch thread(s) on {meta['machine']['platform']}; "
        f"total {meta['seconds_total']:.0f} s). Learning rates picked from each method's grid "
        f"by final train loss on seed {cfg['tuning_seed']}. Damping {meta['damping']:g} for "
        "every natural-gradient method and K-FAC. Command: "
        f"`{meta['command']}`.",
    ]
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(2, len(tasks), figsize=(5 * len(tasks), 7.5), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for col, task in enumerate(tasks):
        for i, method in enumerate(METHODS):
            runs = [
                r
                for r in records
                if r["task"] == task and r["method"] == method and "error" not in r["curve"]
            ]
            if not runs:
                continue
            length = min(len(r["curve"]["step"]) for r in runs)
            steps = np.array(runs[0]["curve"]["step"][:length])
            losses = np.array([r["curve"]["train_loss"][:length] for r in runs])
            seconds = np.array([r["curve"]["seconds"][:length] for r in runs]).mean(0)
            style = {
                "color": colors[i % len(colors)],
                "label": method,
                "linestyle": "--" if method.startswith("NG dense") else "-",
            }
            for row, x in enumerate((steps, seconds)):
                ax = axes[row, col]
                # Time panels skip t = 0 so the x axis can be logarithmic.
                keep = slice(0, None) if row == 0 else slice(1, None)
                ax.plot(x[keep], losses.mean(0)[keep], **style)
                ax.fill_between(
                    x[keep],
                    losses.min(0)[keep],
                    losses.max(0)[keep],
                    color=style["color"],
                    alpha=0.15,
                )
                ax.set_yscale("log")
                if row == 1:
                    ax.set_xscale("log")
                ax.set_xlabel("step" if row == 0 else "training wall time (s)")
                ax.set_ylabel("train loss (full set)")
                ax.set_title(task)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
