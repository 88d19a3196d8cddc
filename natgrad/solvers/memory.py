"""Free memory on a device, and the check that an ``N x N`` kernel fits in it."""

from __future__ import annotations

import torch

from natgrad.errors import GramMemoryError

__all__ = ["available_bytes", "check_gram_fits", "gram_bytes"]


def available_bytes(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device``; ``None`` when unknown.

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux). CUDA: the driver's free memory plus
    what PyTorch's caching allocator holds but does not use.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gram_bytes(num_samples: int, score_dtype: torch.dtype) -> int:
    """Peak bytes of an exact solve (K and its factor in float64, K in the scores' dtype)."""
    squares = num_samples * num_samples
    extra = 0 if score_dtype == torch.float64 else squares * score_dtype.itemsize
    return 2 * 8 * squares + extra


def check_gram_fits(num_samples: int, score_dtype: torch.dtype, device: torch.device) -> None:
    """Raise :class:`~natgrad.errors.GramMemoryError` if the exact solve cannot fit."""
    needed = gram_bytes(num_samples, score_dtype)
    free = available_bytes(device)
    if free is None or needed <= free:
        return
    raise GramMemoryError(
        f"an exact solve (solver='cholesky', also the fallback of on_nonconvergence='fallback' "
        f"when an iterative solver misses tol) forms the N x N kernel and its factor: "
        f"N={num_samples} needs ~{_size(needed)}, {_size(free)} free on {device}; use an "
        f"iterative solver ('auto', 'cg', 'kaczmarz' or 'accelerated_kaczmarz' never form it) "
        f"with on_nonconvergence='raise' or 'warn', or pass fewer samples per call"
    )


def _size(nbytes: int) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (at most GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} bytes"
