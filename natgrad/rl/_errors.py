"""Errors raised by :mod:`natgrad.rl`; the CLI turns them into one-line messages."""

from __future__ import annotations

from types import ModuleType

from natgrad.errors import MissingExtraError, NatgradError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "EnvOutputError",
    "MissingExtraError",
    "TrainingError",
    "first_line",
    "import_gymnasium",
]


class ConfigError(NatgradError, ValueError):
    """A training option, environment id or output directory is unusable.

    Also raised when a file of a run cannot be written mid-run (disk full, read-only).
    """


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated, corrupted, modified or not natgrad's own.

    The message says which file, what is wrong with it and what to do (for example which
    intact previous checkpoint to use instead).
    """


class TrainingError(NatgradError, RuntimeError):
    """Training stopped: too many consecutive policy updates were rejected as faulty."""


class EnvOutputError(NatgradError, ValueError):
    """The environment returned a NaN or infinite observation or reward.

    Raised before the value reaches the normalizers, the buffer or the policy, so the run's
    state (and its last checkpoint) stays usable.
    """


def import_gymnasium() -> ModuleType:
    """Import gymnasium, or raise :class:`MissingExtraError` naming the ``rl`` extra."""
    try:
        import gymnasium
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError("natgrad.rl", "rl", "gymnasium") from error
    return gymnasium


def first_line(error: BaseException) -> str:
    """``"TypeName: message"`` on one line, for one-line error reports.

    natgrad's own messages are kept whole (they end with the fix); others (e.g. torch's
    multi-paragraph load errors) are cut to their first line.
    """
    if isinstance(error, NatgradError):
        text = " ".join(str(error).split())
    else:
        lines = str(error).strip().splitlines()
        text = lines[0][:200] if lines else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
