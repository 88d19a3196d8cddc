"""benchmarks/rl/protocol.py (IQM, AUC, intervals, missing runs, tuning seeds, profile) on
fake run folders with known curves, and benchmarks/rl/run.py --jobs 2 at a tiny budget."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench import load_benchmark

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rl"
BUDGET = 2560
LOG_STEPS = range(256, BUDGET + 1, 256)  # 10 points; the grid (201 points) hits 256
SLOPES = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0, 4: 1000.0}  # seed 4: an outlier the IQM drops


protocol = load_benchmark("rl/protocol.py")


def fake_results(root: Path, algos: dict[str, list[int]], env: str = "FakeEnv-v0") -> Path:
    """Runs with return(step) = c * step / budget and wall_time = step / 1000 * (seed + 1)."""
    runs = []
    for algo, seeds in algos.items():
        for seed in seeds:
            name = protocol.run_name(env, algo, seed, BUDGET)
            run_dir = root / "runs" / name
            run_dir.mkdir(parents=True)
            rows = ["step,episodic_return_mean,wall_time", "128,,0.1"]  # no episode yet
            c = SLOPES[seed] * (2.0 if algo == "b" else 1.0)
            rows += [f"{s},{c * s / BUDGET},{s / 1000 * (seed + 1)}" for s in LOG_STEPS]
            (run_dir / "progress.csv").write_text("\n".join(rows) + "\n")
            runs.append({"name": name, "env": env, "algo": algo, "seed": seed,
                         "steps": BUDGET, "machine": "test", "commit": f"c{seed}"})  # fmt: skip
    (root / "results.json").write_text(json.dumps({"runs": runs, "machines": {"test": {}}}))
    return root


def test_iqm_of_final_return_and_auc_match_hand_computed_values(tmp_path: Path) -> None:
    results = fake_results(tmp_path, {"a": [0, 1, 2, 3, 4]})
    out = protocol.evaluate(results, ["FakeEnv-v0"], ["a"], [0, 1, 2, 3, 4], BUDGET, reps=500)
    (row,) = out["rows"]
    # Final return: the last 10 % of the steps (>= 2304): mean of c * 0.9 and c * 1.0.
    assert [r["final_return"] for r in row["per_seed"]] == pytest.approx(
        [0.95 * c for c in SLOPES.values()]
    )
    # AUC over [0, 2560]: held at 0.1 c up to step 256, then linear to c:
    # (0.1 c * 256 + 0.55 c * 2304) / 2560 = 0.505 c.
    assert [r["auc"] for r in row["per_seed"]] == pytest.approx(
        [0.505 * c for c in SLOPES.values()]
    )
    # IQM of 5 seeds: the middle three (c = 20, 30, 40), mean c = 30.
    assert row["final_return"]["estimate"] == pytest.approx(0.95 * 30)
    assert row["auc"]["estimate"] == pytest.approx(0.505 * 30)
    for key in ("final_return", "auc"):
        assert row[key]["low"] <= row[key]["estimate"] <= row[key]["high"]
        assert row[key]["confidence"] == 0.95
    assert row["median_wall_time"] == pytest.approx(BUDGET / 1000 * 3)  # seed 2's
    assert out["missing"] == [] and protocol.warnings_of(out) == []
    # each run evaluated is listed with the commit that trained it
    assert [(r["seed"], r["commit"]) for r in out["runs"]] == [(s, f"c{s}") for s in SLOPES]


def test_spread_and_ratios_to_a_reference_match_hand_computed_values(tmp_path: Path) -> None:
    results = fake_results(tmp_path, {"a": [0, 1, 2, 3, 4], "b": [0, 1, 2, 3, 4]})
    out = protocol.evaluate(results, ["FakeEnv-v0"], ["a", "b"], [0, 1, 2, 3, 4], BUDGET,
                            reps=300, reference="a")  # fmt: skip
    rows = {row["algo"]: row for row in out["rows"]}
    # finals 0.95 c = 9.5, 19, 28.5, 38, 950: quartiles 19 and 38 (b: twice each)
    assert rows["a"]["iqr_final_return"] == pytest.approx(19.0)
    assert rows["b"]["iqr_final_return"] == pytest.approx(38.0)
    assert rows["a"]["mean_final_return"] == pytest.approx(0.95 * 1100 / 5)
    # b's every run returns twice a's: the ratio of means is 2 on the env and on average
    ratio = out["ratios"]["b"]
    assert set(out["ratios"]) == {"b"} and ratio["skipped"] == []
    assert ratio["per_env"]["FakeEnv-v0"]["ratio"] == pytest.approx(2.0)
    assert ratio["mean"]["ratio"] == pytest.approx(2.0)
    low, high = ratio["mean"]["low"], ratio["mean"]["high"]
    assert low < 2.0 < high  # seeds resampled independently for a and b
    text = protocol.markdown(out)
    assert "relative to a" in text and "| b | 2.00 [" in text
    # a reference whose mean return is not positive is not a scale: the env is skipped
    (results / "runs").rename(tmp_path / "kept")
    negative = fake_results(tmp_path / "negative", {"a": [0, 1], "b": [0, 1]})
    for name in ("FakeEnv-v0-a-s0-2560", "FakeEnv-v0-a-s1-2560"):
        csv_path = negative / "runs" / name / "progress.csv"
        lines = csv_path.read_text().splitlines()
        flipped = [lines[0], lines[1]] + [
            f"{s},{-float(v)},{w}" for s, v, w in (line.split(",") for line in lines[2:])
        ]
        csv_path.write_text("\n".join(flipped) + "\n")
    out = protocol.evaluate(negative, ["FakeEnv-v0"], ["a", "b"], [0, 1], BUDGET, reps=50,
                            reference="a")  # fmt: skip
    assert out["ratios"] == {}


def test_missing_runs_are_listed_and_few_seeds_warned(tmp_path: Path) -> None:
    results = fake_results(tmp_path, {"a": [0, 1, 2, 3, 4], "b": [0, 1]})
    (results / "runs" / protocol.run_name("FakeEnv-v0", "b", 1, BUDGET) / "progress.csv").unlink()
    out = protocol.evaluate(results, ["FakeEnv-v0"], ["a", "b"], [0, 1, 2, 3, 4], BUDGET, 200)
    missing = {(m["algo"], m["seed"]): m["reason"] for m in out["missing"]}
    assert set(missing) == {("b", 1), ("b", 2), ("b", 3), ("b", 4)}
    assert missing[("b", 2)] == "not in results.json"
    assert "progress.csv" in missing[("b", 1)]
    (warning,) = protocol.warnings_of(out)
    assert "b: 1 seed(s)" in warning and ">= 5" in warning
    text = protocol.markdown(out)
    assert "Missing runs (4)" in text and "FakeEnv-v0-b-s3-2560" in text
    # Profile: b's one run (2 x 9.5 = 19) normalized over the env's runs (9.5 .. 950).
    profile = out["performance_profile"]
    assert set(profile) == {"a", "b"}
    assert profile["b"]["fraction"][0] == 1.0 and profile["b"]["fraction"][2] == 0.0
    assert profile["a"]["fraction"][0] == pytest.approx(0.8)  # the min run is not > 0
    assert profile["a"]["fraction"][-1] == 0.0


def test_tuning_seeds_are_refused(tmp_path: Path) -> None:
    results = fake_results(tmp_path, {"a": [0]})
    with pytest.raises(ValueError, match="tuning seeds"):
        protocol.evaluate(results, ["FakeEnv-v0"], ["a"], [0, 1000], BUDGET)
    with pytest.raises(SystemExit):
        protocol.main(["--results", str(results), "--steps", str(BUDGET), "--seeds", "0", "100"])


def test_cli_writes_table_json_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("matplotlib")
    results = fake_results(tmp_path / "results", {"a": [0, 1, 2], "b": [0, 1, 2, 3, 4]})
    out = tmp_path / "out"
    args = ["--results", str(results), "--steps", str(BUDGET), "--out", str(out), "--reps", "200"]
    assert protocol.main(args) == 0
    data = json.loads((out / "protocol.json").read_text())
    assert data["seeds"] == [0, 1, 2, 3, 4]
    assert {"commit", "versions", "machine"} <= set(data["provenance"])  # commit: "" without git
    assert len(data["missing"]) == 2
    assert "| FakeEnv-v0 | b | 5 |" in (out / "protocol.md").read_text()
    assert (out / "performance_profile.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "curves-FakeEnv-v0.png").read_bytes()[:4] == b"\x89PNG"
    assert "protocol asks for >= 5" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a reference that is not evaluated is refused
        protocol.main([*args, "--reference", "c"])
    assert protocol.main([*args, "--reference", "a", "--no-plot"]) == 0
    data = json.loads((out / "protocol.json").read_text())
    assert data["reference"] == "a" and set(data["ratios"]) == {"b"}


def test_run_py_jobs_2_trains_both_seeds_and_a_variant(tmp_path: Path) -> None:
    pytest.importorskip("gymnasium")
    variant = "rat-npg+damping=0.05+norm_adv=false"
    args = [sys.executable, str(BENCH / "run.py"), "--envs", "CartPole-v1", "--algos", "rat-npg",
            variant, "--seeds", "0", "1", "--steps", "1024", "--jobs", "2",
            "--results", str(tmp_path)]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    names = {f"CartPole-v1-{algo}-s{seed}-1024" for algo in ("rat-npg", variant) for seed in (0, 1)}
    data = json.loads((tmp_path / "results.json").read_text())
    assert {r["name"] for r in data["runs"]} == names
    for name in names:
        config = json.loads((tmp_path / "runs" / name / "config.json").read_text())
        expected = (0.05, False) if variant in name else (0.1, True)
        assert (config["options"]["damping"], config["norm_adv"]) == expected
        # the resolved configuration the run trained with, not the one it was given
        assert config["preset"] == "classic" and config["preset_values"] == {}


def test_variant_specs_parse_or_fail_clearly() -> None:
    pytest.importorskip("gymnasium")
    run = protocol.load_script("natgrad_bench_rl_run", BENCH / "run.py")
    assert run.parse_variant("rat-npg") == ("rat-npg", {})
    assert run.parse_variant("rat-trpo+rat_fisher=expected+critic_epochs=20+norm_adv=False") == (
        "rat-trpo",
        {"rat_fisher": "expected", "critic_epochs": 20, "norm_adv": False},
    )
    assert run.parse_variant("rat-npg+damping=1e-2+hidden=32,16")[1] == {
        "damping": 0.01,
        "hidden": (32, 16),
    }
    assert run.parse_variant("rat-npg+max_kl=1")[1] == {"max_kl": 1.0}  # a float field
    bad = {
        "rat+damping=1": "unknown algorithm 'rat'",
        "sb3-trpo+damping=1": "sb3-trpo runs rl-zoo's tuned hyperparameters",
        "rat-npg+cg_iters=5": "cg_iters is an option of cg-trpo, which rat-npg does not read",
        "rat-npg+nosuch=5": "unknown key 'nosuch'; rat-npg takes",
        "ppo+seed=3": "seed is set by run.py's own --seeds flag",
        "ppo+steps=3": "steps is set by run.py's own --steps flag",
        "rat-npg+damping": "'damping' has no '='",
        "rat-npg+damping=0.1+damping=0.2": "damping is given twice",
        "rat-npg+norm_adv=maybe": "norm_adv='maybe' is not a bool",
        "rat-npg+damping=abc": "damping='abc' is not a float",
        "rat-npg+hidden=a,b": "hidden='a,b' is not a comma-separated ints",
        "rat-npg+solver=bogus": "solver",
        "rat-npg+damping=-1": "damping",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            run.parse_variant(spec)


def test_run_names_keep_budgets_apart() -> None:
    pytest.importorskip("gymnasium")
    run = protocol.load_script("natgrad_bench_rl_run", BENCH / "run.py")
    names = {run.run_name("Hopper-v5", "rat-npg", 0, steps) for steps in (128, 900, 2048, 2500)}
    assert len(names) == 4
    assert run.run_name("Hopper-v5", "rat-npg", 0, 300_000) == "Hopper-v5-rat-npg-s0-300k"
    assert run.run_name("Hopper-v5", "rat-npg", 0, 100_000) == "Hopper-v5-rat-npg-s0"
    for steps in (128, 2048, 300_000):
        suffix = run.run_name("E-v0", "a", 0, steps).rpartition("-")[2]
        assert run.budget_steps(suffix) == steps


def write_progress(results: Path, seed: int, columns: dict[str, str]) -> None:
    """Three updates of run ``a``/``seed``: each column's comma-separated cells (may be empty)."""
    run_dir = results / "runs" / protocol.run_name("FakeEnv-v0", "a", seed, BUDGET)
    rows = ["step,episodic_return_mean,wall_time," + ",".join(columns)]
    cells = zip(*(text.split(",") for text in columns.values()), strict=True)
    for step, values in zip((BUDGET - 256, BUDGET - 128, BUDGET), cells, strict=True):
        rows.append(f"{step},{step},1," + ",".join(values))
    (run_dir / "progress.csv").write_text("\n".join(rows) + "\n")


