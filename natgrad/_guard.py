"""Leave the caller's module exactly as it was: detect and undo state changes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call as _functional_call

from natgrad.errors import PolicyMutationError


@contextmanager
def unchanged_module(module: nn.Module, role: str = "policy") -> Iterator[None]:
    """Run the block, then restore any buffer the module's forward changed and raise.

    Changes are found through tensor version counters (in-place updates such as a running
    mean's ``+=``) and identity (a buffer reassigned in ``forward``). Parameters are only
    checked: natgrad never writes them, so a change there comes from the user's code.

    Raises
    ------
    PolicyMutationError
        Naming the changed buffers or parameters, after restoring the buffers.
    """
    buffers = {name: (b, b._version, b.detach().clone()) for name, b in module.named_buffers()}
    params = {name: (p, p._version) for name, p in module.named_parameters()}
    try:
        yield
    finally:
        changed = _restore_buffers(module, buffers)
        changed += [n for n, (p, version) in params.items() if p._version != version]
        if changed:
            names = ", ".join(f"{role}.{n}" for n in changed)
            raise PolicyMutationError(
                f"evaluating the {role} changed {names} (restored): its forward updates "
                "state, e.g. a running normalizer in train mode, so per-sample scores would "
                f"be taken at moving statistics; call {role}.eval() (or freeze the "
                "statistics) before natgrad and switch back afterwards"
            )


def _restore_buffers(module: nn.Module, saved: dict[str, tuple[Tensor, int, Tensor]]) -> list[str]:
    changed = []
    current = dict(module.named_buffers())
    for name, (buffer, version, copy) in saved.items():
        if current.get(name) is buffer and buffer._version == version:
            continue
        changed.append(name)
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        with torch.no_grad():
            buffer.copy_(copy)
        owner._buffers[leaf] = buffer
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
