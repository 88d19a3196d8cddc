"""Classifying ``torch.func.vmap`` failures (shared by policy scores and model Jacobians)."""

from __future__ import annotations


def is_vmap_limitation(error: Exception) -> bool:
    """Whether ``error`` from ``vmap`` is a gap in batching (worth a per-sample loop)."""
    text = str(error).lower()
    if "random" in text and "vmap" in text:
        return False  # randomness in the policy is a user error, not a vmap gap
    return isinstance(error, (RuntimeError, NotImplementedError, ValueError))
