"""Classifying ``torch.func.vmap`` failures (shared by policy scores and model Jacobians)."""

from __future__ import annotations

from natgrad.errors import ArgumentError


def is_vmap_limitation(error: Exception) -> bool:
    """Whether ``error`` from ``vmap`` is a gap in batching (worth a per-sample loop)."""
    text = str(error).lower()
    if "random" in text and "vmap" in text:
        return False  # randomness in the policy is a user error, not a vmap gap
    return isinstance(error, (RuntimeError, NotImplementedError, ValueError))


def raise_unless_vmap_limitation(error: Exception, randomness: str) -> None:
    """Return if ``error`` is a gap in batching; else raise natgrad's ``ValueError``.

    ``randomness`` says why random numbers in forward make the result ill-defined and what
    to do (the message's middle); the original error is chained and quoted.
    """
    if not is_vmap_limitation(error):
        raise ArgumentError(f"{randomness}. Original error: {error}") from error
