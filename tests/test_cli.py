"""The `natgrad` command: train/eval/plot end to end, and usage errors without tracebacks."""

from __future__ import annotations

import json
import shutil
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


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--steps", "256", "--out", str(run), *TINY]) == 0
    return run


def _files(root):
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


# Each misuse: one line on stderr, exit status 2, nothing written. RUN is a finished run
# of 256 steps, OUT a fresh directory.
MISUSES = [
    (["train", "--threads", "-1", "--out", "OUT"], "--threads must be >= 1, or 0"),
    (["train", "--num-envs", "1", "--num-steps", "1", "--out", "OUT"],
     "--num-envs 1 x --num-steps 1 gives 1 sample per update"),
    (["train", "--steps", "0", "--out", "OUT"], "--steps must be > 0"),
    (["train", "--num-envs", "0", "--out", "OUT"], "--num-envs must be > 0"),
    (["train", "--checkpoint-every", "0", "--out", "OUT"], "--checkpoint-every must be > 0"),
    (["train", "--max-grad-norm", "0", "--out", "OUT"], "--max-grad-norm must be > 0"),
    (["train", "--max-rejections", "0", "--out", "OUT"], "--max-rejections must be > 0"),
    (["train", "--kl-reject", "0.5", "--out", "OUT"], "--kl-reject must be 0 (off) or >= 1"),
    (["train", "--cg-damping", "-1", "--out", "OUT"], "--cg-damping must be >= 0"),
    (["train", "--gamma", "nan", "--out", "OUT"], "--gamma must be in [0, 1]"),
    (["train", "--rat-tol", "1.5", "--out", "OUT"], "--rat-tol must be in (0, 1)"),
    (["train", "--algo", "rat-trpo", "--backtrack-coeff", "0", "--out", "OUT"],
     "--backtrack-coeff must be in (0, 1)"),
    (["train", "--trust-env-state", "--out", "OUT"], "--trust-env-state applies to --resume"),
    (["train", "--resume", "--out", "OUT"], "no checkpoint.pt in"),
    (["train", "--resume"], "--resume needs --out DIR"),
    (["train", "--resume", "--out", "RUN", "--steps", "128"],
     "--steps 128 is below the 256 steps this run has already taken; pass --steps 256 or more"),
    (["plot", "RUN", "--out", "/proc/x.png"], "--out '/proc/x.png'"),
    (["plot", "RUN", "--out", "OUT/x.png"], "the directory"),
    (["plot", "RUN", "--out", "RUN/x.foo"], "unknown image format '.foo'"),
    (["plot", "RUN", "--y", "nope"], "--y 'nope' is not a column"),
    (["plot", "OUT"], "has no progress.csv"),
    (["eval", "RUN", "--episodes", "0"], "--episodes must be >= 1"),
    (["eval", "RUN", "--seed", "-1"], "--seed must be >= 0"),
    (["eval", "RUN", "--gif", "OUT/x.gif"], "--gif"),
    (["eval", "OUT"], "no checkpoint.pt in"),
    (["eval", "RUN/config.json"], "is a file, not a run: pass the run's directory"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "message"), MISUSES, ids=lambda v: " ".join(v)[:40])
def test_misuse_is_one_line_exit_2_nothing_written(capsys, tmp_path, finished_run, argv, message):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    paths = {"RUN": str(run), "OUT": str(tmp_path / "out")}
    argv = [a.replace("RUN", paths["RUN"]).replace("OUT", paths["OUT"]) for a in argv]
    before = _files(tmp_path)
    err = _error(capsys, [*argv, "--no-progress"] if argv[0] == "train" else argv)
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert _files(tmp_path) == before
    assert not (tmp_path / "out").exists()


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


def test_torchs_internal_deprecation_is_not_shown_as_natgrads_warning(tmp_path):
    # K-FAC's first jvp imports torch's decompositions, which call torch.jit.script; a
    # fresh process, so that the import happens in this run
    argv = ["train", "--algo", "kfac", "--steps", "128", "--out", str(tmp_path / "run"), *TINY]
    done = subprocess.run([sys.executable, "-m", "natgrad", *argv], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "jit.script" not in done.stderr


def test_a_flag_of_another_algorithm_is_warned_about(capsys, tmp_path):
    argv = ["train", "--algo", "ppo", "--damping", "0.5", "--cg-iters", "3", "--steps", "128",
            "--out", str(tmp_path / "run"), *TINY]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "--cg-iters, --damping do not apply to --algo ppo and will be ignored" in err


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
    out, err = capsys.readouterr()
    assert json.loads(out)["steps"] == 256
    # Restored from the checkpoint at step 128 (a fresh start would end at 256 too).
    assert "natgrad: warning: the saved environments are pickled" in err
    assert "re-seeded at step 128" in err
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


@pytest.mark.parametrize(
    ("source", "poison", "name"),
    [
        ("policy.safetensors", "policy", "policy.head.bias"),
        ("policy.safetensors", "obs_norm", "obs_norm.var"),
        ("checkpoint.pt", "policy", "policy.head.bias"),
        ("checkpoint.pt", "obs_norm", "collector.obs_norm.rms.var"),
    ],
)
def test_eval_refuses_a_saved_policy_with_nan_or_inf(
    capsys, tmp_path, finished_run, source, poison, name
):
    from natgrad.rl import Trainer

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    with pytest.warns(RuntimeWarning, match="re-seeded"):
        trainer = Trainer(None, run, resume=True, tensorboard=False)
    if poison == "policy":
        trainer.policy.head.bias.data[0] = float("nan")
    else:
        trainer.collector.obs_norm.rms.var[1] = float("inf")
    trainer.save()  # with its digests: the file is intact, its values are not
    trainer.close()
    err = _error(capsys, ["eval", str(run / source)])
    assert f"{run / source}: the saved tensor {name!r} holds 1 NaN or inf value(s)" in err


@pytest.mark.parametrize(
    ("stop_at", "note"),
    [
        (1, "no checkpoint was written yet, so nothing is saved: start the run again"),
        (3, "the last checkpoint (step 256) is intact: continue with --resume --out {out}"),
    ],
    ids=["before-the-first-checkpoint", "after-a-checkpoint"],
)
def test_ctrl_c_says_what_is_saved_and_the_advice_works(
    capsys, monkeypatch, tmp_path, stop_at, note
):
    from natgrad.rl.train import Trainer

    out, step, calls = tmp_path / "run", Trainer.step, []

    def interrupted(self):
        calls.append(self.global_step)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "step", interrupted)
    argv = ["train", "--steps", "384", "--checkpoint-every", "1", "--out", str(out), *TINY]
    assert main(argv) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "interrupted; " + note.format(out=out)
    monkeypatch.undo()
    again = argv if stop_at == 1 else ["train", "--resume", "--out", str(out), *TINY[-2:]]
    assert main(again) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 384


def test_ctrl_c_in_eval_claims_no_checkpoint(capsys, monkeypatch, finished_run):
    import importlib

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = importlib.import_module("natgrad.rl.evaluate")  # the module, not the function
    monkeypatch.setattr(module, "evaluate", interrupted)
    assert main(["eval", str(finished_run)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
