"""Every algorithm runs; RAT steps respect their KL; rejected line searches change nothing."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.rl import ALGORITHMS, TrainConfig, Trainer  # noqa: E402
from natgrad.rl.algorithms import backtracking_line_search, mean_kl  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402
from natgrad.rl.policies import log_prob  # noqa: E402

# Small enough that the whole matrix runs in seconds.
SMALL = dict(num_envs=4, num_steps=64, hidden=(16, 16), critic_epochs=2, tol_free=None)
SMALL.pop("tol_free")
ENVS = ("CartPole-v1", "Pendulum-v1")
# The KL actually taken by rat-npg, relative to max_kl, stays within this factor: the step
# size is exact for the quadratic KL model with the sampled (Monte-Carlo) Fisher.
KL_FACTOR = 2.0


def _trainer(tmp_path, **overrides) -> Trainer:
    config = TrainConfig(**{**SMALL, **overrides})
    return Trainer(config, tmp_path / "run", tensorboard=False)


@pytest.mark.parametrize("env", ENVS)
@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_smoke_every_algorithm(tmp_path, env, algo):
    trainer = _trainer(tmp_path, env=env, algo=algo, steps=768)
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    result = trainer.run(progress=False)
    trainer.close()
    assert result.steps == 768
    rows = read_progress(tmp_path / "run" / "progress.csv")
    assert [r["step"] for r in rows] == [256, 512, 768]
    for row in rows:
        assert math.isfinite(row["kl"]) and row["kl"] >= 0.0
        assert math.isfinite(row["value_loss"])
    after = list(trainer.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "learning_curve.png").exists()


@pytest.mark.parametrize("env", ENVS)
def test_rat_npg_kl_within_factor_of_target(tmp_path, env):
    trainer = _trainer(tmp_path, env=env, algo="rat-npg", steps=2048, num_steps=128)
    trainer.run(progress=False)
    trainer.close()
    rows = read_progress(tmp_path / "run" / "progress.csv")
    ratios = [row["kl"] / row["kl_target"] for row in rows]
    assert all(1 / KL_FACTOR <= r <= KL_FACTOR for r in ratios), ratios
    assert all(row["kl_ratio"] == pytest.approx(r) for row, r in zip(rows, ratios, strict=True))


@pytest.mark.parametrize("algo", ["rat-trpo", "cg-trpo"])
def test_rejected_line_search_leaves_params_bit_identical(tmp_path, monkeypatch, algo):
    from natgrad.rl.algorithms import linesearch

    # Every candidate looks like it leaves the trust region, so every step is rejected.
    monkeypatch.setattr(linesearch, "mean_kl", lambda old, new: torch.tensor(1.0))
    trainer = _trainer(tmp_path, algo=algo, steps=256, backtrack_iters=3)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    row = trainer.step()
    trainer.close()
    assert row["step_accepted"] == 0.0 and row["backtracks"] == 3.0
    assert row["kl"] == 0.0
    for name, param in trainer.policy.named_parameters():
        assert torch.equal(param, before[name]), name


def test_line_search_accepts_improving_step_and_writes_params():
    policy = torch.nn.Linear(3, 2)

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = policy

        def forward(self, obs):
            return torch.distributions.Categorical(logits=self.net(obs), validate_args=False)

    model = Wrapped()
    gen = torch.Generator().manual_seed(0)
    obs = torch.randn(64, 3, generator=gen)
    acts = torch.randint(0, 2, (64,), generator=gen)
    adv = torch.randn(64, generator=gen)
    with torch.no_grad():
        old = model(obs)
        old_lp = log_prob(old, acts)
    grads = torch.autograd.grad((log_prob(model(obs), acts) * adv).mean(), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    result = backtracking_line_search(
        model, names, [0.1 * g for g in grads], obs, acts, old_lp, adv, old, 1.0, 5, 0.5
    )
    assert result.accepted and result.backtracks == 0 and result.improvement > 0
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        torch.testing.assert_close(p, b + 0.1 * g)
    with torch.no_grad():
        assert float(mean_kl(old, model(obs))) == pytest.approx(result.kl)


@pytest.mark.parametrize("algo", ["rat-npg", "kfac"])
def test_minatar_cnn_smoke(tmp_path, algo):
    pytest.importorskip("minatar")
    trainer = _trainer(tmp_path, env="MinAtar/Breakout-v1", algo=algo, steps=256, num_steps=32,
                       num_envs=4, hidden=(32,))  # fmt: skip
    assert any(isinstance(m, torch.nn.Conv2d) for m in trainer.policy.modules())
    before = [p.detach().clone() for p in trainer.policy.parameters()]
    trainer.run(progress=False)
    trainer.close()
    after = list(trainer.policy.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_conjugate_gradient_solves_spd_system():
    from natgrad.rl.algorithms import conjugate_gradient

    gen = torch.Generator().manual_seed(0)
    m = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a = m @ m.T + 0.5 * torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=gen, dtype=torch.float64)
    x = conjugate_gradient(lambda v: a @ v, b, iters=6, tol=1e-30)
    torch.testing.assert_close(x, torch.linalg.solve(a, b))


def test_rat_npg_kl_guard_shrinks_overlong_steps(tmp_path, monkeypatch):
    from natgrad import NaturalGradient

    original = NaturalGradient.step_size
    # A KL model that underestimates curvature 100-fold: the closed-form step overshoots.
    monkeypatch.setattr(NaturalGradient, "step_size", lambda self, kl: 10 * original(self, kl))
    guarded = _trainer(tmp_path / "on", algo="rat-npg", steps=256).step()
    assert guarded["kl_guard_shrinks"] >= 1
    assert guarded["kl"] <= 2.0 * guarded["kl_target"]
    unguarded = _trainer(tmp_path / "off", algo="rat-npg", steps=256, kl_guard=0.0).step()
    assert unguarded["kl_guard_shrinks"] == 0
    assert unguarded["kl"] > 2.0 * unguarded["kl_target"]
