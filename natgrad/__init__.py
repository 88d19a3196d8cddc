"""natgrad: natural policy gradients as easy as vanilla ones.

The core object is :class:`RATNaturalGradient` (Randomized Advantage Transformation):
it turns advantages ``A`` into ``A~ = (J J^T / N + lam I)^{-1} A`` so that the ordinary
policy-gradient backward pass yields the Tikhonov-damped natural gradient.
"""

from natgrad.errors import (
    ArgumentError,
    ArgumentTypeError,
    GramMemoryError,
    IllConditionedError,
    NatgradError,
    NonFiniteError,
    NotConvergedError,
    NotConvergedWarning,
    PolicyMutationError,
    PrecisionWarning,
    SampleCouplingError,
    UnderflowError,
)
from natgrad.rat import RATNaturalGradient
from natgrad.results import Diagnostics, NaturalGradient
from natgrad.scores import default_log_prob

__version__ = "0.1.0"

__all__ = [
    # the transform
    "RATNaturalGradient",
    "default_log_prob",
    # results
    "Diagnostics",
    "NaturalGradient",
    # errors and warnings
    "NatgradError",
    "ArgumentError",
    "ArgumentTypeError",
    "GramMemoryError",
    "IllConditionedError",
    "NonFiniteError",
    "NotConvergedError",
    "NotConvergedWarning",
    "PolicyMutationError",
    "PrecisionWarning",
    "SampleCouplingError",
    "UnderflowError",
]
