"""Accuracy-versus-time of natural-gradient solvers on the reference problems (issue 5).

Every method is timed end to end on the same batch in one process (medians of repeats):
natgrad's RATNaturalGradient for each solver/backend/budget, TRPO-style conjugate gradient
on autograd Fisher-vector products, a dense P x P Fisher solve where it fits, and one
vanilla policy-gradient backward pass. Accuracy is the cosine with the exact direction
(float64 Cholesky). Writes results/results.json, results/results.md and results/*.png.

    python benchmarks/solvers/run.py               # all problems
    python benchmarks/solvers/run.py --problems mlp cnn --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from problems import Problem, log_prob_fn, make_problem
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from natgrad import RATNaturalGradient

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = 0.99


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()))


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        out = fn()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def exact_direction(problem: Problem, damping: float) -> Tensor:
    policy = copy.deepcopy(problem.policy).double()
    obs, acts = problem.obs.double(), problem.acts
    acts = acts.double() if acts.is_floating_point() else acts
    rat = RATNaturalGradient(log_prob_fn, damping=damping, solver="cholesky")
    return flat(rat.natural_gradient(policy, obs, acts, problem.adv.double()).direction)


def vanilla_backward(problem: Problem) -> Tensor:
    policy = problem.policy
    policy.zero_grad(set_to_none=True)
    loss = -(problem.adv * log_prob_fn(policy, problem.obs, problem.acts)).mean()
    loss.backward()
    return flat(p.grad for p in policy.parameters())


def trpo_cg(problem: Problem, damping: float, iterations: int) -> Tensor:
    """TRPO-style CG in parameter space on autograd Fisher-vector products.

    The Fisher is the same sampled one RAT uses (F = J^T J / N), so both target the same
    direction: F v = J^T (J v) / N with J v from the double-backward trick.
    """
    policy, n = problem.policy, problem.adv.shape[0]
    params = list(policy.parameters())
    # The fused attention kernels have no double backward; the math kernel has.
    with sdpa_kernel(SDPBackend.MATH):
        log_prob = log_prob_fn(policy, problem.obs, problem.acts)
    g = flat(torch.autograd.grad((problem.adv * log_prob).mean(), params, retain_graph=True))
    dummy = torch.zeros(n, requires_grad=True, device=g.device)
    jt_dummy = torch.autograd.grad(log_prob, params, grad_outputs=dummy, create_graph=True)
    sizes = [p.numel() for p in params]

    def fvp(v: Tensor) -> Tensor:
        pieces = [c.reshape(p.shape) for c, p in zip(v.split(sizes), params, strict=True)]
        jv = torch.autograd.grad(jt_dummy, dummy, grad_outputs=pieces, retain_graph=True)[0]
        jtjv = torch.autograd.grad(log_prob, params, grad_outputs=jv / n, retain_graph=True)
        return flat(jtjv) + damping * v

    x = torch.zeros_like(g)
    r = g.clone()
    p = r.clone()
    rr = float(r @ r)
    for _ in range(iterations):
        fp = fvp(p)
        alpha = rr / float(p @ fp)
        x += alpha * p
        r -= alpha * fp
        rr_new = float(r @ r)
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x


def dense_fisher(problem: Problem, damping: float) -> Tensor:
    rat = RATNaturalGradient(
        log_prob_fn, damping=damping, solver="cholesky", backend="materialized"
    )
    from natgrad.scores import MaterializedScores, PolicyScores

    names = [n for n, _ in problem.policy.named_parameters()]
    with torch.no_grad():
        lp = log_prob_fn(problem.policy, problem.obs, problem.acts)
    scores = PolicyScores(problem.policy, log_prob_fn, problem.obs, problem.acts, names, lp)
    jac = MaterializedScores.from_policy(scores, rat.block_size * 8).matrix.double()
    n, p = jac.shape
    fisher = jac.T @ jac / n
    fisher.diagonal().add_(damping)
    return torch.linalg.solve(fisher, jac.T @ problem.adv.double() / n)


def kfac_direction(problem: Problem, damping: float) -> Tensor:
    """The K-FAC direction of natgrad's ``kfac`` agent (Kronecker factors of one batch)."""
    from natgrad.rl import TrainConfig
    from natgrad.rl.algorithms.kfac import KFAC

    config = TrainConfig(algo="kfac", kfac_damping=damping)
    kfac = KFAC(problem.policy, config, seed=0)
    return flat(kfac.direction(problem.obs, problem.acts, problem.adv).values())


def default_direction(problem: Problem, damping: float) -> Tensor:
    """What a user gets from ``RATNaturalGradient(log_prob_fn, damping)``: all defaults."""
    rat = RATNaturalGradient(log_prob_fn, damping=damping, seed=0)
    return flat(
        rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv).direction
    )


