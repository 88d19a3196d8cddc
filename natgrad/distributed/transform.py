"""``RATNaturalGradient`` with a process group: each rank's samples, the union's gradient.

One call on every rank:

1. each rank checks its own inputs and builds its own score operator ``J_k`` (no
   communication), catching its own error;
2. one ``all_gather_object`` of a small description (options, parameter names and shapes,
   dtype, ``n_k``, the rank's score backend, and its error if any): every rank checks
   that they agree and learns every ``n_k`` and backend; a disagreement or a failed rank
   raises the same :class:`~natgrad.errors.ProcessGroupError` on every rank (no rank is
   left waiting);
3. the distributed solve (:func:`~natgrad.distributed.dispatch.solve_distributed`);
4. one all-reduce of 3 floats for ``g^T d``, ``d^T F d`` and the finiteness of the local
   rows.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from natgrad._checks import check_step_terms, representable
from natgrad._tree import Tree
from natgrad.distributed.comm import Communicator, check_process_group
from natgrad.distributed.dispatch import solve_distributed
from natgrad.distributed.operator import ShardedOperator
from natgrad.errors import NatgradError, NonFiniteError, ProcessGroupError
from natgrad.results import Diagnostics, NaturalGradient

if TYPE_CHECKING:
    from natgrad.rat import RATNaturalGradient

__all__ = ["distributed_natural_gradient"]


def _describe(rat: RATNaturalGradient, scores: Any, adv: Tensor) -> dict[str, Any]:
    """What every rank must agree on."""
    return {
        **rat.options.keywords(),
        "parameters": [
            (name, tuple(shape))
            for name, shape in zip(scores.param_names, scores.shapes, strict=True)
        ],
        "parameter dtype": str(scores.dtype),
        "adv dtype": str(adv.dtype),
        "device type": scores.device.type,
    }


_FIXES = {
    "parameters": "select the same parameters (params=) of the same policy on every rank",
    "parameter dtype": "give every rank's policy the same dtype",
    "adv dtype": "give every rank's advantages the same dtype",
    "device type": "put every rank's policy on the same kind of device",
}


def _check_agreement(gathered: list[tuple[dict[str, Any] | None, int, str | None, str]]) -> None:
    """Raise :class:`ProcessGroupError` (on every rank alike) on a failure or disagreement.

    ``gathered``: every rank's ``(description, n_k, error, backend)``, in rank order.
    """
    failed = [(rank, error) for rank, (_, _, error, _) in enumerate(gathered) if error is not None]
    if failed:
        lines = "; ".join(f"rank {rank}: {error}" for rank, error in failed)
        raise ProcessGroupError(
            f"{len(failed)} rank(s) of the process group failed before the solve ({lines}); "
            "fix the input on those ranks (every rank stops, none is left waiting)"
        )
    first = gathered[0][0]
    assert first is not None
    for rank, (description, _, _, _) in enumerate(gathered[1:], start=1):
        assert description is not None
        for key, value in first.items():
            if description[key] != value:
                fix = _FIXES.get(
                    key, "construct RATNaturalGradient with the same arguments on every rank"
                )
                raise ProcessGroupError(
                    f"ranks disagree on {key}: rank 0 has {value!r}, rank {rank} has "
                    f"{description[key]!r}; {fix}"
                )


def distributed_natural_gradient(
    rat: RATNaturalGradient,
    policy: nn.Module,
    obs: Tree,
    acts: Tree,
    adv: Tensor,
    params: Iterable[Tensor] | None,
) -> NaturalGradient:
    """The natural gradient of the union of all ranks' samples (collective: every rank).

    ``advantages`` and ``jd`` are this rank's rows; ``direction``, ``g_dot_d``,
    ``d_fisher_d`` and the diagnostics' residual and convergence are global. Sets
    ``rat.diagnostics`` and ``rat.communication``.
    """
    start = time.perf_counter()
    group = check_process_group(rat.process_group)
    comm = Communicator(group)
    rat.communication = comm.stats
    prepared = None
    description: dict[str, Any] | None = None
    local_error: BaseException | None = None
    size, backend = 0, ""
    try:
        prepared = rat._prepare(policy, obs, acts, adv, params)
        description = _describe(rat, prepared[0], adv)
        size, backend = int(adv.shape[0]), prepared[1].backend  # adv is checked by now
        # (a list or a 0-d tensor is refused above, on this rank, before the gather)
    except Exception as error:  # noqa: BLE001 - re-raised below, after telling the others
        local_error = error
    summary = None if local_error is None else f"{type(local_error).__name__}: {local_error}"
    gathered = comm.all_gather_object((description, size, summary, backend))
    if local_error is not None:
        raise local_error
    _check_agreement(gathered)
    assert prepared is not None
    scores, local, backend_note = prepared
    operator = ShardedOperator(
        local,
        comm,
        [size for _, size, _, _ in gathered],
        backends=[backend for _, _, _, backend in gathered],
    )
    rhs = adv.detach().to(device=scores.device, dtype=torch.float64)
    with torch.no_grad():
        result, solver_used, notes = solve_distributed(operator, rhs, rat.options, rat.generator)
    total = operator.num_samples
    comm.phase = "result"
    finite = bool(torch.isfinite(result.x).all()) and bool(torch.isfinite(result.jv).all())
    g_dot_d, d_fisher_d, bad = comm.sum(
        rhs @ result.jv, result.jv @ result.jv, 0.0 if finite else 1.0
    )
    if bad > 0:
        raise NonFiniteError(
            f"the transformed advantages A~ or J d are not finite on {int(bad)} rank(s): "
            f"|A~| reaches |A| / damping beyond float64; raise damping (now {rat.damping:g})"
        )
    try:
        advantages = representable("the transformed advantages A~", result.x, adv.dtype)
    except NatgradError as error:
        advantages, underflow = None, error
    else:
        underflow = None
    (underflows,) = comm.sum(0.0 if underflow is None else 1.0)
    if underflow is not None:
        raise underflow
    if underflows > 0:
        raise ProcessGroupError(
            f"the transformed advantages A~ underflow {adv.dtype} on {int(underflows)} other "
            "rank(s); scale the advantages up on every rank (the result is linear in them)"
        )
    assert advantages is not None
    advantages = advantages.to(adv.device).reshape(adv.shape)
    direction = scores.unflatten(
        representable("the natural-gradient direction", result.v, scores.dtype)
    )
    g_dot_d, d_fisher_d = g_dot_d / total, d_fisher_d / total
    check_step_terms(g_dot_d, d_fisher_d, result.v)
    fallbacks: list[str] = []
    if scores.fallback_reason is not None:
        fallbacks.append(
            f"per-sample scores computed one sample at a time: {scores.fallback_reason}"
        )
    if backend_note:
        fallbacks.append(backend_note)
    fallbacks.extend(notes)
    rat.diagnostics = Diagnostics.of_solve(
        result,
        solver=solver_used,
        backend=local.backend,
        score_path=scores.path,
        fallbacks=fallbacks,
        num_samples=total,
        num_params=scores.num_params,
        started=start,
        compiled=False,
    )
    return NaturalGradient(
        advantages=advantages,
        direction=direction,
        param_names=tuple(scores.param_names),
        jd=result.jv.to(adv.dtype),
        g_dot_d=g_dot_d,
        d_fisher_d=d_fisher_d,
        diagnostics=rat.diagnostics,
    )
