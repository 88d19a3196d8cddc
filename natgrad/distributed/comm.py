"""Collectives over a ``torch.distributed`` process group, counted call by call.

Every collective the distributed solvers issue goes through a :class:`Communicator`, which
records the number of calls and the payload bytes by *phase* (``"setup"``,
``"conditioning"``, ``"solve"``, ``"check"``, ``"result"``) in a
:class:`CommunicationStats`. The bytes are the payload this rank contributes (an
all-reduce of a ``P``-vector of float64 counts ``8 P``), not the wire traffic of the
backend's algorithm (a ring all-reduce sends about twice the payload).
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from natgrad.errors import ProcessGroupError

__all__ = ["CommunicationStats", "Communicator", "check_process_group"]


def check_process_group(process_group: Any) -> Any:
    """Validate the ``process_group`` argument: ``None`` or an initialized process group.

    Raises
    ------
    ProcessGroupError
        If ``torch.distributed`` is unavailable or not initialized, or the argument is not
        a ``torch.distributed.ProcessGroup``.
    """
    if process_group is None:
        return None
    if not dist.is_available():
        raise ProcessGroupError(
            "process_group: this PyTorch build has no torch.distributed; pass process_group=None"
        )
    if not dist.is_initialized():
        raise ProcessGroupError(
            "process_group: torch.distributed is not initialized; call "
            "torch.distributed.init_process_group(...) on every rank first (torchrun sets "
            "the environment for it), or pass process_group=None"
        )
    if process_group is dist.GroupMember.NON_GROUP_MEMBER:  # new_group(...) on a non-member
        raise ProcessGroupError(
            "process_group does not contain this rank (torch.distributed.new_group returns "
            "GroupMember.NON_GROUP_MEMBER on the ranks it leaves out); construct "
            "RATNaturalGradient with that group only on its member ranks"
        )
    if not isinstance(process_group, dist.ProcessGroup):
        raise ProcessGroupError(
            "process_group must be a torch.distributed.ProcessGroup (e.g. "
            "torch.distributed.group.WORLD or torch.distributed.new_group(...)) or None, got "
            f"{type(process_group).__name__}"
        )
    try:
        dist.get_rank(process_group)
    except (RuntimeError, ValueError) as error:
        raise ProcessGroupError(
            f"process_group is not usable from this process ({error}); pass a group this "
            "rank belongs to"
        ) from error
    if dist.get_rank(process_group) < 0:
        raise ProcessGroupError(
            "process_group does not contain this rank; call RATNaturalGradient with "
            "process_group only on its member ranks"
        )
    return process_group


@dataclass
class CommunicationStats:
    """Collective calls and payload bytes of one distributed call, by phase.

    Attributes
    ----------
    calls, bytes
        ``{"phase/operation": count}``, e.g. ``"solve/all_reduce"``.
    iterations
        Iterations (CG) or block steps (Kaczmarz) of the solve, for per-iteration figures.
    """

    calls: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    iterations: int = 0

    def add(self, phase: str, operation: str, nbytes: int) -> None:
        """Record one collective of ``nbytes`` payload bytes."""
        key = f"{phase}/{operation}"
        self.calls[key] = self.calls.get(key, 0) + 1
        self.bytes[key] = self.bytes.get(key, 0) + nbytes

    def total_calls(self, phase: str | None = None) -> int:
        """Calls in ``phase`` (all phases when ``None``)."""
        return sum(n for k, n in self.calls.items() if phase is None or k.startswith(phase + "/"))

    def total_bytes(self, phase: str | None = None) -> int:
        """Payload bytes in ``phase`` (all phases when ``None``)."""
        return sum(n for k, n in self.bytes.items() if phase is None or k.startswith(phase + "/"))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy."""
        return {"calls": dict(self.calls), "bytes": dict(self.bytes), "iterations": self.iterations}


class Communicator:
    """The collectives of one distributed call over ``group``, counted in :attr:`stats`.

    Parameters
    ----------
    group
        An initialized ``torch.distributed`` process group.
    """

    def __init__(self, group: Any) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.stats = CommunicationStats()
        self.phase = "setup"

    def _count(self, operation: str, nbytes: int) -> None:
        self.stats.add(self.phase, operation, nbytes)

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (``op="sum"``) or maximum (``op="max"``) over ranks, in place; returns it."""
        reduce_op = dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX
        self._count("all_reduce", tensor.numel() * tensor.element_size())
        if self.size > 1:
            dist.all_reduce(tensor, op=reduce_op, group=self.group)
        return tensor

    def sum(self, *values: Tensor | float) -> list[float]:
        """Global sums of a few local float64 scalars, in one all-reduce."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64)
        return self.all_reduce(self._on_device(local)).tolist()

    def max(self, value: float) -> float:
        """Global maximum of a local scalar."""
        local = self._on_device(torch.tensor([float(value)], dtype=torch.float64))
        return float(self.all_reduce(local, op="max")[0])

    def broadcast(self, tensor: Tensor, source: int) -> Tensor:
        """``tensor`` of group rank ``source`` on every rank, in place; returns it."""
        self._count("broadcast", tensor.numel() * tensor.element_size())
        if self.size > 1:
            src = dist.get_global_rank(self.group, source) if self.group is not None else source
            dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def all_gather_object(self, value: Any) -> list[Any]:
        """Every rank's picklable ``value``, in rank order."""
        self._count("all_gather_object", len(pickle.dumps(value)))
        if self.size == 1:
            return [value]
        gathered: list[Any] = [None] * self.size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def _on_device(self, tensor: Tensor) -> Tensor:
        """NCCL needs CUDA tensors; gloo takes CPU ones."""
        backend = dist.get_backend(self.group) if self.size > 1 else "gloo"
        if backend == "nccl":
            return tensor.to(f"cuda:{torch.cuda.current_device()}")
        return tensor
