"""natgrad's own errors and warnings.

Every error natgrad raises on purpose derives from :class:`NatgradError` (and from the
built-in class that fits, so ``except ValueError`` keeps working). Its message names the
argument or quantity at fault, the problem and the fix.
"""

from __future__ import annotations

__all__ = [
    "ArgumentError",
    "ArgumentTypeError",
    "FisherError",
    "IllConditionedError",
    "MissingExtraError",
    "NatgradError",
    "NonFiniteError",
    "NotConvergedError",
    "NotConvergedWarning",
    "PolicyMutationError",
    "PrecisionWarning",
    "ProcessGroupError",
    "SampleCouplingError",
    "UnderflowError",
]


class NatgradError(Exception):
    """Base class of the errors natgrad raises on purpose."""


class ArgumentError(NatgradError, ValueError):
    """An argument has a value, shape or content natgrad cannot use.

    The message names the argument, what is wrong with it and what to pass instead.
    """


class ArgumentTypeError(NatgradError, TypeError):
    """An argument has a type natgrad cannot use; the message names the type expected."""


class NotConvergedError(NatgradError, RuntimeError):
    """An iterative solver stopped before reaching ``tol`` (``on_nonconvergence="raise"``)."""


class NonFiniteError(NatgradError, ValueError):
    """An input or a result is NaN or infinite; the message names which and why."""


class UnderflowError(NatgradError, ValueError):
    """A result underflows the dtype it is returned in (it would lose its digits).

    The transform is linear in the advantages, so scaling them up fixes it.
    """


class IllConditionedError(NatgradError, ValueError):
    """The damped system cannot be solved in the available precision.

    Raised when ``K / N + lam I`` is not numerically positive definite (its factorization
    fails): ``damping`` is below the rounding level of the scores. The message gives the
    smallest damping that the scores' precision supports.
    """


class PolicyMutationError(NatgradError, ValueError):
    """Evaluating the policy changed its state (e.g. a running normalizer in train mode).

    natgrad restores the changed buffers and parameters before raising, so the policy is
    left as it was. Also raised when the policy writes ``obs`` or ``acts`` in place (after
    that first evaluation; natgrad keeps no copy of the inputs to undo it).
    """


class SampleCouplingError(NatgradError, ValueError):
    """A sample's log-probability depends on other samples of the batch.

    Per-sample scores are then ill-defined: e.g. BatchNorm in train mode, or observations
    normalized with statistics of the batch (``obs.std(0)`` is NaN for one sample).
    """


class ProcessGroupError(NatgradError, ValueError):
    """A ``process_group`` cannot be used, or the ranks of one do not agree.

    Raised on every rank alike (the check is collective): ``torch.distributed`` is not
    initialized, the ranks were given different ``damping``, solver options or parameter
    shapes, the solver has no distributed form, or another rank failed.
    """


class FisherError(NatgradError, ValueError):
    """The requested ``fisher=`` cannot be used as asked.

    An unknown value, an action distribution without a closed-form expected Fisher, or
    ``fisher="expected"`` where only the sampled Fisher has a form (``__call__``'s ``A~``,
    a ``process_group``). The message names ``fisher=`` and the way out.
    """


class GramMemoryError(NatgradError, MemoryError):
    """Forming the ``N x N`` kernel (``solver="cholesky"``) would not fit in free memory.

    Raised before anything is allocated, also when an iterative solver that missed ``tol``
    would fall back to Cholesky (``on_nonconvergence="fallback"``); then the message starts
    with why the fallback was needed (the solver, the residual it stopped at, its iterations
    and ``tol``). The message gives the bytes needed and free, and the way out: an iterative
    solver with ``on_nonconvergence="raise"`` or ``"warn"``, or fewer samples per call.
    """


class MissingExtraError(NatgradError, ImportError):
    """An optional dependency is missing; the message names the extra to install."""

    def __init__(self, what: str, extra: str, package: str | None = None) -> None:
        self.extra = extra
        package = package or extra
        super().__init__(
            f"{what} needs the optional dependency {package!r}, which is not installed; "
            f'install it with: pip install "natgrad[{extra}]"'
        )


class NotConvergedWarning(RuntimeWarning):
    """An iterative solver stopped before reaching ``tol`` and its iterate was returned."""


class PrecisionWarning(RuntimeWarning):
    """The system is too ill-conditioned for the scores' dtype to give ``tol`` accuracy.

    ``diagnostics.precision`` estimates the relative error that rounding of the scores alone
    can cause (condition number times the dtype's machine epsilon).
    """
