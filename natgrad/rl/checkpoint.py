"""Run checkpoints that are safe to load: tensors and plain data only, verified and rotated.

Files in a run directory (``DIR/checkpoint.pt`` is the checkpoint path):

``checkpoint.pt``
    Everything needed to continue the run, as tensors and plain Python data
    (``torch.save``); loaded with ``torch.load(weights_only=True)``, which runs no code.
``checkpoint.prev.pt``
    The checkpoint before it, kept intact while the next one is written.
``checkpoint.json``
    The SHA-256 of every file here (with its step), recorded before the file is written
    and kept while the file or its previous version is on disk; loading checks it, so a
    truncated, corrupted or replaced file is refused before it is parsed.
``checkpoint.env.pkl`` (and ``checkpoint.prev.env.pkl``)
    The pickled environments, for exact resume. Unpickling runs code from the file, so it
    is loaded only on explicit request (:func:`load_env_state`).
``policy.safetensors``
    The policy weights and observation statistics, for sharing and ``natgrad eval``.

Every file is written to a temporary file and moved into place with ``os.replace``, so a
crash (even ``kill -9``) leaves the old or the new file, never a partial one; the next save
removes the temporary files such a crash left.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from natgrad.errors import NatgradError
from natgrad.rl._errors import CheckpointError, ConfigError, MissingExtraError, first_line

__all__ = [
    "atomic_write",
    "atomic_write_text",
    "checkpoint_content",
    "load_checkpoint",
    "load_env_state",
    "load_policy",
    "save_checkpoint",
    "writable_file",
    "write_output",
]

CHECKPOINT_NAME = "checkpoint.pt"
DIGESTS_NAME = "checkpoint.json"
POLICY_NAME = "policy.safetensors"
CHECKPOINT_FORMAT = 2  # 1: natgrad 0.1, pickled environments and NumPy arrays inside


def _umask_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_DEFAULT_MODE = _umask_mode()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write(handle)`` on a temporary file beside ``path``, then move it into place.

    The file gets the mode a plain ``open()`` would give (0o666 less the umask natgrad
    found on import). Readers see the old or the new file, never a partial one; on any
    error the temporary file is removed and ``path`` is left as it was. An ``OSError``
    (disk full, read-only file system) is raised with ``path`` as its file name.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, _DEFAULT_MODE)  # mkstemp's 0600 would hide the run from the group
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException as error:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _naming(error, path) from error
        raise


def _naming(error: OSError, path: Path) -> OSError:
    """``error`` raised for ``path``, the file meant, rather than its temporary copy."""
    return OSError(error.errno, error.strerror or str(error), str(path))


def writable_file(path: str | os.PathLike, flag: str) -> Path:
    """Check that ``path`` can be created (its directory exists and is writable).

    Raises :class:`~natgrad.rl.ConfigError` naming ``flag`` before anything is computed,
    so a typo in an output path costs nothing.
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise ConfigError(
            f"{flag} {str(path)!r}: the directory {str(parent)!r} does not exist; create it "
            "or choose another path"
        )
    if path.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        what = "is a directory" if path.is_dir() else "is in a directory you cannot write"
        raise ConfigError(f"{flag} {str(path)!r} {what}; choose a writable file path")
    return path


