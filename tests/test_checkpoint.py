"""Checkpoints: no code runs on load, damaged files give one line, the previous one is kept."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.cli import main  # noqa: E402
from natgrad.rl.checkpoint import load_checkpoint, load_policy  # noqa: E402

TINY = ["--num-envs", "2", "--num-steps", "32", "--hidden", "8", "--critic-epochs", "1",
        "--checkpoint-every", "1", "--no-progress", "--no-tensorboard"]  # fmt: skip
RESUME = ["--no-progress", "--no-tensorboard"]


class Payload:
    """Unpickling this creates ``path``: proof that code from the file ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--steps", "128", "--out", str(run), *TINY]) == 0
    return run


@pytest.fixture
def run(finished_run, tmp_path, capsys):
    capsys.readouterr()
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _error(capsys, argv, code=2):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _tree(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _record(run, name):
    """Record ``name``'s current digest in checkpoint.json, as a forger could."""
    sidecar = run / "checkpoint.json"
    data = json.loads(sidecar.read_text())
    digest = hashlib.sha256((run / name).read_bytes()).hexdigest()
    data["files"].append({"file": name, "sha256": digest})
    sidecar.write_text(json.dumps(data))


def test_checkpoint_holds_only_tensors_and_plain_data(finished_run):
    state = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 128 and state["iteration"] == 2
    assert load_checkpoint(finished_run / "checkpoint.pt")["global_step"] == 128
    assert (finished_run / "checkpoint.prev.pt").exists()
    assert torch.load(finished_run / "checkpoint.prev.pt", weights_only=True)["iteration"] == 1
    tensors, meta = load_policy(finished_run / "policy.safetensors")
    assert json.loads(meta["config"])["hidden"] == [8] and meta["global_step"] == "128"
    for name, value in state["policy"].items():
        assert torch.equal(tensors[f"policy.{name}"], value)


@pytest.mark.parametrize("record", [False, True], ids=["digest-mismatch", "digest-forged"])
@pytest.mark.parametrize("command", ["eval", "resume"])
def test_crafted_checkpoint_runs_no_code(capsys, run, tmp_path, record, command):
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "policy": Payload(marker)}, run / "checkpoint.pt")
    if record:
        _record(run, "checkpoint.pt")
    (run / "policy.safetensors").unlink()  # eval falls back to checkpoint.pt
    before = _tree(run)
    argv = ["eval", str(run)] if command == "eval" else ["train", "--resume", "--out", str(run)]
    err = _error(capsys, argv + (RESUME if command == "resume" else []))
    assert not marker.exists()
    expected = "holds more than tensors" if record else "truncated, corrupted or was replaced"
    assert expected in err and "checkpoint.prev.pt" in err
    assert _tree(run) == before


def test_crafted_env_state_is_never_loaded_unless_trusted(capsys, run, tmp_path):
    marker = tmp_path / "pwned"
    (run / "checkpoint.env.pkl").write_bytes(pickle.dumps(Payload(marker)))
    # Trusted, the file is still checked against the digest the checkpoint recorded.
    err = _error(capsys, ["train", "--resume", "--trust-env-state", "--out", str(run), *RESUME])
    assert "does not match the SHA-256" in err and "without --trust-env-state" in err
    assert main(["train", "--resume", "--out", str(run), "--steps", "192", *RESUME]) == 0
    assert "re-seeded at step 128" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "old-format", "incomplete"])
