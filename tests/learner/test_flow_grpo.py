"""Flow-GRPO's pure functions against hand-worked values and closed forms, its sampler on an analytic flow, and its
rows through the learner: ratio 1 at lag 0, the schema's version and algorithm checked."""

import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sampler import Sampler
from actors.sampling import sample_groups
from cluster.build import build_model
from cluster.config import Batching, grpo_of, load_config
from learner.batch import ALGORITHM_KEY, VERSION_KEY, from_arrow, to_arrow_groups
from learner.flow_grpo import check_descending, group_advantages, grpo_loss, sde_std, sde_step
from learner.learner import Learner
from tests.helpers import GaussianFlow


def test_sde_step_log_prob_is_the_gaussian_density_worked_by_hand():
    # x = 1, v = -0.5, sigma 0.5 -> 0.25, a = 0.5: sigma_t = 0.5 * sqrt(0.5 / 0.5) = 0.5, dt = -0.25,
    # mean = 1 * (1 + 0.25 / 1 * -0.25) + -0.5 * (1 + 0.25 * 0.5 / 1) * -0.25 = 0.9375 + 0.140625 = 1.078125,
    # std = 0.5 * sqrt(0.25) = 0.25; with eps = 2: x_next = 1.578125 and
    # log p = -(0.5)^2 / (2 * 0.0625) - log 0.25 - log sqrt(2 pi) = -2 + 1.3862944 - 0.9189385 = -1.5326441
    x, v = torch.tensor([[1.0]]), torch.tensor([[-0.5]])
    step = sde_step(x, v, 0.5, 0.25, a=0.5, sigma_max=0.9, noise=torch.tensor([[2.0]]))
    assert step.mean.item() == pytest.approx(1.078125, abs=1e-7)
    assert step.std.item() == pytest.approx(0.25, abs=1e-7)
    assert step.x_next.item() == pytest.approx(1.578125, abs=1e-7)
    assert step.log_prob.item() == pytest.approx(-2 + math.log(4) - 0.5 * math.log(2 * math.pi), abs=1e-6)
    # scoring the same x_next again (the learner's side) gives the same density; a vector latent averages elements
    again = sde_step(x, v, 0.5, 0.25, a=0.5, sigma_max=0.9, x_next=step.x_next)
    assert torch.equal(again.log_prob, step.log_prob)
    x3, v3, e3 = (
        torch.randn(2, 3, generator=torch.Generator().manual_seed(0)),
        torch.zeros(2, 3),
        torch.tensor([[0.0, 1, -1], [2, 0, 0]]),
    )
    s3 = sde_step(x3, v3, torch.tensor([0.5, 0.5]), torch.tensor([0.25, 0.25]), 0.5, 0.9, noise=e3)
    ref = torch.distributions.Normal(s3.mean, 0.25).log_prob(s3.x_next).mean(1)
    assert torch.allclose(s3.log_prob, ref, atol=1e-6)


def test_the_std_at_sigma_one_uses_sigma_max_and_a_zero_noise_level_is_refused():
    assert sde_std(torch.tensor(1.0), sigma_max=0.75, a=0.7).item() == pytest.approx(0.7 * math.sqrt(1 / 0.25))
    assert sde_std(torch.tensor(0.75), sigma_max=0.9, a=0.7).item() == pytest.approx(0.7 * math.sqrt(3.0))
    with pytest.raises(ValueError, match="noise level a must be > 0"):
        sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.25, a=0.0, sigma_max=0.9, noise=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="exactly one of noise"):
        sde_step(torch.zeros(1, 1), torch.zeros(1, 1), 0.5, 0.25, a=0.7, sigma_max=0.9)


