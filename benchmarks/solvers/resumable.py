"""The resumable row loop shared by the per-call benchmarks (call profile, check cost).

Each script measures rows ``(problem, N)`` in one process and keeps finished rows in its
JSON results file, so a stopped run continues where it left off.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from run import provenance


def parse_args(description: str, results: Path, repeats: int) -> argparse.Namespace:
    """The options every per-call benchmark takes (and sets the torch threads)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--problems", nargs="+", default=None)
    parser.add_argument("--sizes", nargs="+", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--machine", default=f"{platform.machine()} CPU")
    parser.add_argument("--fresh", action="store_true", help="discard finished rows")
    parser.add_argument("--out", type=Path, default=results, help="results file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.provenance = provenance(args.machine)  # before this run writes its results file
    return args


def selected(args: argparse.Namespace, rows: Iterable[tuple[str, int]]) -> list[tuple[str, int]]:
    """The rows ``--problems`` and ``--sizes`` keep."""
    return [
        (p, n)
        for p, n in rows
        if (args.problems is None or p in args.problems) and (args.sizes is None or n in args.sizes)
    ]


def load(args: argparse.Namespace) -> dict:
    """The results file's data (empty with ``--fresh`` or when there is none)."""
    if args.out.exists() and not args.fresh:
        return json.loads(args.out.read_text())
    return {"rows": []}


def save(args: argparse.Namespace, data: dict) -> None:
    data.update(threads=args.threads, repeats=args.repeats, provenance=args.provenance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1) + "\n")


def measure_rows(
    args: argparse.Namespace,
    rows: Iterable[tuple[str, int]],
    measure: Callable[[str, int, int], dict],
    report: Callable[[dict], str],
) -> dict:
    """Measure every selected row not finished yet, saving after each; return the data."""
    data = load(args)
    done = {(r["problem"], r["N"]) for r in data["rows"]}
    for name, n in selected(args, rows):
        if (name, n) in done:
            print(f"{name} N={n}: done (kept)")
            continue
        row = measure(name, n, args.repeats)
        data["rows"].append(row)
        save(args, data)
        print(report(row))
    return data
