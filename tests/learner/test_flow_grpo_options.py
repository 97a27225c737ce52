"""Flow-GRPO's options inside the learner (not only its pure functions): ``grpo.global_std`` (the epoch's advantages
over the std of every reward, hand-computed) and ``train.kl_weight > 0`` (the KL to the frozen starting model enters
the loss and, with every advantage 0, alone moves the weights back toward the base)."""

import math

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, grpo_of, load_config
from learner.flow_grpo import grpo_loss
from learner.learner import Learner

PROMPTS = ["a red circle", "two blue squares", "a green triangle"]


def loss_callers() -> list:
    """The learner modules that call ``grpo_loss`` by name: ``learner.learner``, and ``learner.micro_loss`` where the
    learner's loss lives in a part of its own."""
    import importlib
    import importlib.util

    names = ["learner.learner"] + (["learner.micro_loss"] if importlib.util.find_spec("learner.micro_loss") else [])
    return [m for m in map(importlib.import_module, names) if hasattr(m, "grpo_loss")]


def spied(monkeypatch) -> list:
    """The learner's own grpo_loss calls: (advantage, kl_weight, metrics) each."""
    seen = []

    def spy(log_prob, old_log_prob, advantage, *args):
        loss, m = grpo_loss(log_prob, old_log_prob, advantage, *args)
        seen.append((advantage.detach().clone(), args[-1], {k: float(v) for k, v in m.items()}, len(log_prob)))
        return loss, m

    for module in loss_callers():
        monkeypatch.setattr(module, "grpo_loss", spy)
    return seen


@pytest.mark.slow
def test_kl_weight_and_global_std_inside_the_learner(monkeypatch):
    """Slow: two shapes models (a learner with its frozen base copy, a sampler), two sampled groups batches and three
    epochs, about 45 s of CPU on 2 cores; the smallest run in which the learner's own loss shows both options.

    One learner (kl_weight 0.5, global_std) and one sampler, three epochs. First every reward equal: every
    advantage is 0, so the loss is kl_weight * KL alone; the weights start perturbed away from the base the learner
    froze: the KL is > 0, the update follows its gradient alone and the next epoch's KL (same rows, the new weights)
    is lower; the base never moves. Then a batch of varied rewards: each row's advantage is its group's deviation over
    the std of all the epoch's rewards (hand-computed)."""
    seen = spied(monkeypatch)
    cfg = load_config(
        "shapes-flow-grpo",
        [
            "sampling.num_steps=3",
            "train.pairs_per_epoch=3",
            "grpo.group_size=4",
            "train.updates_per_epoch=1",
            "train.micro_batch_rows=6",
            "train.kl_weight=0.5",
            "grpo.global_std=true",
        ],
    )
    learner = Learner(build_model(cfg.model), cfg.train, Batching.of(cfg), cfg.lora, seed=0, grpo=grpo_of(cfg))
    assert learner.grpo.global_std and learner.base is not None
    with torch.no_grad():  # after the learner froze its base: theta != base
        for p in learner.params:
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision, grpo=grpo_of(cfg))

    def sampled(rewards):
        sampler.set_weights(learner.weights())  # lag 0
        job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1, 2], pair_ids=[10, 11, 12], seeds=[5, 6, 7])
        return sampler.complete(job=job, rewards=np.asarray(rewards, dtype=np.float64))[0]

    batch = sampled(np.ones(12))
    base = [p.detach().clone() for p in learner.base.parameters()]
    before = [p.detach().clone() for p in learner.params]
    out = learner.train_epoch(batch)
    first = [(m, n) for _, _, m, n in seen]
    assert all(float(a.abs().max()) == 0.0 and w == 0.5 for a, w, _, _ in seen)
    assert all(m["kl"] > 0 and m["loss"] == pytest.approx(0.5 * m["kl"], rel=1e-6) for m, _ in first)
    assert out["learner/grad_norm"] > 0 and any(not torch.equal(a, p) for a, p in zip(before, learner.params))
    assert all(torch.equal(a, p) for a, p in zip(base, learner.base.parameters()))
    seen.clear()
    learner.train_epoch(batch)
    mean_kl = lambda calls: sum(m["kl"] * n for m, n in calls) / sum(n for _, n in calls)  # noqa: E731
    assert mean_kl([(m, n) for _, _, m, n in seen]) < mean_kl(first)
    # global_std: rewards 0 0 0 4 | 1 1 1 1 | 2 4 6 8, group means 1, 1, 5; all 12 rewards' mean 7/3, population
    # variance 140/12 - 49/9 = 56/9, std sqrt(56/9) (the groups' own stds would be sqrt(3), 0 and sqrt(5))
    seen.clear()
    out = learner.train_epoch(sampled([0.0, 0, 0, 4, 1, 1, 1, 1, 2, 4, 6, 8]))
    s = math.sqrt(56 / 9) + 1e-4
    want = torch.tensor([-1.0, -1, -1, 3, 0, 0, 0, 0, -3, -1, 1, 3]) / s  # per image
    got = torch.cat([a for a, _, _, _ in seen])  # each row's advantage, rows in the update's (shuffled) order
    assert out["learner/rows"] == 12 * 3 and len(got) == 12 * 3
    assert sorted(got.tolist()) == pytest.approx(sorted(want.repeat_interleave(3).tolist()), abs=1e-5)