def test_the_sde_keeps_the_flow_marginals_on_gaussian_data():
    # The SDE shares the ODE's marginals: with the exact velocity of N(0.5, 0.3^2) data, G x P samples end there
    # (Euler error of 50 steps, the sigma = 1 step's sigma_max stand-in, and 8,000 draws: std error 0.0034)
    model = GaussianFlow(mu=0.5, s=0.3)
    traj = sample_groups(model, ["x"] * 1000, list(range(1000)), group_size=8, num_steps=50, noise_level=0.7)
    x = traj.x_final.flatten()
    assert x.mean().item() == pytest.approx(0.5, abs=0.02)
    assert x.std().item() == pytest.approx(0.3, abs=0.02)
    # and the recorded steps chain: each step starts where the previous one arrived
    assert torch.equal(traj.xs[:, :, 1:], traj.x_next[:, :, :-1])
    assert torch.equal(traj.x_next[:, :, -1], traj.x_final)


def test_a_group_depends_on_its_seed_alone_and_a_window_records_its_steps():
    model = GaussianFlow()
    both = sample_groups(
        model, ["a", "b"], [3, 4], group_size=4, num_steps=8, noise_level=0.7, window=2, window_range=5
    )
    alone = sample_groups(model, ["b"], [4], group_size=4, num_steps=8, noise_level=0.7, window=2, window_range=5)
    assert torch.allclose(both.x_final[1], alone.x_final[0], atol=1e-6)
    assert torch.equal(both.steps[1], alone.steps[0])
    for steps in both.steps.tolist():  # two consecutive steps starting in [0, 5 - 2]
        assert steps[1] == steps[0] + 1 and 0 <= steps[0] <= 3
    sig = torch.linspace(1, 0, 9)
    assert torch.equal(both.sigmas, sig[both.steps]) and torch.equal(both.sigmas_next, sig[both.steps + 1])
    assert both.xs.shape == (2, 4, 2, 1, 1, 1) and both.log_probs.shape == (2, 4, 2)
    assert len(set(both.x_final[0].flatten().tolist())) == 4  # the members of a group differ


def test_group_advantages_on_a_hand_made_group():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0])
    groups = torch.tensor([7, 7, 7, 2, 2])
    # group 7: mean 2, population std sqrt(2/3) = 0.816497; group 2: std 0 -> advantages 0
    a = 1 / (math.sqrt(2 / 3) + 1e-4)
    assert group_advantages(rewards, groups).tolist() == pytest.approx([-a, 0.0, a, 0.0, 0.0], abs=1e-6)
    # Flow-GRPO's global_std: each group's mean, the std of all five rewards (3.9799)
    sd = float(np.std([1, 2, 3, 10, 10]))
    assert group_advantages(rewards, groups, global_std=True).tolist() == pytest.approx(
        [-1 / (sd + 1e-4), 0.0, 1 / (sd + 1e-4), 0.0, 0.0], abs=1e-6
    )


@pytest.mark.parametrize(
    "adv,log_ratio,zero",
    [
        (1.0, 0.01, True),  # A > 0, ratio above 1 + eps: the clipped term wins, no gradient
        (1.0, -0.01, False),  # A > 0, ratio below 1 - eps: still pushed up (the pessimistic, unclipped term)
        (-1.0, -0.01, True),  # A < 0, ratio below 1 - eps: clipped, no gradient
        (-1.0, 0.01, False),  # A < 0, ratio above 1 + eps: pushed down
        (1.0, 0.0, False),  # inside the range: gradient -A * ratio
    ],
)
def test_the_clipped_objective_has_no_gradient_outside_the_clip_range(adv, log_ratio, zero):
    old = torch.tensor([-1.0])
    new = (old + log_ratio).requires_grad_(True)
    loss, m = grpo_loss(new, old, torch.tensor([adv]), clip_range=1e-3)
    loss.backward()
    if zero:
        assert new.grad.item() == 0.0 and m["clip_frac"].item() == 1.0
    else:  # d(-A * exp(new - old)) / d new = -A * ratio
        assert new.grad.item() == pytest.approx(-adv * math.exp(log_ratio), rel=1e-6)


