"""Churned paired sampling (ALGORITHM.md §2): closed-form checks on an analytic Gaussian flow."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from actors.sampling import churn_start, churn_step, sample_pairs
from cluster.schedule import pair_seed
from tests.helpers import GaussianFlow


def test_churn_step_with_zero_gamma_is_the_scheduler_euler_step():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    i = 2
    sched._step_index = i
    expected = sched.step(v, sched.timesteps[i], x, return_dict=False)[0]
    got = churn_step(x, v, float(sched.sigmas[i]), float(sched.sigmas[i + 1]), 0.0, None)
    assert torch.allclose(got, expected, atol=1e-6)


def test_churn_step_keeps_the_flow_marginal():
    # On x_t = (1 - t) x0 + t n with the exact v = n - x0, a churn step from t to s lands on a state whose
    # data coefficient is 1 - s and whose noise std is s (the re-noising exactly undoes the overshoot).
    gamma, t, s = 0.3, 0.8, 0.5
    x0, n, fresh = (
        2.0,
        torch.randn(200_000, generator=torch.Generator().manual_seed(3)),
        torch.randn(200_000, generator=torch.Generator().manual_seed(4)),
    )
    x_t = (1 - t) * x0 + t * n
    x_s = churn_step(x_t, n - x0, t, s, gamma, fresh)
    assert x_s.mean().item() == pytest.approx((1 - s) * x0, abs=5e-3)
    assert x_s.std().item() == pytest.approx(s, rel=5e-3)


def test_start_has_unit_variance_and_pairs_correlate_as_the_formula_says():
    gamma = 0.5
    g = torch.Generator().manual_seed(0)
    eps, n1, n2 = (torch.randn(400_000, generator=g) for _ in range(3))
    a, b = churn_start(eps, n1, gamma), churn_start(eps, n2, gamma)
    assert a.var().item() == pytest.approx(1.0, abs=0.01)
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1].item()
    assert corr == pytest.approx(1 / (1 + gamma) ** 2, abs=0.005)  # 0.444


@pytest.mark.parametrize("gamma", [0.0, 0.05])
def test_churned_sampling_reproduces_gaussian_data(gamma):
    model = GaussianFlow(mu=0.5, s=0.3)
    P = 4000
    traj = sample_pairs(model, ["x"] * P, list(range(P)), num_steps=100, gamma=gamma)
    x = traj.x_final.flatten()
    # Euler error at 100 steps plus sampling error of 8000 draws (std error of the mean 0.0034)
    assert x.mean().item() == pytest.approx(0.5, abs=0.015)
    assert x.std().item() == pytest.approx(0.3, abs=0.015)


def test_records_states_velocities_and_the_last_step_has_no_churn():
    model = GaussianFlow()
    traj = sample_pairs(model, ["a", "b"], [1, 2], num_steps=6, gamma=0.1)
    assert traj.xs.shape == (2, 2, 6, 1, 1, 1) and traj.vs.shape == (2, 2, 6, 1, 1, 1)
    assert traj.sigmas.shape == (7,)
    # the last step is a plain Euler step to sigma 0
    last = traj.xs[:, :, -1] + (traj.sigmas[6] - traj.sigmas[5]) * traj.vs[:, :, -1]
    assert torch.allclose(traj.x_final, last, atol=1e-6)
    # each recorded velocity is the model's at the recorded state
    v = model.velocity(traj.xs[0, 0, 3], traj.sigmas[3], None)
    assert torch.allclose(traj.vs[0, 0, 3], v)


def test_same_seed_same_pair_bit_for_bit_and_independent_of_batching():
    model = GaussianFlow(shape=(2, 2, 2))
    a = sample_pairs(model, ["p", "q"], [11, 12], num_steps=5, gamma=0.05)
    b = sample_pairs(model, ["p", "q"], [11, 12], num_steps=5, gamma=0.05)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.x_final, b.x_final)
    alone = sample_pairs(model, ["q"], [12], num_steps=5, gamma=0.05)
    assert torch.allclose(alone.x_final[0], a.x_final[1], atol=1e-6)
    assert not torch.equal(a.x_final[0, 0], a.x_final[0, 1])  # the branches differ


def test_pair_seed_is_stable_and_distinct():
    assert pair_seed(0, "a cat", 3) == pair_seed(0, "a cat", 3)
    assert len({pair_seed(0, "a cat", i) for i in range(100)}) == 100
    assert pair_seed(0, "a cat") != pair_seed(1, "a cat")


def test_bad_arguments_are_explained():
    with pytest.raises(ValueError, match="one seed per prompt"):
        sample_pairs(GaussianFlow(), ["a"], [1, 2])
    with pytest.raises(ValueError, match="gamma"):
        sample_pairs(GaussianFlow(), ["a"], [1], gamma=-1.0)
