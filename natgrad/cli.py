"""The ``natgrad`` command: ``train``, ``plot`` and ``eval`` reinforcement-learning runs.

Every field of :class:`natgrad.rl.TrainConfig` and of every algorithm's options dataclass
is a ``train`` flag (``--max-kl 0.02``, ``--no-norm-reward``), with the field's ``help``
metadata as its help text; ``natgrad train`` with no arguments trains CartPole-v1 with
``rat-npg``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]


def _train_fields() -> list[tuple[dataclasses.Field, str]]:
    """``(field, help)`` of every ``train`` option: the trainer's, then each algorithm's."""
    from natgrad.rl.algorithms import ALGORITHMS
    from natgrad.rl.config import TrainConfig, algorithm_option_fields
    from natgrad.rl.options import help_of

    out = [(f, help_of(f)) for f in dataclasses.fields(TrainConfig) if f.name != "options"]
    for name, field in algorithm_option_fields().items():
        readers = [a for a, cls in ALGORITHMS.items() if name in cls.Options.names()]
        out.append((field, f"{help_of(field)} [{', '.join(readers)}]"))
    return out


def _add_train(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from natgrad.rl.algorithms import ALGORITHMS
    from natgrad.rl.config import TrainConfig
    from natgrad.rl.options import flag

    parser = sub.add_parser(
        "train",
        usage="natgrad train [--env ENV] [--algo ALGO] [--steps N] [--seed S] [--out DIR] "
        "[--resume] [options]",
        help="train an agent (default: CartPole-v1 with rat-npg)",
        description="Train an on-policy agent on a Gymnasium environment. Every option "
        "defaults to TrainConfig or the algorithm's options; the full configuration is "
        "printed and saved as DIR/config.json.",
    )
    groups = {
        True: parser.add_argument_group("training options (natgrad.rl.TrainConfig)"),
        False: parser.add_argument_group(
            "algorithm options", "each is read by the algorithms in [brackets] only"
        ),
    }
    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    for field, text in _train_fields():
        default = field.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs: dict[str, Any] = {"default": None, "help": f"{text} (default: {shown})"}
        kwargs["help"] = kwargs["help"].replace("%", "%%")
        if field.name == "algo":
            kwargs["help"] = f"one of {', '.join(ALGORITHMS)} (default: {default})"
        if field.metadata.get("choices") is not None:
            kwargs["choices"] = field.metadata["choices"]()
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif isinstance(default, tuple):
            kwargs.update(type=int, nargs="+", metavar="WIDTH")
        else:
            kwargs["type"] = type(default)
        groups[field.name in shared].add_argument(flag(field.name), **kwargs)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default: runs/<env>-<algo>-s<seed>-<timestamp>)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint (only --steps may change); the "
        "episodes in progress are re-seeded unless --trust-env-state",
    )
    parser.add_argument(
        "--trust-env-state",
        action="store_true",
        help="with --resume: unpickle the saved environments (checkpoint.env.pkl) to continue "
        "bit for bit; unpickling runs code from the file, so only for runs you trust",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="K",
        help="data-parallel training on K local CPU processes (rat-npg, rat-trpo): each "
        "steps its own environments, the update uses the union of the batches; under "
        "torchrun leave it out (see docs/distributed.md)",
    )
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar"
    )
    parser.add_argument(
        "--tensorboard",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write TensorBoard events if tensorboard is installed",
    )
    parser.add_argument(
        "--track",
        action="store_true",
        help="log the run to Weights & Biases (natgrad[track]); offline under <out>/wandb "
        "when no W&B login is found",
    )
    parser.add_argument("--wandb-project", default="natgrad", help="W&B project (with --track)")
    parser.add_argument("--wandb-entity", default=None, help="W&B team or user (with --track)")
    parser.add_argument("--wandb-group", default=None, help="W&B run group (with --track)")
    parser.add_argument(
        "--wandb-mode",
        choices=["online", "offline"],
        default=None,
        help="W&B mode (with --track; default: $WANDB_MODE, else online when logged in)",
    )
    parser.add_argument(
        "--solved-threshold",
        type=float,
        default=None,
        help="report the first step whose recent mean return reaches this value "
        "(default: the env's reward_threshold)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``natgrad`` argument parser (sub-commands ``train``, ``plot``, ``eval``)."""
    parser = argparse.ArgumentParser(
        prog="natgrad", description="Train, plot and evaluate RL agents with RAT natural gradients."
    )
    from natgrad import __version__

    parser.add_argument("--version", action="version", version=f"natgrad {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{train,plot,eval}")
    train = _add_train(sub)
    train.set_defaults(subparser=train)
    plot = sub.add_parser("plot", help="overlay learning curves (mean and 95%% band per group)")
    plot.add_argument("runs", nargs="+", type=Path, help="run directories")
    plot.add_argument("--out", type=Path, default=Path("learning_curves.png"), help="PNG path")
    plot.add_argument("--y", default="episodic_return_mean", help="progress.csv column")
    plot.add_argument("--title", default=None)
    ev = sub.add_parser("eval", help="report returns of a saved policy")
    ev.add_argument(
        "run",
        type=Path,
        help="run directory (its policy.safetensors or checkpoint.pt), or a "
        "policy.safetensors file",
    )
    ev.add_argument("--episodes", type=int, default=10)
    ev.add_argument("--seed", type=int, default=10_000, help="seed of the first episode")
    ev.add_argument("--stochastic", action="store_true", help="sample actions (default: mode)")
    ev.add_argument("--gif", type=Path, default=None, help="write the first episode as a GIF")
    plot.set_defaults(subparser=plot)
    ev.set_defaults(subparser=ev)
    return parser


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (``signum``) stopped training; the message says what is saved."""

    def __init__(self, message: str = "", signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = signum


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """Stop training on SIGTERM (e.g. a cluster's preemption) as on Ctrl-C."""
    signal.signal(signum, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise _Interrupted(signum=signum)


@contextmanager
def _sigterm_as_ctrl_c(enabled: bool) -> Iterator[None]:
    """While training one process, SIGTERM stops it as Ctrl-C does.

    The save in progress is abandoned (its temporary file removed), the note printed, and
    the exit status is 143. Data-parallel ranks keep the default: their launcher ends them
    with SIGTERM, and a rank waiting in a collective would not run a Python handler.
    """
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _interrupted_note(args: argparse.Namespace, error: KeyboardInterrupt) -> str:
    """The one line printed when Ctrl-C stops ``args.command``: what is saved, what next."""
    signum = getattr(error, "signum", signal.SIGINT)
    stopped = (
        "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    )
    if str(error):
        return f"{stopped}; {error}"
    if args.command != "train":
        return stopped
    if args.resume:  # stopped before training: the checkpoint it resumes is untouched
        return f"{stopped}; the checkpoint is intact: continue with --resume --out {args.out}"
    from natgrad.rl.train import NOTHING_SAVED  # already imported by `train`

    return f"{stopped}; {NOTHING_SAVED}"


def _show_warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    print(f"natgrad: warning: {message}", file=sys.stderr)


def _is_rank_zero() -> bool:
    """Whether this process prints user-facing messages: rank 0 of a launched run, or alone.

    The other ranks of ``--nproc K`` or torchrun train in step with rank 0 and would repeat
    its warnings and notes word for word; they print errors only.
    """
    return os.environ.get("RANK", "0") == "0"


def _launch(args: argparse.Namespace, given: dict[str, Any]) -> int:
    """``--nproc K`` outside a launcher: check what can be checked, then start the ranks."""
    from natgrad.rl._errors import ConfigError
    from natgrad.rl.config import TrainConfig
    from natgrad.rl.launch import LaunchStopped, check_data_parallel, launch
    from natgrad.rl.train import default_out_dir, refuse_existing_run, saved_run_note

    argv = list(args.argv)
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the directory of the run to continue")
        out = args.out
    else:
        config = TrainConfig.from_dict(given)
        check_data_parallel(config.algo, config.options, args.nproc)
        out = args.out if args.out is not None else default_out_dir(config)
        refuse_existing_run(out)
        argv += ["--out", str(out)]  # one timestamped directory for every rank
    try:
        return launch(argv, args.nproc)
    except LaunchStopped as error:  # the ranks have ended: say what their run saved
        raise _Interrupted(saved_run_note(out, f"--nproc {args.nproc}"), error.signum) from None


def _warn_unused_flags(given: dict[str, Any]) -> None:
    """Warn about flags of algorithms other than ``--algo`` (they have no effect)."""
    from natgrad.rl.algorithms import ALGORITHMS
    from natgrad.rl.config import TrainConfig, algorithm_option_fields

    algo = given.get("algo", TrainConfig.algo)
    if algo not in ALGORITHMS:
        return  # refused with the list of algorithms when the config is built
    unused = sorted(
        set(given) & set(algorithm_option_fields()) - set(ALGORITHMS[algo].Options.names())
    )
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        warnings.warn(
            f"{flags} {'does' if len(unused) == 1 else 'do'} not apply to --algo {algo} "
            "and will be ignored; `natgrad train --help` marks each flag's algorithms",
            UserWarning,
            stacklevel=2,
        )


def _train(args: argparse.Namespace) -> int:
    from natgrad.rl._errors import ConfigError
    from natgrad.rl.launch import join_from_env, launched_world_size

    given = {
        f.name: getattr(args, f.name)
        for f, _ in _train_fields()
        if getattr(args, f.name) is not None
    }
    if "hidden" in given:
        given["hidden"] = tuple(given["hidden"])
    world = launched_world_size()
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {args.nproc}")
    if world and args.nproc not in (None, world):
        raise ConfigError(
            f"--nproc {args.nproc} disagrees with the launcher's WORLD_SIZE={world}; under "
            "torchrun leave --nproc out"
        )
    if not world and (args.nproc or 1) > 1:
        return _launch(args, given)
    if world > 1 and not _is_rank_zero():
        warnings.simplefilter("ignore")  # rank 0 shows them once; errors still surface
    parallel = join_from_env()
    finished = False
    try:
        with _sigterm_as_ctrl_c(enabled=parallel.world_size == 1):
            code = _train_rank(args, given, parallel)
        finished = True
        return code
    finally:
        if parallel.world_size > 1:
            import torch.distributed as dist

            if finished:  # no rank tears the group down while another still uses it
                dist.barrier()
            dist.destroy_process_group()


def _train_rank(args: argparse.Namespace, given: dict[str, Any], parallel: Any) -> int:
    """Train as one process, or as one rank of a data-parallel run (``parallel``)."""
    from natgrad.rl._errors import ConfigError
    from natgrad.rl.config import TrainConfig
    from natgrad.rl.envs import make_env
    from natgrad.rl.train import Trainer, default_out_dir, summary_json

    writer = parallel.is_writer
    callbacks = []
    if args.track and writer:  # before the run directory is touched: a missing extra writes nothing
        from natgrad.rl.tracking import WandbTracker

        callbacks.append(
            WandbTracker(args.wandb_project, args.wandb_entity, args.wandb_group,
                         mode=args.wandb_mode)
        )  # fmt: skip
    if args.resume:
        if args.out is None:
            raise ConfigError("--resume needs --out DIR, the directory of the run to continue")
        changed = sorted(set(given) - {"steps"})
        if changed:
            raise ConfigError(
                "--resume continues the saved configuration; only --steps may change, got "
                + ", ".join("--" + c.replace("_", "-") for c in changed)
            )
        trainer = Trainer(None, args.out, resume=True, steps=given.get("steps"),
                          tensorboard=args.tensorboard,
                          trust_env_state=args.trust_env_state, parallel=parallel)  # fmt: skip
    else:
        if args.trust_env_state:
            raise ConfigError("--trust-env-state applies to --resume only; add --resume")
        config = TrainConfig.from_dict(given)
        _warn_unused_flags(given)  # once the flags are known to be valid
        out = args.out if args.out is not None else default_out_dir(config)
        trainer = Trainer(config, out, tensorboard=args.tensorboard, parallel=parallel)
    config = trainer.config
    threshold = args.solved_threshold
    if threshold is None:
        spec = make_env(config.env).spec
        threshold = getattr(spec, "reward_threshold", None)
    if writer:
        print(f"natgrad train -> {trainer.out_dir}", file=sys.stderr)
        print(config.to_json(), file=sys.stderr)
    try:
        result = trainer.run(
            progress=args.progress and writer, solved_threshold=threshold, callbacks=callbacks
        )
    except KeyboardInterrupt as error:
        signum = getattr(error, "signum", signal.SIGINT)
        raise _Interrupted(trainer.continue_note(), signum) from None
    finally:
        trainer.close()
    if writer:
        print(summary_json(result))
    return 0


def _plot(args: argparse.Namespace) -> int:
    from natgrad.rl.plotting import plot_runs

    out = plot_runs(args.runs, args.out, y=args.y, title=args.title)
    print(out)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from natgrad.rl.evaluate import evaluate

    result = evaluate(
        args.run, episodes=args.episodes, seed=args.seed,
        deterministic=not args.stochastic, gif=args.gif,
    )  # fmt: skip
    print(json.dumps({
        "run": str(args.run), "step": result.step, "episodes": len(result.returns),
        "return_mean": result.mean, "return_std": result.std,
        "returns": list(result.returns), "lengths": list(result.lengths),
    }, indent=2))  # fmt: skip
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``natgrad`` command; returns the exit status.

    Usage errors (bad options, unknown env or algo, missing optional extras, unwritable
    output paths, damaged checkpoints) exit with status 2 and one line on stderr, having
    written nothing; so does a run whose files cannot be written (disk full, read-only),
    naming the file and the intact checkpoint. A run stopped by natgrad's own error (e.g.
    repeated rejected updates) exits with status 1 and one line.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = ["train", *argv]  # `natgrad [options]` is `natgrad train [options]`
    args = parser.parse_args(argv)
    args.argv = argv[1:] if args.command == "train" else argv
    sub: argparse.ArgumentParser = args.subparser  # errors are reported in its usage
    from natgrad.errors import NatgradError
    from natgrad.rl._errors import ConfigError, MissingExtraError

    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # one line each, no source excerpt
            # torch's own forward-mode decompositions (first jvp, K-FAC and the expected
            # Fisher) call its deprecated torch.jit.script: nothing a user can act on
            warnings.filterwarnings(
                "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning
            )
            if args.command == "train":
                return _train(args)
            if args.command == "plot":
                return _plot(args)
            return _eval(args)
    except (ConfigError, MissingExtraError) as error:
        sub.exit(2, f"{sub.prog}: error: {error}\n")
    except NatgradError as error:  # e.g. training stopped by repeated faulty updates
        message = " ".join(str(error).split())  # one line
        sub.exit(1, f"{sub.prog}: error: {message}\n")
    except KeyboardInterrupt as error:
        from natgrad.rl.launch import started_by_launch

        # Ctrl-C reaches every rank: one note, rank 0's, or under --nproc the launcher's
        if _is_rank_zero() and not started_by_launch():
            print(_interrupted_note(args, error), file=sys.stderr)
        return 128 + getattr(error, "signum", signal.SIGINT)  # 130, or 143 for SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
