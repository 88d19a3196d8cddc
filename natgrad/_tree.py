"""Minimal pytree helpers for observations and actions, and flat parameter vectors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from natgrad.errors import ArgumentTypeError

Tree = Any


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Tree) -> Tree:
    """Apply ``fn`` to every tensor leaf of a nested dict/list/tuple of tensors."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {key: tree_map(fn, value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        mapped = [tree_map(fn, value) for value in tree]
        return type(tree)(*mapped) if hasattr(tree, "_fields") else type(tree)(mapped)
    raise ArgumentTypeError(
        f"expected a tensor or a dict/list/tuple of tensors, got {type(tree).__name__}"
    )


def tree_leaves(tree: Tree, prefix: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(path, leaf)`` pairs; the path names the leaf for error messages."""
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from tree_leaves(value, f"{prefix}[{key!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from tree_leaves(value, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def take(tree: Tree, index: torch.Tensor) -> Tree:
    """Select rows ``index`` along the first (sample) dimension of every leaf."""
    return tree_map(lambda t: t[index], tree)


def unsqueeze(tree: Tree) -> Tree:
    """Add a leading batch dimension of size one to every leaf."""
    return tree_map(lambda t: t.unsqueeze(0), tree)


def unflatten(flat: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...]:
    """Split a flat ``(P,)`` vector into tensors of ``shapes`` (parameters, in order)."""
    sizes = [math.prod(shape) for shape in shapes]
    pieces = torch.split(flat, sizes)
    return tuple(p.reshape(s) for p, s in zip(pieces, shapes, strict=True))
