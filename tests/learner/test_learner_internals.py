"""Learner.train_epoch internals: gradient accumulation, gradient clipping, the non-finite-gradient guard and the
KL term's base model (LoRA: adapters disabled; full weights: a frozen copy of the start weights).

Two models: the analytic 1-D toy flow of tests/helpers.py, where the first update's gradient has a closed form,
and the tiny offline SD3, the real code path with many parameters."""

import math
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
import torch

import learner.micro_loss as micro_loss
from actors.sampler import Sampler
from cluster.config import Batching, load_config
from learner.batch import from_arrow, to_arrow
from learner.learner import Learner
from learner.weights import checksum
from models.adapter import SD3Adapter
from tests.helpers import GaussianFlow

PROMPTS = ["a red circle", "a blue square"]


# -- helpers -------------------------------------------------------------------------------------------------
def toy_cfg(*extra):
    # 3 pairs x 2 branches x 2 steps = 12 rows, all in one update; no LoRA (the toy's one parameter is b)
    return load_config(
        "tiny-cpu",
        [
            "sampling.num_steps=2",
            "train.pairs_per_epoch=3",
            "train.updates_per_epoch=1",
            "lora.enabled=false",
            "train.lr=0.01",
            *extra,
        ],
    )


# Three pairs of 1-element latents: final states (x_1, x_2) and rewards (r_1, r_2) chosen by hand.
TOY_FINAL = [(0.7, 0.5), (0.2, 0.6), (1.0, 1.3)]
TOY_REWARDS = [(1.0, 0.0), (0.2, 0.6), (0.0, 0.9)]


def toy_batch(model: GaussianFlow, poison: str | None = None) -> pa.RecordBatch:
    """An on-policy batch for the toy: v_i is the model's own velocity at x_i (so rho = 1 at version 0)."""
    P, N = len(TOY_FINAL), 2
    sigmas = torch.tensor([1.0, 0.5, 0.0])
    xs = torch.linspace(-1.0, 1.0, P * 2 * N).view(P, 2, N, 1, 1, 1)
    with torch.no_grad():
        vs = torch.stack(
            [model.velocity(xs[:, :, i].reshape(-1, 1, 1, 1), sigmas[i].expand(2 * P), None) for i in range(N)], 1
        ).view(P, 2, N, 1, 1, 1)
    if poison == "v":
        vs[1, 0, 1] = float("nan")
    x_final = torch.tensor(TOY_FINAL).view(P, 2, 1, 1, 1)
    traj = SimpleNamespace(xs=xs, vs=vs, sigmas=sigmas, x_final=x_final, seeds=[0, 1, 2])
    return to_arrow(traj, np.array(TOY_REWARDS), [0] * P, [0, 1, 2], ["x"] * P, policy_version=0)


def toy_gradient() -> float:
    """dLoss/db at rho = 1, worked out from the SPO loss (learner/loss.py): one row's gradient w.r.t. v_theta is
    2 dR d / M; v_theta = v_exact + b, so dLoss/db = mean over rows of 2 dR mean(d). Here M = 1, d = dx / (dx^2 +
    1e-6) with dx = (x_1 - x_2) / 2, dR = (r_1 - r_2) / 2; branch 2 has both signs flipped, so every row of a pair
    contributes the same, and each pair has 2 branches x 2 steps = 4 rows: the mean over pairs."""
    terms = []
    for (x1, x2), (r1, r2) in zip(TOY_FINAL, TOY_REWARDS):
        x1, x2 = float(np.float32(x1)), float(np.float32(x2))  # the batch holds float32 latents
        dx, dR = (x1 - x2) / 2, (r1 - r2) / 2
        terms.append(2 * dR * dx / (dx * dx + 1e-6))
    return sum(terms) / len(terms)  # (9.999 + 2.000 + 5.999) / 3 = 5.999


def capture_grads(learner: Learner) -> list[dict[str, torch.Tensor]]:
    """Record the gradients the optimizer step sees (after clipping), then take the real step."""
    seen, real_step = [], learner.opt.step

    def step(*a, **k):
        seen.append(
            {n: p.grad.detach().clone() for n, p in learner.model.transformer.named_parameters() if p.requires_grad}
        )
        return real_step(*a, **k)

    learner.opt.step = step
    return seen


def global_norm(grads: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads.values())))


