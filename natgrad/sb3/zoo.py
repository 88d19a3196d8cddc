"""rl-zoo3 with ``rat_trpo`` and ``rat_npg``: ``python -m natgrad.sb3.zoo train|enjoy ...``.

Registers :class:`~natgrad.sb3.RATTRPO` and :class:`~natgrad.sb3.RATNPG` in rl-zoo3's
algorithm table (and its hyperparameter sampler, for ``-optimize``), points
``--conf-file`` at the YAML files shipped in ``natgrad/sb3/hyperparams/`` unless one is
given, and runs rl-zoo3's own ``train`` or ``enjoy`` with the remaining arguments::

    python -m natgrad.sb3.zoo train --algo rat_trpo --env Hopper-v5 -f logs
    python -m natgrad.sb3.zoo enjoy --algo rat_trpo --env Hopper-v5 -f logs

Every rl-zoo3 option works as usual (``-n``, ``--seed``, ``-params``, ``-tb``, ...); other
algorithms (``--algo ppo``) run unchanged. Requires ``rl_zoo3`` (in the ``sb3`` extra).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from natgrad.errors import ArgumentError, MissingExtraError, NatgradError
from natgrad.sb3.rat_npg import RATNPG
from natgrad.sb3.rat_trpo import RATTRPO

__all__ = ["ALGORITHMS", "hyperparams_path", "main", "register"]

#: rl-zoo3 name -> algorithm class.
ALGORITHMS = {"rat_trpo": RATTRPO, "rat_npg": RATNPG}
COMMANDS = ("train", "enjoy")
HYPERPARAMS = Path(__file__).parent / "hyperparams"
_USAGE = (
    "usage: python -m natgrad.sb3.zoo {train,enjoy} [rl-zoo3 arguments]\n"
    "  e.g. python -m natgrad.sb3.zoo train --algo rat_trpo --env CartPole-v1 -f logs\n"
    "  (python -m natgrad.sb3.zoo train --help lists rl-zoo3's arguments)"
)


def hyperparams_path(algo: str) -> Path:
    """The YAML file of tuned hyperparameters shipped for ``algo`` (``rat_trpo``, ...)."""
    if algo not in ALGORITHMS:
        raise ArgumentError(f"algo must be one of {sorted(ALGORITHMS)}, got {algo!r}")
    return HYPERPARAMS / f"{algo}.yml"


def _rat_sampler(sample_trpo: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """TRPO's optuna sampler with ``damping`` in place of ``cg_max_steps``."""

    def sample(trial: Any, n_actions: int, n_envs: int, additional_args: dict) -> dict:
        params = sample_trpo(trial, n_actions, n_envs, additional_args)
        params.pop("cg_max_steps", None)
        params["damping"] = trial.suggest_float("damping", 1e-3, 1.0, log=True)
        return params

    return sample


def _rat_converter(convert: Callable[[dict], dict]) -> Callable[[dict], dict]:
    """TRPO's converter of stored optuna trials, dropping ``cg_max_steps``."""

    def converted(params: dict) -> dict:
        params = convert(params)
        params.pop("cg_max_steps", None)
        return params

    return converted


def register() -> None:
    """Add ``rat_trpo`` and ``rat_npg`` to rl-zoo3's algorithms and optuna samplers."""
    try:
        from rl_zoo3 import hyperparams_opt
        from rl_zoo3.utils import ALGOS
    except ImportError as error:
        raise MissingExtraError("natgrad.sb3.zoo", "sb3", "rl_zoo3") from error
    ALGOS.update(ALGORITHMS)
    sampler = _rat_sampler(hyperparams_opt.sample_trpo_params)
    converter = _rat_converter(hyperparams_opt.convert_onpolicy_params)
    for name in ALGORITHMS:
        hyperparams_opt.HYPERPARAMS_SAMPLER[name] = sampler
        hyperparams_opt.HYPERPARAMS_CONVERTER[name] = converter


def _algo(args: Sequence[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--algo" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--algo="):
            return arg.split("=", 1)[1]
    return None


def _with_config(args: list[str]) -> list[str]:
    """Add ``--conf-file`` with the shipped YAML for ``rat_*`` unless one is given."""
    algo = _algo(args)
    given = any(a in ("-conf", "--conf-file") or a.startswith("--conf-file=") for a in args)
    if algo in ALGORITHMS and not given:
        return [*args, "--conf-file", str(hyperparams_path(algo))]
    return args


def _log_folder(args: Sequence[str]) -> Path:
    """The ``-f``/``--log-folder`` of rl-zoo3's ``train`` (its default ``logs``)."""
    folder = "logs"
    for i, arg in enumerate(args):
        if arg in ("-f", "--log-folder") and i + 1 < len(args):
            folder = args[i + 1]
        elif arg.startswith("--log-folder="):
            folder = arg.split("=", 1)[1]
    return Path(folder)


def _directories(folder: Path) -> set[Path]:
    """Every directory under ``folder``, ``folder`` included (empty if it does not exist)."""
    if not folder.is_dir():
        return set()
    return {folder, *(Path(root) / d for root, dirs, _ in os.walk(folder) for d in dirs)}


def _holds_nothing(path: Path) -> bool:
    """Whether ``path`` is a monitor file without a single episode (header lines only)."""
    if not path.name.endswith("monitor.csv") or not path.is_file():
        return False
    try:
        with path.open(encoding="utf-8") as lines:
            return sum(1 for _ in lines) <= 2  # '#{"t_start": ...}' and 'r,l,t'
    except (OSError, UnicodeDecodeError):
        return False


def _remove_unused(folder: Path, before: set[Path]) -> None:
    """Remove the directories created under ``folder`` since ``before`` that hold nothing.

    A failed ``train`` (unknown environment, bad hyperparameter) leaves the run directory
    rl-zoo3 created before the error: empty folders and monitor files without an episode.
    Directories that existed before, and any holding something else, are kept.
    """
    if not folder.is_dir():
        return
    for root, _, files in os.walk(folder, topdown=False):
        path = Path(root)
        if path in before or any(entry.is_dir() for entry in path.iterdir()):
            continue
        if not all(_holds_nothing(path / name) for name in files):
            continue
        try:
            for name in files:
                (path / name).unlink()
            path.rmdir()
        except OSError:  # written to meanwhile, or not ours to remove: keep it
            continue


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``train`` or ``enjoy`` of rl-zoo3 with the RAT algorithms registered.

    Parameters
    ----------
    argv
        ``[command, *rl_zoo3_arguments]``; ``None`` reads ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status (0 on success, 2 for a usage error).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] not in COMMANDS:
        print(_USAGE, file=sys.stderr)
        return 0 if args[:1] in (["-h"], ["--help"]) else 2
    command, rest = args[0], args[1:]
    register()
    if command == "train":
        from rl_zoo3.train import train as run

        rest = _with_config(rest)
    else:
        from rl_zoo3.enjoy import enjoy as run
    folder = _log_folder(rest) if command == "train" else None
    before = set() if folder is None else _directories(folder)
    saved = sys.argv
    sys.argv = [f"natgrad.sb3.zoo {command}", *rest]
    finished = False
    try:
        run()
        finished = True
    except NatgradError as error:  # a bad hyperparameter: natgrad's message, no traceback
        print(f"natgrad.sb3.zoo {command}: error: {error}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
        if folder is not None and not finished:  # no empty run directory left behind
            _remove_unused(folder, before)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
