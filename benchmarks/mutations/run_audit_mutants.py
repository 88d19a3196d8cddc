"""Run every mutation of the evidence audit against the tests meant to kill it.

Usage (from the repository root; not part of the default test run, ~10-20 minutes)::

    python benchmarks/mutations/run_audit_mutants.py [--plugin-dir DIR] [NAME ...]

Each mutant is applied in memory by the audit's pytest plugin (``mutplugin.py``, default
``../shared/repro/evidence``) and the relevant test files run with ``-x``; the mutant is
killed when a test fails that passes without the mutation; the first failing test is
recorded. A mutation whose pattern no longer matches the code is re-expressed in
``audit_plugin.py`` (same meaning, current code) when it has been moved there, and
reported as stale otherwise. The table is written
to ``benchmarks/mutations/audit_report.md``.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent

# Mutant-name prefix -> test files that should kill it (fast, targeted files first).
TARGETS: list[tuple[str, list[str]]] = [
    ("kacz_", ["test_claims.py", "test_solvers.py", "test_rat.py", "test_compile.py"]),
    ("chol_damping", ["test_claims.py", "test_rat.py"]),
    ("cg_damping", ["test_claims.py", "test_solvers.py", "test_rat.py"]),
    ("step_size_", ["test_claims.py", "test_rl_algorithms.py"]),
    ("dfd_wrong", ["test_claims.py", "test_rat.py"]),
    ("lm_", ["test_supervised_optimizer.py"]),
    ("trpo_fvp_no_damping", ["test_rl_algorithms.py"]),
    ("kfac_", ["test_rl_algorithms.py"]),
    ("ls_no_surrogate", ["test_rl_algorithms.py"]),
    ("params_given_order", ["test_claims.py", "test_rat.py"]),
    ("auto_never_fits", ["test_claims.py"]),
    ("resample_broken", ["test_claims.py", "test_solvers.py"]),
    ("fused_", ["test_compile.py"]),
    ("mse_", ["test_supervised.py"]),
    ("no_bootstrap", ["test_rl_rollout.py", "test_rl_components.py"]),
    ("factored_cross_gram_scaled", ["test_claims.py", "test_factored.py", "test_rat.py"]),
    ("resume_restart", ["test_rl_resume_algorithms.py", "test_rl_train.py"]),
]


# The tests issue 16 lists as unable to catch their bug (and the new tests of its claims),
# each run alone against the mutants it must kill: (pytest arguments, mutants).
LISTED: list[tuple[list[str], list[str]]] = [
    (["tests/test_rat.py", "-k", "direction_matches and kaczmarz"],
     ["kacz_damping", "kacz_one_epoch", "kacz_half_step"]),
    (["tests/test_rat.py", "-k", "direction_matches and cg"], ["cg_damping"]),
    (["tests/test_compile.py", "-k", "float32 or same_iteration"], ["fused_half", "fused_damping"]),
    (["tests/test_rl_algorithms.py", "-k", "closed_form"], ["step_size_1_3x", "step_size_0_8x"]),
    (["tests/test_claims.py", "-k", "step_size"],
     ["step_size_1_3x", "step_size_0_8x", "dfd_wrong"]),
    (["tests/test_rl_algorithms.py", "-k", "line_search_rejects"], ["ls_no_surrogate"]),
    (["tests/test_supervised.py", "-k", "mse_sampled"],
     ["mse_noise_scale", "mse_sampled_noise_x3"]),
    (["tests/test_supervised_optimizer.py", "-k", "clamped"],
     ["lm_no_min_clamp", "lm_no_max_clamp"]),
    (["tests/test_claims.py", "-k", "cross_gram"], ["factored_cross_gram_scaled"]),
    (["tests/test_claims.py", "-k", "full_rank_nystrom"], ["factored_cross_gram_scaled"]),
    (["tests/test_claims.py", "-k", "parameters_order"], ["params_given_order"]),
    (["tests/test_claims.py", "-k", "memory_budget"], ["auto_never_fits"]),
    (["tests/test_claims.py", "-k", "resample"], ["resample_broken"]),
    (["tests/test_rl_algorithms.py", "-k", "cg_trpo_fisher"], ["trpo_fvp_no_damping"]),
    (["tests/test_rl_algorithms.py", "-k", "kfac_direction"], ["kfac_no_pi", "kfac_no_decay"]),
    (["tests/test_rl_rollout.py"], ["no_bootstrap"]),
    (["tests/test_rl_resume_algorithms.py"], ["resume_restart"]),
]  # fmt: skip


def targets_for(name: str) -> list[str]:
    for prefix, files in TARGETS:
        if name.startswith(prefix):
            return [f"tests/{f}" for f in files]
    raise KeyError(f"no test files listed for mutant {name!r}; add it to TARGETS")


def stale_patterns(mutations: list[tuple[str, str, str]]) -> list[str]:
    """The patterns of a mutation that do not occur exactly once in the current source."""
    stale = []
    for module, old, _ in mutations:
        source = inspect.getsource(importlib.import_module(module))
        if source.count(old) != 1:
            stale.append(f"{module}: {old!r}")
    return stale


def run_one(name: str, files: list[str], env: dict[str, str], plugin: str) -> dict:
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", plugin,
               "-p", "no:cacheprovider", "-o", "addopts=", *files]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    failed = re.findall(r"^FAILED (\S+)", output, flags=re.MULTILINE)
    errors = re.findall(r"^ERROR (\S+)", output, flags=re.MULTILINE)
    if proc.returncode == 1 and failed:
        status, by = "killed", failed[0].split(" ")[0]
        # The same test without the mutation must pass, or the kill proves nothing.
        clean = {k: v for k, v in env.items() if k not in ("MUT", "AUDIT_MUT")}
        check = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", by],
            cwd=ROOT, env=clean, capture_output=True, text=True,
        )  # fmt: skip
        if check.returncode != 0:
            status = "inconclusive (fails unmutated)"
    elif proc.returncode == 0:
        status, by = "SURVIVED", ""
    else:
        status, by = f"error (rc {proc.returncode})", (errors or [output.strip()[-200:]])[0]
    return {"name": name, "status": status, "by": by, "seconds": seconds, "files": files}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    parser.add_argument("--plugin-dir", default=str(ROOT.parent / "shared/repro/evidence"))
    parser.add_argument("--report", default=str(HERE / "audit_report.md"))
    parser.add_argument(
        "--skip-listed", action="store_true", help="skip the per-listed-test section"
    )
    args = parser.parse_args()
    plugin_dir = str(Path(args.plugin_dir).resolve())
    sys.path.insert(0, plugin_dir)
    sys.path.insert(0, str(HERE))
    os.environ.pop("MUT", None)
    mutplugin = importlib.import_module("mutplugin")
    from audit_plugin import MOVED

    import natgrad.rl.algorithms  # noqa: F401 - so that every mutated module imports
    import natgrad.rl.train  # noqa: F401

    def mutate_and_run(name: str, files: list[str]) -> dict:
        stale = stale_patterns(mutplugin.MUTATIONS[name])
        base = {**os.environ, "PYTHONPATH": os.pathsep.join([plugin_dir, str(HERE)])}
        note = ""
        if not stale:
            env, plugin = {**base, "MUT": name}, "mutplugin"
        elif name in MOVED and not stale_patterns(MOVED[name]):
            env = {**base, "AUDIT_MUT": name, "AUDIT_PLUGIN_DIR": plugin_dir}
            plugin = "audit_plugin"
            note = "shared pattern stale (" + "; ".join(stale) + "); moved, same meaning"
        else:
            return {"name": name, "status": "stale pattern, not run", "by": "", "seconds": 0.0,
                    "files": files, "note": "; ".join(stale)}  # fmt: skip
        result = run_one(name, files, env, plugin)
        result["note"] = note
        print(f"{name}: {result['status']} {result['by']} ({result['seconds']:.0f} s)", flush=True)
        return result

    names = args.names or list(mutplugin.MUTATIONS)
    results = [mutate_and_run(name, targets_for(name)) for name in names]
    listed = []
    if not args.skip_listed:
        for selection, mutants in LISTED:
            for name in mutants:
                if name in names:
                    listed.append(mutate_and_run(name, selection))
    write_report(Path(args.report), results, listed)
    return 0 if all(r["status"] == "killed" for r in results + listed) else 1


def write_report(path: Path, results: list[dict], listed: list[dict]) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    dirty = subprocess.run(["git", "status", "--porcelain", "natgrad"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    killed = sum(r["status"] == "killed" for r in results)
    lines = [
        "# Audit mutants (issue 16) against the test suite",
        "",
        f"Generated by `python benchmarks/mutations/run_audit_mutants.py` at commit `{commit}`"
        + (" (natgrad/ had uncommitted changes)" if dirty else "")
        + f": **{killed} of {len(results)} killed**. Each mutant ran against its test files "
        "with `pytest -x`; the first failing test is named.",
        "",
        "| mutant | killed? | first failing test | test files | seconds | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        files = ", ".join(Path(f).name for f in r["files"] if f.startswith("tests/"))
        by = f"`{r['by']}`" if r["by"] else ""
        lines.append(f"| `{r['name']}` | {r['status']} | {by} | {files} | {r['seconds']:.0f} "
                     f"| {r.get('note', '')} |")  # fmt: skip
    if listed:
        lines += [
            "",
            "## Each fixed or new test alone",
            "",
            "The tests the issue lists as unable to catch their bug, after the fix, and the "
            "tests of its untested claims, each selection run alone against its mutants.",
            "",
            "| selection | mutant | killed? | first failing test |",
            "|---|---|---|---|",
        ]
        for r in listed:
            selection = " ".join(r["files"])
            by = f"`{r['by']}`" if r["by"] else ""
            lines.append(f"| `{selection}` | `{r['name']}` | {r['status']} | {by} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