def natgrad_direction(problem: Problem, damping: float, **settings) -> Tensor:
    rat = RATNaturalGradient(
        log_prob_fn, damping=damping, seed=0, on_nonconvergence="warn", **settings
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flat(
            rat.natural_gradient(problem.policy, problem.obs, problem.acts, problem.adv).direction
        )


def methods(
    problem: Problem, quick: bool, compiled: bool = False
) -> dict[str, tuple[str, list[int], object]]:
    """Method name -> (budget label, budgets, fn(damping, budget) -> direction)."""
    epochs = [1, 2, 4, 8] if quick else [1, 2, 3, 5, 8, 12, 20]
    iters = [5, 10, 20, 40] if quick else [5, 10, 15, 20, 30, 45, 70, 100]
    table: dict[str, tuple[str, list[int], object]] = {
        "rat default: RATNaturalGradient(damping)": (
            "-", [1], lambda lam, k: default_direction(problem, lam)
        ),
    }  # fmt: skip

    def rat(budget: str | None, **fixed):
        """fn(damping, budget) running RATNaturalGradient with ``budget`` set to the budget."""
        tol = {} if fixed.get("solver") == "cholesky" else {"tol": 1e-12}
        return lambda lam, k: natgrad_direction(
            problem, lam, **tol, **({budget: k} if budget else {}), **fixed
        )

    backends = ["factored", "streaming" if problem.name == "large_mlp" else "materialized"]
    variants = [(f"[{backend}]", {"backend": backend}) for backend in backends]
    if compiled:
        variants.append(("[factored, compile]", {"backend": "factored", "compile": True}))
    for label, options in variants:
        for block in (256, 1024):
            table[f"rat-kaczmarz b={block} {label}"] = (
                "epochs", epochs,
                rat("max_epochs", solver="kaczmarz", block_size=block, **options),
            )  # fmt: skip
        table[f"rat-cg {label}"] = (
            "iterations", iters, rat("max_iters", solver="cg", preconditioner_rank=0, **options)
        )  # fmt: skip
        if options.get("compile"):
            continue
        table[f"rat-cg nystrom-256 {label}"] = (
            "iterations", [1, 2, 3, 5, 8, 12, 20],
            rat("max_iters", solver="cg", preconditioner_rank=256, **options),
        )  # fmt: skip
        if options["backend"] != "streaming":
            table[f"rat-cholesky {label}"] = ("-", [1], rat(None, solver="cholesky", **options))
    if problem.name != "transformer":  # attention's projections are not hookable modules
        table["kfac (K-FAC direction)"] = ("-", [1], lambda lam, k: kfac_direction(problem, lam))
    table["trpo-cg (autograd FVP)"] = ("iterations", iters, lambda lam, k: trpo_cg(problem, lam, k))
    if problem.name == "mlp":
        table["dense fisher (P x P)"] = ("-", [1], lambda lam, k: dense_fisher(problem, lam))
    return table


def run_problem(
    name: str,
    dampings: list[float],
    repeats: int,
    quick: bool,
    device: str = "cpu",
    compiled: bool = False,
    warmup: bool = False,
) -> dict:
    problem = make_problem(name, device=device)
    num_params = sum(p.numel() for p in problem.policy.parameters())
    vanilla, _ = median_time(lambda: vanilla_backward(problem), max(repeats, 5))
    record = {
        "problem": name,
        "num_samples": int(problem.adv.shape[0]),
        "num_params": num_params,
        "vanilla_backward_s": vanilla,
        "dampings": {},
    }
    print(
        f"[{name}] N={problem.adv.shape[0]} P={num_params} vanilla={vanilla * 1e3:.1f} ms",
        flush=True,
    )
    for damping in dampings:
        exact = exact_direction(problem, damping)
        curves = {}
        for method, (unit, budgets, fn) in methods(problem, quick, compiled).items():
            points = []
            if warmup:  # compilation, cuBLAS/cuDNN handles, allocator: not part of the timing
                try:
                    fn(damping, budgets[0])
                except RuntimeError:
                    pass
            for budget in budgets:
                try:
                    seconds, direction = median_time(
                        lambda f=fn, b=budget, d=damping: f(d, b), repeats
                    )
                except RuntimeError as error:  # e.g. no double backward for an attention kernel
                    print(f"  {method}: unsupported ({str(error)[:80]})", flush=True)
                    break
                points.append(
                    {"budget": budget, "seconds": seconds, "cosine": cosine(direction, exact)}
                )
                if points[-1]["cosine"] >= 0.9999:
                    break
            if not points:
                curves[method] = {"unit": unit, "points": [], "time_to_target_s": None}
                continue
            reached = [p["seconds"] for p in points if p["cosine"] >= TARGET]
            curves[method] = {
                "unit": unit,
                "points": points,
                "time_to_target_s": min(reached) if reached else None,
            }
            best = max(p["cosine"] for p in points)
            print(
                f"  lam={damping:g} {method:38s} t99="
                f"{f'{min(reached):.4f}' if reached else '   -  '} best cos={best:.4f}",
                flush=True,
            )
        record["dampings"][str(damping)] = curves
    return record


def memory_probe(
    backend: str, device: str = "cpu", num_samples: int | None = None, block_size: int = 256
) -> int:
    """Peak extra memory (bytes) of one Kaczmarz epoch on large_mlp with ``backend``.

    CPU: run in a fresh process (``--memory-probe``), peak RSS increase. CUDA: in process,
    peak allocated minus the allocation before the call.
    """
    problem = make_problem("large_mlp", device=device, num_samples=num_samples)

    def call() -> None:
        natgrad_direction(
            problem, 1e-2, solver="kaczmarz", block_size=block_size, max_epochs=1, tol=1e-12,
            backend=backend, memory_budget=2**40,
        )  # fmt: skip

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    call()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (after - before) * 1024


def probe_in_subprocess(backend: str, num_samples: int, block_size: int) -> int:
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-probe", backend, "--probe-samples",
         str(num_samples), "--probe-block", str(block_size)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_extra_bytes"]


def memory_table(device: str = "cpu") -> dict:
    out = {}
    for backend in ("streaming", "factored", "materialized"):
        if device == "cuda":
            out[backend] = memory_probe(backend, device)
        else:
            out[backend] = probe_in_subprocess(backend, 4096, 256)
    problem = make_problem("large_mlp")
    p = sum(q.numel() for q in problem.policy.parameters())
    out["N x P x 4 bytes"] = problem.adv.shape[0] * p * 4
    out["block (256) x P x 4 bytes"] = 256 * p * 4
    return out


def memory_scaling(settings: list[tuple[str, int, int]]) -> list[dict]:
    """Peak extra RSS of one Kaczmarz epoch (fresh process each) for (backend, N, b)."""
    p = sum(q.numel() for q in make_problem("large_mlp", num_samples=8).policy.parameters())
    rows = []
    for backend, n, b in settings:
        peak = probe_in_subprocess(backend, n, b)
        rows.append({"backend": backend, "N": n, "block_size": b, "P": p,
                     "peak_extra_bytes": peak, "N*P*4": n * p * 4, "b*P*4": b * p * 4})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def provenance(machine: str) -> dict:
    """Commit and versions of this run (docs/performance.md renders them)."""

    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {
        "commit": git("rev-parse", "HEAD"),
        "commit_source": "recorded by the script (HEAD when it started"
        + ("; the working tree had uncommitted changes)" if dirty else ")"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "machine": machine,
    }


def write_outputs(data: dict, results: Path = RESULTS) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / "results.json").write_text(json.dumps(data, indent=1))
    lines = [
        "# Solver benchmark",
        "",
        f"Command: `{data['command']}`  ",
        f"Machine: {data['machine']}; torch {data['torch']}; threads {data['threads']}; "
        f"device {data.get('device', 'cpu')}"
        f"{' (' + data['gpu'] + ')' if data.get('gpu') else ''}; "
        f"warm-up call before timing: {data.get('warmup', False)}.",
        "",
        "Time to reach cosine >= 0.99 with the exact float64 direction (median of "
        f"{data['repeats']} repeats, whole call including per-sample scores), and the ratio "
        "to TRPO-style CG and to one vanilla backward pass.",
        "",
        "| problem | N | P | damping | method | t(cos>=0.99) | / TRPO-CG | / vanilla |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rec in data["problems"]:
        for damping, curves in rec["dampings"].items():
            trpo = curves["trpo-cg (autograd FVP)"]["time_to_target_s"]
            for method, curve in curves.items():
                t = curve["time_to_target_s"]
                ratio_trpo = f"{t / trpo:.2f}" if (t and trpo) else "-"
                ratio_van = f"{t / rec['vanilla_backward_s']:.1f}" if t else "-"
                lines.append(
                    f"| {rec['problem']} | {rec['num_samples']} | {rec['num_params']} | "
                    f"{damping} | {method} | {f'{t:.4f} s' if t else 'not reached'} | "
                    f"{ratio_trpo} | {ratio_van} |"
                )
    if "memory" in data:
        lines += [
            "",
            "## Peak extra memory, large MLP (one Kaczmarz epoch)",
            "",
            "| backend / reference | bytes |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v / 2**20:.1f} MiB |" for k, v in data["memory"].items()]
    (results / "results.md").write_text("\n".join(lines) + "\n")
    plot(data, results)


def plot(data: dict, results: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for rec in data["problems"]:
        dampings = list(rec["dampings"])
        fig, axes = plt.subplots(
            1, len(dampings), figsize=(6.5 * len(dampings), 4.5), squeeze=False
        )
        for ax, damping in zip(axes[0], dampings, strict=True):
            palette = plt.get_cmap("tab20").colors
            for i, (method, curve) in enumerate(rec["dampings"][damping].items()):
                xs = [p["seconds"] for p in curve["points"]]
                ys = [max(p["cosine"], 0.0) for p in curve["points"]]
                style = {"marker": "o", "ms": 3, "color": palette[i % len(palette)]}
                if method.startswith("trpo"):
                    style = {"marker": "s", "ms": 4, "color": "black", "lw": 2}
                elif method.startswith("rat default"):
                    style = {"marker": "*", "ms": 14, "color": "red", "ls": "none"}
                elif method.startswith(("kfac", "dense")):
                    style = {"marker": "X", "ms": 8, "color": palette[i % len(palette)]}
                elif "materialized" in method or "streaming" in method:
                    style["ls"] = "--"
                ax.plot(xs, ys, label=method, **style)
            ax.axvline(
                rec["vanilla_backward_s"], color="k", ls=":", lw=1, label="one vanilla backward"
            )
            ax.axhline(TARGET, color="gray", ls="--", lw=1)
            ax.set_xscale("log")
            ax.set_ylim(0.5, 1.005)
            ax.set_xlabel("wall time (s)")
            ax.set_ylabel("cosine with exact direction")
            ax.set_title(
                f"{rec['problem']} N={rec['num_samples']} P={rec['num_params']} lam={damping}"
            )
        axes[0][-1].legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(results / f"{rec['problem']}.png", dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn", "transformer", "large_mlp"])
    parser.add_argument("--dampings", nargs="+", type=float, default=[1e-2, 1e-3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="add compile=True variants")
    parser.add_argument("--warmup", action="store_true", help="one untimed call per method")
    parser.add_argument("--results", type=Path, default=RESULTS, help="output folder")
    parser.add_argument("--quick", action="store_true", help="fewer budgets (smoke test)")
    parser.add_argument("--memory-probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-samples", type=int, default=4096, help=argparse.SUPPRESS)
    parser.add_argument("--probe-block", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-scaling", action="store_true",
        help="peak memory of streaming/factored/materialized vs N and block size (CPU)",
    )  # fmt: skip
    parser.add_argument("--replot", action="store_true", help="redraw from results.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_probe:
        peak = memory_probe(args.memory_probe, "cpu", args.probe_samples, args.probe_block)
        print(json.dumps({"peak_extra_bytes": peak}))
        return
    if args.memory_scaling:
        settings = [("streaming", 1024, 256), ("streaming", 4096, 256), ("streaming", 4096, 64),
                    ("streaming", 4096, 1024), ("factored", 1024, 256), ("factored", 4096, 256),
                    ("materialized", 256, 256), ("materialized", 512, 256),
                    ("materialized", 1024, 256)]  # fmt: skip
        rows = memory_scaling(settings)
        args.results.mkdir(parents=True, exist_ok=True)
        machine = f"{platform.machine()} {platform.system()} {platform.release()}, CPU"
        out = {"command": "python benchmarks/solvers/run.py --memory-scaling",
               "provenance": provenance(machine), "rows": rows}  # fmt: skip
        (args.results / "memory_scaling.json").write_text(json.dumps(out, indent=1))
        lines = [
            "# Peak extra memory of one Kaczmarz epoch vs N and block size (CPU, large MLP)",
            "",
            f"Command: `python benchmarks/solvers/run.py --memory-scaling`; torch "
            f"{torch.__version__}; each row a fresh process, peak RSS increase.",
            "",
            "| backend | N | block b | P | peak extra | N x P x 4 B | b x P x 4 B |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['backend']} | {r['N']} | {r['block_size']} | {r['P']} | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} MiB | {r['N*P*4'] / 2**20:.0f} MiB | "
            f"{r['b*P*4'] / 2**20:.0f} MiB |"
            for r in rows
        ]
        (args.results / "memory_scaling.md").write_text("\n".join(lines) + "\n")
        return
    if args.replot:
        write_outputs(json.loads((args.results / "results.json").read_text()), args.results)
        return
    data = {
        "command": "python benchmarks/solvers/run.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} {platform.processor() or ''} "
        f"{platform.system()} {platform.release()}".strip(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        "warmup": args.warmup,
        "problems": [],
    }
    data["provenance"] = provenance(
        f"{data['machine']}, {data['gpu'] or 'CPU'}, {args.threads} torch thread(s)"
    )
    for name in args.problems:  # results written after each problem
        data["problems"].append(
            run_problem(
                name,
                args.dampings,
                args.repeats,
                args.quick,
                device=args.device,
                compiled=args.compile,
                warmup=args.warmup,
            )
        )
        if name == "large_mlp":
            data["memory"] = memory_table(args.device)
        write_outputs(data, args.results)


if __name__ == "__main__":
    main()
