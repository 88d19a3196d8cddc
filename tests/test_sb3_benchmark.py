"""The SB3 scripts run: benchmarks/sb3/compare.py (train, resume, summarize) and
examples/sb3/update_time.py, at tiny budgets on CartPole."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sb3" / "compare.py"


def test_compare_trains_both_resumes_and_summarizes(tmp_path: Path) -> None:
    pytest.importorskip("sb3_contrib")
    pytest.importorskip("rl_zoo3")
    args = [sys.executable, str(SCRIPT), "--env", "CartPole-v1", "--steps", "1024",
            "--seeds", "0", "--out", str(tmp_path)]  # fmt: skip
    first = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == ["rat_trpo-CartPole-v1-s0.json", "trpo-CartPole-v1-s0.json"]
    record = json.loads((tmp_path / "runs" / runs[0]).read_text())
    assert record["hyperparameters_from"] == "rat_trpo.yml[CartPole-v1]"
    assert record["update_seconds"] and len(record["eval_returns"]) == 10
    summary = json.loads((tmp_path / "results.json").read_text())
    assert set(summary["algorithms"]) == {"trpo", "rat_trpo"}
    assert summary["provenance"]["versions"]["sb3_contrib"]
    assert (tmp_path / "CartPole-v1.png").stat().st_size > 0
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)  # resumes: no run
    assert again.returncode == 0 and "seed 0:" not in again.stdout + again.stderr


def test_update_time_example_runs() -> None:
    pytest.importorskip("sb3_contrib")
    script = SCRIPT.parents[2] / "examples" / "sb3" / "update_time.py"
    args = [sys.executable, str(script), "--envs", "CartPole-v1", "--repeats", "1"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| CartPole-v1")]
    assert [row.split("|")[2].strip() for row in rows] == ["TRPO", "RATTRPO", "RATNPG"]
