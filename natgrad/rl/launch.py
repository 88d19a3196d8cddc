"""Start or join the ranks of a data-parallel run (``natgrad train --nproc K``, torchrun).

``natgrad train --nproc K`` starts ``K`` local processes of ``python -m natgrad train``
with torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` on ``127.0.0.1`` and a free port); each joins the gloo process group
(:func:`join_from_env`) and trains as one :class:`~natgrad.rl.parallel.DataParallel`
rank. Under ``torchrun`` the launcher is torchrun's and the rest is the same.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence

from natgrad.rl._errors import ConfigError
from natgrad.rl.parallel import DataParallel, LocalRun

__all__ = [
    "LaunchStopped",
    "check_data_parallel",
    "join_from_env",
    "launch",
    "launched_world_size",
    "started_by_launch",
]

_POLL_SECONDS = 0.05
_LAUNCHER_PID = "NATGRAD_LAUNCHER_PID"
"""Set by :func:`launch` in each rank's environment: the ranks end when the launcher does."""
_PR_SET_PDEATHSIG = 1  # prctl(2) option: the signal this process gets when its parent dies


class LaunchStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (a scheduler's stop) stopped ``natgrad train --nproc K``.

    Every rank was ended before this is raised; ``signum`` is the signal. The launcher,
    not the ranks, says what the run saved (:func:`started_by_launch`).
    """

    def __init__(self, signum: int) -> None:
        super().__init__()
        self.signum = signum


def started_by_launch(environ: Mapping[str, str] | None = None) -> bool:
    """Whether :func:`launch` (``--nproc K``, not torchrun) started this process as a rank."""
    return _LAUNCHER_PID in (os.environ if environ is None else environ)


def _stop_launcher(signum: int, frame: object) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the launcher at once
    raise LaunchStopped(signum)


def _end_with_launcher(environ: Mapping[str, str]) -> None:
    """In a rank that :func:`launch` started: get SIGTERM when the launcher dies (Linux).

    A launcher killed outright (SIGKILL, out of memory) runs no handler; without this its
    ranks would go on training, unwatched, in the run directory.
    """
    launcher = environ.get(_LAUNCHER_PID)
    if launcher is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError, ValueError):  # no prctl: the launcher's handler still ends us
        return
    if os.getppid() != int(launcher):  # it died before prctl took effect
        raise ConfigError(
            "the natgrad train --nproc launcher that started this rank has ended; nothing "
            "was trained by this rank"
        )


def launched_world_size(environ: Mapping[str, str] | None = None) -> int:
    """``WORLD_SIZE`` when a launcher (torchrun, ``--nproc``) started this process, else 0."""
    environ = os.environ if environ is None else environ
    if "RANK" not in environ or "WORLD_SIZE" not in environ:
        return 0
    try:
        return int(environ["WORLD_SIZE"])
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={environ['WORLD_SIZE']!r} is not an integer; start the ranks with "
            "torchrun or natgrad train --nproc K"
        ) from None


def join_from_env() -> LocalRun:
    """Join the gloo process group the launcher describes (one process: :class:`LocalRun`)."""
    if launched_world_size() <= 1:
        return LocalRun()
    _end_with_launcher(os.environ)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="env://")
    return DataParallel()


def check_data_parallel(algo: str, options: object, nproc: int) -> None:
    """Refuse, before any process starts, an algorithm without a data-parallel form.

    Raises
    ------
    ConfigError
        ``algo`` keeps the default :meth:`PolicyUpdate.use_process_group`, or
        ``--rat-fisher`` is not ``sampled``.
    """
    from natgrad.rl.algorithms import ALGORITHMS, PolicyUpdate

    cls = ALGORITHMS.get(algo)
    if cls is not None and cls.use_process_group is PolicyUpdate.use_process_group:
        supported = [n for n, c in ALGORITHMS.items() if c.use_process_group is not
                     PolicyUpdate.use_process_group]  # fmt: skip
        raise ConfigError(
            f"--nproc {nproc}: --algo {algo} has no data-parallel form yet (its update would "
            "need gradients or Fisher-vector products averaged over ranks); use --algo "
            f"{' or '.join(supported)}, or drop --nproc"
        )
    fisher = getattr(options, "rat_fisher", "sampled")
    if fisher != "sampled":
        raise ConfigError(
            f"--nproc {nproc}: --rat-fisher {fisher} has no data-parallel form; use "
            "--rat-fisher sampled, or drop --nproc"
        )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``python -m natgrad train *argv`` as ``nproc`` local ranks; return the exit status.

    Rank 0 inherits stdout and stderr; the other ranks' stdout is discarded (they print
    nothing but errors). When a rank fails, the others are terminated and its status is
    returned (``128 + N`` for a rank ended by signal ``N``).

    Raises
    ------
    LaunchStopped
        Ctrl-C or SIGTERM reached the launcher: every rank was ended first. On Linux the
        ranks also end when the launcher is killed outright.
    """
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python
    on_main_thread = threading.current_thread() is threading.main_thread()
    if on_main_thread:
        signal.signal(signal.SIGTERM, _stop_launcher)
    status = 0
    stopped: LaunchStopped | None = None
    try:
        for rank in range(nproc):
            env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(nproc),
                "LOCAL_WORLD_SIZE": str(nproc),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                _LAUNCHER_PID: str(os.getpid()),
            }
            stdout = None if rank == 0 else subprocess.DEVNULL
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "natgrad", "train", *argv], env=env, stdout=stdout
                )
            )
        status = _wait_for_ranks(procs)
    except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM through _stop_launcher
        stopped = error if isinstance(error, LaunchStopped) else LaunchStopped(signal.SIGINT)
    finally:
        _end_ranks(procs)
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if stopped is not None:
        raise stopped
    if status == 0:
        status = next((_exit_status(p.returncode) for p in procs if p.returncode != 0), 0)
    return status


def _wait_for_ranks(procs: Sequence[subprocess.Popen[bytes]]) -> int:
    """Wait until every rank exits, or one fails (its status)."""
    while True:
        codes = [p.poll() for p in procs]
        failed = [code for code in codes if code not in (None, 0)]
        if failed:
            return _exit_status(failed[0])
        if all(code is not None for code in codes):
            return 0
        time.sleep(_POLL_SECONDS)


def _end_ranks(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Terminate the ranks still running and wait for every one."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait()


def _exit_status(returncode: int) -> int:
    """A shell's exit status for a rank's return code (``-N``: ended by signal ``N``)."""
    return 128 - returncode if returncode < 0 else returncode
