"""One numerics mode (``train.precision``) for sampler and learner: the same autocast on CUDA (fp16 = the reference's),
none on CPU; timesteps reach the transformer in float32; at lag 0 the learner re-evaluates the sampler's v exactly."""

import contextlib
import re
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.batch import from_arrow
from learner.learner import Learner
from learner.loss import fdfo_loss
from models.adapter import SD3Adapter
from models.device import autocast, grad_scaler

PROMPTS = ["a red circle", "two blue squares"]


def test_autocast_per_mode_and_device():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # this CPU build warns that CUDA autocast is unavailable
        fp16, bf16 = autocast("cuda", "fp16"), autocast("cuda", "bf16")
    assert isinstance(fp16, torch.autocast) and fp16.fast_dtype == torch.float16
    assert isinstance(bf16, torch.autocast) and bf16.fast_dtype == torch.bfloat16
    assert isinstance(autocast("cuda", "fp32"), contextlib.nullcontext)
    assert all(isinstance(autocast("cpu", p), contextlib.nullcontext) for p in ("fp32", "bf16", "fp16"))
    assert not grad_scaler("cpu", "fp16").is_enabled() and not grad_scaler("cpu", "bf16").is_enabled()
    with pytest.raises(
        ValueError, match=re.escape("precision must be one of ['bf16', 'fp16', 'fp32'] (train.precision), got 'amp'")
    ):
        autocast("cpu", "amp")


def test_timestep_reaches_the_transformer_in_float32():
    model = SD3Adapter.tiny(seed=0, dtype=torch.bfloat16)
    seen = []
    model.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["timestep"]), with_kwargs=True)
    sigma = torch.tensor(0.7231)
    with torch.no_grad():
        model.velocity(torch.randn(2, 16, 16, 16), sigma, model.encode_prompts(PROMPTS))
    (t,) = seen
    # 1000 sigma = 723.1 in float32; rounded to bf16 it would be 724 (8 significant bits: steps of 4 in 512-1024)
    assert t.dtype == torch.float32 and torch.equal(t, (sigma * 1000.0).expand(2)) and abs(float(t[0]) - 723.1) < 1e-4
    assert float(t[0].to(torch.bfloat16)) == 724.0


@pytest.mark.parametrize("weights,record,w", [(torch.float16, "float16", 2.0), (torch.bfloat16, "bfloat16", 2.0)])
def test_log_rho_is_zero_at_lag_zero_in_the_recorded_dtype(weights, record, w, monkeypatch):
    """The presets' numerics on CPU: fp16 (bf16) weights, what fp16 (bf16) autocast computes in on CUDA, x and v
    recorded in that dtype, CFG 2.0 (v_neg + w (v_pos - v_neg) combined in the compute dtype, as the reference): the
    learner's v_theta at the recorded inputs is the recorded v, bit for bit, so log rho is exactly 0 at every step --
    seen in the learner's own update (``fdfo_loss``'s inputs inside ``train_epoch``), not a re-built forward."""
    import learner.micro_loss as micro_loss

    seen = []  # (v_theta, v, the loss's metrics) of each micro-batch

    def spy(v_theta, v, *args, **kwargs):
        loss, m = fdfo_loss(v_theta, v, *args, **kwargs)
        seen.append((v_theta.detach(), v.detach(), m))
        return loss, m

    monkeypatch.setattr(micro_loss, "fdfo_loss", spy)
    cfg = load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            "sampling.pairs_per_call=2",
            "train.micro_batch_rows=8",
            "train.precision=fp16",
            f"sampling.record_dtype={record}",
            f"sampling.guidance_scale={w}",
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
        ],
    )
    learner = Learner(SD3Adapter.tiny(seed=0, dtype=weights), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    sampler = Sampler(SD3Adapter.tiny(seed=0, dtype=weights), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    with torch.no_grad():  # a non-zero LoRA, so the adapter's path is exercised
        for p in learner.params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sampler.set_weights(learner.weights())
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    batch, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))
    tb = from_arrow(pa.Table.from_batches([batch]))
    recorded = {"float16": torch.float16, "bfloat16": torch.bfloat16}[record]
    assert tb.v.dtype == recorded and tb.x.dtype == recorded and float(tb.guidance_scale[0]) == w
    out = learner.train_epoch(batch)
    rows = tb.x.shape[0] * tb.x.shape[1]  # every (branch, recorded step) row, in the update's batches
    assert (
        out["learner/rows"] == rows and sum(len(v) for _, v, _ in seen) == rows and out["learner/policy_lag_max"] == 0
    )
    for v_theta, v, m in seen:
        assert torch.equal(v_theta, v.float()) and float(m["log_rho_abs_max"]) == 0.0
    assert out["learner/log_rho_abs_max"] == 0.0 and learner.version == 1
