"""Fisher matrices written as rows: ``F = W^T W / N`` with ``W`` an ``R x P`` matrix.

Shared by the supervised natural gradient (:mod:`natgrad.supervised`) and the expected
Fisher of policies (``RATNaturalGradient(fisher="expected")``):

* :mod:`natgrad.fisher.factors`: square roots of output-space Fisher matrices applied to
  output Jacobians (categorical logits, Gaussian mean and log-scale);
* :mod:`natgrad.fisher.solve`: the damped direction ``(W^T W / N + lam I)^{-1} g`` from
  ``W`` by the RAT solvers, in kernel or push-through form;
* :mod:`natgrad.fisher.families`: which action distributions have a closed-form expected
  Fisher, and how its rows are built;
* :mod:`natgrad.fisher.expected`: the expected-Fisher natural policy gradient.
"""
