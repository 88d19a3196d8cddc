"""The expected-Fisher rows ``W`` as a matrix-free operator (``R = N m`` rows, never held).

``W v`` is ``J_z v`` for all samples at once (``z``: the distribution parameters) mapped by
the family's Fisher square root; ``W^T x`` is one backward pass of ``z`` with the
transposed map applied to ``x`` first. Both run on one recorded forward pass (``J_z v`` as
the double backward of ``J_z^T u`` in a dummy ``u``, the trick of TRPO's Fisher-vector
products) and cost about a backward pass each, against ``R x P`` numbers for the rows
themselves (``m`` rows per sample: 12 for a 6-dimensional Gaussian). Rows of a few samples
(Kaczmarz blocks, the Nystrom sample, Cholesky's kernel) come from per-sample Jacobians,
chunk by chunk, as the streaming backend computes score rows. Because the products run on
the batched policy, :meth:`ExpectedFisherRows.check_per_sample` first checks on the whole
batch that no sample's distribution depends on the others.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.distributions import Distribution
from torch.func import vjp, vmap

from natgrad._guard import functional_call
from natgrad._tree import Tree, take, tree_map, unflatten, unsqueeze
from natgrad._vmap import raise_unless_vmap_limitation
from natgrad.fisher.families import FisherFamily
from natgrad.scores import StreamingScores
from natgrad.supervised.jacobians import _check_consistent, output_jacobians

_COLUMNS_AT_ONCE = 64
"""Kernel columns (forward-mode passes) batched in one ``vmap`` call."""

__all__ = ["ExpectedFisherRows"]


class _RowSource:
    """Rows ``s W[index]`` by row index (row ``r``: sample ``r // m``, factor row ``r % m``)."""

    def __init__(self, owner: ExpectedFisherRows) -> None:
        self.owner = owner
        self.num_samples = owner.num_rows
        self.num_params = owner.num_params
        self.dtype = owner.param_dtype
        self.device = owner.device

    def rows(self, index: Tensor) -> Tensor:
        owner = self.owner
        samples, inverse = torch.unique(
            torch.div(index, owner.m, rounding_mode="floor"), return_inverse=True
        )
        per_sample = owner.sample_rows(samples)  # (S, m, P)
        return per_sample[inverse, index % owner.m] * owner.scale


class ExpectedFisherRows(StreamingScores):
    """``s W`` (``W``: expected-Fisher rows, ``s = sqrt(R / N)``) for the RAT solvers.

    Parameters
    ----------
    wrapper
        ``obs -> z``: the distribution parameters of ``policy(obs)``, ``(N, k)``.
    policy
        The policy (gives the distribution of a subset of samples).
    obs
        The batch of observations.
    names
        Parameter names of ``wrapper`` (``policy.<name>``) forming ``theta``, in order.
    shapes
        Their shapes (for flat vectors).
    dist
        ``policy(obs)``, detached.
    family
        The distribution family (outputs and Fisher square root).
    rows_per_sample
        ``m``.
    scale
        ``s = sqrt(R / N)``: the solvers' ``J^T J / R`` is then ``W^T W / N``.
    chunk_size
        Rows computed at once when rows are needed (Kaczmarz blocks, Nystrom sample, kernel).
    """

    backend = "streaming"

    def __init__(
        self,
        wrapper: nn.Module,
        policy: nn.Module,
        obs: Tree,
        names: list[str],
        shapes: list[torch.Size],
        dist: Distribution,
        family: FisherFamily,
        rows_per_sample: int,
        scale: float,
        chunk_size: int,
    ) -> None:
        named = dict(wrapper.named_parameters())
        self.wrapper, self.policy, self.obs = wrapper, policy, obs
        self.names, self.shapes = list(names), list(shapes)
        self.family, self.dist = family, dist
        self.m, self.scale = rows_per_sample, scale
        self.outputs = family.outputs(dist).detach()
        self.outputs = self.outputs.reshape(self.outputs.shape[0], -1)
        self.num_batch = int(self.outputs.shape[0])
        self.num_rows = self.num_batch * rows_per_sample
        self.params = {n: named[n].detach() for n in names}
        self.constants = {n: p.detach() for n, p in named.items() if n not in self.params}
        self.constants.update(dict(wrapper.named_buffers()))
        first = self.params[names[0]]
        self.param_dtype, self.device = first.dtype, first.device
        self.num_params = int(sum(p.numel() for p in self.params.values()))
        self.jacobian_path, self.jacobian_fallback = "vmap", None
        self.product_failure: str | None = None
        self._record: tuple | None = None
        self._factor_pullback = None
        super().__init__(_RowSource(self), max(chunk_size, rows_per_sample))

    # -- rows of a few samples ----------------------------------------------------------
    def sample_rows(self, samples: Tensor) -> Tensor:
        """``W`` rows of ``samples`` (shape ``(S, m, P)``, the parameters' dtype)."""
        obs_s = take(self.obs, samples)
        with torch.no_grad():
            dist_s = self.policy(obs_s)
        jac = output_jacobians(self.wrapper, obs_s, self.names, self.outputs[samples], len(samples))
        if jac.fallback_reason is not None:
            self.jacobian_path, self.jacobian_fallback = jac.path, jac.fallback_reason
        return self.family.rows(dist_s, jac.jacobians).reshape(len(samples), self.m, -1)

    def check_per_sample(self, chunk_size: int) -> None:
        """Check on the whole batch that each sample's outputs do not depend on the others.

        The products run on the batched policy, so a policy that couples samples
        (BatchNorm in train mode, ...) would give a Fisher that is not the mean of
        per-sample ones: refused, as the per-sample Jacobians of the rows refuse it.
        """

        def single(obs_i: Tree) -> Tensor:
            out = functional_call(
                self.wrapper, {**self.params, **self.constants}, (unsqueeze(obs_i),)
            )
            return out.reshape(-1)

        pieces = []
        for index in torch.arange(self.num_batch, device=self.device).split(chunk_size):
            obs_s = take(self.obs, index)
            try:
                pieces.append(vmap(single)(obs_s))
            except Exception as error:  # noqa: BLE001 - classified by the helper
                raise_unless_vmap_limitation(
                    error,
                    "the policy draws random numbers in forward (e.g. active dropout), so its "
                    "Fisher is ill-defined; call policy.eval() first",
                )
                pieces += [single(tree_map(lambda t, i=i: t[i], obs_s)) for i in range(len(index))]
        per_sample = torch.cat([p.reshape(-1, self.outputs.shape[1]) for p in pieces])
        _check_consistent(per_sample.detach(), self.outputs)

    def kernel_trace(self) -> None:
        """Unknown: the trace needs every row (a full Jacobian pass), the products do not."""
        return None

    def cross_gram(self, index: Tensor) -> Tensor:
        """``K[:, index]``: the rows of ``index``, then ``W`` applied to them as tangents."""
        selected = self._rows(index)
        columns = [self._matvecs(part.T) for part in selected.split(_COLUMNS_AT_ONCE)]
        return torch.cat(columns, dim=1)

    # -- the Fisher square root on output-space vectors ---------------------------------
    def _factor(self, dz: Tensor) -> Tensor:
        """``dz`` ``(N, k)`` -> ``(N, m)``: the family's rows of a one-column Jacobian."""
        return self.family.rows(self.dist, dz[..., None]).reshape(self.num_batch, self.m)

    # -- products with J_z, on one recorded forward pass --------------------------------
    def _recorded(self) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor | None]]:
        """The batched forward ``z(theta)`` and ``J_z^T u`` as a function of a dummy ``u``.

        Recorded once: ``J_z^T c`` is a backward pass of ``z``, and ``J_z v`` the
        derivative of ``(J_z^T u) . v`` in ``u`` (double backward), so neither product
        runs the policy forward again.
        """
        if self._record is None:
            leaves = [self.params[n].detach().requires_grad_() for n in self.names]
            with torch.enable_grad():
                params = {**dict(zip(self.names, leaves, strict=True)), **self.constants}
                z = functional_call(self.wrapper, params, (self.obs,))
                z = z.reshape(self.num_batch, -1)
                u = torch.zeros_like(z, requires_grad=True)
                first = torch.autograd.grad(z, leaves, u, create_graph=True, allow_unused=True)
            self._record = (leaves, z, u, list(first))
        return self._record

    def _jz(self, tangents: list[Tensor], batched: bool = False) -> Tensor:
        """``J_z v`` (``(N, k)``), or ``(c, N, k)`` for ``c`` tangents stacked (``batched``)."""
        _, z, u, first = self._recorded()
        pairs = [
            (g, t.to(self.param_dtype))
            for g, t in zip(first, tangents, strict=True)
            if g is not None and g.requires_grad
        ]
        shape = (tangents[0].shape[0], *z.shape) if batched else z.shape
        if not pairs:  # z does not depend on theta: J_z = 0
            return torch.zeros(shape, dtype=z.dtype, device=z.device)
        with torch.enable_grad():
            (dz,) = torch.autograd.grad(
                [g for g, _ in pairs],
                u,
                [t for _, t in pairs],
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=batched,
            )
        return torch.zeros(shape, dtype=z.dtype, device=z.device) if dz is None else dz

    def _split(self, v: Tensor) -> list[Tensor]:
        return list(unflatten(v, self.shapes))

    def _matvecs(self, vectors: Tensor) -> Tensor:
        """``s W V`` for the columns of ``vectors`` (shape ``(P, c)``) -> ``(R, c)``."""
        if self.product_failure is None:
            count = vectors.shape[1]
            stacked = [
                piece.T.reshape(count, *shape)
                for piece, shape in zip(
                    torch.split(vectors, [math.prod(s) for s in self.shapes]),
                    self.shapes,
                    strict=True,
                )
            ]
            try:
                dz = self._jz(stacked, batched=True)
            except (RuntimeError, NotImplementedError, ValueError):
                pass  # not batchable: one column at a time below
            else:
                rows = torch.stack([self._factor(d.detach()) for d in dz])
                return (rows.reshape(count, -1).T * self.scale).to(self.dtype)
        return torch.stack([self.matvec(v) for v in vectors.T], dim=1)

    def matvec(self, v: Tensor) -> Tensor:
        if self.product_failure is None:
            try:
                dz = self._jz(self._split(v))
            except (RuntimeError, NotImplementedError) as error:  # no double backward
                self.product_failure = f"{type(error).__name__}: {str(error)[:120]}"
            else:
                return (self._factor(dz.detach()).reshape(-1) * self.scale).to(self.dtype)
        return super().matvec(v)

    def rmatvec(self, x: Tensor) -> Tensor:
        if self._factor_pullback is None:
            zeros = torch.zeros_like(self.outputs, dtype=self.param_dtype)
            self._factor_pullback = vjp(self._factor, zeros)[1]
        y = x.reshape(self.num_batch, self.m).to(self.param_dtype) * self.scale
        (cotangent,) = self._factor_pullback(y)
        leaves, z, _, _ = self._recorded()
        with torch.enable_grad():
            grads = torch.autograd.grad(
                z, leaves, cotangent.to(z.dtype), retain_graph=True, allow_unused=True
            )
        pieces = [
            torch.zeros_like(leaf) if g is None else g
            for leaf, g in zip(leaves, grads, strict=True)
        ]
        return torch.cat([p.reshape(-1) for p in pieces]).to(self.dtype)

    def notes(self) -> list[str]:
        """What ran differently from the matrix-free plan (for ``diagnostics.fallbacks``)."""
        out = []
        if self.product_failure is not None:
            out.append(
                "expected-Fisher products W v from rows (no double backward: "
                f"{self.product_failure})"
            )
        if self.jacobian_fallback is not None:
            out.append(f"distribution Jacobians one sample at a time: {self.jacobian_fallback}")
        return out