def test_damaged_checkpoint_offers_the_previous_one(capsys, run, damage):
    path = run / "checkpoint.pt"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"\x00not a checkpoint" * 100)
    elif damage == "old-format":  # natgrad 0.1 stored NumPy arrays: refused
        torch.save({"global_step": 1, "obs": np.zeros(3)}, path)
        _record(run, "checkpoint.pt")
    else:  # plain data, recorded digest, but fields missing
        torch.save({"format": 2, "config": {"hidden": "x"}}, path)
        _record(run, "checkpoint.pt")
    before = _tree(run)
    for argv in (["train", "--resume", "--out", str(run), *RESUME], ["eval", str(run)]):
        if argv[0] == "eval":
            (run / "policy.safetensors").unlink()
            before.pop("policy.safetensors")
        err = _error(capsys, argv)
        assert str(path) in err
        assert f"the previous checkpoint (step 64) is intact: cp {run}/checkpoint.prev.pt" in err
        assert _tree(run) == before  # nothing written, config.json and progress.csv included
    # The advice works: the previous checkpoint resumes.
    shutil.copy(run / "checkpoint.prev.pt", path)
    assert main(["train", "--resume", "--out", str(run), "--steps", "128", *RESUME]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 128


def test_damaged_policy_file(capsys, run):
    path = run / "policy.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    err = _error(capsys, ["eval", str(run)])
    assert "policy.safetensors is truncated, corrupted or was replaced" in err
    # Shared alone (no checkpoint.json beside it), it is still parsed safely.
    alone = run.parent / "alone"
    alone.mkdir()
    shutil.copy(path, alone / "policy.safetensors")
    err = _error(capsys, ["eval", str(alone / "policy.safetensors")])
    assert "not a valid safetensors file" in err


def test_eval_a_shared_policy_file(capsys, run):
    shared = run.parent / "shared.safetensors"
    shutil.copy(run / "policy.safetensors", shared)
    assert main(["eval", str(run), "--episodes", "2"]) == 0
    from_run = json.loads(capsys.readouterr().out)
    assert main(["eval", str(shared), "--episodes", "2"]) == 0
    from_file = json.loads(capsys.readouterr().out)
    assert from_file["returns"] == from_run["returns"] and from_file["step"] == 128
    (run / "policy.safetensors").unlink()  # the checkpoint gives the same policy
    for target in (run, run / "checkpoint.pt"):
        assert main(["eval", str(target), "--episodes", "2"]) == 0
        assert json.loads(capsys.readouterr().out)["returns"] == from_run["returns"]


SAVED = ("checkpoint.json", "checkpoint.env.pkl", "policy.safetensors", "checkpoint.pt")


def _failing_saves(monkeypatch, name, after=0, error=None):
    """Make the writes of ``name`` after the first ``after`` stop halfway, raising ``error``.

    By default alternately out of space and Ctrl-C. ``progress.csv`` fails in its logger.
    Returns the list of failed writes.
    """
    import natgrad.rl.checkpoint as ck
    from natgrad.rl.logger import RunLogger

    calls, failures = [], []

    def fail():
        failures.append(name)
        if error is not None:
            return error
        return OSError(28, "No space left on device") if len(failures) % 2 else KeyboardInterrupt()

    def half(handle):
        handle.write(b"partial")
        raise fail()

    def write(path, content, original=ck.atomic_write):
        calls.append(Path(path).name)
        if Path(path).name == name and calls.count(name) > after:
            content = half
        return original(path, content)

    def log(logger, row, original=RunLogger.write):
        calls.append("progress.csv")
        if name == "progress.csv" and calls.count(name) > after:
            raise fail()
        return original(logger, row)

    monkeypatch.setattr(ck, "atomic_write", write)
    monkeypatch.setattr(RunLogger, "write", log)
    return failures


@pytest.mark.parametrize("name", SAVED)
def test_repeated_failed_saves_never_lose_the_last_checkpoint(capsys, run, monkeypatch, name):
    failures = _failing_saves(monkeypatch, name)
    for _ in range(4):  # more failed saves than records kept per file before the fix
        try:
            main(["train", "--resume", "--out", str(run), "--steps", "256", *RESUME])
        except (OSError, SystemExit):
            pass
    assert len(failures) == 4
    monkeypatch.undo()
    capsys.readouterr()
    assert load_checkpoint(run / "checkpoint.pt")["global_step"] == 128
    previous = 128 if name == "checkpoint.pt" else 64  # kept before checkpoint.pt's write
    assert load_checkpoint(run / "checkpoint.prev.pt")["global_step"] == previous
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert main(["train", "--resume", "--out", str(run), "--steps", "192", *RESUME]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 192


@pytest.mark.parametrize(
    ("name", "after", "code", "intact"),
    [
        ("checkpoint.pt", 1, errno.ENOSPC, 64),
        ("policy.safetensors", 0, errno.EROFS, None),
        ("progress.csv", 2, errno.ENOSPC, 128),
        ("checkpoint.json", 0, errno.EACCES, None),
    ],
)
def test_a_full_or_read_only_disk_is_one_line_naming_the_file_and_the_intact_checkpoint(
    capsys, tmp_path, monkeypatch, name, after, code, intact
):
    out = tmp_path / "run"
    _failing_saves(monkeypatch, name, after, OSError(code, os.strerror(code)))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--steps", "256", "--out", str(out), *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    err = err.strip().splitlines()[-1]
    assert f"natgrad train: error: cannot write {out / name}: {os.strerror(code)}; " in err
    assert f"free space or make '{out}' writable" in err
    if intact is None:
        assert err.endswith(
            "no checkpoint was written yet, so nothing is saved: start the run again"
        )
        assert not (out / "checkpoint.pt").exists()
        again = ["train", "--steps", "256", "--out", str(out), *TINY]
    else:
        assert err.endswith(
            f"the last checkpoint (step {intact}) is intact: continue with --resume --out {out}"
        )
        again = ["train", "--resume", "--out", str(out), *RESUME]
    monkeypatch.undo()  # space freed: the advice works
    assert main(again) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 256


def test_sigterm_mid_save_stops_like_ctrl_c(capsys, tmp_path, monkeypatch):
    import natgrad.rl.checkpoint as ck

    def unhandled(signum, frame):
        raise RuntimeError("SIGTERM reached the test: natgrad did not handle it")

    def terminated_halfway(handle):
        handle.write(b"partial")
        os.kill(os.getpid(), signal.SIGTERM)  # a cluster's preemption, mid-write
        raise AssertionError("SIGTERM did not stop the write")

    original, writes = ck.atomic_write, []

    def write(path, content):
        writes.append(Path(path).name)
        if writes.count("checkpoint.pt") == 2:
            content = terminated_halfway
        return original(path, content)

    monkeypatch.setattr(ck, "atomic_write", write)
    out = tmp_path / "run"
    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert main(["train", "--steps", "256", "--out", str(out), *TINY]) == 143
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored after training
    finally:
        signal.signal(signal.SIGTERM, previous)
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == (
        f"stopped by SIGTERM; the last checkpoint (step 64) is intact: continue with --resume "
        f"--out {out}"
    )
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    assert main(["train", "--resume", "--out", str(out), *RESUME]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 256


def test_the_next_save_removes_temporary_files_a_kill_left(capsys, run):
    left = [".checkpoint.pt.k1ll3d.tmp", ".checkpoint.prev.pt.tmp", ".checkpoint.json.x.tmp",
            ".checkpoint.env.pkl.y.tmp", ".checkpoint.prev.env.pkl.tmp",
            ".policy.safetensors.z.tmp"]  # fmt: skip
    for name in [*left, ".notes.tmp", "checkpoint.pt.tmp"]:
        (run / name).write_bytes(b"partial")
    assert main(["train", "--resume", "--out", str(run), "--steps", "192", *RESUME]) == 0
    assert sorted(p.name for p in run.iterdir() if "tmp" in p.name) == [
        ".notes.tmp",  # not natgrad's: kept
        "checkpoint.pt.tmp",
    ]


def test_a_missing_checkpoint_offers_the_intact_previous_one(capsys, run):
    path = run / "checkpoint.pt"
    path.unlink()
    (run / "policy.safetensors").unlink()  # eval falls back to checkpoint.pt
    for argv in (["train", "--resume", "--out", str(run), *RESUME], ["eval", str(run)]):
        err = _error(capsys, argv)
        assert f"no checkpoint.pt in '{run}'" in err
        assert f"the previous checkpoint (step 64) is intact: cp {run}/checkpoint.prev.pt" in err
    shutil.copy(run / "checkpoint.prev.pt", path)  # the advice works
    assert main(["train", "--resume", "--out", str(run), "--steps", "128", *RESUME]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 128


@pytest.mark.parametrize("rewrite", ["resume", "new-column"])
def test_an_interrupted_rewrite_of_progress_csv_keeps_every_row(tmp_path, monkeypatch, rewrite):
    """Resuming (rows after the checkpoint dropped) and a new column rewrite the CSV; it
    was truncated in place first, so a Ctrl-C mid-rewrite lost the rows."""
    import csv

    from natgrad.rl.logger import RunLogger

    logger = RunLogger(tmp_path, tensorboard=False)
    for step in (64, 128, 192):
        logger.write({"step": step, "kl": 0.01})
    before = (tmp_path / "progress.csv").read_bytes()

    def interrupted(self, rows):
        raise KeyboardInterrupt

    monkeypatch.setattr(csv.DictWriter, "writerows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if rewrite == "resume":
            RunLogger(tmp_path, resume_step=128, tensorboard=False)
        else:
            logger.write({"step": 256, "kl": 0.01, "new_metric": 1.0})
    assert (tmp_path / "progress.csv").read_bytes() == before
