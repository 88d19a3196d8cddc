"""Options dataclasses whose fields carry their own help text and check.

Every option of ``natgrad train`` is a dataclass field declared with :func:`option`: its
default, its one-line help (the CLI's ``--help`` text) and its check are written once,
next to each other. :class:`natgrad.rl.TrainConfig` holds the options the trainer reads;
each algorithm declares its own :class:`AlgorithmOptions` subclass next to its update rule.
A field named ``max_kl`` is the flag ``--max-kl``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, TypeVar

from natgrad._checks import check_nonnegative_int, is_integer, is_real, np_bool
from natgrad.rl._errors import ConfigError

__all__ = [
    "AlgorithmOptions",
    "RecordsGivenFields",
    "at_least_one_or_off",
    "check_fields",
    "check_value",
    "explicit_fields",
    "flag",
    "help_of",
    "nonnegative",
    "nonnegative_int",
    "one_of",
    "option",
    "positive",
    "unit_interval",
]

Check = Callable[[str, Any], None]
"""``check(flag, value)`` raises :class:`ConfigError` naming ``flag`` if ``value`` is bad."""

T = TypeVar("T")


def flag(name: str) -> str:
    """The command-line flag of a field: ``max_kl`` -> ``--max-kl``."""
    return "--" + name.replace("_", "-")


Choices = Callable[[], tuple[str, ...]]
"""The allowed values of a string option, looked up when used (registries may grow)."""


def option(default: T, help: str, check: Check | None = None, choices: Choices | None = None) -> T:
    """A dataclass field with its default, its help text and its check (``None``: any value).

    ``help`` is what ``natgrad train --help`` prints for the flag (with the default);
    ``choices()`` gives the allowed strings (also the flag's argparse choices).
    """
    if choices is not None:
        check = one_of(choices)
    metadata = {"help": help, "check": check, "choices": choices}
    return dataclasses.field(default=default, metadata=metadata)


def help_of(field: dataclasses.Field) -> str:
    """The help text of a field declared with :func:`option` (empty otherwise)."""
    return field.metadata.get("help", "")


def positive(flag: str, value: Any) -> None:
    """Finite and > 0."""
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{flag} must be > 0, got {value!r}")


def nonnegative(flag: str, value: Any) -> None:
    """Finite and >= 0."""
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{flag} must be >= 0, got {value!r}")


def unit_interval(flag: str, value: Any) -> None:
    """In ``[0, 1]``."""
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{flag} must be in [0, 1], got {value!r}")


def open_unit_interval(flag: str, value: Any) -> None:
    """In ``(0, 1)`` (a relative tolerance)."""
    if not 0.0 < value < 1.0:  # NaN fails too
        raise ConfigError(f"{flag} must be in (0, 1), got {value!r}")


def at_least_one_or_off(flag: str, value: Any) -> None:
    """0 (off) or a factor >= 1 of ``--max-kl``."""
    if not (math.isfinite(value) and (value == 0 or value >= 1)):
        raise ConfigError(f"{flag} must be 0 (off) or >= 1 (a factor of --max-kl), got {value!r}")


def nonnegative_int(hint: str = "") -> Check:
    """An integer >= 0; ``hint`` is appended to the message."""

    def check(flag: str, value: Any) -> None:
        try:
            check_nonnegative_int(flag, value, hint)
        except (TypeError, ValueError) as error:
            raise ConfigError(str(error)) from None

    return check


def one_of(choices: Choices) -> Check:
    """One of ``choices()``."""

    def check(flag: str, value: Any) -> None:
        allowed = choices()
        if value not in allowed:
            raise ConfigError(f"{flag} must be one of {', '.join(allowed)}; got {value!r}")

    return check


def _is_widths(value: Any) -> bool:
    return isinstance(value, (tuple, list)) and all(is_integer(v) for v in value)


_TYPES: dict[str, tuple[str, Callable[[Any], bool], Callable[[Any], Any]]] = {
    "int": ("an integer", is_integer, int),
    "float": ("a real number", is_real, float),
    "bool": ("True or False", lambda v: isinstance(v, (bool, np_bool)), bool),
    "str": ("a string", lambda v: isinstance(v, str), str),
    "tuple[int, ...]": ("a tuple of integers", _is_widths, lambda v: tuple(int(w) for w in v)),
}
"""Option annotation -> (what it means, does a value have that type, its plain Python form).

NumPy scalars pass as their Python type (``np.int64`` as ``int``), ints as floats, a list
of ints (a JSON array) as a tuple; a bool is not a number here. An annotation that is not
a key (``options``) is checked by its owner.
"""


def check_value(field: dataclasses.Field, value: Any, label: str, owner: str = "") -> Any:
    """``value`` of ``field`` checked against the field's annotation, then its own check.

    ``label`` names it in the error (``--max-kl``), ``owner`` adds the Python spelling
    (``RatNPGOptions`` gives ``RatNPGOptions.max_kl``). Returns the value in its plain
    Python form (see :data:`_TYPES`); raises :class:`ConfigError`.
    """
    kind = _TYPES.get(field.type) if isinstance(field.type, str) else None
    if kind is not None:
        what, accepts, plain = kind
        if not accepts(value):
            where = f" ({owner}.{field.name})" if owner else ""
            raise ConfigError(
                f"{label}{where} must be {what}, got {value!r} of type "
                f"{type(value).__name__}; pass e.g. {field.default!r} (the default)"
            )
        value = plain(value)
    check = field.metadata.get("check")
    if check is not None:
        check(label, value)
    return value


def check_fields(options: Any) -> None:
    """Check every field of the dataclass instance ``options``, in field order.

    Each field's type (from its annotation), then its value; stores its plain Python form.
    """
    owner = type(options).__name__
    for field in dataclasses.fields(options):
        value = getattr(options, field.name)
        plain = check_value(field, value, flag(field.name), owner)
        if plain is not value:
            setattr(options, field.name, plain)


class RecordsGivenFields:
    """Mixin of dataclasses that remember which fields their constructor was given.

    The names passed to ``cls(...)`` (positionally or by keyword) are kept, so that a
    preset can fill in only the options the user left at their defaults
    (:func:`explicit_fields`). ``dataclasses.replace`` and ``from_dict`` pass every field.
    """

    _given: frozenset[str]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - see the class
        self = super().__new__(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.init]  # type: ignore[arg-type]
        object.__setattr__(self, "_given", frozenset(names[: len(args)]) | frozenset(kwargs))
        return self


def explicit_fields(options: Any) -> frozenset[str]:
    """The fields of the dataclass instance ``options`` that the user set.

    Those passed to its constructor (for a :class:`RecordsGivenFields`), and those whose
    value differs from the field's default (set by assignment after construction).
    """
    given = getattr(options, "_given", frozenset())
    changed = {
        f.name
        for f in dataclasses.fields(options)
        if f.default is not dataclasses.MISSING and getattr(options, f.name) != f.default
    }
    return frozenset(given) | changed


@dataclasses.dataclass
class AlgorithmOptions(RecordsGivenFields):
    """Base of the options of one algorithm (no fields of its own).

    Subclasses are dataclasses whose fields are declared with :func:`option`; they are
    checked at construction and saved in ``config.json`` under ``"options"``.
    """

    def __post_init__(self) -> None:
        check_fields(self)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names, in field order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every option (JSON-serializable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[A], data: dict[str, Any]) -> A:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise ConfigError(
                f"unknown options {unknown} for {cls.__name__}; known: {sorted(cls.names())}"
            )
        return cls(**data)


A = TypeVar("A", bound=AlgorithmOptions)
