"""Validation at the public boundary: every message names the argument, the problem, the fix."""

from __future__ import annotations

import difflib
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from natgrad._tree import Tree, tree_leaves, tree_map
from natgrad.errors import ArgumentError, ArgumentTypeError, NonFiniteError, UnderflowError

try:  # NumPy is a dependency, but keep the checks importable without it
    from numpy import bool_ as np_bool
except ImportError:  # pragma: no cover
    np_bool = bool


def is_integer(value: Any) -> bool:
    """Python and NumPy integers (``np.int64``), not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np_bool))


def is_real(value: Any) -> bool:
    """Python and NumPy real numbers (``np.float32``), not bools."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np_bool))


def consistency_tolerance(dtype: torch.dtype) -> float:
    """Relative gap allowed between per-sample and batched evaluations of one function.

    They round differently (other kernels, other summation orders), by about the dtype's
    machine epsilon; used as ``tol * (1 + |value|)``. ``1e-7`` for float64, else
    ``max(2e-3, 32 eps)``: 2e-3 for float32, 0.03 for float16 and 0.25 for bfloat16 (8-bit
    mantissa, ``eps = 2**-7``), whose rounding alone exceeds a fixed 2e-3.
    """
    if dtype == torch.float64:
        return 1e-7
    return max(2e-3, 32 * torch.finfo(dtype).eps)


def check_keywords(owner: str, given: Iterable[str], valid: Iterable[str], hint: str = "") -> None:
    """Refuse a keyword of ``given`` that is not in ``valid``, naming the closest valid one."""
    valid = tuple(valid)
    for name in given:
        if name in valid:
            continue
        close = difflib.get_close_matches(name, valid, n=1)
        did_you_mean = f" (did you mean {close[0]!r}?)" if close else ""
        raise ArgumentTypeError(
            f"{owner} got an unexpected keyword argument {name!r}{did_you_mean}; "
            f"{hint or 'it takes ' + ', '.join(valid)}"
        )


def check_nonnegative_int(name: str, value: Any, hint: str = "") -> int:
    """Return ``value`` as an ``int`` if it is an integer >= 0."""
    if not is_integer(value):
        raise ArgumentTypeError(f"{name} must be an integer >= 0, got {value!r}{hint}")
    if value < 0:
        raise ArgumentError(f"{name} must be an integer >= 0, got {value!r}{hint}")
    return int(value)


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``allowed``, else raise a ``ValueError``."""
    if value not in allowed:
        options = ", ".join(repr(a) for a in allowed)
        raise ArgumentError(f"{name} must be one of {options}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool (``True``/``False``), else raise a ``TypeError``."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_positive_float(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as a float if it is a real number (NumPy's too), finite and > 0."""
    if not is_real(value):
        raise ArgumentTypeError(f"{name} must be a finite float > 0, got {value!r}{hint}")
    if not math.isfinite(value) or value <= 0:
        raise ArgumentError(f"{name} must be a finite float > 0, got {value!r}{hint}")
    return float(value)


def check_fraction(name: str, value: Any, hint: str = "") -> float:
    """Return ``value`` as a float if it is a real number (NumPy's too) with ``0 < value < 1``."""
    if not is_real(value):
        raise ArgumentTypeError(f"{name} must be a float in (0, 1), got {value!r}{hint}")
    if not 0 < value < 1:  # NaN fails too
        raise ArgumentError(f"{name} must be a float in (0, 1), got {value!r}{hint}")
    return float(value)


def check_positive_int(name: str, value: Any, hint: str = "") -> int:
    """Return ``value`` as an ``int`` if it is an integer (NumPy's too) >= 1."""
    if not is_integer(value):
        raise ArgumentTypeError(f"{name} must be an integer >= 1, got {value!r}{hint}")
    if value < 1:
        raise ArgumentError(f"{name} must be an integer >= 1, got {value!r}{hint}")
    return int(value)


