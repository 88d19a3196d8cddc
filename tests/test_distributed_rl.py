"""Data-parallel training (``natgrad train --nproc K``): 2 gloo ranks on CartPole, on CPU.

The ranks are forked processes (as in ``tests/test_distributed.py``) or, for the command
line, the processes ``--nproc`` starts. Checked: only rank 0 writes; every rank ends every
update with bit-identical parameters; the direction is RAT's on the union of the ranks'
batches; a resume continues bit for bit; unsupported algorithms are refused up front.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from natgrad import RATNaturalGradient
from natgrad.rl._errors import ConfigError
from natgrad.rl.checkpoint import load_checkpoint
from natgrad.rl.config import TrainConfig
from natgrad.rl.logger import read_progress
from natgrad.rl.normalize import RunningMeanStd
from natgrad.rl.parallel import DataParallel, TrackedRunningMeanStd, merge_statistics
from natgrad.rl.train import Trainer
from natgrad.solvers import RL_AGENT

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="no torch.distributed")

TINY = {"env": "CartPole-v1", "num_envs": 2, "num_steps": 64, "hidden": (8,), "seed": 3}
TINY_FLAGS = ["--num-envs", "2", "--num-steps", "64", "--hidden", "8", "--seed", "3"]


def _flat(trainer: Trainer) -> torch.Tensor:
    params = [*trainer.policy.parameters(), *trainer.critic.parameters()]
    return torch.cat([p.detach().reshape(-1) for p in params])


def _gather(tensor: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def _trainer(out: Path, steps: int, **options: object) -> Trainer:
    config = TrainConfig.from_dict({**TINY, "algo": "rat-trpo", "steps": steps, **options})
    return Trainer(config, out, tensorboard=False, parallel=DataParallel())


def _check_direction(rank: int, root: Path) -> None:
    """One update's direction equals RAT's on the concatenated batch (float64, exact solver)."""
    trainer = _trainer(root / f"direction{rank}", 256, solver="cholesky")
    assert trainer.algo.rat.process_group is dist.group.WORLD
    built = RATNaturalGradient.from_options(RL_AGENT, process_group=dist.group.WORLD)
    assert built.process_group is dist.group.WORLD
    trainer.collector.collect(
        trainer.policy, trainer.critic, trainer.buffer, trainer.action_generator
    )
    trainer.parallel.sync_statistics(trainer.collector)
    batch = trainer.buffer.batch(trainer.config.gamma, trainer.config.gae_lambda)
    adv = trainer.parallel.normalize_advantages(batch.advantages)
    policy = copy.deepcopy(trainer.policy).double()
    mine = trainer.algo.rat.natural_gradient(policy, batch.obs.double(), batch.acts, adv.double())
    obs = torch.cat(_gather(batch.obs.double()))
    acts = torch.cat(_gather(batch.acts))
    union_adv = torch.cat(_gather(adv.double()))
    raw = torch.cat(_gather(batch.advantages))
    whitened = (raw - raw.mean()) / (raw.std() + 1e-8)
    assert torch.allclose(union_adv.float(), whitened, rtol=1e-5, atol=1e-6)
    rat = trainer.algo.rat
    whole = RATNaturalGradient(rat.log_prob_fn, damping=rat.damping, solver="cholesky")
    expected = whole.natural_gradient(policy, obs, acts, union_adv)
    for d, e in zip(mine.direction, expected.direction, strict=True):
        assert float((d - e).abs().max()) <= 1e-10 * max(1.0, float(e.abs().max()))
    assert mine.d_fisher_d == pytest.approx(expected.d_fisher_d, rel=1e-10)
    trainer.close()


def _rank_main(rank: int, world: int, store: str, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    root_path = Path(root)
    _check_direction(rank, root_path)
    # Rank 1 gets its own directory, which must stay absent: only rank 0 writes.
    out = root_path / ("run" if rank == 0 else "rank1-run")
    part = root_path / ("part" if rank == 0 else "rank1-part")
    whole = _trainer(out, 768)
    whole.run(progress=False)
    params = _flat(whole)
    whole.close()
    assert all(torch.equal(params, other) for other in _gather(params))
    norm, scaler = whole.collector.obs_norm.rms, whole.collector.reward_scaler.rms
    merged = [norm.mean, norm.var, [norm.count, float(scaler.var), scaler.count]]
    stats = torch.from_numpy(np.concatenate(merged))  # every rank normalizes alike
    assert all(torch.equal(stats, other) for other in _gather(stats))
    first = _trainer(part, 256)
    first.run(progress=False)
    first.close()
    resumed = Trainer(None, part, resume=True, steps=768, tensorboard=False,
                      trust_env_state=True, parallel=DataParallel())  # fmt: skip
    assert (resumed.global_step, resumed.iteration) == (256, 1)
    resumed.run(progress=False)
    resumed.close()
    assert torch.equal(_flat(resumed), params)  # the same as the uninterrupted run
    if rank == 1:
        assert not (root_path / "rank1-run").exists() and not (root_path / "rank1-part").exists()
    dist.destroy_process_group()


def test_two_ranks_share_the_update_and_resume_exactly():
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_rank_main, args=(2, os.path.join(tmp, "store"), tmp), nprocs=2,
                           start_method="fork")  # fmt: skip
        rows = read_progress(Path(tmp) / "run" / "progress.csv")
        assert [r["step"] for r in rows] == [256.0, 512.0, 768.0]
        state = load_checkpoint(Path(tmp) / "part" / "checkpoint.pt")
        ranks = state["data_parallel"]["ranks"]
        assert state["data_parallel"]["world_size"] == 2 and len(ranks) == 2
        assert not torch.equal(ranks[0]["action_generator"], ranks[1]["action_generator"])


def test_cli_nproc_two_trains_and_only_rank0_writes(tmp_path, capfd, monkeypatch):
    from natgrad.cli import main

    out = tmp_path / "run"
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # --rat-tol 1e-9 is below float32's reach: every rank's update warns (PrecisionWarning)
    code = main(["train", "--nproc", "2", "--steps", "512", *TINY_FLAGS, "--out", str(out),
                 "--no-progress", "--no-tensorboard", "--rat-tol", "1e-9"])  # fmt: skip
    printed = capfd.readouterr()
    assert code == 0, printed.err
    assert '"steps": 512' in printed.out and printed.out.count('"out_dir"') == 1  # rank 0 only
    assert printed.err.count("natgrad: warning:") == 1, printed.err  # rank 0's, once
    assert printed.err.count("natgrad train ->") == 1
    rows = read_progress(out / "progress.csv")
    assert [r["step"] for r in rows] == [256.0, 512.0]
    # the summary's final return is the logged one (every rank's episodes), not rank 0's
    summary = json.loads(printed.out[printed.out.index("{") :])
    assert summary["final_return"] == rows[-1]["episodic_return_mean"]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["global_step"] == 512 and state["data_parallel"]["world_size"] == 2
    with pytest.raises(ConfigError, match="--nproc 2"):
        Trainer(None, out, resume=True, tensorboard=False)  # one process cannot continue it


def test_cli_refuses_an_algorithm_without_data_parallel_form(tmp_path, capsys):
    from natgrad.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--nproc", "2", "--algo", "ppo", "--out", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "--nproc 2" in message and "--algo ppo" in message and "rat-npg" in message
    assert not (tmp_path / "run").exists()


def test_cli_nproc_must_agree_with_the_launcher(monkeypatch, capsys):
    from natgrad.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        main(["train", "--nproc", "2"])
    assert "WORLD_SIZE=3" in capsys.readouterr().err


def test_merged_statistics_equal_those_of_the_union():
    rng = np.random.default_rng(0)
    start = rng.normal(size=(5, 3))
    batches = [rng.normal(2.0, 3.0, size=(n, 3)) for n in (7, 11)]
    reference = RunningMeanStd((3,))
    reference.update(start)
    ranks = []
    for batch in batches:
        tracked = TrackedRunningMeanStd.replacing(reference)
        for row in batch:  # one observation per step, as the collector folds them
            tracked.update(row[None])
        ranks.append(tracked)
    rows = [np.concatenate([[t.pending.count], t.pending.mean, t.pending.var]) for t in ranks]
    for tracked in ranks:
        merge_statistics([tracked], lambda row: np.stack(rows))
    reference.update(np.concatenate(batches))
    for tracked in ranks:
        assert tracked.count == reference.count and tracked.pending.count == 0
        np.testing.assert_allclose(tracked.mean, reference.mean, rtol=1e-12)
        np.testing.assert_allclose(tracked.var, reference.var, rtol=1e-12)
    assert np.array_equal(ranks[0].mean, ranks[1].mean)


_WITH_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _start_launcher(out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "natgrad", "train", "--nproc", "2", "--steps", "10000000",
            *TINY_FLAGS, "--checkpoint-every", "1", "--out", str(out), "--no-progress",
            "--no-tensorboard", *extra]  # fmt: skip
    # in its own process group with SIGINT not ignored, as a terminal's foreground job (a
    # background job's SIGINT may be ignored, and exec keeps it so)
    args = [sys.executable, "-c", _WITH_SIGINT, *args[1:]]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip


def _ranks_after_a_checkpoint(launcher: subprocess.Popen[str], out: Path) -> list[int]:
    """The launcher's rank processes, once the run has written a checkpoint."""
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert launcher.poll() is None, launcher.stderr.read()
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    assert len(children) == 2
    return [int(pid) for pid in children]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has ended; only its exit status waits to be collected


