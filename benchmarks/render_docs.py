"""Render every benchmark number in README.md and docs/*.md from the committed results files.

The pages carry *generated regions*: an HTML comment holding a Python expression, the
rendered value, and a closing comment, for example

    about <!-- fig: rl_mean_wall('CartPole-v1', 'rat-npg') -->10<!-- /fig --> seconds

The expression is evaluated with the helpers below, which read only
``benchmarks/*/results*/`` (and ``git`` for provenance), so a number on a page can only
change together with the results file it comes from. Block regions (tables, provenance
notes) put the markers on their own lines. The same goes for the figures: ``ASSETS`` maps
each ``docs/assets`` image to the benchmark plot it copies.

    python benchmarks/render_docs.py          # rewrite the regions and the asset copies
    python benchmarks/render_docs.py --check  # exit 1 if a committed page or asset differs

``tests/test_docs_figures.py`` runs the check in the test suite. Needs only the standard
library (and ``git`` on the PATH for the provenance notes); independent of natgrad.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import math
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
PAGES = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))]
REGION = re.compile(r"<!-- fig: (?P<expr>.*?) -->(?P<body>.*?)<!-- /fig -->", re.DOTALL)

# docs/assets image -> the benchmark plot it is a copy of
ASSETS = {
    "perf-cpu-mlp.png": "solvers/results/mlp.png",
    "perf-cpu-cnn.png": "solvers/results/cnn.png",
    "perf-cpu-transformer.png": "solvers/results/transformer.png",
    "perf-h100-mlp.png": "solvers/results/cuda-h100/mlp.png",
    "perf-h100-cnn.png": "solvers/results/cuda-h100/cnn.png",
    "perf-h100-large_mlp.png": "solvers/results/cuda-h100/large_mlp.png",
    "perf-h100-transformer.png": "solvers/results/cuda-h100/transformer.png",
    "rl-1m-Hopper.png": "rl/results_mujoco_1m/Hopper-v5-1000k.png",
    "rl-1m-Walker2d.png": "rl/results_mujoco_1m/Walker2d-v5-1000k.png",
    "rl-1m-HalfCheetah.png": "rl/results_mujoco_1m/HalfCheetah-v5-1000k.png",
    "rl-minatar-Breakout.png": "rl/results/MinAtar_Breakout-v1-500k.png",
    "rl-minatar-SpaceInvaders.png": "rl/results/MinAtar_SpaceInvaders-v1-500k.png",
    "supervised-curves.png": "supervised/results/curves.png",
    "sb3-Hopper.png": "sb3/results/Hopper-v5.png",
    "rl-300k-profile.png": "rl/results_protocol_300k/protocol-300k/performance_profile.png",
    "rl-300k-ablations-HalfCheetah.png": (
        "rl/results_protocol_300k/protocol-300k-ablations/curves-HalfCheetah-v5.png"
    ),
    "rl-300k-Hopper.png": "rl/results_protocol_300k/protocol-300k/curves-Hopper-v5.png",
    "rl-300k-Walker2d.png": "rl/results_protocol_300k/protocol-300k/curves-Walker2d-v5.png",
    "rl-300k-HalfCheetah.png": "rl/results_protocol_300k/protocol-300k/curves-HalfCheetah-v5.png",
    "rl-300k-HalfCheetah-entry.png": (
        "rl/results_protocol_300k_entry/protocol-300k/curves-HalfCheetah-v5.png"
    ),
    "rl-300k-Walker2d-entry.png": (
        "rl/results_protocol_300k_walker2d_entry/protocol-300k/curves-Walker2d-v5.png"
    ),
    "rl-1m-protocol-Hopper.png": "rl/results_protocol_1m/protocol-1000k/curves-Hopper-v5.png",
    "rl-1m-protocol-Walker2d.png": (
        "rl/results_protocol_1m/protocol-1000k-walker2d/curves-Walker2d-v5.png"
    ),
    "rl-1m-protocol-HalfCheetah.png": (
        "rl/results_protocol_1m/protocol-1000k-halfcheetah/curves-HalfCheetah-v5.png"
    ),
}

SOLVER_CODE = ["natgrad/rat.py", "natgrad/scores.py", "natgrad/factored.py", "natgrad/solvers"]
# results file -> (what it is, the library code whose behaviour it measures)
RESULTS = {
    "solvers/results/results.json": ("CPU solver benchmark", SOLVER_CODE),
    "solvers/results/cuda-h100/results.json": ("H100 solver benchmark", SOLVER_CODE),
    "solvers/results/cpu-memory/memory_scaling.json": ("CPU memory benchmark", SOLVER_CODE),
    "rl/results/results.json": ("RL benchmark", ["natgrad/rl", *SOLVER_CODE]),
    "rl/results_mujoco_1m/results.json": ("MuJoCo 1M-step benchmark", ["natgrad/rl", *SOLVER_CODE]),
    "solvers/results/recurrent.json": (
        "CPU recurrent-policy benchmark",
        [*SOLVER_CODE, "natgrad/layers", "natgrad/_rnn.py"],
    ),
    "solvers/results/large_batch.json": ("CPU large-batch benchmark", SOLVER_CODE),
    "solvers/results/kaczmarz.json": ("CPU Kaczmarz benchmark", SOLVER_CODE),
    "solvers/results/call_profile.json": ("CPU call profile", SOLVER_CODE),
    "solvers/results/check_cost.json": (
        "CPU cost of the refusal checks",
        [*SOLVER_CODE, "natgrad/_checks.py", "natgrad/_guard.py", "natgrad/distributions.py"],
    ),
    "solvers/results/expected_fisher_cost.json": (
        "CPU expected-Fisher cost",
        [*SOLVER_CODE, "natgrad/fisher", "natgrad/operators.py"],
    ),
    "sb3/results/results.json": ("SB3 comparison", ["natgrad/sb3", *SOLVER_CODE]),
    "rl/results/tune/mujoco.json": ("MuJoCo preset search", ["natgrad/rl", *SOLVER_CODE]),
    "rl/results/tune/mujoco-3env.json": (
        "second MuJoCo preset search",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k/protocol-300k/protocol.json": (
        "MuJoCo 300k protocol",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_preset/protocol-300k/protocol.json": (
        "MuJoCo 300k preset evaluation",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_kl_tuning/results.json": (
        "trust-region runs on tuning seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_damping_tuning/results.json": (
        "the peer's damping on tuning seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_kl/protocol-300k/protocol.json": (
        "MuJoCo 300k, max_kl 0.06 on evaluation seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_peer/protocol-300k/protocol.json": (
        "MuJoCo 300k, the peer's setting on evaluation seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_entry/protocol-300k/protocol.json": (
        "MuJoCo 300k, the preset with HalfCheetah's entry on evaluation seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_fresh/protocol-300k/protocol.json": (
        "HalfCheetah 300k, the preset's entry on fresh seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_fresh/protocol-300k-three-envs/protocol.json": (
        "MuJoCo 300k, the preset on fresh seeds, three envs",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k_walker2d_entry/protocol-300k/protocol.json": (
        "Walker2d 300k, the preset's entry on fresh seeds",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_1m/protocol-1000k/protocol.json": (
        "MuJoCo 1M protocol",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_1m/protocol-1000k-walker2d/protocol.json": (
        "MuJoCo 1M protocol, Walker2d",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_1m/protocol-1000k-hopper-rivals/protocol.json": (
        "MuJoCo 1M protocol, Hopper's cg-trpo and kfac rows",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_1m/protocol-1000k-halfcheetah/protocol.json": (
        "MuJoCo 1M protocol, HalfCheetah",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results/peer_kl.json": ("the peer's KL constraint", ["benchmarks/rl/peer_kl.py"]),
    "rl/results_protocol_300k/protocol-300k-ablations/protocol.json": (
        "MuJoCo 300k ablations",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "rl/results_protocol_300k/protocol-300k-ablations-walker2d/protocol.json": (
        "Walker2d 300k ablations",
        ["natgrad/rl", *SOLVER_CODE],
    ),
    "supervised/results/results.json": (
        "supervised benchmark",
        ["natgrad/supervised", "natgrad/solvers", "natgrad/scores.py"],
    ),
}

METHOD_ALIASES = {
    "default": "rat default: RATNaturalGradient(damping)",
    "trpo": "trpo-cg (autograd FVP)",
    "kfac": "kfac (K-FAC direction)",
    "dense": "dense fisher (P x P)",
}


# ---------------------------------------------------------------------------- loading


@functools.cache
def load(name: str):
    return json.loads((BENCH / name).read_text())


def solver_file(device: str) -> str:
    files = {"cpu": "results.json", "h100": "cuda-h100/results.json"}
    return f"solvers/results/{files[device]}"


def problem(device: str, name: str) -> dict:
    for rec in load(solver_file(device))["problems"]:
        if rec["problem"] == name:
            return rec
    raise KeyError(f"{device} results have no problem {name!r}")


def curve(device: str, name: str, damping: float, method: str) -> dict:
    curves = problem(device, name)["dampings"][str(damping)]
    return curves[METHOD_ALIASES.get(method, method)]


# ---------------------------------------------------------------------------- formatting


def ms(seconds: float | None, digits: int = 1) -> str:
    """Seconds as milliseconds, ``'-'`` for None."""
    return "-" if seconds is None else f"{1e3 * seconds:.{digits}f} ms"


def num(x: float, digits: int = 0) -> str:
    """A number with thousands separators."""
    return f"{x:,.{digits}f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.0f} MiB"


def times(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}x"


def span(values, fmt: str = "{:.0f}", sep: str = "-") -> str:
    """``'lo-hi'`` (or one value when all are equal) in the given format."""
    values = list(values)
    lo, hi = fmt.format(min(values)), fmt.format(max(values))
    return lo if lo == hi else f"{lo}{sep}{hi}"


def mean_se(values, digits: int = 1) -> str:
    values = list(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


# ---------------------------------------------------------------------------- solvers


def t99(device: str, name: str, damping: float, method: str) -> float | None:
    """Seconds to cosine >= 0.99 with the exact direction (None: never reached)."""
    return curve(device, name, damping, method)["time_to_target_s"]


def cosine(device: str, name: str, damping: float, method: str) -> float:
    """Cosine with the exact direction at the largest budget."""
    return curve(device, name, damping, method)["points"][-1]["cosine"]


def budget99(device: str, name: str, damping: float, method: str) -> int | None:
    """The smallest budget (iterations, epochs) of the grid that reached cosine 0.99."""
    for point in curve(device, name, damping, method)["points"]:
        if point["cosine"] >= 0.99:
            return point["budget"]
    return None


def max_budget(device: str, name: str, damping: float, method: str) -> int:
    return curve(device, name, damping, method)["points"][-1]["budget"]


def vanilla(device: str, name: str) -> float:
    return problem(device, name)["vanilla_backward_s"]


def params(device: str, name: str) -> int:
    return problem(device, name)["num_params"]


def samples(device: str, name: str) -> int:
    return problem(device, name)["num_samples"]


def fastest(device: str, name: str, damping: float, exclude=("default", "dense")) -> str:
    """The method with the smallest time to cosine 0.99."""
    skip = {METHOD_ALIASES.get(m, m) for m in exclude}
    curves = problem(device, name)["dampings"][str(damping)]
    timed = {m: c["time_to_target_s"] for m, c in curves.items() if c["time_to_target_s"]}
    return min((m for m in timed if m not in skip), key=timed.__getitem__)


GOAL_ROWS = {
    "cpu": ("default", ("mlp", "cnn", "transformer")),
    "h100": ("rat-cholesky [factored]", ("mlp", "cnn", "large_mlp")),
}


def ratio(device: str, name: str, damping: float, method: str, to: str = "trpo") -> float:
    """Time to cosine 0.99 of ``method`` over TRPO-CG's (``to="trpo"``) or over one
    vanilla backward pass (``to="vanilla"``)."""
    mine = t99(device, name, damping, method)
    other = vanilla(device, name) if to == "vanilla" else t99(device, name, damping, to)
    return mine / other


def goals_met(device: str, to: str = "trpo") -> str:
    """``'k of n'`` rows of the goals table that meet the goal (0.5x TRPO, 10x vanilla)."""
    method, names = GOAL_ROWS[device]
    limit = 10 if to == "vanilla" else 0.5
    hits = [ratio(device, n, d, method, to) <= limit for n in names for d in (0.01, 0.001)]
    return f"{sum(hits)} of {len(hits)}"


def t99_span(device: str, name: str, prefix: str = "rat-", unit: str = "ms") -> str:
    """Range of the times to cosine 0.99 of every method whose name starts with prefix."""
    values = [
        c["time_to_target_s"]
        for d in problem(device, name)["dampings"].values()
        for m, c in d.items()
        if m.startswith(prefix) and c["time_to_target_s"]
    ]
    return span([1e3 * v for v in values]) + " " + unit


def chol_gap_ms() -> str:
    """Largest H100 gap between Cholesky (what "auto" runs there) and the fastest method."""
    gaps = [
        t99("h100", p, d, "rat-cholesky [factored]") - t99("h100", p, d, fastest("h100", p, d))
        for p in ("mlp", "cnn", "large_mlp", "transformer")
        for d in (0.01, 0.001)
    ]
    return f"{1e3 * max(gaps):.0f} ms"


PROBLEM_TEXT = {
    "mlp": "Gaussian MLP {obs} -> 64 -> 64 -> {act}, tanh, state-independent log-std "
    "(the observation and action sizes of Walker2d and HalfCheetah)",
    "cnn": "MinAtar-sized: 4x10x10 -> Conv(16, 3x3) -> 128 -> 6 logits",
    "transformer": "16 tokens of 8 features, 2 encoder layers, d = 64, 6 logits",
    "large_mlp": "Gaussian MLP 64 -> 700 -> 700 -> 8",
}


def problems_table() -> str:
    rows = ["| problem | policy | N | P | measured on |", "|---|---|---|---|---|"]
    for name in ("mlp", "cnn", "transformer", "large_mlp"):
        devices = []
        for device, label in (("cpu", "CPU"), ("h100", "H100")):
            try:
                rec = problem(device, name)
            except KeyError:
                continue
            devices.append(label)
        text = PROBLEM_TEXT[name].format(obs=17, act=6)
        rows.append(
            f"| `{name}` | {text} | {rec['num_samples']} | {num(rec['num_params'])} | "
            f"{', '.join(devices)} |"
        )
    return block("\n".join(rows))


def met(value: float, goal: float) -> str:
    """``'met'`` when ``value <= goal``, else ``'missed'``."""
    return "met" if value <= goal else "missed"


def _goal(value: float, goal: float, digits: int) -> str:
    text = f"{value:.{digits}f}"
    return f"**{text}**" if value <= goal else f"{text} (missed)"


def goals_table() -> str:
    rows = [
        "| device | problem | damping | natgrad | TRPO-CG t99 | ratio (goal <= 0.5) | "
        "vanilla backward | multiple (goal <= 10) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for device, label, method, names in (
        ("cpu", "CPU, 1 thread", "default", ("mlp", "cnn", "transformer")),
        ("h100", "H100", "rat-cholesky [factored]", ("mlp", "cnn", "large_mlp")),
    ):
        for name in names:
            for damping in (0.01, 0.001):
                mine, trpo = t99(device, name, damping, method), t99(device, name, damping, "trpo")
                van = vanilla(device, name)
                rows.append(
                    f"| {label} | {name} | {damping:g} | {ms(mine)} | {ms(trpo)} | "
                    f"{_goal(mine / trpo, 0.5, 2)} | {ms(van)} | {_goal(mine / van, 10, 1)} |"
                )
    return block("\n".join(rows))


def compile_pairs() -> str:
    """H100 rows with and without compile=True: time to cosine 0.99."""
    rows = [
        "| problem | damping | method | eager | `compile=True` | compiled / eager |",
        "|---|---|---|---|---|---|",
    ]
    for rec in load(solver_file("h100"))["problems"]:
        for damping, curves in rec["dampings"].items():
            for method, data in curves.items():
                if not method.endswith(", compile]"):
                    continue
                eager = curves[method.replace(", compile]", "]")]["time_to_target_s"]
                compiled = data["time_to_target_s"]
                if not (eager and compiled):
                    continue
                short = method.replace(" [factored, compile]", "")
                rows.append(
                    f"| {rec['problem']} | {damping} | {short} | {ms(eager)} | {ms(compiled)} | "
                    f"{compiled / eager:.2f} |"
                )
    return block("\n".join(rows))


def compile_ratios() -> list[float]:
    out = []
    for rec in load(solver_file("h100"))["problems"]:
        for curves in rec["dampings"].values():
            for method, data in curves.items():
                eager = curves.get(method.replace(", compile]", "]"), {}).get("time_to_target_s")
                if method.endswith(", compile]") and eager and data["time_to_target_s"]:
                    out.append(data["time_to_target_s"] / eager)
    return out


def memory_h100_table() -> str:
    mem = load(solver_file("h100"))["memory"]
    ref = {
        "streaming": "`b x P x 4` bytes = {b}; `N x P x 4` bytes = {n}",
        "factored": "layer inputs and output gradients only",
        "materialized": "holds `J` ({n}) plus the chunks it is assembled from",
    }
    rows = ["| backend | peak extra | reference |", "|---|---|---|"]
    for backend in ("streaming", "factored", "materialized"):
        text = ref[backend].format(
            b=mib(mem["block (256) x P x 4 bytes"]), n=mib(mem["N x P x 4 bytes"])
        )
        rows.append(f"| {backend} | {mib(mem[backend])} | {text} |")
    return block("\n".join(rows))


def memory_rows() -> list[dict]:
    return load("solvers/results/cpu-memory/memory_scaling.json")["rows"]


def memory_cpu(backend: str, n: int, b: int) -> float:
    for row in memory_rows():
        if (row["backend"], row["N"], row["block_size"]) == (backend, n, b):
            return row["peak_extra_bytes"]
    raise KeyError((backend, n, b))


def memory_cpu_table() -> str:
    rows = [
        "| backend | N | block b | peak extra | `N x P x 4` B | `b x P x 4` B |",
        "|---|---|---|---|---|---|",
    ]
    for r in memory_rows():
        rows.append(
            f"| {r['backend']} | {r['N']} | {r['block_size']} | {mib(r['peak_extra_bytes'])} | "
            f"{mib(r['N*P*4'])} | {mib(r['b*P*4'])} |"
        )
    return block("\n".join(rows))


def recurrent_records() -> list[dict]:
    return load("solvers/results/recurrent.json")["records"]


def recurrent_table() -> str:
    rows = [
        "| policy | N x T | P | damping | natgrad | TRPO-CG (iterations to 0.99) | ratio "
        "(goal <= 1, aim 0.5) | vanilla backward | before issue 12 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in recurrent_records():
        m = r["methods"]
        trpo = next(v for k, v in m.items() if k.startswith("trpo-cg"))
        rat = m["rat default"]["median_s"]
        ratio = rat / trpo["median_s"]
        rows.append(
            f"| {r['problem'].upper()} | {r['num_samples']} x {r['steps']} | "
            f"{num(r['num_params'])} | {r['damping']:g} | {ms(rat)} | "
            f"{ms(trpo['median_s'])} ({r['trpo_budget_to_target']}) | {_goal(ratio, 1.0, 2)} | "
            f"{ms(m['vanilla backward']['median_s'])} | "
            f"{ms(m['rat before issue 12 (materialized, fused kernel)']['median_s'], 0)} |"
        )
    return block("\n".join(rows))


def recurrent_ratios() -> list[float]:
    return [r["ratio_rat_to_trpo"] for r in recurrent_records()]


def kaczmarz_row(problem: str, damping: float) -> dict:
    for r in load("solvers/results/kaczmarz.json")["rows"]:
        if (r["problem"], r["damping"]) == (problem, damping):
            return r
    raise KeyError((problem, damping))


def kaczmarz_variant(problem: str, damping: float, variant: str) -> dict:
    """One solver's entry of a Kaczmarz-variants row (one subscript in a fig expression)."""
    return kaczmarz_row(problem, damping)[variant]


