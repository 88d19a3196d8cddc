"""benchmarks/rl/run.py continues a natgrad run that a stopped sweep left half done.

A sweep stopped midway (a session's end, a kill) leaves the run's folder under
``<results>/partial/``; the next sweep continues it from its last checkpoint instead of
starting over: bit for bit with ``--trust-env-state``, with re-seeded environments and a
``resumed_at`` note without it. A folder of another configuration is not continued.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
from bench import load_benchmark

pytest.importorskip("gymnasium")

from natgrad.rl import TrainConfig, Trainer  # noqa: E402
from natgrad.rl.callbacks import Callback  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402

run = load_benchmark("rl/run.py")

ENV = "CartPole-v1"
ALGO = "rat-npg+num_envs=2+num_steps=64+hidden=8,8+critic_epochs=1+checkpoint_every=1"
STEPS = 4 * 2 * 64  # four updates
TIMING = {"wall_time", "steps_per_sec", "solver_seconds"}


class _StopAfter(Callback):
    """Stop a run after ``updates`` updates, as a killed sweep would."""

    def __init__(self, updates: int) -> None:
        self.updates = updates

    def on_update(self, trainer, row) -> None:
        if row["iteration"] >= self.updates:
            raise KeyboardInterrupt


def _rows(run_dir: Path) -> list[dict[str, float]]:
    return [
        {k: v for k, v in row.items() if k not in TIMING and not math.isnan(v)}
        for row in read_progress(run_dir / "progress.csv")
    ]


def _stopped_run(results: Path, algo: str, updates: int) -> Path:
    """The partial folder a sweep stopped after ``updates`` updates leaves behind."""
    name, overrides = run.parse_variant(algo)
    work = results / run.PARTIAL / run.run_name(ENV, algo, 0, STEPS)
    config = TrainConfig.from_dict({"env": ENV, "algo": name, "seed": 0, "steps": STEPS,
                                    **overrides})  # fmt: skip
    trainer = Trainer(config, work, tensorboard=False)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(progress=False, callbacks=[_StopAfter(updates)])
    trainer.close()
    return work


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict, list[dict[str, float]]]:
    results = tmp_path_factory.mktemp("whole")
    record = run.train_and_record(ENV, ALGO, 0, STEPS, results, "test")
    return record, _rows(results / "runs" / record["name"])


def test_a_stopped_run_continues_bit_for_bit_with_trust_env_state(tmp_path, uninterrupted):
    whole, rows = uninterrupted
    _stopped_run(tmp_path, ALGO, updates=2)
    record = run.train_and_record(ENV, ALGO, 0, STEPS, tmp_path, "test", trust_env_state=True)
    assert record["resumed_at"] == 2 * 2 * 64 and record["resumed_bit_for_bit"] is True
    assert _rows(tmp_path / "runs" / record["name"]) == rows
    assert record["final_return"] == whole["final_return"]
    assert "resumed_at" not in whole
    assert not (tmp_path / run.PARTIAL / record["name"]).exists()  # cleaned up


def test_without_trust_it_continues_from_the_checkpoint_with_reseeded_envs(tmp_path, uninterrupted):
    _, rows = uninterrupted
    _stopped_run(tmp_path, ALGO, updates=2)
    record = run.train_and_record(ENV, ALGO, 0, STEPS, tmp_path, "test")
    assert record["resumed_at"] == 2 * 2 * 64 and record["resumed_bit_for_bit"] is False
    resumed = _rows(tmp_path / "runs" / record["name"])
    assert [r["step"] for r in resumed] == [r["step"] for r in rows]
    assert resumed[:2] == rows[:2]  # the updates before the stop are kept, not redone


def test_a_partial_folder_of_another_configuration_is_started_over(tmp_path, uninterrupted):
    whole, rows = uninterrupted
    other = ALGO + "+damping=0.5"
    work = _stopped_run(tmp_path, other, updates=2)
    shutil.move(work, tmp_path / run.PARTIAL / whole["name"])  # same name, other config
    record = run.train_and_record(ENV, ALGO, 0, STEPS, tmp_path, "test", trust_env_state=True)
    assert "resumed_at" not in record
    assert _rows(tmp_path / "runs" / record["name"]) == rows
    config = json.loads((tmp_path / "runs" / record["name"] / "config.json").read_text())
    assert config["options"]["damping"] != 0.5


def test_a_damaged_checkpoint_is_started_over(tmp_path, uninterrupted, capsys):
    whole, rows = uninterrupted
    work = _stopped_run(tmp_path, ALGO, updates=2)
    (work / "checkpoint.pt").write_bytes(b"not a checkpoint")
    record = run.train_and_record(ENV, ALGO, 0, STEPS, tmp_path, "test", trust_env_state=True)
    assert "resumed_at" not in record
    assert _rows(tmp_path / "runs" / record["name"]) == rows
    assert "not resumed" in capsys.readouterr().err