def check_policy(policy: Any, owner: str = "policy") -> nn.Module:
    """Require an ``nn.Module`` whose per-sample gradients are well defined."""
    if not isinstance(policy, nn.Module):
        raise ArgumentTypeError(f"{owner} must be a torch.nn.Module, got {type(policy).__name__}")
    for name, module in policy.named_modules():
        where = f"{owner}.{name}" if name else owner
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ArgumentError(
                f"{where} is a {type(module).__name__} in train mode: it normalizes with "
                "batch statistics, which couples samples, so per-sample scores are "
                f"ill-defined; call {owner}.eval() (or that module's .eval()) before natgrad "
                "and switch back to .train() afterwards"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise ArgumentError(
                f"{where} is an active {type(module).__name__}(p={module.p}): the "
                "outputs are random, so per-sample scores are ill-defined; call "
                f"{owner}.eval() before natgrad (or use p=0)"
            )
        if isinstance(module, nn.RReLU):
            raise ArgumentError(
                f"{where} is an RReLU in train mode: it draws a random slope for every "
                "element, so the outputs are random and per-sample scores are ill-defined; "
                f"call {owner}.eval() before natgrad (RReLU then uses a fixed slope)"
            )
        if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
            raise ArgumentError(
                f"{where} is a MultiheadAttention with active dropout={module.dropout}; "
                f"call {owner}.eval() before natgrad (or use dropout=0)"
            )
        if isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1:
            raise ArgumentError(
                f"{where} is a {type(module).__name__} with active dropout={module.dropout}; "
                f"call {owner}.eval() before natgrad (or use dropout=0)"
            )
    return policy


def select_parameters(
    policy: nn.Module, params: Iterable[Tensor] | None, owner: str = "policy"
) -> list[str]:
    """Names of the parameters that form ``theta``.

    ``None`` selects every parameter with ``requires_grad=True``; an iterable selects those
    parameters of ``policy`` (by identity), each once; the names come in the policy's own
    order, whatever the order given.
    """
    named = list(policy.named_parameters())
    if params is None:
        names = [n for n, p in named if p.requires_grad]
        if not names:
            raise ArgumentError(
                f"{owner} has no parameters with requires_grad=True, so there is no natural "
                "gradient to compute; unfreeze some parameters or pass params=[...]"
            )
        return names
    if isinstance(params, Tensor):
        raise ArgumentTypeError(
            "params must be an iterable of parameters (e.g. policy.actor.parameters()), "
            "got a single tensor; wrap it in a list"
        )
    if isinstance(params, (nn.Module, Mapping)):
        fix = ".parameters()" if isinstance(params, nn.Module) else ".values()"
        raise ArgumentTypeError(
            f"params must be an iterable of parameters, got a {type(params).__name__}; pass "
            f"its {fix} (e.g. {owner}.actor.parameters())"
        )
    by_id = {id(p): n for n, p in named}
    chosen: dict[str, int] = {}  # name -> index in params
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            named_pair = isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], Tensor)
            hint = "; pass .parameters(), not .named_parameters()" if named_pair else ""
            raise ArgumentTypeError(
                f"params[{i}] must be a parameter tensor, got {type(p).__name__}{hint}"
            )
        if id(p) not in by_id:
            buffer = next((n for n, b in policy.named_buffers() if b is p), None)
            what = f" (it is the buffer {owner}.{buffer}, which is not trained)" if buffer else ""
            raise ArgumentError(
                f"params[{i}] (shape {tuple(p.shape)}) is not a parameter of {owner}{what}; "
                f"pass parameters obtained from the {owner} itself, e.g. {owner}.parameters()"
            )
        if not p.requires_grad:
            raise ArgumentError(
                f"params[{i}] ({by_id[id(p)]}) has requires_grad=False (frozen); drop it "
                "from params or unfreeze it"
            )
        name = by_id[id(p)]
        if name in chosen:
            raise ArgumentError(
                f"params[{i}] ({name}) is params[{chosen[name]}] again; pass each parameter "
                "once (a duplicate would get one direction, not two)"
            )
        chosen[name] = i
    if not chosen:
        raise ArgumentError("params is empty; pass at least one trainable parameter or None")
    return [n for n, _ in named if n in chosen]


