"""The `natgrad` command: train/eval/plot end to end, and usage errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytest.importorskip("gymnasium")

from natgrad.cli import main  # noqa: E402

TINY = ["--num-envs", "2", "--num-steps", "64", "--hidden", "8", "--critic-epochs", "1",
        "--no-progress", "--no-tensorboard"]  # fmt: skip


def _error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unknown_env(capsys, tmp_path):
    err = _error(capsys, ["train", "--env", "CartPol-v1", "--out", str(tmp_path / "run")])
    assert "unknown environment --env 'CartPol-v1'" in err and "CartPole-v1" in err
    assert not (tmp_path / "run").exists()


def test_unknown_algo(capsys, tmp_path):
    err = _error(capsys, ["train", "--algo", "sgd", "--out", str(tmp_path)])
    assert "unknown algorithm --algo 'sgd'" in err and "rat-npg" in err


def test_bad_value(capsys, tmp_path):
    err = _error(capsys, ["train", "--max-kl", "-1", "--out", str(tmp_path)])
    assert "--max-kl must be > 0" in err
    err = _error(capsys, ["train", "--rat-preconditioner-rank", "-2", "--out", str(tmp_path)])
    assert "--rat-preconditioner-rank must be an integer >= 0" in err


@pytest.mark.parametrize(
    ("env", "extra", "module"),
    [("Hopper-v5", "mujoco", "mujoco"), ("MinAtar/Breakout-v1", "minatar", "minatar")],
)
def test_missing_extra_names_it(capsys, monkeypatch, tmp_path, env, extra, module):
    if module == "mujoco" and "gymnasium.envs.mujoco.mujoco_env" in sys.modules:
        pytest.skip("MuJoCo environments already imported in this process")
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    monkeypatch.setitem(sys.modules, module, None)
    err = _error(capsys, ["train", "--env", env, "--out", str(tmp_path), "--steps", "1", *TINY])
    assert f'pip install "natgrad[{extra}]"' in err


def test_unwritable_out(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = _error(capsys, ["train", "--out", str(blocker / "run"), *TINY])
    assert "--out" in err and "writable" in err


def test_resume_rejects_changed_options(capsys, tmp_path):
    err = _error(capsys, ["train", "--resume", "--out", str(tmp_path), "--max-kl", "0.1"])
    assert "only --steps may change" in err


def test_train_eval_plot_resume(capsys, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--steps", "128", "--out", str(run), *TINY]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 128
    config = json.loads((run / "config.json").read_text())
    assert config["env"] == "CartPole-v1" and config["algo"] == "rat-npg"
    assert config["hidden"] == [8]
    for name in ("progress.csv", "checkpoint.pt", "learning_curve.png"):
        assert (run / name).exists(), name
    header = (run / "progress.csv").read_text().splitlines()[0].split(",")
    for column in ("step", "episodic_return_mean", "kl", "kl_target", "wall_time"):
        assert column in header
    # An existing run is not overwritten by accident.
    err = _error(capsys, ["train", "--steps", "128", "--out", str(run), *TINY])
    assert "--resume" in err
    assert main(["train", "--resume", "--out", str(run), "--steps", "256",
                 "--no-progress", "--no-tensorboard"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["steps"] == 256
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 2 and report["step"] == 256 and report["return_mean"] > 0
    png = tmp_path / "curves.png"
    assert main(["plot", str(run), str(run), "--out", str(png)]) == 0
    assert png.stat().st_size > 0


def test_eval_missing_run(capsys, tmp_path):
    err = _error(capsys, ["eval", str(tmp_path)])
    assert "no checkpoint.pt" in err


def test_import_natgrad_does_not_need_gymnasium():
    code = (
        "import sys, natgrad, natgrad.cli, natgrad.rl; "
        "assert 'gymnasium' not in sys.modules, 'gymnasium imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