def with_nan(batch: pa.RecordBatch, column: str) -> pa.RecordBatch:
    """``batch`` with one element of the tensor column ``column`` ('v' or 'd') set to NaN."""
    t = getattr(from_arrow(batch), column).clone()
    t.view(-1)[7] = float("nan")
    i = batch.schema.get_field_index(column)
    cols = list(batch.columns)
    cols[i] = pa.FixedShapeTensorArray.from_numpy_ndarray(t.numpy())
    return pa.RecordBatch.from_arrays(cols, schema=batch.schema)


def sd3_cfg(*extra):
    # 2 pairs x 2 branches x 2 steps = 8 rows in one update
    return load_config(
        "tiny-cpu",
        ["sampling.num_steps=2", "train.pairs_per_epoch=2", "train.updates_per_epoch=1", "train.lr=1e-2", *extra],
    )


@pytest.fixture(scope="module")
def sd3_batch():
    """Two pairs from the tiny SD3 at its start weights (version 0), with distinct rewards."""
    cfg = sd3_cfg()
    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[5, 6])
    batch, report = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75]]))
    assert report["dropped"] == [] and batch.num_rows == 4
    return batch


def sd3_learner(*extra):
    cfg = sd3_cfg(*extra)
    return Learner(SD3Adapter.tiny(seed=0), cfg.train, Batching.of(cfg), cfg.lora, seed=0)


