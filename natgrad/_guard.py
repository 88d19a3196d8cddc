"""Leave the caller's module exactly as it was: detect and undo state changes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call as _functional_call

from natgrad._tree import tree_leaves
from natgrad.errors import PolicyMutationError

Saved = dict[str, tuple[Tensor, int, Tensor]]
"""Tensors by name, each with its version counter and a copy of its values."""


@contextmanager
def unchanged_module(module: nn.Module, role: str = "policy") -> Iterator[None]:
    """Run the block, then restore any buffer or parameter it changed and raise.

    Changes are found through tensor version counters (in-place updates such as a running
    mean's ``+=``) and identity (a tensor reassigned in ``forward``). natgrad never writes
    parameters, but it evaluates the policy on aliases of them, so a ``forward`` that
    updates a parameter in place (``self.w.add_(...)`` under ``torch.no_grad()``) would
    change the caller's parameter once per evaluation: it is put back too.

    Raises
    ------
    PolicyMutationError
        Naming the changed buffers or parameters, after restoring them.
    """
    buffers = _saved(module.named_buffers())
    params = _saved(module.named_parameters())
    try:
        yield
    finally:
        changed = _restore(module, buffers, dict(module.named_buffers()), "_buffers")
        changed += _restore(module, params, dict(module.named_parameters()), "_parameters")
        if changed:
            names = ", ".join(f"{role}.{n}" for n in changed)
            hint = _max_norm_hint(module, changed, role)
            raise PolicyMutationError(
                f"evaluating the {role} changed {names} (restored): its forward updates "
                "state, e.g. a running normalizer in train mode, so per-sample scores would "
                f"be taken at moving statistics; call {role}.eval() (or freeze the "
                f"statistics) before natgrad and switch back afterwards{hint}"
            )


def _max_norm_hint(module: nn.Module, changed: list[str], role: str) -> str:
    """The fix for an embedding with ``max_norm`` (it renormalizes its weight in any mode)."""
    for name in changed:
        owner_name, _, _ = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        if isinstance(owner, (nn.Embedding, nn.EmbeddingBag)) and owner.max_norm is not None:
            where = f"{role}.{owner_name}" if owner_name else role
            return (
                f"; {where} is an {type(owner).__name__} with max_norm={owner.max_norm}, which "
                "renormalizes its weight in place on every call whatever the mode: "
                "renormalize the weight once yourself and set max_norm=None (eval() does "
                "not stop it)"
            )
    return ""


@contextmanager
def differentiable_paths() -> Iterator[None]:
    """Within the block the policy computes what autograd differentiates: no fast paths.

    ``nn.MultiheadAttention`` and ``nn.TransformerEncoder`` switch to a fused inference
    path when no gradient is needed (the encoder's nested tensors zero the outputs at
    padded positions), so an evaluation without gradients (the batched log-probabilities,
    the per-sample consistency check) could compute another function than the scores.
    """
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def unchanged_inputs(trees: Mapping[str, Any], what: str) -> Iterator[None]:
    """Run the block (one evaluation, ``what``); raise if it wrote a tensor of ``trees``.

    ``trees`` maps argument names (``"obs"``, ``"acts"``) to tensors or nested
    dicts/lists/tuples of them. In-place writes are found through version counters; they
    are not undone (that would need a copy of every input), so this guards the *first*
    evaluation: the caller's tensors are changed once, as by a plain call of the policy,
    and natgrad stops before evaluating again on inputs that change under it.

    Raises
    ------
    PolicyMutationError
        Naming the changed tensor.
    """
    leaves = [
        (path, leaf, leaf._version)
        for name, tree in trees.items()
        for path, leaf in tree_leaves(tree, name)
        if isinstance(leaf, Tensor)
    ]
    yield
    for path, leaf, version in leaves:
        if leaf._version != version:
            raise PolicyMutationError(
                f"{what} wrote {path} in place (e.g. {path} /= 255 or {path}.clamp_(...) "
                f"in forward), so {path} is now changed, and every further evaluation would "
                "see other inputs (per-sample scores would not match the batch); compute "
                f"out of place instead ({path} = {path} / 255) and pass the original values "
                "again"
            )


def _saved(named: Iterator[tuple[str, Tensor]]) -> Saved:
    """Each tensor with its version counter and a copy of its values."""
    return {name: (t, t._version, t.detach().clone()) for name, t in named}


def _restore(module: nn.Module, saved: Saved, current: dict[str, Tensor], slot: str) -> list[str]:
    """Put back the values and objects of ``saved`` that changed; returns their names.

    ``slot`` is where the owners register them (``"_buffers"`` or ``"_parameters"``).
    """
    changed = []
    for name, (tensor, version, copy) in saved.items():
        if current.get(name) is tensor and tensor._version == version:
            continue
        changed.append(name)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        with torch.no_grad():
            tensor.copy_(copy)
        getattr(owner, slot)[leaf] = tensor
    return changed


@contextmanager
def parameters_kept(module: nn.Module) -> Iterator[None]:
    """Put back every parameter object of ``module`` that the block left replaced.

    With a submodule reachable under several names (SB3's shared features extractor is
    ``features_extractor``, ``pi_features_extractor`` and ``vf_features_extractor``),
    ``torch.func.functional_call`` can leave a substituted tensor registered after the call,
    silently detaching the module from the optimizer that holds the original parameter.
    """
    saved = [
        (owner, name, param)
        for owner in module.modules()
        for name, param in owner._parameters.items()
    ]
    try:
        yield
    finally:
        for owner, name, param in saved:
            if owner._parameters.get(name) is not param:
                owner._parameters[name] = param


def functional_call(module: nn.Module, tensors: Mapping[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``torch.func.functional_call`` that leaves ``module`` holding its own parameters.

    Every natgrad call site goes through here, so a module reachable under several names
    keeps its parameter objects (see :func:`parameters_kept`).
    """
    with parameters_kept(module):
        return _functional_call(module, dict(tensors), args)