def _wait_until_ended(pids: list[int], seconds: float = 30) -> list[int]:
    """The ranks still running after ``seconds`` (killed then, so that none outlives the test)."""
    deadline = time.monotonic() + seconds
    while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in pids if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


LINUX = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@LINUX
@pytest.mark.parametrize(
    ("signum", "stopped"), [(signal.SIGTERM, "stopped by SIGTERM"), (signal.SIGINT, "interrupted")]
)
def test_stopping_the_nproc_launcher_ends_every_rank_and_says_how_to_resume(
    tmp_path, signum, stopped
):
    """SIGTERM to the launcher (a scheduler's stop) left both ranks training, unwatched;
    Ctrl-C (SIGINT to the whole process group) ended them without the one-line note."""
    out = tmp_path / "run"
    launcher = _start_launcher(out)
    ranks = _ranks_after_a_checkpoint(launcher, out)
    if signum == signal.SIGINT:
        os.killpg(launcher.pid, signum)
    else:
        launcher.send_signal(signum)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signum, err
    assert _wait_until_ended(ranks) == []
    step = int(load_checkpoint(out / "checkpoint.pt")["global_step"])
    note = (f"{stopped}; the last checkpoint (step {step}) is intact: continue with "
            f"--resume --out {out} --nproc 2")  # fmt: skip
    assert err.count(note) == 1, err
    assert "Traceback" not in err
    if signum == signal.SIGINT:
        return
    # the note's command continues the run
    resumed = subprocess.run(
        [sys.executable, "-m", "natgrad", "train", "--resume", "--out", str(out), "--nproc", "2",
         "--steps", str(step + 256), "--no-progress", "--no-tensorboard"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert int(load_checkpoint(out / "checkpoint.pt")["global_step"]) == step + 256


@LINUX
def test_the_ranks_end_when_the_launcher_is_killed_outright(tmp_path):
    """SIGKILL runs no handler: the ranks get SIGTERM from the kernel when their parent dies."""
    out = tmp_path / "run"
    launcher = _start_launcher(out)
    ranks = _ranks_after_a_checkpoint(launcher, out)
    launcher.kill()
    launcher.communicate(timeout=60)
    assert _wait_until_ended(ranks) == []
    load_checkpoint(out / "checkpoint.pt")  # intact


def test_a_rank_ended_by_a_signal_gives_the_shells_status(tmp_path):
    from natgrad.rl.launch import _exit_status

    assert _exit_status(-9) == 137 and _exit_status(-15) == 143
    assert _exit_status(0) == 0 and _exit_status(2) == 2


def test_the_launchers_note_reads_what_the_run_saved(tmp_path):
    from natgrad.rl.train import NOTHING_SAVED, saved_run_note

    assert saved_run_note(tmp_path, "--nproc 2") == NOTHING_SAVED
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    note = saved_run_note(tmp_path, "--nproc 2")
    assert note.startswith("the checkpoint cannot be read: ") and "intact" not in note