def test_advantages_are_clamped_and_the_kl_term_is_the_step_gaussians_kl():
    lp = torch.zeros(2, requires_grad=True)
    loss, m = grpo_loss(lp, torch.zeros(2), torch.tensor([9.0, -2.0]), adv_clip_max=5.0)
    loss.backward()
    assert lp.grad.tolist() == pytest.approx([-5.0 / 2, 2.0 / 2])  # mean over 2 rows of -clamp(A)
    mean, base, std = torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([0.5])
    _, m = grpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), mean=mean, mean_base=base, std=std, kl_weight=0.1)
    assert m["kl"].item() == pytest.approx(1.0 / (2 * 0.25))  # mean((1, -1)^2) / (2 * 0.5^2)
    assert m["loss"].item() == pytest.approx(0.1 * 2.0)


def grpo_cfg(*extra):
    return load_config(
        "shapes-flow-grpo",
        [
            "sampling.num_steps=3",
            "train.pairs_per_epoch=3",
            "grpo.group_size=4",
            "train.updates_per_epoch=1",
            "train.micro_batch_rows=5",
            *extra,
        ],
    )


def test_ratio_is_one_at_lag_zero_and_the_learner_trains_the_groups(monkeypatch):
    import learner.micro_loss as micro_loss

    seen = []  # the learner's own grpo_loss inputs: log p (with its graph), old log p, A

    def spy(log_prob, old_log_prob, advantage, *args):
        seen.append((log_prob, old_log_prob, advantage))
        return grpo_loss(log_prob, old_log_prob, advantage, *args)

    monkeypatch.setattr(micro_loss, "grpo_loss", spy)
    cfg = grpo_cfg()
    learner = Learner(build_model(cfg.model), cfg.train, Batching.of(cfg), cfg.lora, seed=0, grpo=grpo_of(cfg))
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision, grpo=grpo_of(cfg))
    sampler.set_weights(learner.weights())
    prompts = ["a red circle", "two blue squares", "a green triangle"]
    job, images = sampler.sample(prompts=prompts, prompt_ids=[0, 1, 2], pair_ids=[10, 11, 12], seeds=[5, 6, 7])
    assert images.shape[0] == 12  # 3 groups of 4, members adjacent
    rewards = np.array([1.0, 2, 3, 4, 0, 0, 0, 1, 5, 5, 5, 5])
    rewards[2] = np.nan  # group 10 has a failed image: dropped whole
    batch, report = sampler.complete(job=job, rewards=rewards)
    assert report["dropped"] == [10] and batch.num_rows == 8
    tb = from_arrow(batch)
    assert tb.group_id.tolist() == [11] * 4 + [12] * 4 and tb.member.tolist() == [0, 1, 2, 3] * 2
    a = 1 / (math.sqrt(3 / 16) + 1e-4)  # group 11: rewards 0 0 0 1, mean 1/4, std sqrt(3/16); 12: std 0
    assert tb.advantage.tolist() == pytest.approx([-a / 4] * 3 + [3 * a / 4] + [0.0] * 4, abs=1e-5)
    W = tb.x.shape[1]

    def scored(rows: pa.RecordBatch):  # the learner's log p of each recorded step minus the sampler's [images, W]
        learner.begin_epoch(rows)  # (its own epoch state and loss inputs; the epoch then dropped)
        ep, learner._epoch = learner._epoch, None
        n = len(from_arrow(rows))
        seen.clear()
        with torch.no_grad():
            lag = torch.stack([learner._grpo_loss(ep, torch.arange(n) * W + i)[2] for i in range(W)])
        return torch.stack([(lp - old).double() for lp, old, _ in seen], 1), lag

    # the learner scores the recorded steps with the sampler's weights: the same log p (the sampler's own log p is
    # of the recorded, rounded state) -- bit for bit at the sampler's batch shape (every group kept: 12 rows a step),
    # to float rounding at another (8 rows here: the matmuls block differently; up to 1.4e-6 on a 2-core x86 CPU)
    log_rho, lag = scored(batch)
    assert log_rho.shape == (8, W) and float(log_rho.abs().max()) < 1e-5 and int(lag.abs().max()) == 0
    job, _ = sampler.sample(prompts=prompts, prompt_ids=[0, 1, 2], pair_ids=[20, 21, 22], seeds=[5, 6, 7])
    log_rho, _ = scored(sampler.complete(job=job, rewards=np.arange(12.0))[0])
    assert log_rho.shape == (12, W) and float(log_rho.abs().max()) == 0.0
    # the learner's own update mixes rows into micro-batches of 5: rounding by batch shape only, inside the clip range
    before = [p.detach().clone() for p in learner.params]
    seen.clear()
    out = learner.train_epoch(batch)
    assert out["trained_pair_ids"] == [11, 12] and out["learner/rows"] == 8 * 3 and out["updates"] == 1
    assert out["learner/log_rho_abs_max"] < 1e-5 and out["learner/clip_frac"] == 0.0
    assert learner.version == 1
    # ... and it trains: log p carries the gradient to the weights (a detached or constant log p would not)
    assert all(lp.requires_grad for lp, _, _ in seen) and sum(len(lp) for lp, _, _ in seen) == 8 * 3
    assert out["learner/grad_norm"] > 0 and math.isfinite(out["learner/grad_norm"])
    assert any(not torch.equal(a, p.detach()) for a, p in zip(before, learner.params))
    # the step's direction: each image's log p of its recorded steps, with the new weights minus the sampler's,
    # rises for the positive-advantage member of group 11, falls for the three below the mean, and the
    # advantage-weighted sum (the surrogate) rises
    rise = scored(batch)[0].sum(1)  # [8 images]
    assert rise[3] > 0 and bool(torch.all(rise[:3] < 0)), rise
    assert float((tb.advantage.double() * rise).sum()) > 0


