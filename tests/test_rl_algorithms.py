"""Every algorithm runs; RAT steps respect their KL; rejected line searches change nothing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

pytest.importorskip("gymnasium")

from natgrad.distributions import log_prob  # noqa: E402
from natgrad.errors import NotConvergedWarning  # noqa: E402
from natgrad.rl import ALGORITHMS, TrainConfig, Trainer  # noqa: E402
from natgrad.rl.algorithms import backtracking_line_search, mean_kl  # noqa: E402
from natgrad.rl.logger import read_progress  # noqa: E402

# Small enough that the whole matrix runs in seconds.
SMALL = dict(num_envs=4, num_steps=64, hidden=(16, 16), critic_epochs=2, tol_free=None)
SMALL.pop("tol_free")
ENVS = ("CartPole-v1", "Pendulum-v1")
# The KL actually taken by rat-npg without its guard, relative to max_kl, on the small runs
# below: the step size is exact for the quadratic KL model with the sampled Fisher.
KL_BAND = (0.7, 1.5)


def _trainer(tmp_path, **overrides) -> Trainer:
    config = TrainConfig.from_dict({**SMALL, **overrides})
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
def test_rat_npg_step_is_the_closed_form_and_its_kl_near_the_target(tmp_path, env):
    """With the KL guard and the rejection off, every update takes
    ``eta = sqrt(2 max_kl / d^T F d)`` and the KL actually taken stays near ``max_kl``.

    The band is measured, not enforced by any mechanism: with the guard off these runs
    give KL / max_kl in [0.90, 1.28]; a step size 1.3x (0.8x) too large moves it outside.
    """
    trainer = _trainer(
        tmp_path, env=env, algo="rat-npg", steps=2048, num_steps=128, kl_guard=0.0, kl_reject=0.0
    )
    trainer.run(progress=False)
    trainer.close()
    rows = read_progress(tmp_path / "run" / "progress.csv")
    assert len(rows) == 4
    for row in rows:
        assert row["kl_guard_shrinks"] == 0.0
        assert row["step_size"] == pytest.approx(
            math.sqrt(2.0 * row["kl_target"] / row["d_fisher_d"]), rel=1e-9
        )
    ratios = [row["kl"] / row["kl_target"] for row in rows]
    assert all(KL_BAND[0] <= r <= KL_BAND[1] for r in ratios), ratios
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
    unguarded = _trainer(
        tmp_path / "off", algo="rat-npg", steps=256, kl_guard=0.0, kl_reject=0.0
    ).step()
    assert unguarded["kl_guard_shrinks"] == 0
    assert unguarded["kl"] > 2.0 * unguarded["kl_target"]
    # Without the guard, the trainer's last line of defence rejects the 100-fold overshoot.
    with pytest.warns(RuntimeWarning, match="exceeds --kl-reject 10 x the target"):
        rejected = _trainer(tmp_path / "rej", algo="rat-npg", steps=256, kl_guard=0.0).step()
    assert rejected["update_rejected"] == 1.0 and rejected["kl"] == 0.0


def _categorical_batch(n=64, features=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, features, generator=gen)
    acts = torch.randint(0, 2, (n,), generator=gen)
    adv = torch.randn(n, generator=gen)
    return obs, acts, adv


class _Softmax(torch.nn.Module):
    def __init__(self, features=3, actions=2, hidden=None):
        super().__init__()
        layers = [torch.nn.Linear(features, hidden or actions)]
        if hidden:
            layers += [torch.nn.Tanh(), torch.nn.Linear(hidden, actions)]
        self.net = torch.nn.Sequential(*layers)

    def forward(self, obs):
        return torch.distributions.Categorical(logits=self.net(obs))


def test_line_search_rejects_a_step_that_worsens_the_surrogate():
    """A candidate inside the trust region is still rejected if the surrogate gets worse."""
    torch.manual_seed(0)
    model = _Softmax()
    obs, acts, adv = _categorical_batch()
    with torch.no_grad():
        old = model(obs)
        old_lp = log_prob(old, acts)
    grads = torch.autograd.grad((log_prob(model(obs), acts) * adv).mean(), list(model.parameters()))
    names = [n for n, _ in model.named_parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    result = backtracking_line_search(  # a small step *down* the surrogate: tiny KL
        model, names, [-0.1 * g for g in grads], obs, acts, old_lp, adv, old, 1.0, 4, 0.5
    )
    assert not result.accepted and result.fraction == 0.0 and result.backtracks == 4
    assert 0.0 < result.kl <= 1.0 and result.improvement < 0.0
    for p, b in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, b)


@pytest.mark.parametrize("algo", ["rat-trpo", "cg-trpo"])
def test_line_search_rejects_every_non_improving_step_in_training(tmp_path, monkeypatch, algo):
    from natgrad.rl.algorithms import linesearch

    real = linesearch.surrogate

    def no_candidate_improves(log_probs, old_log_probs, adv):
        value = real(log_probs, old_log_probs, adv)
        return value if log_probs is old_log_probs else value - 1.0  # the baseline call

    monkeypatch.setattr(linesearch, "surrogate", no_candidate_improves)
    trainer = _trainer(tmp_path, algo=algo, steps=256, backtrack_iters=3)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    row = trainer.step()
    trainer.close()
    assert row["step_accepted"] == 0.0 and row["backtracks"] == 3.0
    assert row["surrogate_improvement"] < 0.0
    for name, param in trainer.policy.named_parameters():
        assert torch.equal(param, before[name]), name


def test_cg_trpo_fisher_vector_product_is_kl_hessian_plus_damping(monkeypatch):
    """cg-trpo solves ``(H + cg_damping I) s = g`` with ``H`` the Hessian of the mean KL."""
    from torch.func import functional_call

    from natgrad.rl.algorithms import CGTRPO, CGTRPOOptions, trpo

    torch.manual_seed(0)
    model = _Softmax(hidden=4)
    obs, acts, adv = _categorical_batch()
    update = CGTRPO(model, CGTRPOOptions(cg_damping=0.3), seed=0)
    named = [(n, p) for n, p in model.named_parameters()]
    shapes = [p.shape for _, p in named]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])
    with torch.no_grad():
        old_dist = model(obs)
        old_lp = log_prob(old_dist, acts)

    def kl_of(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for (n, _), t, s in zip(named, pieces, shapes, strict=True)}
        return mean_kl(old_dist, functional_call(model, params, (obs,)))

    hessian = torch.autograd.functional.hessian(kl_of, theta)
    probes = torch.randn(3, theta.numel(), generator=torch.Generator().manual_seed(1))
    seen = {}
    real_cg = trpo.conjugate_gradient

    def spy(fvp, b, iters, *args, **kwargs):
        seen["products"] = [fvp(v) for v in probes]
        return real_cg(fvp, b, iters, *args, **kwargs)

    monkeypatch.setattr(trpo, "conjugate_gradient", spy)
    update.update(obs, acts, old_lp, adv)
    for v, product in zip(probes, seen["products"], strict=True):
        torch.testing.assert_close(product, hessian @ v + 0.3 * v, rtol=1e-4, atol=1e-6)


def _kfac_reference_factors(model, obs, acts):
    """Per layer: A = E[[a, 1][a, 1]^T] and G = E[g g^T], g = d log pi_i / d (layer output),
    from the inputs computed by hand and per-sample gradients of the bias (= g_i)."""
    first, second = model.net[0], model.net[2]
    inputs = {"net.0": obs, "net.2": torch.tanh(first(obs)).detach()}
    out = {}
    for name, layer in (("net.0", first), ("net.2", second)):
        rows = []
        for i in range(obs.shape[0]):
            lp = log_prob(model(obs[i : i + 1]), acts[i : i + 1]).sum()
            rows.append(torch.autograd.grad(lp, layer.bias)[0])
        g = torch.stack(rows)
        a = torch.cat([inputs[name], torch.ones(obs.shape[0], 1)], dim=1)
        out[name] = (a.T @ a / obs.shape[0], g.T @ g / obs.shape[0])
    return out


def _kfac_reference_direction(model, factors, obs, acts, adv, damping):
    lp = log_prob(model(obs), acts)
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad((adv * lp).mean(), list(model.parameters())),
                     strict=True))  # fmt: skip
    direction = {}
    for name, (a, g) in factors.items():
        pi = math.sqrt((float(a.trace()) / a.shape[0]) / (float(g.trace()) / g.shape[0]))
        root = math.sqrt(damping)
        a_damped = a + pi * root * torch.eye(a.shape[0])
        g_damped = g + root / pi * torch.eye(g.shape[0])
        m = torch.cat([grads[f"{name}.weight"], grads[f"{name}.bias"][:, None]], dim=1)
        nat = torch.linalg.inv(g_damped) @ m @ torch.linalg.inv(a_damped)
        direction[f"{name}.weight"], direction[f"{name}.bias"] = nat[:, :-1], nat[:, -1]
    return direction


def test_kfac_direction_uses_pi_damping_and_decayed_factors():
    """K-FAC: ``(G + sqrt(lam)/pi I)^{-1} grad_W (A + pi sqrt(lam) I)^{-1}`` with
    ``pi = sqrt((tr A / dim A) / (tr G / dim G))``, factors averaged with ``kfac_decay``."""
    from natgrad.rl.algorithms import KFAC, KFACOptions

    torch.manual_seed(0)
    model = _Softmax(hidden=4)
    kfac = KFAC(model, KFACOptions(kfac_damping=0.05, kfac_decay=0.8), seed=0)
    obs1, acts1, adv1 = _categorical_batch(seed=1)
    obs2, acts2, adv2 = _categorical_batch(seed=2)
    obs1, obs2 = 4.0 * obs1, 0.5 * obs2  # pi far from 1, and different per batch

    first = _kfac_reference_factors(model, obs1, acts1)
    pis = [math.sqrt((float(a.trace()) / a.shape[0]) / (float(g.trace()) / g.shape[0]))
           for a, g in first.values()]  # fmt: skip
    assert all(abs(pi - 1.0) > 0.5 for pi in pis), pis
    got = kfac.direction(obs1, acts1, adv1)
    expected = _kfac_reference_direction(model, first, obs1, acts1, adv1, 0.05)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)

    second = _kfac_reference_factors(model, obs2, acts2)
    decayed = {
        name: (0.8 * a1 + 0.2 * a2, 0.8 * g1 + 0.2 * g2)
        for name, ((a1, g1), (a2, g2)) in zip(first, zip(first.values(), second.values(),
                                                             strict=True), strict=True)
    }  # fmt: skip
    got = kfac.direction(obs2, acts2, adv2)
    for name, (a, g) in decayed.items():
        torch.testing.assert_close(kfac.factors[name][0], a, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(kfac.factors[name][1], g, rtol=1e-5, atol=1e-7)
    expected = _kfac_reference_direction(model, decayed, obs2, acts2, adv2, 0.05)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_every_update_improves_the_surrogate_of_its_batch(algo):
    """Beyond "parameters changed": each rule moves uphill on the batch's surrogate
    ``mean(pi / pi_old * A)`` (an update along -g, or a wrong preconditioner sign, fails)."""
    from natgrad.rl.algorithms import make_algorithm, surrogate

    torch.manual_seed(0)
    model = _Softmax(hidden=4)
    obs, acts, _ = _categorical_batch(n=128)
    with torch.no_grad():
        old_lp = log_prob(model(obs), acts)
    # Advantages that a better policy can actually exploit: favour action 1 when obs[0] > 0.
    adv = torch.where((acts == 1) == (obs[:, 0] > 0), 1.0, -1.0)
    adv = (adv - adv.mean()) / adv.std()
    flat = {"algo": algo, "max_kl": 0.01, "lr": 1e-2, "ppo_minibatch": 32}
    update = make_algorithm(algo, model, TrainConfig.from_dict({**SMALL, **flat}).options, seed=0)
    update.update(obs, acts, old_lp, adv)
    with torch.no_grad():
        new_dist = model(obs)
        gain = float(surrogate(log_prob(new_dist, acts), old_lp, adv)) - float(adv.mean())
    assert gain > 0.0, gain
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("norm_adv", [True, False])
def test_norm_adv_whitens_the_advantages_or_passes_them_raw(tmp_path, norm_adv):
    trainer = _trainer(tmp_path, env="Pendulum-v1", steps=256, norm_adv=norm_adv)
    batches, given = [], []
    make_batch, update = trainer.buffer.batch, trainer.algo.update

    def record_batch(*args, **kwargs):
        batches.append(make_batch(*args, **kwargs))
        return batches[-1]

    def record_update(obs, acts, log_probs, adv):
        given.append(adv.clone())
        return update(obs, acts, log_probs, adv)

    trainer.buffer.batch, trainer.algo.update = record_batch, record_update
    trainer.step()
    trainer.close()
    raw = batches[0].advantages
    assert float(raw.mean().abs()) > 1e-3  # Pendulum's raw advantages are not centred
    if norm_adv:
        expected = (raw - raw.mean()) / (raw.std() + 1e-8)
        assert torch.allclose(given[0], expected)
        assert abs(float(given[0].mean())) < 1e-5 and abs(float(given[0].std()) - 1) < 1e-4
    else:
        assert torch.equal(given[0], raw)
    assert trainer.config.norm_adv is norm_adv


@pytest.mark.parametrize("policy", ["fallback", "warn", "raise"])
def test_rat_on_nonconvergence_reaches_the_solver(tmp_path, policy):
    """One Kaczmarz epoch cannot reach rat_tol: fallback solves exactly, warn steps along
    the inexact iterate (the paper's few-epoch solve), raise rejects the update."""
    trainer = _trainer(tmp_path, env="CartPole-v1", steps=256, solver="kaczmarz", damping=1e-2,
                       block_size=8, rat_max_epochs=1, rat_tol=1e-4,
                       rat_on_nonconvergence=policy)  # fmt: skip
    assert trainer.algo.rat.on_nonconvergence == policy
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        row = trainer.step()
    trainer.close()
    diagnostics = trainer.algo.rat.diagnostics
    if policy == "fallback":
        assert row["update_rejected"] == 0.0 and row["solver_fallbacks"] == 1.0
        assert diagnostics.solver == "cholesky" and diagnostics.converged
        assert row["solver_converged"] == 1.0
    elif policy == "warn":
        assert row["update_rejected"] == 0.0 and row["solver_fallbacks"] == 1.0  # the note
        assert "instead" not in diagnostics.fallbacks[0]
        assert diagnostics.solver == "kaczmarz" and not diagnostics.converged
        assert row["solver_converged"] == 0.0
        assert any(issubclass(w.category, NotConvergedWarning) for w in caught)
    else:
        assert row["update_rejected"] == 1.0 and trainer.rejected_updates == 1
