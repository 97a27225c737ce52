"""The sampler records v with the same numerics the learner computes v_theta with: at lag 0, log rho is exactly 0."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sampler import Sampler
from cluster.build import build_model
from cluster.config import Batching, load_config
from learner.batch import from_arrow
from learner.learner import Learner
from learner.loss import fdfo_loss


@pytest.mark.parametrize(
    "preset,extra", [("tiny-cpu", ["lora.enabled=true", "lora.rank=4", "lora.alpha=8"]), ("shapes", [])]
)
def test_log_rho_is_zero_at_lag_zero(preset, extra):
    cfg = load_config(
        preset,
        [
            "sampling.num_steps=3",
            "train.pairs_per_epoch=4",
            "train.updates_per_epoch=1",
            "sampling.pairs_per_call=4",
            "train.micro_batch_rows=5",
            *extra,
        ],
    )
    learner = Learner(build_model(cfg.model), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    sampler = Sampler(build_model(cfg.model), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    sampler.set_weights(learner.weights())  # version 0 on both sides, same bits
    prompts = ["a red circle", "two blue squares", "a green triangle", "a red circle"]
    job, images = sampler.sample(prompts=prompts, prompt_ids=[0, 1, 2, 0], pair_ids=[0, 1, 2, 3], seeds=[5, 6, 7, 8])
    rewards = np.arange(8, dtype=np.float64).reshape(4, 2) % 3  # any finite rewards
    batch, _ = sampler.complete(job=job, rewards=rewards)

    # the sampler's own batches re-evaluated by the learner (the rows of one step, in the sampler's order, the
    # prompts from the learner's cache): the same bits, so log rho is exactly 0
    tb = from_arrow(pa.Table.from_batches([batch]))
    keep, steps = torch.arange(tb.x.shape[0]), tb.x.shape[1]
    for i in range(steps):
        x, v, sigma, d, dR, cond, lag = learner._rows(tb, keep, torch.arange(len(keep)) * steps + i)
        with torch.no_grad():
            v_theta = learner.model.velocity(x, sigma, cond, float(tb.guidance_scale[0]))
        assert torch.equal(v_theta, v) and int(lag.abs().max()) == 0
        assert float(fdfo_loss(v_theta, v, d, dR)[1]["log_rho_abs_max"]) == 0.0

    # the learner's own update shuffles rows into micro-batches of 5 (steps, branches and prompts mixed): a CPU
    # matmul rounds by batch shape, so v_theta moves in the last bits only; log rho stays at rounding level, far
    # inside the trust region, and no row is clipped
    out = learner.train_epoch(batch)
    assert 0.0 <= out["learner/log_rho_abs_max"] < 1e-4 and out["learner/clip_frac"] == 0.0