# -- gradient accumulation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("micro", [1, 5, 12, 4096])
def test_toy_accumulated_gradient_is_the_full_batch_mean_in_closed_form(micro):
    # 12 rows in micro-batches of 1 (12 of them), 5 (5 + 5 + 2: uneven shares), 12 and 4096 (one pass)
    cfg = toy_cfg(f"train.micro_batch_rows={micro}", "train.grad_clip=1000")
    model = GaussianFlow()
    learner = Learner(model, cfg.train, Batching.of(cfg), lora=None, seed=0)
    seen = capture_grads(learner)
    out = learner.train_epoch(toy_batch(model))
    g = toy_gradient()
    assert g == pytest.approx(5.999, abs=1e-3)
    assert out["updates"] == 1 and out["learner/rows"] == 12 and learner.version == 1
    assert seen[0]["b"].item() == pytest.approx(g, rel=1e-5)
    assert out["learner/grad_norm"] == pytest.approx(abs(g), rel=1e-5)
    # AdamW's first step from b = 0: b = -lr * g / (|g| + eps) = -lr (weight decay acts on b = 0)
    assert model.transformer.b.item() == pytest.approx(-0.01, rel=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_sd3_micro_batches_accumulate_to_the_full_batch_update(sd3_batch, optimizer):
    # 8 rows as micro-batches of 3 + 3 + 2 against one micro-batch of 8: the same gradient and the same weights
    small = sd3_learner("train.micro_batch_rows=3", "train.grad_clip=1000")
    large = sd3_learner("train.micro_batch_rows=4096", "train.grad_clip=1000")
    assert small.weights().checksum == large.weights().checksum
    if optimizer == "sgd":  # w - lr * g: the weights then show the gradient's size, not only its sign
        for ln in (small, large):
            ln.opt = torch.optim.SGD(ln.params, lr=ln.cfg.lr)
    calls = {"small": 0, "large": 0}
    for name, ln in (("small", small), ("large", large)):
        real = ln.model.velocity

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        ln.model.velocity = counted
    seen_small, seen_large = capture_grads(small), capture_grads(large)
    out_small, out_large = small.train_epoch(sd3_batch), large.train_epoch(sd3_batch)
    assert calls == {"small": 3, "large": 1}  # the accumulation path was taken
    assert out_small["learner/rows"] == out_large["learner/rows"] == 8
    gs, gl = seen_small[0], seen_large[0]
    assert gs.keys() == gl.keys() and len(gs) > 10
    norm = global_norm(gl)
    assert norm > 1e-3  # a real gradient, not zeros on both sides
    for n in gl:
        assert torch.allclose(gs[n], gl[n], rtol=1e-4, atol=1e-6 * norm), n
    assert out_small["learner/grad_norm"] == pytest.approx(out_large["learner/grad_norm"], rel=1e-5)
    assert out_small["learner/loss"] == pytest.approx(out_large["learner/loss"], rel=1e-4, abs=1e-7)
    ws, wl = small.weights().tensors, large.weights().tensors
    start = sd3_learner().weights().tensors
    moved = max((wl[n] - start[n]).abs().max().item() for n in wl)
    # AdamW's first step moves each weight by lr * g / (|g| + eps) ~ lr = 1e-2, SGD's by lr * g. For AdamW the
    # few elements with |g| ~ eps = 1e-8 turn float rounding of g into ~1e-5 of the step, hence 1% of lr there.
    atol = 1e-4 if optimizer == "adamw" else 1e-8
    assert moved > 100 * atol  # the update is far above the tolerance
    for n in wl:
        assert torch.allclose(ws[n], wl[n], rtol=0, atol=atol), n


# -- gradient clipping ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("clip", [1.5, 100.0])
def test_toy_grad_clip_caps_the_gradient_and_reports_the_raw_norm(clip):
    cfg = toy_cfg("train.micro_batch_rows=4096", f"train.grad_clip={clip}")
    model = GaussianFlow()
    learner = Learner(model, cfg.train, Batching.of(cfg), lora=None, seed=0)
    seen = capture_grads(learner)
    out = learner.train_epoch(toy_batch(model))
    g = toy_gradient()  # 5.999: above 1.5, below 100
    expected = g * min(1.0, clip / abs(g))  # clipped to norm 1.5, or untouched
    assert seen[0]["b"].item() == pytest.approx(expected, rel=1e-5)
    assert out["learner/grad_norm"] == pytest.approx(abs(g), rel=1e-5)  # the norm before clipping


def test_sd3_grad_clip_scales_the_global_norm_to_the_clip(sd3_batch):
    raw = sd3_learner("train.grad_clip=1000")
    seen_raw = capture_grads(raw)
    raw_norm = raw.train_epoch(sd3_batch)["learner/grad_norm"]
    assert raw_norm == pytest.approx(global_norm(seen_raw[0]), rel=1e-5) and raw_norm > 1e-3
    clip = raw_norm / 4
    clipped = sd3_learner(f"train.grad_clip={clip}")
    seen = capture_grads(clipped)
    out = clipped.train_epoch(sd3_batch)
    assert out["learner/grad_norm"] == pytest.approx(raw_norm, rel=1e-5)  # reported: the pre-clip norm
    assert global_norm(seen[0]) == pytest.approx(clip, rel=1e-4)  # applied: exactly the clip
    for n, g in seen_raw[0].items():  # same direction, a quarter the size
        assert torch.allclose(seen[0][n], g * (clip / raw_norm), rtol=1e-4, atol=1e-8 * raw_norm), n


# -- non-finite gradients: the update is skipped and counted (as the reference's GradScaler does), the run goes on ---
def test_toy_nan_velocity_skips_the_update_and_keeps_the_weights():
    cfg = toy_cfg()
    model = GaussianFlow()
    learner = Learner(model, cfg.train, Batching.of(cfg), lora=None, seed=0)
    out = learner.train_epoch(toy_batch(model, poison="v"))
    assert model.transformer.b.item() == 0.0 and learner.skipped_steps == 1 and out["learner/skipped_steps"] == 1
    assert learner.version == 1 and math.isnan(out["learner/grad_norm"])  # the update's slot is used up


@pytest.mark.parametrize("column", ["v", "d"])
def test_sd3_nan_in_batch_skips_the_update_and_keeps_the_weights(sd3_batch, column):
    learner = sd3_learner()
    before = learner.weights()
    out = learner.train_epoch(with_nan(sd3_batch, column))
    after = learner.weights()
    assert out["learner/skipped_steps"] == 1 and learner.version == 1 and after.checksum == before.checksum
    assert all(torch.equal(after.tensors[n], before.tensors[n]) for n in before.tensors)
    assert not learner.opt.state  # AdamW never stepped: no moments
    # control: the same batch without the NaN trains; the count is cumulative
    out = learner.train_epoch(sd3_batch)
    assert out["updates"] == 1 and learner.version == 2 and out["learner/skipped_steps"] == 1
    assert learner.weights().checksum != before.checksum


# -- the KL term's base velocity ---------------------------------------------------------------------------------
def spy_kl(learner: Learner, monkeypatch) -> list[dict]:
    """Record each micro-batch's inputs (x, sigma, cond) and the v_theta / v_base the loss receives."""
    calls: list[dict] = []
    real_rows, real_loss = learner._rows, micro_loss.fdfo_loss

    def rows(*a, **k):
        out = real_rows(*a, **k)
        calls.append({"x": out[0], "sigma": out[2], "cond": out[5]})
        return out

    def loss(v_theta, v, d, dR, epsilon, v_base=None, kl_weight=0.0, v_prox=None):
        calls[-1].update(v_theta=v_theta.detach().clone(), v_base=v_base, kl_weight=kl_weight)
        return real_loss(v_theta, v, d, dR, epsilon, v_base, kl_weight, v_prox)

    monkeypatch.setattr(learner, "_rows", rows)
    monkeypatch.setattr(micro_loss, "fdfo_loss", loss)
    return calls


def base_velocity(ref: SD3Adapter, call: dict) -> torch.Tensor:
    with torch.no_grad():
        return ref.velocity(call["x"], call["sigma"], call["cond"], 1.0)


def test_lora_kl_base_is_the_model_with_adapters_disabled(sd3_batch, monkeypatch):
    learner = sd3_learner("lora.enabled=true", "lora.rank=4", "lora.alpha=8", "train.kl_weight=0.5")
    assert learner.lora and learner.base is None  # LoRA: no copy, the adapters are switched off
    ref = SD3Adapter.tiny(seed=0)  # the same start weights, no adapter at all
    calls = spy_kl(learner, monkeypatch)
    m1 = learner.train_epoch(sd3_batch)  # lora_B starts at 0: policy == base
    m2 = learner.train_epoch(sd3_batch)  # after one update the adapters matter
    assert learner.version == 2 and len(calls) == 2
    for c in calls:
        assert c["kl_weight"] == 0.5 and c["v_base"] is not None
        assert torch.allclose(c["v_base"], base_velocity(ref, c), rtol=0, atol=1e-5)
    first, second = calls
    assert torch.allclose(first["v_theta"], first["v_base"], rtol=0, atol=1e-6) and m1["learner/kl"] < 1e-10
    gap = (second["v_theta"] - second["v_base"]).abs().max().item()
    assert gap > 1e-3  # the adapters change the policy ...
    kl = (second["v_theta"] - second["v_base"]).pow(2).flatten(1).mean(1).mean().item()
    assert m2["learner/kl"] == pytest.approx(kl, rel=1e-4)  # ... and the KL metric is their mean square gap
    # after a base forward the adapters are on again
    c = second
    with torch.no_grad():
        policy = learner.model.velocity(c["x"], c["sigma"], c["cond"], 1.0)
        base = learner._base_velocity(c["x"], c["sigma"], c["cond"], 1.0)
        again = learner.model.velocity(c["x"], c["sigma"], c["cond"], 1.0)
    assert torch.allclose(base, base_velocity(ref, c), rtol=0, atol=1e-5)
    assert torch.equal(policy, again) and (policy - base).abs().max().item() > 1e-3


def test_full_weight_kl_base_stays_frozen_at_the_start_weights(sd3_batch, monkeypatch):
    learner = sd3_learner("lora.enabled=false", "train.kl_weight=0.5")
    assert not learner.lora and learner.base is not None

    def named(module):
        return dict(module.named_parameters())

    start = checksum(named(learner.model.transformer))
    assert checksum(named(learner.base)) == start
    assert not any(p.requires_grad for p in learner.base.parameters())
    ref = SD3Adapter.tiny(seed=0)
    calls = spy_kl(learner, monkeypatch)
    m1 = learner.train_epoch(sd3_batch)
    m2 = learner.train_epoch(sd3_batch)
    assert learner.version == 2 and len(calls) == 2
    assert checksum(named(learner.model.transformer)) != start  # the policy moved ...
    assert checksum(named(learner.base)) == start  # ... the base did not
    assert all(p.grad is None for p in learner.base.parameters())
    assert learner.model.transformer is not learner.base  # swapped back after each base forward
    for c in calls:
        assert torch.allclose(c["v_base"], base_velocity(ref, c), rtol=0, atol=1e-5)
    assert m1["learner/kl"] < 1e-10
    second = calls[1]
    assert (second["v_theta"] - second["v_base"]).abs().max().item() > 1e-3
    kl = (second["v_theta"] - second["v_base"]).pow(2).flatten(1).mean(1).mean().item()
    assert m2["learner/kl"] == pytest.approx(kl, rel=1e-4)
