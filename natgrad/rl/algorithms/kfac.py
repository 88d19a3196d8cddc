"""``kfac``: ACKTR-style Kronecker-factored natural gradient for Linear and Conv2d layers."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp, vmap

from natgrad._guard import functional_call
from natgrad.distributions import log_prob
from natgrad.layers import capture_layer_calls, output_gradients
from natgrad.rl.algorithms.base import PolicyUpdate, TrustRegionOptions
from natgrad.rl.options import option, positive, unit_interval

__all__ = ["KFAC", "KFACOptions"]


def _with_ones(a: Tensor) -> Tensor:
    return torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)


@dataclasses.dataclass
class KFACOptions(TrustRegionOptions):
    """Options of ``kfac``: the trust region, the factors' damping and decay, ACKTR's cap."""

    kfac_damping: float = option(1e-2, "K-FAC Tikhonov damping.", positive)
    kfac_decay: float = option(0.95, "Moving-average decay of the K-FAC factors.", unit_interval)
    kfac_max_lr: float = option(0.25, "ACKTR's largest K-FAC step.", positive)


class KFAC(PolicyUpdate):
    """K-FAC natural gradient (Martens & Grosse, 2015; KFC for convolutions) with ACKTR's step.

    Per layer, the Fisher block is approximated by ``A (x) G`` with ``A = E[a a^T]`` (layer
    inputs, with a bias column) and ``G = E[g g^T]`` (per-sample score gradients w.r.t. the
    layer outputs, for the sampled actions); factors are averaged with ``kfac_decay``. The
    preconditioned gradient is ``(G + I sqrt(lam)/pi)^{-1} grad_W (A + pi sqrt(lam) I)^{-1}``
    (factored Tikhonov damping). Parameters outside Linear/Conv2d layers (the Gaussian
    ``log_std``) use the diagonal empirical Fisher. The step is ACKTR's
    ``min(kfac_max_lr, sqrt(2 max_kl / d^T F d))`` with ``d^T F d`` from an exact
    Jacobian-vector product on the batch.
    """

    Options = KFACOptions
    options: KFACOptions

    def __init__(self, policy: nn.Module, options: Any = None, seed: int = 0) -> None:
        super().__init__(policy, options, seed)
        self.layers = {
            name: module
            for name, module in policy.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None
        }
        covered = {f"{n}.{p}" for n in self.layers for p in ("weight", "bias")}
        self.other = [
            n for n, p in policy.named_parameters() if p.requires_grad and n not in covered
        ]
        self.factors: dict[str, tuple[Tensor, Tensor]] = {}

    def _capture(self, obs: Tensor, acts: Tensor) -> tuple[Tensor, dict[str, Tensor], dict]:
        lp, calls = capture_layer_calls(self.layers, lambda: log_prob(self.policy(obs), acts))
        inputs = {name: records[-1].inputs[0].detach() for name, records in calls.items()}
        outputs = {name: records[-1].output for name, records in calls.items()}
        return lp, inputs, outputs

    def _batch_factors(self, name: str, a: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        module = self.layers[name]
        n = a.shape[0]
        if isinstance(module, nn.Conv2d):
            patches = F.unfold(
                a, module.kernel_size, module.dilation, module.padding, module.stride
            )  # (N, C*k*k, L)
            locations = patches.shape[-1]
            a = patches.transpose(1, 2).reshape(-1, patches.shape[1])
            g = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
            a = _with_ones(a)
            return a.T @ a / (n * locations), g.T @ g * locations / n
        a = _with_ones(a)
        return a.T @ a / n, g.T @ g / n

    def direction(self, obs: Tensor, acts: Tensor, adv: Tensor) -> dict[str, Tensor]:
        """The K-FAC natural-gradient direction on a batch (updates the running factors).

        Returns a direction per trainable parameter name, in ``named_parameters`` order.
        """
        cfg = self.options
        params = dict(self.policy.named_parameters())
        lp, inputs, outputs = self._capture(obs, acts)
        names = [n for n, p in params.items() if p.requires_grad]
        grads = dict(zip(names, torch.autograd.grad((adv * lp).mean(), [params[n] for n in names],
                                                    retain_graph=True), strict=True))  # fmt: skip
        # Per-sample gradients w.r.t. layer outputs: backprop of sum_i log pi(a_i|s_i).
        out_grads = output_gradients(lp.sum(), [outputs[n] for n in self.layers])
        direction: dict[str, Tensor] = {}
        root = cfg.kfac_damping**0.5
        for name, g_out in zip(self.layers, out_grads, strict=True):
            a_new, g_new = self._batch_factors(name, inputs[name], g_out.detach())
            if name in self.factors:
                a_old, g_old = self.factors[name]
                a_new = cfg.kfac_decay * a_old + (1 - cfg.kfac_decay) * a_new
                g_new = cfg.kfac_decay * g_old + (1 - cfg.kfac_decay) * g_new
            self.factors[name] = (a_new, g_new)
            pi = ((a_new.trace() / a_new.shape[0]) / (g_new.trace() / g_new.shape[0])).sqrt()
            a_damped = a_new + pi * root * torch.eye(a_new.shape[0], device=a_new.device)
            g_damped = g_new + root / pi * torch.eye(g_new.shape[0], device=g_new.device)
            gw, gb = grads[f"{name}.weight"], grads[f"{name}.bias"]
            m = torch.cat([gw.reshape(gw.shape[0], -1), gb[:, None]], dim=1)
            nat = torch.linalg.solve(g_damped, torch.linalg.solve(a_damped, m.T).T)
            direction[f"{name}.weight"] = nat[:, :-1].reshape(gw.shape)
            direction[f"{name}.bias"] = nat[:, -1]
        if self.other:
            direction.update(self._diagonal(obs, acts, {n: grads[n] for n in self.other}))
        return {n: direction[n] for n in names}

    def update(
        self, obs: Tensor, acts: Tensor, old_log_probs: Tensor, adv: Tensor
    ) -> dict[str, float]:
        """One K-FAC step of at most ``max_kl`` (to second order) and ``kfac_max_lr``."""
        cfg = self.options
        params = dict(self.policy.named_parameters())
        direction = self.direction(obs, acts, adv)
        names, ordered = list(direction), list(direction.values())
        primals = {n: params[n].detach() for n in names}

        def batch_log_prob(p: dict[str, Tensor]) -> Tensor:
            return log_prob(functional_call(self.policy, p, (obs,)), acts)

        _, jd = jvp(batch_log_prob, (primals,), (dict(zip(names, ordered, strict=True)),))
        dfd = float((jd**2).mean())
        eta = min(cfg.kfac_max_lr, (2 * cfg.max_kl / dfd) ** 0.5) if dfd > 0 else 0.0
        with torch.no_grad():
            for n, d in zip(names, ordered, strict=True):
                params[n].add_(d, alpha=eta)
        return {"step_size": eta, "kl_target": cfg.max_kl, "d_fisher_d": dfd}

    def _diagonal(self, obs: Tensor, acts: Tensor, grads: dict[str, Tensor]) -> dict[str, Tensor]:
        params = {n: p.detach() for n, p in self.policy.named_parameters()}

        def one(p_other: dict[str, Tensor], o: Tensor, a: Tensor) -> Tensor:
            dist = functional_call(self.policy, {**params, **p_other}, (o[None],))
            return log_prob(dist, a[None])[0]

        scores = vmap(grad(one), in_dims=(None, 0, 0))({n: params[n] for n in grads}, obs, acts)
        lam = self.options.kfac_damping
        return {n: g / ((scores[n] ** 2).mean(0) + lam) for n, g in grads.items()}

    def state_dict(self) -> dict[str, Any]:
        """The running Kronecker factors."""
        return {"factors": {n: (a.clone(), g.clone()) for n, (a, g) in self.factors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the running Kronecker factors."""
        self.factors = dict(state["factors"])