def test_a_batch_of_another_algorithm_or_schema_version_is_refused():
    cfg = grpo_cfg()
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision, grpo=grpo_of(cfg))
    job, _ = sampler.sample(prompts=["a red circle"], prompt_ids=[0], pair_ids=[0], seeds=[5])
    batch, _ = sampler.complete(job=job, rewards=np.arange(4.0))
    assert batch.schema.metadata[ALGORITHM_KEY] == b"flow_grpo" and batch.schema.metadata[VERSION_KEY] == b"1"
    with pytest.raises(
        ValueError,
        match="a flow_grpo batch reached a fdfo learner: every sampler and the learner "
        "must run the same train.algorithm",
    ):
        from_arrow(batch, algorithm="fdfo")
    old = batch.replace_schema_metadata({**batch.schema.metadata, VERSION_KEY: b"0"})
    with pytest.raises(ValueError, match="batch schema flow_grpo v0, but this learner reads flow_grpo v1"):
        from_arrow(old)
    with pytest.raises(ValueError, match=r"rewards must be \[P, G\] = \[1, 4\]"):
        to_arrow_groups(sampler._pending[sampler.sample(["x"], [0], [1], [1])[0]].traj, np.zeros(3), [0], [1], ["x"], 0)
    fdfo = load_config("shapes")
    with pytest.raises(ValueError, match="train.algorithm = 'fdfo' but grpo settings were given"):
        Learner(build_model(fdfo.model), fdfo.train, Batching.of(fdfo), fdfo.lora, grpo=cfg.grpo)
    assert isinstance(pa.Table.from_batches([batch]).schema.metadata, dict)


def test_a_step_that_does_not_go_down_in_sigma_is_refused_on_the_host():
    x = torch.zeros(2, 1, 1, 1)
    msg = r"^sde_step goes from sigma to a smaller sigma_next \(dt < 0\)$"
    with pytest.raises(ValueError, match=msg):
        sde_step(x, x, 0.5, 0.5, a=0.7, sigma_max=0.9, noise=x)  # dt = 0
    with pytest.raises(ValueError, match=msg):
        sde_step(x, x, torch.tensor([0.5, 0.4]), torch.tensor([0.3, 0.6]), a=0.7, sigma_max=0.9, x_next=x)
    with pytest.raises(ValueError, match=msg):  # the learner's check, per row
        check_descending(torch.tensor([0.5, 0.4]), torch.tensor([0.3, 0.4]))
    check_descending(torch.tensor([0.5, 0.4]), torch.tensor([0.3, 0.2]))
