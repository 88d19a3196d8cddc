"""A minimal K-FAC (Martens & Grosse 2015) for models whose trainable layers are nn.Linear.

Per layer, the Fisher block is approximated by ``A (x) G`` with ``A = E[a a^T]`` (layer input
with a bias 1 appended) and ``G = E[s s^T]`` (gradient of the log-likelihood of a target
sampled from the model w.r.t. the layer's pre-activation). Factors are running averages;
damping is factored Tikhonov with the pi-correction, steps are KL-clipped. Benchmark baseline only.

This is the *supervised* baseline (targets sampled from the model, a loss instead of a
policy); the RL agent ``kfac`` (``natgrad/rl/algorithms/kfac.py``, Linear and Conv2d layers,
ACKTR's step) is a separate implementation on purpose: each follows its own literature.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class KFAC:
    def __init__(
        self,
        model: nn.Module,
        loss: str,
        lr: float,
        damping: float = 1e-2,
        ema: float = 0.95,
        seed: int = 0,
        kl_clip: float = 1e-3,
    ) -> None:
        self.model, self.loss, self.lr, self.damping, self.ema = model, loss, lr, damping, ema
        self.kl_clip = kl_clip
        self.layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
        trained = {id(p) for p in model.parameters() if p.requires_grad}
        covered = {id(p) for m in self.layers for p in m.parameters()}
        if trained != covered:
            raise ValueError("this K-FAC handles models whose only parameters are nn.Linear")
        self.generator = torch.Generator().manual_seed(seed)
        self.factors: dict[int, tuple[Tensor, Tensor]] = {}
        self._inputs: dict[int, Tensor] = {}
        self._outputs: dict[int, Tensor] = {}
        for i, layer in enumerate(self.layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            self._inputs[i] = args[0].detach()
            self._outputs[i] = output

        return hook

    def _loss(self, out: Tensor, targets: Tensor) -> Tensor:
        if self.loss == "mse":
            return 0.5 * (out - targets).pow(2).sum(dim=1).mean()
        return nn.functional.cross_entropy(out, targets)

    def step(self, inputs: Tensor, targets: Tensor) -> float:
        out = self.model(inputs)
        pre = [self._outputs[i] for i in range(len(self.layers))]
        acts = [self._inputs[i] for i in range(len(self.layers))]
        value = self._loss(out, targets)
        params = [p for layer in self.layers for p in (layer.weight, layer.bias)]
        grads = torch.autograd.grad(value, params, retain_graph=True)
        with torch.no_grad():
            if self.loss == "mse":
                sampled = out + torch.randn(out.shape, generator=self.generator).to(out)
            else:
                probs = torch.softmax(out, dim=1)
                sampled = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        # Summed (not mean) sampled loss: each row of the pre-activation gradient is then one
        # sample's score, as the Fisher needs.
        n = out.shape[0]
        sampled_loss = self._loss(out, sampled) * n
        scores = torch.autograd.grad(sampled_loss, pre)
        with torch.no_grad():
            for i, (a, s) in enumerate(zip(acts, scores, strict=True)):
                a1 = torch.cat([a, torch.ones(n, 1, dtype=a.dtype)], dim=1)
                new_a, new_g = a1.T @ a1 / n, s.T @ s / n
                if i in self.factors:
                    old_a, old_g = self.factors[i]
                    new_a = self.ema * old_a + (1 - self.ema) * new_a
                    new_g = self.ema * old_g + (1 - self.ema) * new_g
                self.factors[i] = (new_a, new_g)
            updates = []
            for i in range(len(self.layers)):
                factor_a, factor_g = self.factors[i]
                gw, gb = grads[2 * i], grads[2 * i + 1]
                matrix = torch.cat([gw, gb[:, None]], dim=1)
                pi = math.sqrt(
                    (float(factor_a.trace()) / factor_a.shape[0])
                    / max(float(factor_g.trace()) / factor_g.shape[0], 1e-30)
                )
                root = math.sqrt(self.damping)
                eye_a = torch.eye(factor_a.shape[0], dtype=factor_a.dtype)
                eye_g = torch.eye(factor_g.shape[0], dtype=factor_g.dtype)
                left = torch.linalg.solve(factor_g + (root / pi) * eye_g, matrix)
                updates.append(torch.linalg.solve(factor_a + (root * pi) * eye_a, left.T).T)
            # KL clipping (as in common K-FAC implementations): shrink the step so that its
            # quadratic KL estimate lr^2 * g^T F^{-1} g stays below kl_clip.
            quad = sum(
                float((u[:, :-1] * grads[2 * i]).sum() + (u[:, -1] * grads[2 * i + 1]).sum())
                for i, u in enumerate(updates)
            )
            scale = min(1.0, math.sqrt(self.kl_clip / max(self.lr**2 * quad, 1e-30)))
            for layer, update in zip(self.layers, updates, strict=True):
                layer.weight -= scale * self.lr * update[:, :-1]
                layer.bias -= scale * self.lr * update[:, -1]
        return float(value.detach())
