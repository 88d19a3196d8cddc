"""Start or join the ranks of a data-parallel run (``natgrad train --nproc K``, torchrun).

``natgrad train --nproc K`` starts ``K`` local processes of ``python -m natgrad train``
with torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
``MASTER_PORT`` on ``127.0.0.1`` and a free port); each joins the gloo process group
(:func:`join_from_env`) and trains as one :class:`~natgrad.rl.parallel.DataParallel`
rank. Under ``torchrun`` the launcher is torchrun's and the rest is the same.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from natgrad.rl._errors import ConfigError
from natgrad.rl.parallel import DataParallel, LocalRun

__all__ = ["check_data_parallel", "join_from_env", "launch", "launched_world_size"]

_POLL_SECONDS = 0.05


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
    returned; Ctrl-C terminates every rank (status 130).
    """
    port = _free_port()
    procs: list[subprocess.Popen[bytes]] = []
    for rank in range(nproc):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        stdout = None if rank == 0 else subprocess.DEVNULL
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "natgrad", "train", *argv], env=env, stdout=stdout
            )
        )
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [code for code in codes if code not in (None, 0)]
            if failed:
                status = failed[0]
                break
            if all(code is not None for code in codes):
                break
            time.sleep(_POLL_SECONDS)
    except KeyboardInterrupt:
        status = 130
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait()
    if status == 0:
        status = next((p.returncode for p in procs if p.returncode != 0), 0)
    return status