def check_advantages(adv: Any, device: torch.device) -> Tensor:
    """``adv`` must be a finite, non-empty, 1-D floating tensor on the policy's device."""
    if not isinstance(adv, Tensor):
        raise ArgumentTypeError(
            f"adv must be a torch.Tensor of shape (N,), got {type(adv).__name__}"
        )
    if adv.dim() != 1:
        hint = ""
        if adv.dim() == 0:
            hint = "; pass one advantage per sample, a tensor of shape (N,)"
        elif adv.numel() == max(adv.shape):
            hint = "; flatten it with adv.reshape(-1)"
        raise ArgumentError(f"adv must be 1-D of shape (N,), got shape {tuple(adv.shape)}{hint}")
    if adv.shape[0] == 0:
        raise ArgumentError("adv is empty (N = 0): RAT needs at least one sample")
    if not adv.is_floating_point():
        raise ArgumentTypeError(f"adv must be a floating-point tensor, got dtype {adv.dtype}")
    if adv.device != device:
        raise ArgumentError(
            f"adv is on {adv.device} but the policy parameters are on {device}; move it "
            f"with adv.to({str(device)!r})"
        )
    if not bool(torch.isfinite(adv).all()):
        bad = int((~torch.isfinite(adv)).sum())
        raise NonFiniteError(
            f"adv contains {bad} non-finite value(s) (NaN or inf); fix the advantage "
            "computation (e.g. returns, value targets, normalization by a zero std)"
        )
    return adv


def check_batch(
    name: str,
    tree: Tree,
    num_samples: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    counted_by: str = "adv",
    owner: str = "policy",
) -> None:
    """Every leaf of ``tree`` is a tensor with ``num_samples`` rows on ``device``.

    ``counted_by`` names what fixed ``N`` and ``owner`` what holds the parameters, for the
    error messages (``"adv"``/``"policy"`` for RL batches, inputs/``"model"`` otherwise).
    """
    for path, leaf in tree_leaves(tree, name):
        if not isinstance(leaf, Tensor):
            raise ArgumentTypeError(
                f"{path} must be a torch.Tensor (or a dict/list/tuple of tensors), "
                f"got {type(leaf).__name__}; convert it with torch.as_tensor(...)"
            )
        if leaf.dim() == 0 or leaf.shape[0] != num_samples:
            got = (
                "a scalar"
                if leaf.dim() == 0
                else f"{leaf.shape[0]} rows (shape {tuple(leaf.shape)})"
            )
            raise ArgumentError(
                f"{path} has {got} but {counted_by} has N = {num_samples} samples; the first "
                f"dimension of every {name} tensor and of {counted_by} must be the same "
                "sample dimension"
            )
        if leaf.device != device:
            raise ArgumentError(
                f"{path} is on {leaf.device} but the {owner} parameters are on {device}; "
                f"move it with .to({str(device)!r})"
            )
        if leaf.is_floating_point() and leaf.dtype != dtype:
            raise ArgumentTypeError(
                f"{path} has dtype {leaf.dtype} but the {owner} parameters are {dtype}; "
                f"convert it with .to({dtype})"
            )
        if (leaf.is_floating_point() or leaf.is_complex()) and not bool(torch.isfinite(leaf).all()):
            bad = ~torch.isfinite(leaf).reshape(num_samples, -1).all(dim=1)
            raise NonFiniteError(
                f"{path} contains NaN or inf in {int(bad.sum())} sample(s) (first: sample "
                f"{int(torch.nonzero(bad)[0, 0])}); drop or repair those samples (e.g. an "
                "environment that returned NaN, a normalizer dividing by a zero std)"
            )


def parameter_device_dtype(
    module: nn.Module, names: list[str], role: str = "policy"
) -> tuple[torch.device, torch.dtype]:
    """The one device and floating dtype of the selected parameters ``names`` of ``module``.

    Scores, tolerances and the precision estimate are computed in one dtype, so selected
    parameters of several dtypes are refused (a float64 ``log_std`` beside a float32
    network would get float64 tolerances for float32 rounding), as are parameters on the
    ``meta`` device (no values to differentiate).
    """
    named = dict(module.named_parameters())
    selected = [(name, named[name]) for name in names]
    for name, param in selected:
        check_materialized(f"{role}.{name}", param, role)
    device, dtype = selected[0][1].device, selected[0][1].dtype
    elsewhere = next(((n, p) for n, p in selected if p.device != device), None)
    if elsewhere is not None:
        raise ArgumentError(
            f"{role} parameters are on several devices ({role}.{selected[0][0]} is on "
            f"{device}, {role}.{elsewhere[0]} on {elsewhere[1].device}); move the {role} to "
            f"one device, e.g. {role}.to({str(device)!r})"
        )
    if not dtype.is_floating_point:
        raise ArgumentTypeError(f"{role} parameters must be floating point, got {dtype}")
    other = next(((n, p) for n, p in selected if p.dtype != dtype), None)
    if other is not None:
        raise ArgumentTypeError(
            f"{role} parameters have several dtypes ({role}.{selected[0][0]} is {dtype}, "
            f"{role}.{other[0]} is {other[1].dtype}); natgrad computes the scores, their "
            f"tolerances and its precision estimate in one dtype; convert the {role} to "
            f"one (e.g. {role}.double() or {role}.float()) or select parameters of one "
            "dtype with params=[...]"
        )
    return device, dtype


