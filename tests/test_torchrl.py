"""natgrad.torchrl.RATAdvantage inside TorchRL pipelines (Collector, GAE, A2C/Reinforce)."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from reference import dense_natural_gradient, dense_scores
from torch import nn

pytest.importorskip("torchrl")
pytest.importorskip("gymnasium")

from tensordict import TensorDict  # noqa: E402
from tensordict.nn import NormalParamExtractor, TensorDictModule  # noqa: E402
from torchrl.collectors import Collector  # noqa: E402
from torchrl.envs import GymEnv  # noqa: E402
from torchrl.modules import (  # noqa: E402
    IndependentNormal,
    ProbabilisticActor,
    TanhNormal,
    ValueOperator,
)
from torchrl.objectives import A2CLoss, ReinforceLoss  # noqa: E402
from torchrl.objectives.value import GAE  # noqa: E402

from natgrad.errors import ArgumentError, ArgumentTypeError, NatgradError  # noqa: E402
from natgrad.torchrl import RATAdvantage  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchrl" / "a2c_rat.py"
DAMPING = 0.1


@pytest.fixture(scope="module")
def pipeline():
    """One Pendulum batch of 128 frames after GAE, with the actor and critic that made it."""
    torch.manual_seed(0)
    env = GymEnv("Pendulum-v1")
    env.set_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=IndependentNormal,
        spec=env.action_spec,
        return_log_prob=True,
    )
    critic = ValueOperator(
        nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)), in_keys=["observation"]
    )
    collector = Collector(
        env, actor, frames_per_batch=128, total_frames=128, auto_register_policy_transforms=False
    )
    data = next(iter(collector))
    collector.shutdown()
    with torch.no_grad():
        GAE(gamma=0.99, lmbda=0.95, value_network=critic)(data)
    return actor, critic, data


def reference_direction(actor, data):
    """d = (F + lam I)^{-1} g in float64 from per-sample autograd rows (tests/reference.py)."""

    def log_prob_fn(actor, obs, acts):
        return actor.get_dist(TensorDict({"observation": obs}, [len(obs)])).log_prob(acts)

    params = list(actor.parameters())
    scores = dense_scores(actor, log_prob_fn, data["observation"], data["action"], params, 128)
    return dense_natural_gradient(scores, data["advantage"].reshape(-1), DAMPING)


def flat_grad(actor):
    return torch.cat([p.grad.reshape(-1) for p in actor.parameters()]).double()


@pytest.mark.parametrize(
    ("loss_cls", "key"), [(A2CLoss, "loss_objective"), (ReinforceLoss, "loss_actor")]
)
def test_loss_gradient_is_the_natural_gradient(pipeline, loss_cls, key):
    actor, critic, batch = pipeline
    data = batch.clone()
    expected = reference_direction(actor, data)
    rat = RATAdvantage(actor, damping=DAMPING, solver="cholesky", seed=0)
    kwargs = {"entropy_bonus": False} if loss_cls is A2CLoss else {}
    loss_module = loss_cls(actor, critic, **kwargs)

    rat(data)
    assert rat.diagnostics.num_samples == 128 and rat.diagnostics.converged
    assert data["advantage"].shape == batch["advantage"].shape
    loss_module.zero_grad()
    loss_module(data)[key].backward()
    got = -flat_grad(actor)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_batch_dimensions_are_flattened_and_restored(pipeline):
    actor, _, batch = pipeline
    flat = RATAdvantage(actor, damping=DAMPING, solver="cholesky")(batch.clone())
    shaped = RATAdvantage(actor, damping=DAMPING, solver="cholesky")(batch.clone().reshape(4, 32))
    assert shaped["advantage"].shape == (4, 32, 1)
    assert torch.allclose(shaped["advantage"].reshape(-1), flat["advantage"].reshape(-1))


def test_tanh_normal_actor_gets_the_exact_transform(pipeline):
    """TorchRL's TanhNormal (its PPO/SAC default) raises on ``.support``; float actions must
    not look it up. A~ matches the dense float64 solve (J J^T / N + lam I)^{-1} A."""
    _, _, batch = pipeline
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2), NormalParamExtractor())
    actor = ProbabilisticActor(
        TensorDictModule(net, in_keys=["observation"], out_keys=["loc", "scale"]),
        in_keys=["loc", "scale"],
        distribution_class=TanhNormal,
        return_log_prob=True,
    )
    data = batch.clone()
    data["action"] = data["action"].clamp(-0.9, 0.9)  # inside TanhNormal's (-1, 1)

    def log_prob_fn(actor, obs, acts):
        return actor.get_dist(TensorDict({"observation": obs}, [len(obs)])).log_prob(acts)

    params = list(actor.parameters())
    scores = dense_scores(actor, log_prob_fn, data["observation"], data["action"], params, 128)
    gram = scores @ scores.T / 128 + DAMPING * torch.eye(128, dtype=torch.float64)
    expected = torch.linalg.solve(gram, data["advantage"].reshape(-1).double())
    RATAdvantage(actor, damping=DAMPING, solver="cholesky")(data)
    got = data["advantage"].reshape(-1).double()
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-4 * expected.abs().max())


def test_max_kl_scales_advantages_to_the_trust_region_step(pipeline):
    actor, _, batch = pipeline
    rat = RATAdvantage(actor, damping=DAMPING, solver="cholesky", out_key="rat_advantage")
    result = rat.natural_gradient(batch)
    scaled = RATAdvantage(
        actor, damping=DAMPING, solver="cholesky", out_key="rat_advantage", max_kl=0.01
    )(batch.clone())
    eta = result.step_size(0.01)
    assert torch.allclose(scaled["rat_advantage"].reshape(-1), eta * result.advantages)
    assert "rat_advantage" not in batch.keys()  # natural_gradient leaves the batch alone


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda actor: RATAdvantage(nn.Linear(3, 2)), TypeError, "ProbabilisticActor"),
        (lambda actor: RATAdvantage(actor, damping=-1.0), ValueError, "damping"),
        (lambda actor: RATAdvantage(actor, max_kl=0.0), ValueError, "max_kl"),
        (lambda actor: RATAdvantage(actor, max_kl=True), ValueError, "max_kl"),  # was 1.0
        (lambda actor: RATAdvantage(actor, options={"damping": 0.1}), TypeError, "SolverOptions"),
        # a misspelled keyword: named, with the closest valid one and the valid ones
        (
            lambda actor: RATAdvantage(actor, dampign=0.1),
            TypeError,
            r"unexpected keyword argument 'dampign' \(did you mean 'damping'\?\); besides its "
            r"own keywords \(options, seed, .*\) it takes the solver keywords \(solver, damping",
        ),
        (lambda actor: RATAdvantage(actor, advantage="adv"), TypeError, "'advantage_key'"),
    ],
)
def test_construction_errors_name_the_argument(pipeline, make, error, match):
    with pytest.raises(error, match=match) as refused:
        make(pipeline[0])
    assert isinstance(refused.value, NatgradError)


def test_missing_key_and_wide_advantage_are_refused(pipeline):
    actor, _, batch = pipeline
    with pytest.raises(ArgumentError, match=r"needs 'adv' \(advantage_key\) in the tensordict, "):
        RATAdvantage(actor, advantage_key="adv")(batch.clone())
    without_obs = batch.clone().exclude("observation")
    with pytest.raises(ArgumentError, match=r"'observation' \(an actor input key\).*run the adv"):
        RATAdvantage(actor).natural_gradient(without_obs)
    wrong_actions = batch.clone()  # 3 action columns for Pendulum's 1: broadcast silently
    wrong_actions["action"] = torch.zeros(128, 3)
    with pytest.raises(
        ArgumentError, match=r"acts of shape \(128, 3\) does not match .*\(128, 1\)"
    ):
        RATAdvantage(actor)(wrong_actions)
    wide = batch.clone()
    wide["advantage"] = wide["advantage"].expand(128, 2).clone()
    with pytest.raises(ValueError, match="one value per sample"):
        RATAdvantage(actor)(wide)


@pytest.mark.parametrize("shape", [(0,), (4, 0)])
def test_an_empty_batch_is_refused(pipeline, shape):
    actor, _, batch = pipeline
    empty = batch[:0] if shape == (0,) else batch.reshape(4, 32)[:, :0]
    assert tuple(empty.batch_size) == shape
    with pytest.raises(ArgumentError, match=re.escape(f"holds no samples (batch size {shape})")):
        RATAdvantage(actor)(empty)
    with pytest.raises(ArgumentError, match="holds no samples"):
        RATAdvantage(actor).natural_gradient(empty)


def test_a_plain_dict_is_refused(pipeline):
    actor, _, batch = pipeline
    with pytest.raises(ArgumentTypeError, match=r"must be called on a TensorDict \(.*\), got dict"):
        RATAdvantage(actor)(batch.to_dict())


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensordict", None)
    monkeypatch.delitem(sys.modules, "natgrad.torchrl")
    with pytest.raises(ImportError, match=r'pip install "natgrad\[torchrl\]"'):
        import natgrad.torchrl  # noqa: F401


def test_import_natgrad_does_not_import_optional_integrations():
    code = (
        "import sys, natgrad; "
        "print(sorted(m for m in ('torchrl', 'tensordict', 'tyro', 'wandb') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_example_trains_in_a_torchrl_pipeline():
    main = runpy.run_path(str(EXAMPLE))["main"]
    returns = main(frames=1024, frames_per_batch=512, verbose=False)
    assert len(returns) == 2 and all(r > 0 for r in returns)