def write_output(path: Path, write: Callable[[BinaryIO], object], flag: str) -> None:
    """:func:`atomic_write` an output file, reporting an OS failure as a ``ConfigError``."""
    try:
        atomic_write(path, write)
    except OSError as error:
        raise ConfigError(
            f"{flag} {str(path)!r} cannot be written: {error.strerror or error}; choose a "
            "writable file path"
        ) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (used for ``config.json``)."""
    atomic_write(path, lambda handle: handle.write(text.encode()))


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _previous(path: Path) -> Path:
    """``checkpoint.pt`` -> ``checkpoint.prev.pt``, ``x.env.pkl`` -> ``x.prev.env.pkl``."""
    stem, _, rest = path.name.partition(".")
    return path.with_name(f"{stem}.prev.{rest}")


def _env_path(path: Path) -> Path:
    return path.with_name(f"{path.name.partition('.')[0]}.env.pkl")


def _read_digests(directory: Path) -> list[dict[str, Any]] | None:
    """The records of ``checkpoint.json`` (``None`` if there is no such file)."""
    path = directory / DIGESTS_NAME
    try:
        records = json.loads(path.read_text())["files"]
        if not all(isinstance(r, dict) and isinstance(r.get("sha256"), str) for r in records):
            raise TypeError
        return records
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"{path} is unreadable or corrupted ({type(error).__name__}), so no checkpoint "
            "in the directory can be verified; start a new run with another --out"
        ) from None


def _disk_digests(directory: Path, name: str) -> set[str]:
    """SHA-256 of ``directory/name`` and of its previous version, those that can be read."""
    if Path(name).name != name:  # a forged record naming a file elsewhere
        return set()
    digests = set()
    for path in (directory / name, _previous(directory / name)):
        try:
            digests.add(_sha256(path.read_bytes()))
        except OSError:
            continue
    return digests


def _record_digests(directory: Path, files: dict[str, str], info: dict[str, Any]) -> None:
    """Add ``{file name: digest}`` to ``checkpoint.json``, before the files are replaced.

    Earlier records are kept exactly while they match a file on disk (``name`` or its
    ``*.prev.*``): a save that failed after recording its files leaves records that the
    next save drops, and no number of failed saves can push out the record of an intact file.
    """
    try:
        records = _read_digests(directory) or []
    except CheckpointError:  # a damaged record must not stop training: start it afresh
        records = []
    names = {r.get("file") for r in records if isinstance(r.get("file"), str)}
    on_disk = {name: _disk_digests(directory, name) for name in names}
    records = [r for r in records if r["sha256"] in on_disk.get(r.get("file"), ())]
    records += [{"file": name, "sha256": digest, **info} for name, digest in files.items()]
    kept: list[dict[str, Any]] = []
    for record in reversed(records):  # one record per file and digest: the newest
        if not any((r["file"], r["sha256"]) == (record["file"], record["sha256"]) for r in kept):
            kept.append(record)
    text = json.dumps({"format": CHECKPOINT_FORMAT, "files": kept[::-1]}, indent=1)
    atomic_write_text(directory / DIGESTS_NAME, text + "\n")


def _keep_previous(path: Path) -> None:
    """Make ``path``'s previous version (``*.prev.*``) the current file, atomically."""
    if not path.exists():
        return
    previous = _previous(path)
    tmp = previous.with_name(f".{previous.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)  # no copy: the old inode lives on as the previous version
        except OSError:  # file systems without hard links
            shutil.copyfile(path, tmp)
        os.replace(tmp, previous)
        tmp.unlink(missing_ok=True)  # left if previous was this file already (no-op rename)
    except OSError as error:
        raise _naming(error, previous) from error


def _remove_temporaries(paths: Iterable[Path]) -> None:
    """Remove the temporary files of ``paths`` (and their ``*.prev.*``) that a killed save left."""
    for path in paths:
        for name in (path.name, _previous(path).name):
            for stale in path.parent.glob(f".{glob.escape(name)}.*tmp"):
                stale.unlink(missing_ok=True)


def _encode_policy(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    st = _safetensors()
    contiguous = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return st.save(contiguous, metadata=metadata)


def save_checkpoint(
    path: str | os.PathLike,
    state: dict[str, Any],
    env_state: bytes | None = None,
    policy: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None,
) -> None:
    """Write a checkpoint, keeping the previous one and recording every digest.

    Parameters
    ----------
    path
        Checkpoint path, normally ``DIR/checkpoint.pt``.
    state
        Tensors and plain data only (dicts, lists, tuples, numbers, strings, ``None``):
        anything else makes :func:`load_checkpoint` refuse the file.
    env_state
        Pickled environments for exact resume, written to ``checkpoint.env.pkl``; the
        checkpoint records its SHA-256 (``"env_state_sha256"``).
    policy
        ``(tensors, metadata)`` to write as ``DIR/policy.safetensors`` (metadata: strings).

    Raises
    ------
    MissingExtraError
        ``policy`` is given and ``safetensors`` is not installed (nothing is written).
    """
    path = Path(path)
    info = {k: state[k] for k in ("global_step", "iteration") if k in state}
    # Everything is encoded first, so a failure leaves the directory untouched.
    files: dict[Path, bytes] = {}
    if env_state is not None:
        files[_env_path(path)] = env_state
    if policy is not None:
        files[path.parent / POLICY_NAME] = _encode_policy(*policy)
    env_digest = None if env_state is None else _sha256(env_state)
    buffer = io.BytesIO()
    torch.save({**state, "format": CHECKPOINT_FORMAT, "env_state_sha256": env_digest}, buffer)
    files[path] = buffer.getvalue()
    _remove_temporaries([*files, path.parent / DIGESTS_NAME])
    _record_digests(path.parent, {p.name: _sha256(d) for p, d in files.items()}, info)
    for target, data in files.items():  # the environments before the checkpoint naming them
        if target.name != POLICY_NAME:
            _keep_previous(target)
        atomic_write(target, lambda handle, data=data: handle.write(data))


def _recorded(path: Path, records: list[dict[str, Any]], digest: str) -> dict[str, Any] | None:
    return next((r for r in records if r["sha256"] == digest), None)


def _previous_hint(path: Path) -> str:
    """How to continue when ``path`` is unusable: the intact previous checkpoint, if any."""
    previous = _previous(path)
    try:
        records = _read_digests(path.parent) or []
        record = _recorded(path, records, _sha256(previous.read_bytes()))
    except (OSError, CheckpointError):
        record = None
    if record is None:
        return "no intact previous checkpoint is left; start a new run with another --out"
    step = record.get("global_step", "?")
    return f"the previous checkpoint (step {step}) is intact: cp {previous} {path}, then rerun"


def _read_verified(path: Path, hint: Callable[[Path], str], required: bool) -> bytes:
    """Read ``path`` and check its SHA-256 against ``checkpoint.json``.

    ``required=False`` accepts a file with no ``checkpoint.json`` beside it (a shared
    policy file); its content is still parsed safely.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if _previous(path).exists():  # the checkpoint was removed, its previous one was not
            raise CheckpointError(f"no {path.name} in {str(path.parent)!r}; {hint(path)}") from None
        raise CheckpointError(
            f"no {path.name} in {str(path.parent)!r}; pass the --out directory of a "
            "`natgrad train` run"
        ) from None
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error.strerror}; {hint(path)}") from None
    if not data:
        raise CheckpointError(f"{path} is empty (0 bytes); {hint(path)}")
    records = _read_digests(path.parent)
    if records is None:
        if not required:
            return data
        raise CheckpointError(
            f"{path} cannot be verified: {DIGESTS_NAME}, which records its SHA-256, is "
            f"missing from {str(path.parent)!r} (natgrad 0.1 wrote none: continue such runs "
            "with that version); restore it, or start a new run"
        )
    if _recorded(path, records, _sha256(data)) is None:
        raise CheckpointError(
            f"{path} is truncated, corrupted or was replaced (its SHA-256 is not recorded in "
            f"{DIGESTS_NAME}); it was not loaded; {hint(path)}"
        )
    return data


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, without running any code.

    The file must match a digest in ``checkpoint.json`` and hold only tensors and plain
    data (``torch.load(weights_only=True)``).

    Raises
    ------
    CheckpointError
        The file is missing, empty, truncated, corrupted, replaced, written by another
        natgrad version or not natgrad's; the one-line message offers the previous
        checkpoint when it is intact.
    """
    path = Path(path)
    data = _read_verified(path, _previous_hint, required=True)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure: the message says what to do
        raise CheckpointError(
            f"{path} holds more than tensors and plain data ({first_line(error)}); it was "
            f"refused without running any of it; {_previous_hint(path)}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format", 1) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{path} is not a natgrad checkpoint of format {CHECKPOINT_FORMAT} (found "
            f"{found}); continue it with the natgrad version that wrote it, or start a new run"
        )
    return state


@contextmanager
def checkpoint_content(path: str | os.PathLike) -> Iterator[None]:
    """Report a loaded checkpoint whose fields are missing or malformed as one line.

    Wrap the code that unpacks the dict from :func:`load_checkpoint`: a file that passed
    the checks but was not written by this natgrad for this run raises
    :class:`~natgrad.rl.CheckpointError` instead of a ``KeyError`` deep in a loader.
    """
    try:
        yield
    except CheckpointError:
        raise
    except NatgradError as error:
        if not isinstance(error, ConfigError):  # a saved config's bad field is the file's
            raise
        path = Path(path)
        raise CheckpointError(
            f"{path} does not fit this run: {first_line(error)}; {_previous_hint(path)}"
        ) from None
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        path = Path(path)
        raise CheckpointError(
            f"{path} does not fit this run: {first_line(error)}; {_previous_hint(path)}"
        ) from None


def load_env_state(path: str | os.PathLike, digest: str) -> bytes:
    """The pickled environments recorded by the checkpoint at ``path`` (not unpickled).

    Parameters
    ----------
    path
        Checkpoint path; the environments are in ``checkpoint.env.pkl`` or, if a crash
        came between the two writes, ``checkpoint.prev.env.pkl``.
    digest
        The checkpoint's ``"env_state_sha256"``: only a file with this digest is returned.
    """
    env_path = _env_path(Path(path))
    for candidate in (env_path, _previous(env_path)):
        try:
            data = candidate.read_bytes()
        except OSError:
            continue
        if _sha256(data) == digest:
            return data
    raise CheckpointError(
        f"{env_path} is missing, or does not match the SHA-256 that {Path(path).name} "
        "recorded for it; resume without --trust-env-state (episodes are re-seeded)"
    )


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as error:
        raise MissingExtraError("policy.safetensors", "rl", "safetensors") from error
    return safetensors.torch


def _policy_hint(path: Path) -> str:
    return f"remove it to evaluate {CHECKPOINT_NAME} instead, or resume the run to rewrite it"


def load_policy(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``policy.safetensors`` (see :func:`save_checkpoint`): ``(tensors, metadata)``.

    Beside a ``checkpoint.json`` (in a run directory) the file must match a recorded
    digest; a file shared on its own is parsed as is (safetensors runs no code).
    """
    path = Path(path)
    data = _read_verified(path, _policy_hint, required=False)
    st = _safetensors()
    try:
        tensors = st.load(data)
        size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + size]).get("__metadata__") or {}
    except Exception as error:  # any parse failure: the message says what to do
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({first_line(error)}); {_policy_hint(path)}"
        ) from None
    return tensors, metadata
