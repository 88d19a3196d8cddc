"""Atomic checkpoint files: a crash mid-write never destroys the previous checkpoint."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

__all__ = ["atomic_write_text", "load_checkpoint", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"


def _atomic(path: Path, write: Callable[[BinaryIO], object]) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # os.replace is atomic on POSIX and Windows: readers see the old or the new file.
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` with ``torch.save`` to a temporary file, then ``os.replace`` it."""
    _atomic(Path(path), lambda handle: torch.save(state, handle))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (used for ``config.json``)."""
    _atomic(Path(path), lambda handle: handle.write(text.encode()))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`.

    Checkpoints contain pickled environments and NumPy state, so they are loaded with
    ``weights_only=False``: only load checkpoints you (or natgrad) wrote.
    """
    return torch.load(Path(path), map_location="cpu", weights_only=False)
