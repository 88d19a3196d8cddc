"""Natural gradients over ``torch.distributed``: each rank's samples, the union's answer.

``RATNaturalGradient(..., process_group=group)`` routes here. Every rank holds only its
own samples and score rows ``J_k``; the solvers exchange ``P``-vectors (``J^T x`` summed
over ranks) and a few scalars. See the docs page *Distributed* for the contract, the
solvers and their communication per iteration.
"""

from typing import Any

from natgrad.distributed.comm import CommunicationStats, Communicator, check_process_group
from natgrad.distributed.dispatch import DISTRIBUTED_SOLVERS, solve_distributed
from natgrad.distributed.operator import ShardedOperator
from natgrad.distributed.transform import distributed_natural_gradient

try:
    from torch.distributed import ProcessGroup
except ImportError:  # a PyTorch build without torch.distributed
    ProcessGroup = Any  # type: ignore[misc,assignment]

__all__ = [
    "DISTRIBUTED_SOLVERS",
    "CommunicationStats",
    "Communicator",
    "ProcessGroup",
    "ShardedOperator",
    "check_process_group",
    "distributed_natural_gradient",
    "solve_distributed",
]
