"""Import benchmark scripts (``benchmarks/...``) by path, for the tests that check them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(relative: str) -> ModuleType:
    """Import ``benchmarks/<relative>`` as ``natgrad_bench_<folder>_<stem>``.

    The script's folder goes on ``sys.path`` for its sibling imports; the module name is
    unique per script, since ``benchmarks/rl`` and ``benchmarks/solvers`` both have a
    ``run.py``.
    """
    path = BENCHMARKS / relative
    name = f"natgrad_bench_{path.parent.name}_{path.stem}"
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
