"""Supervised natural gradient: damped Gauss-Newton / Fisher steps through the RAT solvers.

``natural_gradient(model, inputs, targets, loss=...)`` returns ``d = (F + lam I)^{-1} g``
for a mean-squared-error (Gauss-Newton) or cross-entropy (exact or sampled Fisher) loss;
:class:`NaturalGradientOptimizer` turns it into a training step.
"""

from natgrad.supervised.fisher import mean_loss
from natgrad.supervised.natural_gradient import (
    SupervisedNaturalGradient,
    SupervisedResult,
    natural_gradient,
)
from natgrad.supervised.optimizer import NaturalGradientOptimizer, StepInfo

__all__ = [
    "NaturalGradientOptimizer",
    "StepInfo",
    "SupervisedNaturalGradient",
    "SupervisedResult",
    "mean_loss",
    "natural_gradient",
]