def test_merge_can_take_only_the_peer_rows(tmp_path: Path) -> None:
    run = protocol.load_script("natgrad_bench_rl_run", BENCH / "run.py")
    other = fake_results(tmp_path / "old", {"a": [0, 1], "peer": [0, 1]})
    data = {"runs": []}
    (tmp_path / "new" / "runs").mkdir(parents=True)
    run.merge_results(data, tmp_path / "new", other, ["peer"])
    assert sorted((r["algo"], r["seed"]) for r in data["runs"]) == [("peer", 0), ("peer", 1)]
    for record in data["runs"]:
        assert (tmp_path / "new" / "runs" / record["name"] / "progress.csv").exists()
    assert not any(
        p.name.startswith("FakeEnv-v0-a-") for p in (tmp_path / "new" / "runs").iterdir()
    )
    run.merge_results(data, tmp_path / "new", other)  # no filter: the rest, none twice
    assert len(data["runs"]) == 4


def test_merge_can_take_only_some_envs(tmp_path: Path) -> None:
    run = protocol.load_script("natgrad_bench_rl_run", BENCH / "run.py")
    other = fake_results(tmp_path / "old", {"a": [0, 1]})
    fake_results(tmp_path / "old2", {"a": [0]}, env="OtherEnv-v0")
    merged = json.loads((other / "results.json").read_text())
    merged["runs"] += json.loads((tmp_path / "old2" / "results.json").read_text())["runs"]
    (other / "results.json").write_text(json.dumps(merged))
    shutil.copytree(tmp_path / "old2" / "runs", other / "runs", dirs_exist_ok=True)
    data = {"runs": []}
    (tmp_path / "new" / "runs").mkdir(parents=True)
    run.merge_results(data, tmp_path / "new", other, ["a"], ["OtherEnv-v0"])
    assert [(r["env"], r["seed"]) for r in data["runs"]] == [("OtherEnv-v0", 0)]
    assert [p.name for p in (tmp_path / "new" / "runs").iterdir()] == [data["runs"][0]["name"]]


