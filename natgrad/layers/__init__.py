"""Factorable layers: exact per-sample scores from one backward pass, one module per kind.

``FACTORABLE_LAYERS`` maps a module type to its :class:`FactorableLayer`; the factored
backend (:mod:`natgrad.factored`) uses every registered kind, and the K-FAC agent records
its layers with the same :func:`capture_layer_calls` and :func:`output_gradients`.
"""

from natgrad.layers import (  # noqa: F401  (each registers its module types)
    conv,
    linear,
    recurrent,
)
from natgrad.layers._base import (
    FACTORABLE_LAYERS,
    FactorableLayer,
    LayerCall,
    LayerFactor,
    capture_layer_calls,
    output_gradients,
    register_layer,
    unregister_layer,
)
from natgrad.layers.linear import LinearFactor, LinearLayer
from natgrad.layers.rows import RowsFactor

__all__ = [
    "FACTORABLE_LAYERS",
    "FactorableLayer",
    "LayerCall",
    "LayerFactor",
    "LinearFactor",
    "LinearLayer",
    "RowsFactor",
    "capture_layer_calls",
    "output_gradients",
    "register_layer",
    "unregister_layer",
]
