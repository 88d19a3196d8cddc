"""`natgrad train --track`: Weights & Biases logging, offline-safe, resumed into the same run."""

from __future__ import annotations

import json
import sys
import types

import pytest

pytest.importorskip("gymnasium")

from natgrad.cli import main  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402
from natgrad.rl.tracking import RUN_ID_NAME, WandbTracker, wandb_mode  # noqa: E402

TINY = ["--num-envs", "2", "--num-steps", "64", "--hidden", "8", "--critic-epochs", "1",
        "--no-progress", "--no-tensorboard"]  # fmt: skip


class FakeRun:
    def __init__(self, step: int, **kwargs) -> None:
        self.step, self.kwargs, self.logged, self.finished = step, kwargs, [], False

    def log(self, metrics, step):
        self.logged.append((step, metrics))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    """A stand-in ``wandb`` module recording every run; ``server_step`` is W&B's next step."""
    module = types.SimpleNamespace(runs=[], server_step=0)

    def init(**kwargs):
        run = FakeRun(module.server_step, **kwargs)
        module.runs.append(run)
        return run

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def test_every_row_is_logged_at_its_step_and_resume_continues_the_run(capsys, tmp_path, fake_wandb):
    run_dir = tmp_path / "run"
    argv = ["train", "--steps", "256", "--out", str(run_dir), "--track", *TINY]
    assert main([*argv, "--wandb-project", "p", "--wandb-group", "g"]) == 0
    (first,) = fake_wandb.runs
    rows = read_progress(run_dir / "progress.csv")
    assert [step for step, _ in first.logged] == [int(r["step"]) for r in rows] == [128, 256]
    for (_, metrics), row in zip(first.logged, rows, strict=True):
        assert metrics["charts/episodic_return_mean"] == row["episodic_return_mean"]
        assert metrics["train/kl"] == row["kl"]
        assert "step" not in metrics and "train/step" not in metrics
    assert first.finished
    kwargs = first.kwargs
    assert (kwargs["project"], kwargs["group"], kwargs["name"]) == ("p", "g", "run")
    assert kwargs["config"] == json.loads((run_dir / "config.json").read_text())
    assert kwargs["id"] == (run_dir / RUN_ID_NAME).read_text().strip()
    assert kwargs["resume"] == "allow" and kwargs["dir"] == str(run_dir)

    # The process was killed after W&B had received step 384 but before the checkpoint
    # after 384 was written: the resume restarts at 256, continues the same W&B run and
    # does not send step 384 twice.
    fake_wandb.server_step = 385
    assert main(["train", "--resume", "--out", str(run_dir), "--steps", "512", "--track",
                 "--no-progress", "--no-tensorboard"]) == 0  # fmt: skip
    second = fake_wandb.runs[1]
    assert second.kwargs["id"] == kwargs["id"]
    assert [step for step, _ in second.logged] == [512]
    assert [int(r["step"]) for r in read_progress(run_dir / "progress.csv")] == [128, 256, 384, 512]


def test_missing_wandb_names_the_extra_and_writes_nothing(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exc:
        main(["train", "--out", str(tmp_path / "run"), "--track", *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert 'pip install "natgrad[track]"' in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_mode_follows_the_request_the_environment_then_the_login(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode() == "offline"  # no credentials: never waits for the network
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password k\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_mode() == "offline"
    assert wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # W&B's alias of offline
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"
    monkeypatch.setenv("WANDB_MODE", "sideways")
    from natgrad.rl._errors import ConfigError

    with pytest.raises(ConfigError, match=r"^\$WANDB_MODE must be .*disabled.*'sideways'"):
        wandb_mode()  # the value came from the environment: the message says so
    with pytest.raises(ConfigError, match=r"^--wandb-mode must be"):
        wandb_mode("sideways")


def test_real_wandb_offline_run(capsys, monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    assert main(["train", "--steps", "128", "--out", str(run_dir), "--track", *TINY]) == 0
    run_id = (run_dir / RUN_ID_NAME).read_text().strip()
    (offline,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0


def test_tracker_is_a_plain_callback(fake_wandb, tmp_path):
    tracker = WandbTracker(mode="offline")
    tracker.on_update(None, {"step": 1.0, "kl": 0.1})  # before on_start: nothing, no error
    tracker.on_close(None)
    assert fake_wandb.runs == []


def test_tags_reach_the_run_and_none_without_them(fake_wandb, tmp_path):
    trainer = types.SimpleNamespace(
        out_dir=tmp_path, config=types.SimpleNamespace(to_dict=lambda: {"env": "E"})
    )
    WandbTracker(mode="offline", tags=("rat", "cartpole")).on_start(trainer)
    WandbTracker(mode="offline").on_start(trainer)
    assert [run.kwargs["tags"] for run in fake_wandb.runs] == [["rat", "cartpole"], None]