def check_materialized(name: str, tensor: Tensor, role: str = "policy") -> None:
    """``tensor`` (called ``name``) must hold values: not on ``meta``, not uninitialized."""
    if isinstance(tensor, nn.parameter.UninitializedTensorMixin):
        raise ArgumentError(
            f"{name} is uninitialized (a Lazy module that has not run yet), so there are no "
            f"values to differentiate; run the {role} once on a batch (e.g. {role}(obs)) "
            "before natgrad"
        )
    if tensor.device.type == "meta":
        raise ArgumentError(
            f"{name} is on the meta device (shapes without values), so there are no scores "
            f"to compute; materialize the {role} first, e.g. {role}.to_empty(device='cpu') "
            "and load its weights"
        )


def check_finite_parameters(module: nn.Module, role: str = "policy") -> None:
    """Every parameter and floating buffer of ``module`` has values, all finite."""
    named = list(module.named_parameters()) + [
        (n, b) for n, b in module.named_buffers() if b.is_floating_point()
    ]
    for name, tensor in named:
        check_materialized(f"{role}.{name}", tensor, role)
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(
                f"{role}.{name} contains NaN or inf, so every output and per-sample gradient "
                f"is meaningless; the {role} was already broken before this call (a diverged "
                "update?): restore it from a checkpoint, and check the step that produced it"
            )


def require_finite(what: str, value: Tensor, cause: str) -> None:
    """Raise natgrad's error if ``value`` holds NaN or inf; ``cause`` says why it would."""
    if not bool(torch.isfinite(value).all()):
        raise NonFiniteError(
            f"{what} is not finite: {cause}; scale the advantages down (e.g. normalize "
            "them to unit standard deviation: the transform is linear in them), raise "
            "damping, or, for a float16/bfloat16 policy, use float32 or float64 parameters"
        )


def check_step_terms(g_dot_d: float, d_fisher_d: float, direction: Tensor) -> None:
    """``g^T d`` and ``d^T F d`` must be finite, and ``d^T F d`` a normal float64.

    They are Python floats (float64): checked as such, not through a float32 tensor, so
    values beyond float32's range (advantages of 1e20) are not mistaken for overflow. A
    non-zero ``direction`` whose ``d^T F d`` falls below float64's smallest normal number
    (advantages near 1e-155) has lost its digits, and :meth:`NaturalGradient.step_size`
    would return 0 or a wrong step: :class:`UnderflowError`.
    """
    if not (math.isfinite(g_dot_d) and math.isfinite(d_fisher_d)):
        raise NonFiniteError(
            f"g^T d = {g_dot_d:.3g} and d^T F d = {d_fisher_d:.3g} are not both finite: they "
            "overflow float64; scale the advantages down (e.g. normalize them to unit "
            "standard deviation: the direction is linear in them, g^T d and d^T F d "
            "quadratic), or raise damping"
        )
    tiny = torch.finfo(torch.float64).tiny
    if d_fisher_d < tiny and bool((direction != 0).any()):
        raise UnderflowError(
            f"d^T F d = {d_fisher_d:.3g} underflows float64 (smallest normal {tiny:.3g}), so "
            "it and the step size sqrt(2 max_kl / d^T F d) would lose their digits; scale "
            "the advantages up (e.g. normalize them to unit standard deviation: d^T F d is "
            "quadratic in them)"
        )