def test_report_plots_the_runs_on_disk_and_tables_every_recorded_run(tmp_path: Path, capsys):
    run = protocol.load_script("natgrad_bench_rl_run", BENCH / "run.py")
    results = fake_results(tmp_path, {"a": [0, 1, 2]}, env="CartPole-v1")  # a threshold
    data = json.loads((results / "results.json").read_text())
    for record in data["runs"]:
        record.update(final_return=1.0, steps_to_threshold=None, wall_time=1.0)
    data["commands"] = ["python benchmarks/rl/run.py ..."]
    (results / "results.json").write_text(json.dumps(data))
    shutil.rmtree(results / "runs" / data["runs"][0]["name"])  # recorded, folder gone
    run.report(results)
    assert "| CartPole-v1 | a | 3 |" in (results / "results.md").read_text()
    assert len(list(results.glob("CartPole-v1*.png"))) == 1
    assert "plots leave out 1 recorded runs" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("part", "columns", "expected"),
    [
        pytest.param(
            "solver",
            {
                0: {"solver_converged": "1,0,0", "solver_seconds": "0.1,0.2,0.3"},
                1: {"solver_converged": "1,,1", "solver_seconds": "0.4,,5"},
            },
            # converged: 1, 0, 0, 1, 1 (the empty cell skipped); seconds 0.1 0.2 0.3 0.4 5
            {"updates": 5, "converged_fraction": 0.6, "median_solver_seconds": 0.3},
            id="solver",
        ),
        pytest.param(
            "update",
            {
                0: {"kl": "0.01,0.03,0.02", "kl_target": "0.02,0.02,0.02", "backtracks": "0,1,0"},
                1: {"kl": "0.04,,0.01", "kl_target": "0.02,,0.02", "backtracks": "2,,0"},
            },
            # KL / target: 0.5 1.5 1 2 0.5 (the empty row skipped); backtracked: 0 1 0 1 0
            {"updates": 5, "median_kl_ratio": 1.0, "backtracked_fraction": 0.4},
            id="update",
        ),
    ],
)
def test_progress_figures_are_pooled_over_updates_and_seeds(
    tmp_path: Path, part: str, columns: dict, expected: dict
) -> None:
    results = fake_results(tmp_path, {"a": [0, 1], "peer": [0]})
    for seed, cells in columns.items():
        write_progress(results, seed, cells)
    out = protocol.evaluate(results, ["FakeEnv-v0"], ["a", "peer"], [0, 1], BUDGET, reps=50)
    by_algo = {row["algo"]: row for row in out["rows"]}
    assert by_algo["a"][part] == {k: pytest.approx(v) for k, v in expected.items()}
    assert by_algo["peer"][part] is None  # no such columns: a peer
