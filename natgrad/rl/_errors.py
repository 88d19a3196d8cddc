"""Errors raised by :mod:`natgrad.rl`; the CLI turns them into argparse-style messages."""

from __future__ import annotations

from types import ModuleType


class ConfigError(ValueError):
    """A training option, environment id or output directory is unusable."""


class MissingExtraError(ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, what: str, extra: str, package: str | None = None) -> None:
        self.extra = extra
        package = package or extra
        super().__init__(
            f"{what} needs the optional dependency {package!r}, which is not installed; "
            f'install it with: pip install "natgrad[{extra}]"'
        )


def import_gymnasium() -> ModuleType:
    """Import gymnasium, or raise :class:`MissingExtraError` naming the ``rl`` extra."""
    try:
        import gymnasium
    except ImportError as error:  # pragma: no cover - exercised only without the extra
        raise MissingExtraError("natgrad.rl", "rl", "gymnasium") from error
    return gymnasium