def representable(what: str, exact: Tensor, dtype: torch.dtype) -> Tensor:
    """``exact`` (float64) cast to ``dtype``, or natgrad's error if the cast loses it.

    Overflow gives inf (:class:`NonFiniteError`); underflow to zero or to subnormals loses
    digits silently (:class:`UnderflowError`), e.g. a float16 direction below 6e-5.
    """
    name = str(dtype).removeprefix("torch.")
    cast = exact.to(dtype)
    require_finite(what, cast, f"largest |value| = {float(exact.abs().max()):.3g} overflows {name}")
    loss = float(torch.linalg.vector_norm(cast.to(exact.dtype) - exact))
    if loss > 4 * torch.finfo(dtype).eps * float(torch.linalg.vector_norm(exact)):
        raise UnderflowError(
            f"{what} underflows {name} (largest |value| = {float(exact.abs().max()):.3g}, "
            f"smallest normal {name} = {torch.finfo(dtype).tiny:.3g}), which would lose its "
            "digits; scale the advantages (or targets) up -- the result is linear in them "
            "-- or use float32/float64"
        )
    return cast


def check_log_probs_differentiable(
    log_prob_fn: Any, policy: nn.Module, obs: Tree, acts: Tree, names: list[str]
) -> None:
    """``log_prob_fn`` must return log-probabilities that depend on the parameters.

    A detached output (``.detach()``, ``torch.no_grad()`` or a NumPy round trip inside
    ``log_prob_fn``) has zero scores, and the transform would silently return ``A / lam``.
    Checked on the first sample, with gradients enabled; the caller restores the policy.
    Skipped when no selected parameter requires grad (``params=`` of frozen tensors), and
    when ``log_prob_fn`` fails on one sample (the per-sample scores diagnose that).
    """
    named = dict(policy.named_parameters())
    if not any(named[name].requires_grad for name in names):
        return
    try:
        out = log_prob_fn(policy, tree_map(lambda t: t[:1], obs), tree_map(lambda t: t[:1], acts))
    except Exception:  # noqa: BLE001 - diagnosed by the per-sample scores
        return
    if isinstance(out, Tensor) and not out.requires_grad:
        raise ArgumentError(
            "log_prob_fn returned log-probabilities that do not depend on the policy "
            "parameters (no autograd graph: detached, computed under torch.no_grad(), or "
            "through NumPy), so every score would be zero and the transform would return "
            "A / damping; return policy(obs).log_prob(acts) as a tensor still attached to "
            "the graph"
        )


def check_log_probs(log_probs: Any, num_samples: int, device: torch.device | None = None) -> Tensor:
    """The output of ``log_prob_fn`` on the whole batch: finite, real, ``(N,)``, on ``device``.

    ``device`` is the parameters' device (``None``: not checked).
    """
    if not isinstance(log_probs, Tensor):
        raise ArgumentTypeError(
            f"log_prob_fn must return a tensor of shape (N,), got {type(log_probs).__name__}"
        )
    if not log_probs.is_floating_point():
        raise ArgumentTypeError(
            f"log_prob_fn must return real floating-point log-probabilities, got dtype "
            f"{log_probs.dtype}; return policy(obs).log_prob(acts) (no cast to an integer, "
            "bool or complex dtype)"
        )
    if device is not None and log_probs.device != device:
        raise ArgumentError(
            f"log_prob_fn returned log-probabilities on {log_probs.device} but the policy "
            f"parameters are on {device}; compute them on {device} (drop the .to(...), "
            ".cpu() or .cuda() at the end of log_prob_fn)"
        )
    if tuple(log_probs.shape) != (num_samples,):
        hint = ""
        if tuple(log_probs.shape) == (num_samples, num_samples) and num_samples > 1:
            hint = (
                "; a square (N, N) table usually means actions of shape (N, 1) broadcast "
                "against a distribution of batch shape (N,), pairing every action with "
                "every state: pass acts.squeeze(-1)"
            )
        elif log_probs.dim() == 2 and log_probs.shape[0] == num_samples:
            hint = (
                "; it looks like one log-probability per action dimension: sum them with "
                ".sum(-1) (or wrap the distribution in torch.distributions.Independent)"
            )
        raise ArgumentError(
            f"log_prob_fn must return shape (N,) = ({num_samples},), got "
            f"{tuple(log_probs.shape)}{hint}"
        )
    if not bool(torch.isfinite(log_probs).all()):
        bad = int(torch.nonzero(~torch.isfinite(log_probs))[0, 0])
        raise NonFiniteError(
            f"log_prob_fn returned a non-finite log-probability for sample {bad} "
            f"({float(log_probs[bad])}); actions outside the support (e.g. |a| >= 1 for a "
            "tanh-squashed policy, a in {0, 1} for a Beta) or NaN parameters cause this"
        )
    return log_probs