def kaczmarz_table() -> str:
    rows = [
        "| problem | damping | default (CG) | `kaczmarz`: epochs to 0.99 | time | x default "
        "| `accelerated_kaczmarz`: epochs to 0.99 | time | x default |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in load("solvers/results/kaczmarz.json")["rows"]:
        cells = [f"`{r['problem']}`", f"{r['damping']:g}", ms(r["default"]["seconds"], 0)]
        for variant in ("kaczmarz", "accelerated_kaczmarz"):
            v = r[variant]
            if v["reached"]:
                cells += [
                    str(v["epochs"]),
                    ms(v["seconds"], 0),
                    _goal(v["ratio_to_default"], 1.5, 1),
                ]
            else:
                cells += [f"> {v['epochs']}", "-", "-"]
        rows.append("| " + " | ".join(cells) + " |")
    return block("\n".join(rows))


PROFILE_ORDER = ("mlp", "cnn", "transformer")
PROFILE_PHASES = {
    "validate": "checks + forward",
    "capture": "factor capture",
    "per_sample_rows": "per-sample rows",
    "verify": "verification",
    "preconditioner": "preconditioner",
    "solve": "solve",
    "other": "other",
}


def profile_rows() -> list[dict]:
    rows = load("solvers/results/call_profile.json")["rows"]
    return sorted(rows, key=lambda r: (PROFILE_ORDER.index(r["problem"]), r["N"]))


def profile_row(problem: str, num_samples: int) -> dict:
    """One row of the call profile (one subscript in a fig expression)."""
    for r in profile_rows():
        if (r["problem"], r["N"]) == (problem, num_samples):
            return r
    raise KeyError((problem, num_samples))


def profile_call(problem: str, num_samples: int) -> dict:
    """The default call's entry of a call-profile row."""
    return profile_row(problem, num_samples)["natgrad"]


def profile_trpo(problem: str, num_samples: int) -> dict:
    """TRPO-CG's entry of a call-profile row."""
    return profile_row(problem, num_samples)["trpo"]


def in_backwards(problem: str, num_samples: int, phase: str) -> str:
    """A phase's time in vanilla backward passes of the same batch."""
    row = profile_row(problem, num_samples)
    return f"{row['natgrad']['phases'][phase] / row['backward_seconds']:.1f}"


def profile_phase(problem: str, num_samples: int, phase: str) -> float:
    """Seconds of one phase of the default call."""
    return profile_row(problem, num_samples)["natgrad"]["phases"][phase]


def profile_table() -> str:
    """Phases of one default call, beside one vanilla backward and TRPO-CG to cosine 0.99."""
    heads = " | ".join(PROFILE_PHASES.values())
    rows = [
        f"| problem | N | P | solver (iterations) | natgrad | {heads} | fixed share | "
        "vanilla backward | x backward (goal <= 10) | TRPO-CG to 0.99 | x TRPO-CG (goal <= 0.4) |",
        "|---" * (10 + len(PROFILE_PHASES)) + "|",
    ]
    for r in profile_rows():
        call = r["natgrad"]
        phases = " | ".join(ms(call["phases"][k]) for k in PROFILE_PHASES)
        trpo = r["trpo"]
        reached = "" if trpo["reached"] else " (not reached)"
        rows.append(
            f"| `{r['problem']}` | {num(r['N'])} | {num(r['P'])} | {call['solver']} "
            f"({call['iterations']}) | {ms(call['seconds'])} | {phases} | "
            f"{100 * r['fixed_share']:.0f} % | {ms(r['backward_seconds'], 2)} | "
            f"{_goal(r['natgrad_over_backward'], 10, 1)} | {ms(trpo['seconds'])} "
            f"({trpo['iterations']} it.){reached} | {_goal(r['natgrad_over_trpo'], 0.4, 2)} |"
        )
    return block("\n".join(rows))


def check_cost_rows() -> list[dict]:
    """Rows of ``benchmarks/solvers/check_cost.py``, in the call profile's order."""
    rows = load("solvers/results/check_cost.json")["rows"]
    return sorted(rows, key=lambda r: (PROFILE_ORDER.index(r["problem"]), r["N"]))


def check_cost_table() -> str:
    """One default call with and without each refusal check (CPU)."""
    rows = [
        "| problem | N | P | backend | call with both checks | without the value check | "
        "value check's share | without the differentiability check | "
        "differentiability check's share |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in check_cost_rows():
        t = r["seconds"]
        rows.append(
            f"| `{r['problem']}` | {num(r['N'])} | {num(r['P'])} | {r['backend']} | "
            f"{ms(t['with_checks'])} | {ms(t['without_value_check'])} | "
            f"{100 * r['value_check_share']:.0f} % | {ms(t['without_differentiable_check'])} | "
            f"{100 * r['differentiable_check_share']:.0f} % |"
        )
    return block("\n".join(rows))


def crossover_table() -> str:
    """``solver="cg"`` against ``solver="cholesky"`` on small batches (CPU)."""
    rows = [
        "| problem | N | `cg` (iterations) | `cholesky` | cholesky / cg | `auto` picks |",
        "|---|---|---|---|---|---|",
    ]
    import torch

    from natgrad.solvers.dispatch import auto_solver

    data = load("solvers/results/call_profile.json")["crossover"]
    for r in sorted(data, key=lambda r: (PROFILE_ORDER.index(r["problem"]), r["N"])):
        picks = auto_solver(torch.device("cpu"), "factored", r["N"], 256)
        rows.append(
            f"| `{r['problem']}` | {num(r['N'])} | {ms(r['cg']['seconds'])} "
            f"({r['cg']['iterations']}) | {ms(r['cholesky']['seconds'])} | "
            f"{r['cholesky_over_cg']:.2f} | {picks} |"
        )
    return block("\n".join(rows))


def crossover_row(problem: str, num_samples: int) -> dict:
    for r in load("solvers/results/call_profile.json")["crossover"]:
        if (r["problem"], r["N"]) == (problem, num_samples):
            return r
    raise KeyError((problem, num_samples))


def crossover_ratios(below: int | None = None, at_least: int | None = None) -> list[float]:
    """Cholesky / CG time ratios of the crossover rows with ``N < below`` or ``N >= at_least``."""
    data = load("solvers/results/call_profile.json")["crossover"]
    return [
        r["cholesky_over_cg"]
        for r in data
        if (below is None or r["N"] < below) and (at_least is None or r["N"] >= at_least)
    ]


def tune_trials(family: str) -> list[dict]:
    return load(f"rl/results/tune/{family}.json")["trials"]


def tune_best_other(family: str) -> float:
    """Objective of the best trial other than the defaults' (trial 0)."""
    return max(t["value"] for t in tune_trials(family) if t["number"] != 0)


def tune_trial(family: str, number: int) -> dict:
    for t in tune_trials(family):
        if t["number"] == number:
            return t
    raise KeyError((family, number))


def tune_ratio(family: str, number: int, env: str) -> str:
    """A trial's final return on ``env`` over the defaults' (trial 0), as ``'1.23x'``."""
    run = tune_trial(family, number)["returns"]
    base = tune_trial(family, 0)["returns"]
    (key,) = [k for k in run if k.startswith(f"{env}/")]
    return f"{run[key] / base[key]:.2f}x"


def tune_param(family: str, number: int, name: str) -> str:
    value = tune_trial(family, number)["params"][name]
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def tune_env_ratio(study: str, number: int, env: str) -> float:
    """A trial's final return over the defaults' (trial 0) on ``env``, mean over seeds."""
    run, base = tune_trial(study, number)["returns"], tune_trial(study, 0)["returns"]
    keys = [k for k in run if k.startswith(f"{env}/")]
    return statistics.fmean(run[k] / base[k] for k in keys)


def tune_table(study: str) -> str:
    """Every trial of a search, best first: its settings, per-env ratios, objective."""
    info = load(f"rl/results/tune/{study}.json")
    names = list(info["space"])
    envs = info["envs"]
    lines = [
        "| trial | " + " | ".join(f"`{n}`" for n in names) + " | "
        + " | ".join(e.removesuffix("-v5") for e in envs) + " | objective |",
        "|---" * (2 + len(names) + len(envs)) + "|",
    ]  # fmt: skip
    for t in sorted(info["trials"], key=lambda t: -t["value"]):
        params = [tune_param(study, t["number"], n) for n in names]
        ratios = [f"{tune_env_ratio(study, t['number'], e):.2f}" for e in envs]
        lines.append(f"| {t['number']} | " + " | ".join(params + ratios) + f" | {t['value']:.2f} |")
    return block("\n".join(lines))


def tune_small_damping(family: str, at_most: float) -> list[float]:
    """Objectives of the trials with ``damping <= at_most``."""
    return [t["value"] for t in tune_trials(family) if t["params"]["damping"] <= at_most]


def large_batch_rows(problem: str | None = None) -> list[dict]:
    rows = load("solvers/results/large_batch.json")["rows"]
    return sorted(
        (r for r in rows if problem is None or r["problem"] == problem),
        key=lambda r: (r["problem"], r["N"]),
    )


def largest_batch_row(problem: str) -> dict:
    """The large-batch row with the largest ``N`` for one problem."""
    return large_batch_rows(problem)[-1]


def large_batch_table() -> str:
    rows = [
        "| problem | N | P | solver / backend | iterations | natgrad | per sample | "
        "vanilla backward | multiple | peak extra memory | dense `J` (`N x P x 4` B) | "
        "`N x N` float64 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in large_batch_rows():
        rows.append(
            f"| `{r['problem']}` | {num(r['N'])} | {num(r['P'])} | {r['solver']} / "
            f"{r['backend']} | {r['iterations']} | {ms(r['rat_seconds'], 0)} | "
            f"{r['rat_us_per_sample']:.0f} us | {ms(r['backward_seconds'])} | "
            f"{times(r['rat_over_backward'])} | {mib(r['peak_extra_bytes'])} | "
            f"{mib(r['dense_rows_bytes'])} | {mib(r['gram_bytes'])} |"
        )
    return block("\n".join(rows))


EXPECTED_COST = "solvers/results/expected_fisher_cost.json"
EXPECTED_VARIANTS = {
    "sampled": '`fisher="sampled"` (default)',
    "expected": '`fisher="expected"`, matrix-free',
    "expected_materialized": '`fisher="expected"`, `backend="materialized"`',
    "trpo_kl_cg": "TRPO: 10 CG iterations on KL-Hessian products",
}


def expected_cost_row(policy: str) -> dict:
    """One policy's row of the expected-Fisher cost benchmark."""
    for row in load(EXPECTED_COST)["rows"]:
        if row["policy"] == policy:
            return row
    raise KeyError(policy)


def expected_cost_ratio(policy: str, numerator: str, denominator: str) -> float:
    row = expected_cost_row(policy)
    return row[numerator]["seconds"] / row[denominator]["seconds"]


def expected_rows_shape(policy: str) -> str:
    """``N m x P`` of a policy's expected-Fisher rows (``m = 2 x`` action dimension)."""
    row = expected_cost_row(policy)
    return f"`{num(row['num_samples'] * 2 * row['act_dim'])} x {num(row['num_params'])}`"


def expected_cost_table() -> str:
    rows = load(EXPECTED_COST)["rows"]
    head = " | ".join(
        f"{r['policy']} ({r['obs_dim']} obs, {r['act_dim']} actions, P = {num(r['num_params'])})"
        for r in rows
    )
    lines = [
        f"| call (N = {num(rows[0]['num_samples'])}) | {head} |",
        "|---" * (1 + len(rows)) + "|",
    ]
    for key, label in EXPECTED_VARIANTS.items():
        cells = []
        for r in rows:
            entry = r[key]
            detail = (
                f"{entry['iterations']} it."
                if entry.get("solver") is None
                else (f"{entry['solver']}, {entry['iterations']} it.")
            )
            multiple = entry["seconds"] / r["backward"]["seconds"]
            cells.append(f"{ms(entry['seconds'])} ({detail}, {times(multiple)} a backward)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return block("\n".join(lines))


def per_sample_growth(problem: str) -> float:
    """Time per sample at the largest N over the smallest (1 = linear in N)."""
    rows = large_batch_rows(problem)
    return rows[-1]["rat_us_per_sample"] / rows[0]["rat_us_per_sample"]


# ---------------------------------------------------------------------------- SB3


def sb3() -> dict:
    return load("sb3/results/results.json")


def sb3_table() -> str:
    data = sb3()
    names = {"trpo": "`sb3_contrib.TRPO`", "rat_trpo": "`natgrad.sb3.RATTRPO`"}
    rows = [
        "| algorithm | runs | final return, IQM [95% CI] | evaluation return, IQM [95% CI] "
        "| mean return over the run (AUC), IQM [95% CI] | per-seed final returns | "
        "update (`train()`) median | run wall time median |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def ci(entry: dict) -> str:
        i = entry["iqm"]
        return f"{i['estimate']:.0f} [{i['low']:.0f}, {i['high']:.0f}]"

    for algo, row in data["algorithms"].items():
        finals = ", ".join(f"{v:.0f}" for v in row["final_return"]["per_seed"])
        rows.append(
            f"| {names[algo]} | {row['runs']} | {ci(row['final_return'])} | "
            f"{ci(row['eval_return'])} | {ci(row['auc_return'])} | {finals} | "
            f"{ms(row['update_seconds_median'], 0)} | {row['wall_seconds_median']:.0f} s |"
        )
    return block("\n".join(rows))


def sb3_iqm(algo: str, key: str = "final_return") -> float:
    return sb3()["algorithms"][algo][key]["iqm"]["estimate"]


def sb3_reading() -> str:
    """One paragraph read off the table: interval overlap per score, update-time ratio."""
    algos = sb3()["algorithms"]
    if set(algos) != {"trpo", "rat_trpo"}:
        return block("The comparison is incomplete: " + ", ".join(algos) + " only.")
    parts = []
    for key, what in (("final_return", "final"), ("eval_return", "evaluation"),
                      ("auc_return", "AUC")):  # fmt: skip
        r, t = algos["rat_trpo"][key]["iqm"], algos["trpo"][key]["iqm"]
        higher = "RATTRPO" if r["estimate"] > t["estimate"] else "TRPO"
        if r["low"] > t["high"] or t["low"] > r["high"]:
            parts.append(f"{what}: {higher} higher, the intervals do not overlap")
        else:
            parts.append(f"{what}: {higher} higher, but the intervals overlap")
    runs = f"{algos['rat_trpo']['runs']} (RATTRPO) and {algos['trpo']['runs']} (TRPO) seeds"
    return block(
        f"Reading it: {'; '.join(parts)}. With {runs} an overlap means the difference is not "
        "established (with so few runs the IQM is close to the mean and the interval close "
        "to the range of the seeds). A `RATTRPO` update took "
        f"{sb3_update_ratio():.2f}x the time of a TRPO update (medians over all updates of "
        "all runs; most of either is the critic's 20 regression epochs, which are the same "
        "code in both). The runs alternated between the two algorithms on a machine shared "
        "with other jobs whose load changed over the hours of the benchmark, which moves whole "
        "runs' wall times by tens of percent: read the update times, not the wall times, for "
        "speed."
    )


def sb3_update_ratio() -> float:
    algos = sb3()["algorithms"]
    return algos["rat_trpo"]["update_seconds_median"] / algos["trpo"]["update_seconds_median"]


# ---------------------------------------------------------------------------- RL


def rl_runs(env: str, algo: str, steps: int = 100_000, results: str = "results") -> list[dict]:
    runs = [
        r
        for r in load(f"rl/{results}/results.json")["runs"]
        if r["env"] == env and r["algo"] == algo and r["steps"] == steps
    ]
    if not runs:
        raise KeyError(f"no runs for {env} {algo} {steps} in rl/{results}")
    return runs


def rl_final(env: str, algo: str, steps: int = 100_000, results: str = "results", digits=1):
    return mean_se((r["final_return"] for r in rl_runs(env, algo, steps, results)), digits)


def rl_finals(env: str, algo: str, steps: int = 100_000, results: str = "results", digits=0):
    runs = sorted(rl_runs(env, algo, steps, results), key=lambda r: r["seed"])
    return " / ".join(f"{r['final_return']:.{digits}f}" for r in runs)


def rl_mean_wall(env: str, algo: str, steps: int = 100_000, results: str = "results") -> str:
    runs = rl_runs(env, algo, steps, results)
    return f"{statistics.fmean(r['wall_time'] for r in runs):.1f}"


def rl_wall_range(env: str, algo: str, steps: int = 100_000, results: str = "results") -> str:
    return span(r["wall_time"] for r in rl_runs(env, algo, steps, results))


def _mean_and_se(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))


def rl_close(a: str, b: str, envs, steps: int = 100_000, close: bool = True) -> str:
    """Envs where the final returns of algos a and b are (``close``) or are not within the
    sum of their standard errors of each other."""
    out = []
    for env in envs:
        ma, sa = _mean_and_se(r["final_return"] for r in rl_runs(env, a, steps))
        mb, sb = _mean_and_se(r["final_return"] for r in rl_runs(env, b, steps))
        if (abs(ma - mb) <= sa + sb) == close:
            out.append(env.split("-v")[0])
    return ", ".join(out) if out else "none"


def rl_solved(env: str, algo: str, steps: int = 100_000) -> str:
    """Mean steps to the env's threshold over seeds, 'never' if a seed did not reach it."""
    runs = rl_runs(env, algo, steps)
    values = [r["steps_to_threshold"] for r in runs]
    if any(v is None for v in values):
        return "never" if all(v is None for v in values) else "not every seed"
    return num(statistics.fmean(values))


def rl_solved_range(env: str, algo: str, steps: int = 100_000) -> str:
    return span((r["steps_to_threshold"] for r in rl_runs(env, algo, steps)), "{:,.0f}", "–")


def rl_table(envs, algos, steps: int = 100_000, digits=None, solved_rows=()) -> str:
    names = [f"`{a}`" + (" (peer)" if a == "sb3-trpo" else "") for a in algos]
    header = "| env | " + " | ".join(names)
    rows = [header + " |", "|---|" + "---|" * len(algos)]
    for env in envs:
        cells = []
        for algo in algos:
            try:
                cells.append(rl_final(env, algo, steps, digits=(digits or {}).get(env, 1)))
            except KeyError:
                cells.append("")
        rows.append(f"| {env} | " + " | ".join(cells) + " |")
        if env in solved_rows:
            threshold = solved_rows[env]
            cells = []
            for algo in algos:
                try:
                    cells.append(rl_solved(env, algo, steps))
                except KeyError:
                    cells.append("")
            rows.append(f"| — steps to {threshold} | " + " | ".join(cells) + " |")
    return block("\n".join(rows))


def rl_100k_table() -> str:
    algos = ["rat-npg", "rat-trpo", "cg-trpo", "kfac", "ppo", "a2c", "sb3-trpo"]
    envs = ["CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Hopper-v5", "Walker2d-v5"]
    envs.append("HalfCheetah-v5")
    digits = {"Hopper-v5": 0, "Walker2d-v5": 0, "HalfCheetah-v5": 0}
    return rl_table(envs, algos, 100_000, digits, {"CartPole-v1": 475, "Acrobot-v1": -100})


def rl_300k_table() -> str:
    algos = ["rat-npg", "cg-trpo", "sb3-trpo"]
    envs = ["Hopper-v5", "Walker2d-v5"]
    text = rl_table(envs, algos, 300_000, {"Hopper-v5": 0, "Walker2d-v5": 0})
    walls = " | ".join(
        span(r["wall_time"] for e in ("Hopper-v5", "Walker2d-v5") for r in rl_runs(e, a, 300_000))
        for a in algos
    )
    return block(text.strip("\n") + f"\n| — wall time per run (s) | {walls} |")


KL_TUNING = "results_kl_tuning"
PEER_KL = "rl/results/peer_kl.json"


def peer_kl(env: str, key: str = "effective_max_kl") -> float:
    """A figure of ``peer_kl.json``: sb3-contrib TRPO's KL constraint in natgrad's units."""
    return load(PEER_KL)["envs"][env][key]


def natgrad_default_max_kl() -> float:
    """natgrad's default ``max_kl``, as ``peer_kl.py`` recorded it."""
    return load(PEER_KL)["natgrad_default_max_kl"]


def peer_kl_table() -> str:
    """The peer's ``target_kl`` and ``cg_damping`` per env and what they are in natgrad's units."""
    data = load(PEER_KL)
    if not data["train_constrains_mean_of_kl_divergence"]:
        raise ValueError(f"{PEER_KL}: sb3-contrib's TRPO.train no longer takes the mean KL")
    if not data["hessian_vector_product_adds_cg_damping"]:
        raise ValueError(f"{PEER_KL}: sb3-contrib's TRPO no longer damps its KL Hessian")
    lines = [
        "| env | action dimensions | whole / constrained KL | rl-zoo `target_kl` | "
        "as natgrad's `max_kl` | rl-zoo `cg_damping` | as natgrad's `damping` |",
        "|---|---|---|---|---|---|---|",
    ]
    for env, row in data["envs"].items():
        lines.append(
            f"| {env} | {row['action_dim']} | {row['ratio']:.2f} | {row['zoo_target_kl']:g} | "
            f"{row['effective_max_kl']:.2f} | {row['zoo_cg_damping']:g} | "
            f"{row['effective_damping']:.2f} |"
        )
    return block("\n".join(lines))


KL_TUNING_ROWS = {
    "HalfCheetah-v5": [
        "rat-npg",
        "rat-npg+max_kl=0.06",
        "rat-npg+max_kl=0.12",
        "rat-npg+max_kl=0.24",
        "rat-npg+num_envs=2+num_steps=1024+max_kl=0.04+critic_epochs=20+critic_minibatch=128",
        "cg-trpo+num_envs=2+num_steps=1024+max_kl=0.04+critic_epochs=20+critic_minibatch=128"
        "+cg_iters=25",
        "cg-trpo+num_envs=2+num_steps=1024+critic_epochs=20+critic_minibatch=128+max_kl=0.24"
        "+cg_iters=25",
        "rat-trpo+num_envs=2+num_steps=1024+critic_epochs=20+critic_minibatch=128+max_kl=0.24",
        "rat-npg+num_envs=2+num_steps=1024+critic_epochs=20+critic_minibatch=128+max_kl=0.24",
        "sb3-trpo",
    ],
    "Hopper-v5": ["rat-npg", "rat-npg+max_kl=0.03", "rat-npg+max_kl=0.06"],
    "Walker2d-v5": ["rat-npg", "rat-npg+max_kl=0.06", "rat-npg+max_kl=0.12"],
}


def kl_tuning_table() -> str:
    rows = [(env, algo) for env, algos in KL_TUNING_ROWS.items() for algo in algos]
    return tuning_table(KL_TUNING, rows)


def _tuning_final(env: str, algo: str, results: str = "results_kl_tuning") -> float:
    """Mean final return of ``algo`` at 300k steps over the runs in ``results``."""
    return statistics.fmean(r["final_return"] for r in rl_runs(env, algo, 300_000, results))


def kl_tuning_mean(env: str, algo: str) -> str:
    """Mean final return of ``algo`` on the tuning seeds of ``results_kl_tuning``."""
    return num(_tuning_final(env, algo))


def kl_tuning_ratio(env: str, algo: str, reference: str = "rat-npg") -> str:
    """Mean final return of ``algo`` over ``reference``'s on the tuning seeds."""
    return f"{_tuning_final(env, algo) / _tuning_final(env, reference):.2f}"


DAMPING_TUNING = "results_damping_tuning"
_PEER_LAYOUT = "num_envs=2+num_steps=1024+critic_epochs=20+critic_minibatch=128"
DAMPING_TUNING_ROWS = {
    "HalfCheetah-v5": [
        f"rat-npg+{_PEER_LAYOUT}+max_kl=0.24+damping=0.6",
        f"rat-npg+{_PEER_LAYOUT}+max_kl=0.12+damping=0.6",
        "sb3-trpo",
    ],
    "Walker2d-v5": [
        "rat-npg",
        "rat-npg+max_kl=0.04",
        f"rat-npg+{_PEER_LAYOUT}+max_kl=0.03+damping=0.6",
        "sb3-trpo",
    ],
}


def damping_tuning_table(env: str = "HalfCheetah-v5") -> str:
    """``env`` on tuning seeds 1000-1007: the candidate entries beside the peer."""
    rows = [(env, algo) for algo in DAMPING_TUNING_ROWS[env]]
    return tuning_table(DAMPING_TUNING, rows, reference="sb3-trpo")


def damping_tuning_ratio(algo: str, env: str = "HalfCheetah-v5") -> str:
    """Mean final return of ``algo`` over the peer's on the same tuning seeds."""
    ratio = _tuning_final(env, algo, DAMPING_TUNING) / _tuning_final(
        env, "sb3-trpo", DAMPING_TUNING
    )
    return f"{ratio:.2f}"


def tuning_wall(env: str, algo: str) -> str:
    """Median wall time per run of ``algo`` on ``env`` in the damping-tuning results."""
    runs = rl_runs(env, algo, 300_000, DAMPING_TUNING)
    return f"{statistics.median(r['wall_time'] for r in runs):.0f} s"


def tuning_table(results: str, rows, steps: int = 300_000, reference: str = "rat-npg") -> str:
    """Runs on tuning seeds: per-seed final returns, their mean, and the mean's ratio to
    ``reference`` on the same env and seeds; ``rows`` are ``(env, algo)`` pairs."""
    lines = [
        f"| env | row | seeds | final return per seed | mean | ÷ `{reference}` |",
        "|---|---|---|---|---|---|",
    ]
    for env, algo in rows:
        runs = sorted(rl_runs(env, algo, steps, results), key=lambda r: r["seed"])
        seeds = [r["seed"] for r in runs]
        base = {r["seed"]: r["final_return"] for r in rl_runs(env, reference, steps, results)}
        if not set(seeds) <= set(base):
            raise KeyError(f"{results}: {env} {reference} lacks seeds of {algo}")
        mean = statistics.fmean(r["final_return"] for r in runs)
        ratio = mean / statistics.fmean(base[s] for s in seeds)
        finals = " / ".join(f"{r['final_return']:,.0f}" for r in runs)
        lines.append(f"| {env} | `{algo}` | {span(seeds)} | {finals} | {mean:,.0f} | {ratio:.2f} |")
    return block("\n".join(lines))


PROTOCOL_300K = "rl/results_protocol_300k/protocol-300k/protocol.json"
ABLATIONS_300K = "rl/results_protocol_300k/protocol-300k-ablations/protocol.json"
WALKER_ABLATIONS_300K = "rl/results_protocol_300k/protocol-300k-ablations-walker2d/protocol.json"
PRESET_300K = "rl/results_protocol_300k_preset/protocol-300k/protocol.json"
KL_300K = "rl/results_protocol_300k_kl/protocol-300k/protocol.json"
PEER_300K = "rl/results_protocol_300k_peer/protocol-300k/protocol.json"
ENTRY_300K = "rl/results_protocol_300k_entry/protocol-300k/protocol.json"
FRESH_300K = "rl/results_protocol_300k_fresh/protocol-300k/protocol.json"
FRESH3_300K = "rl/results_protocol_300k_fresh/protocol-300k-three-envs/protocol.json"
WALKER_ENTRY_300K = "rl/results_protocol_300k_walker2d_entry/protocol-300k/protocol.json"
PROTOCOL_1M = "rl/results_protocol_1m/protocol-1000k/protocol.json"
PROTOCOL_1M_WALKER = "rl/results_protocol_1m/protocol-1000k-walker2d/protocol.json"
PROTOCOL_1M_HOPPER_RIVALS = "rl/results_protocol_1m/protocol-1000k-hopper-rivals/protocol.json"
PROTOCOL_1M_HALFCHEETAH = "rl/results_protocol_1m/protocol-1000k-halfcheetah/protocol.json"


def protocol_row(name: str, env: str, algo: str) -> dict:
    """One env x algo row of a ``protocol.json`` (benchmarks/rl/protocol.py)."""
    for row in load(name)["rows"]:
        if row["env"] == env and row["algo"] == algo:
            return row
    raise KeyError(f"{name}: no row {env} x {algo}")


def _iqm_ci(figure: dict | None, digits: int = 0) -> str:
    if figure is None:
        return "n/a"
    e, lo, hi = figure["estimate"], figure["low"], figure["high"]
    return f"{e:,.{digits}f} [{lo:,.{digits}f}, {hi:,.{digits}f}]"


def protocol_table(name: str) -> str:
    """The protocol's rows: IQM [95 % CI] of final return and AUC, spread, wall time."""
    data = load(name)
    lines = [
        "| env | algo | seeds | final return, IQM [95% CI] | spread across seeds (IQR) | "
        "mean return over the run (AUC), IQM [95% CI] | wall time per run (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["rows"]:
        spread = row["iqr_final_return"]
        lines.append(
            f"| {row['env']} | `{row['algo']}` | {len(row['seeds'])} | "
            f"{_iqm_ci(row['final_return'])} | {'n/a' if spread is None else num(spread)} | "
            f"{_iqm_ci(row['auc'])} | {row['median_wall_time']:.0f} s |"
        )
    return block("\n".join(lines))


def protocol_ratio_table(name: str) -> str:
    """Mean final return of each algo relative to the protocol's reference, per env."""
    data = load(name)
    envs = data["envs"]

    def cell(figure: dict | None) -> str:
        if figure is None:
            return "n/a"
        return f"{figure['ratio']:.2f} [{figure['low']:.2f}, {figure['high']:.2f}]"

    lines = [
        f"| algo (÷ `{data['reference']}`) | " + " | ".join(envs) + " | mean over the envs |",
        "|---|" + "---|" * (len(envs) + 1),
    ]
    for algo, ratio in data["ratios"].items():
        cells = " | ".join(cell(ratio["per_env"].get(env)) for env in envs)
        lines.append(f"| `{algo}` | {cells} | {cell(ratio['mean'])} |")
    return block("\n".join(lines))


def protocol_ratio(name: str, algo: str, env: str | None = None, key: str = "ratio") -> str:
    """One ratio (``key``: ``ratio``, ``low`` or ``high``) of ``algo`` to the reference, on
    ``env`` or (``None``) averaged over the envs."""
    ratio = load(name)["ratios"][algo]
    figure = ratio["mean"] if env is None else ratio["per_env"][env]
    return f"{figure[key]:.2f}"


def mean_of_ratios(algo: str, *cells: tuple[str, str]) -> str:
    """Mean of ``algo``'s ratios to the reference over ``(protocol, env)`` cells, which may
    come from protocols of different seeds (a point estimate: no interval)."""
    ratios = [load(name)["ratios"][algo]["per_env"][env]["ratio"] for name, env in cells]
    return f"{statistics.fmean(ratios):.2f}"


def _spread(values: list[float]) -> float | None:
    """75th minus 25th percentile (linear), as ``protocol.py`` computes the IQR."""
    if len(values) < 2:
        return None
    low, _, high = statistics.quantiles(values, n=4, method="inclusive")  # numpy's "linear"
    return high - low


def protocol_goal_table(
    *names: str,
    rivals: tuple[str, ...] = ("sb3-trpo", "cg-trpo", "kfac"),
    today: str = "rl/results_mujoco_1m/results.json",
) -> str:
    """Issue 13's second goal per env of the protocols ``names``: the best RAT row's IQM
    against each rival's, and its spread across seeds against ``today``'s ``rat-npg`` runs
    (the table the goal refers to). An env's rows may come from several protocols (e.g.
    the rivals' runs evaluated later); a later protocol's row wins.

    ``met``: every rival was run and none has a higher IQM (point estimates; the intervals
    are in the cells); ``missed``: a rival's IQM is higher; ``open``: a rival is not run yet.
    """
    earlier = load(today)["runs"]
    header = " | ".join(f"`{r}`" for r in rivals)
    lines = [
        f"| env | best RAT row, IQM [95% CI] | {header} | IQR: best RAT row / today's "
        "`rat-npg` | IQM goal |",
        "|---|---|" + "---|" * len(rivals) + "---|---|",
    ]
    pooled: dict[str, dict[str, dict]] = {}  # env -> algo -> row, over every protocol
    for name in names:
        for row in load(name)["rows"]:
            pooled.setdefault(row["env"], {})[row["algo"]] = row
    for env, rows in pooled.items():
        rat = [row for algo, row in rows.items() if algo.startswith("rat-")]
        if not rat:
            continue
        best = max(rat, key=lambda row: row["final_return"]["estimate"])
        cells, verdict = [], "met"
        for rival in rivals:
            if rival not in rows:
                cells.append("not run")
                verdict = "open" if verdict == "met" else verdict
                continue
            cells.append(_iqm_ci(rows[rival]["final_return"]))
            if rows[rival]["final_return"]["estimate"] > best["final_return"]["estimate"]:
                verdict = "missed"
        before = _spread([r["final_return"] for r in earlier
                          if r["env"] == env and r["algo"] == "rat-npg"])  # fmt: skip
        spread = best["iqr_final_return"]
        spreads = f"{'n/a' if spread is None else num(spread)} / " + (
            "n/a" if before is None else num(before)
        )
        lines.append(
            f"| {env} | `{best['algo']}` {_iqm_ci(best['final_return'])} | "
            + " | ".join(cells)
            + f" | {spreads} | {verdict} |"
        )
    return block("\n".join(lines))


def paired_finals(new: str, old: str, env: str, algo: str) -> list[tuple[float, float]]:
    """Final returns of ``algo`` on ``env`` in two protocols, paired by seed (seeds both have)."""
    before = {r["seed"]: r["final_return"] for r in protocol_row(old, env, algo)["per_seed"]}
    after = {r["seed"]: r["final_return"] for r in protocol_row(new, env, algo)["per_seed"]}
    return [(after[s], before[s]) for s in sorted(after) if s in before]


def paired_ratio(new: str, old: str, env: str, algo: str) -> str:
    """Mean final return in ``new`` over the mean in ``old``, same seeds."""
    pairs = paired_finals(new, old, env, algo)
    return f"{statistics.fmean(a for a, _ in pairs) / statistics.fmean(b for _, b in pairs):.2f}"


def paired_wins(new: str, old: str, env: str, algo: str) -> str:
    """``'k of n'``: seeds on which ``new`` ended higher than ``old``."""
    pairs = paired_finals(new, old, env, algo)
    return f"{sum(a > b for a, b in pairs)} of {len(pairs)}"


def protocol_iqr(name: str, env: str, algo: str) -> str:
    return num(protocol_row(name, env, algo)["iqr_final_return"])


def protocol_iqm(name: str, env: str, algo: str) -> str:
    return num(protocol_row(name, env, algo)["final_return"]["estimate"])


def protocol_finals_span(name: str, env: str, algo: str) -> str:
    """Lowest to highest per-seed final return of a row."""
    finals = [r["final_return"] for r in protocol_row(name, env, algo)["per_seed"]]
    return f"{num(min(finals))} to {num(max(finals))}"


def _pooled_figure(name: str, env: str, algo: str, part: str, key: str) -> float:
    """``protocol_row(...)[part][key]``, or an error that says to rerun protocol.py."""
    summary = protocol_row(name, env, algo).get(part)
    if not summary or summary.get(key) is None:
        raise ValueError(f"{name}: no {part} {key} in {env} x {algo} (rerun protocol.py)")
    return float(summary[key])


def protocol_update(name: str, env: str, algo: str, key: str) -> float:
    """A pooled step figure of a protocol row (``median_kl_ratio`` or
    ``backtracked_fraction``, :func:`benchmarks.rl.protocol.step_summary`)."""
    return _pooled_figure(name, env, algo, "update", key)


def _progress_rows(results: str, env: str, algo: str, seed: int, steps: int) -> list[dict]:
    """The ``progress.csv`` rows of one committed run folder of ``rl/<results>/runs``."""
    import csv

    folder = BENCH / "rl" / results / "runs" / f"{env}-{algo}-s{seed}-{steps // 1000}k"
    with open(folder / "progress.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def run_trajectory_table(
    results: str, env: str, algos, seeds, steps: int, marks=(100_000, 300_000, 500_000)
) -> str:
    """Policy entropy along the runs (median over seeds, at the update nearest each mark
    and at the end) and the KL each update took (median over every update of every seed),
    read from the committed run folders."""
    ends = [*marks, steps]
    head = " | ".join(f"entropy at {m // 1000}k" for m in ends)
    lines = [f"| algo | {head} | KL per update | final return per seed |",
             "|---|" + "---|" * len(ends) + "---|---|"]  # fmt: skip
    for algo in algos:
        runs = {seed: _progress_rows(results, env, algo, seed, steps) for seed in seeds}
        cells = []
        for mark in ends:
            at = [min(rows, key=lambda r: abs(int(r["step"]) - mark)) for rows in runs.values()]
            cells.append(f"{statistics.median(float(r['entropy']) for r in at):.1f}")
        kl = statistics.median(float(r["kl"]) for rows in runs.values() for r in rows)
        finals = " / ".join(
            num(r["final_return"])
            for r in sorted(rl_runs(env, algo, steps, results), key=lambda r: r["seed"])
            if r["seed"] in runs
        )
        lines.append(f"| `{algo}` | {' | '.join(cells)} | {kl:.3f} | {finals} |")
    return block("\n".join(lines))


def protocol_above(name: str, env: str, algo: str, threshold: float) -> str:
    """How many seeds of a row ended above ``threshold``, as "K of N"."""
    finals = [r["final_return"] for r in protocol_row(name, env, algo)["per_seed"]]
    return f"{sum(f > threshold for f in finals)} of {len(finals)}"


def protocol_solver(name: str, env: str, algo: str, key: str) -> float:
    """A pooled solver figure of a protocol row (``converged_fraction`` or
    ``median_solver_seconds``, :func:`benchmarks.rl.protocol.solver_summary`)."""
    return _pooled_figure(name, env, algo, "solver", key)


def protocol_auc(name: str, env: str, algo: str) -> str:
    return num(protocol_row(name, env, algo)["auc"]["estimate"])


def protocol_wall(name: str, env: str, algo: str) -> str:
    return f"{protocol_row(name, env, algo)['median_wall_time']:.0f} s"


def protocol_seeds(name: str) -> str:
    seeds = load(name)["seeds"]
    return (
        f"{seeds[0]}-{seeds[-1]}"
        if seeds == list(range(seeds[0], seeds[-1] + 1))
        else (", ".join(map(str, seeds)))
    )


def common_steps() -> dict:
    """The 'common steps' summary of results_mujoco_1m/results.md: (env, algo) -> row."""
    out = {}
    text = (BENCH / "rl/results_mujoco_1m/results.md").read_text()
    part = text.split("fewest steps any of them reached", 1)[1]
    for line in part.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[2].isdigit():
            out[cells[0], cells[3]] = {"steps": int(cells[2]), "return": cells[5]}
    return out


def kilo(steps: float) -> str:
    return f"{steps / 1000:.0f}k" if steps < 1_000_000 else f"{steps / 1e6:g}M"


def reached(run: dict) -> int:
    return run.get("steps_reached", run["steps"])


def rl_1m_table() -> str:
    rows = [
        "| env | `rat-npg` final (steps) | `sb3-trpo` final (steps) | common steps | "
        "`rat-npg` there | `sb3-trpo` there |",
        "|---|---|---|---|---|---|",
    ]
    common = common_steps()
    for env in ("Hopper-v5", "Walker2d-v5", "HalfCheetah-v5"):
        cells = []
        for algo in ("rat-npg", "sb3-trpo"):
            runs = rl_runs(env, algo, 1_000_000, "results_mujoco_1m")
            steps = [reached(r) for r in runs]
            where = (
                kilo(min(steps))
                if min(steps) == max(steps)
                else (f"{kilo(min(steps))}-{kilo(max(steps))}")
            )
            cells.append(f"{mean_se((r['final_return'] for r in runs), 0)} ({where})")
        rows.append(
            f"| {env} | {cells[0]} | {cells[1]} | {kilo(common[env, 'rat-npg']['steps'])} | "
            f"{common_return(env, 'rat-npg')} | {common_return(env, 'sb3-trpo')} |"
        )
    return block("\n".join(rows))


def common_return(env: str, algo: str) -> str:
    value, se = common_steps()[env, algo]["return"].split(" ± ")
    return f"{float(value):.0f} ± {float(se):.0f}"


def rl_minatar_table() -> str:
    rows = [
        "| env | `rat-npg` | `sb3-trpo` (peer) | wall time per run: `rat-npg` | `sb3-trpo` |",
        "|---|---|---|---|---|",
    ]
    for env in ("MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1"):
        rows.append(
            f"| {env} | {rl_final(env, 'rat-npg', 500_000)} | {rl_final(env, 'sb3-trpo', 500_000)} "
            f"| {rl_wall_range(env, 'rat-npg', 500_000)} s | "
            f"{rl_wall_range(env, 'sb3-trpo', 500_000)} s |"
        )
    return block("\n".join(rows))


def minatar_speedup() -> str:
    ratios = [
        statistics.fmean(r["wall_time"] for r in rl_runs(env, "sb3-trpo", 500_000))
        / statistics.fmean(r["wall_time"] for r in rl_runs(env, "rat-npg", 500_000))
        for env in ("MinAtar/Breakout-v1", "MinAtar/SpaceInvaders-v1")
    ]
    return span(ratios, "{:.1f}")


def seconds_per_million(env: str, algo: str) -> str:
    """Mean wall seconds per 1M steps of the 1M-budget runs (stopped runs: steps reached)."""
    runs = rl_runs(env, algo, 1_000_000, "results_mujoco_1m")
    return f"{statistics.fmean(r['wall_time'] / reached(r) * 1e6 for r in runs):.0f}"


# ---------------------------------------------------------------------------- supervised


def sup_runs(task: str, method: str) -> list[dict]:
    runs = [
        r
        for r in load("supervised/results/results.json")["runs"]
        if r["task"] == task and r["method"] == method
    ]
    if not runs:
        raise KeyError((task, method))
    return runs


def sup_final(task: str, method: str, key: str = "train_loss") -> float:
    return statistics.fmean(r["curve"][key][-1] for r in sup_runs(task, method))


def sup_at(task: str, method: str, step: int, key: str = "train_loss") -> float:
    runs = sup_runs(task, method)
    return statistics.fmean(r["curve"][key][r["curve"]["step"].index(step)] for r in runs)


def sup_ms(task: str, method: str) -> float:
    return statistics.fmean(
        1e3 * r["curve"]["seconds"][-1] / max(r["curve"]["step"][-1], 1)
        for r in sup_runs(task, method)
    )


def sup_time_to(task: str, method: str, level: float) -> float | None:
    """Mean training seconds until the train loss first was <= level (None: not every seed)."""
    out = []
    for r in sup_runs(task, method):
        c = r["curve"]
        hits = [s for s, loss in zip(c["seconds"], c["train_loss"], strict=True) if loss <= level]
        if not hits:
            return None
        out.append(hits[0])
    return statistics.fmean(out)


def sup_step_to(task: str, method: str, level: float) -> float | None:
    out = []
    for r in sup_runs(task, method):
        c = r["curve"]
        hits = [s for s, loss in zip(c["step"], c["train_loss"], strict=True) if loss <= level]
        if not hits:
            return None
        out.append(hits[0])
    return statistics.fmean(out)


def g(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}g}"


def supervised_table() -> str:
    data = load("supervised/results/results.json")
    methods = list(data["methods"])
    tasks = list(dict.fromkeys(r["task"] for r in data["runs"]))
    rows = [
        "| task | method | lr | final train loss | final test loss | test metric | ms / step "
        "| diverged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks:
        for method in methods:
            runs = sup_runs(task, method)
            ok = [r for r in runs if "error" not in r["curve"]]

            def stat(key: str, ok=ok) -> str:
                values = [r["curve"][key][-1] for r in ok]
                if not values:
                    return "n/a"
                return f"{statistics.fmean(values):.4g} ± {statistics.pstdev(values):.2g}"

            metric = "acc" if task == "digits" else "MSE"
            rows.append(
                f"| {task} | {method} | {runs[0]['lr']:g} | {stat('train_loss')} | "
                f"{stat('test_loss')} | {metric} {stat('metric')} | {sup_ms(task, method):.1f} | "
                f"{len(runs) - len(ok)}/{len(runs)} |"
            )
    cfg, machine = data["config"], data["machine"]
    rows += [
        "",
        f"Mean ± std over seeds {cfg['seeds']} ({cfg['steps']} steps, batch "
        f"{cfg['batch_size']}, {machine['torch_threads']} torch thread(s); total "
        f"{data['seconds_total']:.0f} s). Learning rates picked from each method's grid by "
        f"final train loss on seed {cfg['tuning_seed']}. Damping {data['damping']:g} for every "
        f"natural-gradient method and K-FAC. Command: `{data['command']}`.",
    ]
    return block("\n".join(rows))


# ---------------------------------------------------------------------------- provenance


def git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=False, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def has_history(commit: str) -> bool:
    return git("cat-file", "-e", f"{commit}^{{commit}}") is not None


def first_change(commit: str, paths: list[str]) -> str | None:
    """The first commit after ``commit`` touching ``paths``; ``'uncommitted'`` for edits only
    in the working tree; None if the code is unchanged (a change later undone counts as none:
    the working tree's ``paths`` are compared with ``commit``'s first)."""
    log = git("log", "--reverse", "--format=%h", f"{commit}..HEAD", "--", *paths)
    if log is None:
        raise RuntimeError(f"git history with commit {commit} is needed to render provenance")
    if git("diff", "--quiet", commit, "--", *paths) is not None:  # the same text as then
        return None
    return log.splitlines()[0] if log else "uncommitted"


def provenance_info(name: str) -> dict:
    data = load(name)
    return data["provenance"]


def provenance(name: str, runs: str | None = None) -> str:
    """An admonition: which commit and versions produced the results file ``name``, and
    whether the library code it measures has changed since.

    ``runs``: for a file that collects runs from several commits (``rl/results``), a
    filter ``"env algo steps"`` selecting those the page shows; the oldest of their
    commits is the one compared.
    """
    what, paths = RESULTS[name]
    info = provenance_info(name)
    commits = [info["commit"]]
    if runs is not None:
        commits = sorted(
            {r["commit"] for r in select_runs(name, runs)},
            key=lambda c: int(git("log", "-1", "--format=%ct", c) or 0),
        )
    oldest = commits[0]
    where = (
        f"`{oldest[:7]}`"
        if len(commits) == 1
        else (f"`{oldest[:7]}` to `{commits[-1][:7]}` ({len(commits)} commits)")
    )
    how = info["commit_source"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    changed = first_change(oldest, paths)
    code = ", ".join(f"`{p}`" for p in paths)
    if changed is None:
        status = f"The code it measures ({code}) is unchanged since."
        kind = "note"
    else:
        since = "uncommitted changes" if changed == "uncommitted" else f"first in `{changed}`"
        status = (
            f"**The code it measures ({code}) has changed since** ({since}; "
            f"`git log {oldest[:7]}..HEAD -- {' '.join(paths)}`): the numbers describe that "
            "older code and have not been rerun."
        )
        kind = "warning"
    text = (
        f'!!! {kind} "Provenance: {what}"\n'
        f"    `benchmarks/{name}`, measured at commit {where} ({how}); {versions}; "
        f"{info['machine']}.\n    {status}"
    )
    return block(text)


def code_changed(name: str, runs: str | None = None) -> bool:
    """Whether the code a results file measures changed after it (or the selected runs)."""
    _, paths = RESULTS[name]
    commits = [provenance_info(name)["commit"]]
    if runs is not None:
        commits = [r["commit"] for r in select_runs(name, runs)]
    return any(first_change(c, paths) is not None for c in set(commits))


def select_runs(name: str, spec: str) -> list[dict]:
    """Runs of an RL results file matching ``"ENV[,ENV] ALGO[,ALGO] STEPS"`` (``*``: any)."""
    envs, algos, steps = spec.split()
    out = []
    for r in load(name)["runs"]:
        if envs != "*" and r["env"] not in envs.split(","):
            continue
        if algos != "*" and r["algo"] not in algos.split(","):
            continue
        if steps != "*" and r["steps"] != int(steps):
            continue
        out.append(r)
    return out


# ---------------------------------------------------------------------------- engine


def block(text: str) -> str:
    """A block region: its markers on their own lines, blank lines around the content."""
    return "\n\n" + text.strip("\n") + "\n\n"


NAMESPACE = {k: v for k, v in globals().items() if not k.startswith("_")}


def render_text(text: str) -> str:
    def replace(match: re.Match) -> str:
        expr = match["expr"]
        line = text[text.rfind("\n", 0, match.start()) + 1 : match.start()]
        if line.count("`") % 2:
            raise RuntimeError(f"<!-- fig: {expr} --> sits inside a code span")
        if not line.strip() and not match["body"].startswith("\n"):
            raise RuntimeError(f"inline <!-- fig: {expr} --> starts a line (an HTML block)")
        if "][" in expr:
            raise RuntimeError(
                f"<!-- fig: {expr} --> chains subscripts, which mkdocs-autorefs reads as a "
                "reference link (a strict build fails): use a helper with one subscript"
            )
        try:
            value = eval(expr, dict(NAMESPACE))  # noqa: S307 - trusted repository content
        except Exception as error:
            raise RuntimeError(f"cannot render <!-- fig: {expr} -->: {error!r}") from error
        return f"<!-- fig: {expr} -->{value}<!-- /fig -->"

    return REGION.sub(replace, text)


def check_assets(write: bool) -> list[str]:
    stale = []
    for asset, source in ASSETS.items():
        target, origin = ROOT / "docs" / "assets" / asset, BENCH / source
        if not target.exists() or target.read_bytes() != origin.read_bytes():
            stale.append(f"docs/assets/{asset} (copy of benchmarks/{source})")
            if write:
                target.write_bytes(origin.read_bytes())
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report differences")
    args = parser.parse_args(argv)
    stale = check_assets(write=not args.check)
    for page in PAGES:
        path = ROOT / page
        old = path.read_text()
        new = render_text(old)
        if new != old:
            stale.append(page)
            if args.check:
                sys.stdout.writelines(
                    difflib.unified_diff(
                        old.splitlines(True), new.splitlines(True), page, page + " (rendered)"
                    )
                )
            else:
                path.write_text(new)
    verb = (
        "differ from the results (run python benchmarks/render_docs.py)"
        if args.check
        else ("rewritten")
    )
    for item in stale:
        print(f"{item}: {verb}")
    return 1 if (stale and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
