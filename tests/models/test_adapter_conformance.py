"""One conformance suite for every ``FlowModel`` adapter (tiny SD3, tiny FLUX.1-dev, tiny FLUX.1-schnell), checked
against the model's own diffusers pipeline running its own ``__call__`` on the same weights, noise and prompts:

- the velocity is the pipeline's own transformer call, at every state the pipeline visits;
- the churn step with gamma = 0 is the pipeline's scheduler Euler step, and the whole gamma = 0 paired sampler
  lands where the pipeline does (CFG cases too: the negative prompt runs batched here, separately there);
- ``decode`` is the pipeline's own decode (``output_type="pt"``) of the same latents;
- a LoRA checkpoint fdfo writes loads with the pipeline class's ``load_lora_weights`` and gives the trained velocity;
- gradient checkpointing changes memory, not the update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import torch

from actors.sampler import Sampler
from actors.sampling import churn_step, sample_pairs
from cluster.config import Batching, load_config
from learner.checkpoint import save_checkpoint
from learner.learner import Learner
from models.adapter import SD3Adapter
from models.flux import FluxAdapter
from models.tiny import MAX_TOKENS, tiny_flux_pipeline, tiny_sd3_pipeline

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 3


@dataclass
class Case:
    """An adapter under test: how to build it from a pipeline, its guidance, and how its pipeline is called."""

    wrap: Callable  # pipeline -> adapter
    pipeline: Callable  # () -> a fresh tiny pipeline (seed 0: the same weights every time)
    guidance: float  # the adapter's guidance_scale
    pipeline_guidance: dict  # the pipeline's __call__ arguments that give the same guidance
    cfg: bool = False  # guidance is CFG (two halves: the pipeline batches them differently)

    def adapter(self):
        return self.wrap(self.pipeline())

    def to_pipeline(self, model, x):  # our [B, C, h, w] -> the pipeline's latent layout
        return model.pack(x) if isinstance(model, FluxAdapter) else x

    def from_pipeline(self, model, z):  # the pipeline's latent layout -> our [B, C, h, w]
        return model.unpack(z) if isinstance(model, FluxAdapter) else z


CASES = {
    "sd3": Case(
        lambda p: SD3Adapter(p, max_sequence_length=MAX_TOKENS),
        lambda: tiny_sd3_pipeline(seed=0),
        1.0,
        {"guidance_scale": 1.0},
    ),
    "sd3-cfg": Case(
        lambda p: SD3Adapter(p, max_sequence_length=MAX_TOKENS),
        lambda: tiny_sd3_pipeline(seed=0),
        2.0,
        {"guidance_scale": 2.0},
        cfg=True,
    ),
    "flux-dev": Case(
        lambda p: FluxAdapter(p, height=32, width=32, max_sequence_length=MAX_TOKENS),
        lambda: tiny_flux_pipeline(seed=0),
        3.5,
        {"guidance_scale": 3.5},
    ),
    "flux-schnell": Case(
        lambda p: FluxAdapter(p, height=32, width=32, max_sequence_length=MAX_TOKENS),
        lambda: tiny_flux_pipeline(seed=0, guidance_embeds=False),
        1.0,
        {},
    ),
    "flux-schnell-cfg": Case(
        lambda p: FluxAdapter(p, height=32, width=32, max_sequence_length=MAX_TOKENS),
        lambda: tiny_flux_pipeline(seed=0, guidance_embeds=False),
        2.0,
        {"true_cfg_scale": 2.0, "negative_prompt": [""] * len(PROMPTS)},
        cfg=True,
    ),
}
EXACT = [name for name, case in CASES.items() if not case.cfg]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Toy-sized tensors gain nothing from intra-op threads, and on a loaded machine their spin-waits cost 10-40x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    c = CASES[request.param]
    return request.param, c, c.adapter()


def run_pipeline(case: Case, model, x0: torch.Tensor, output_type: str, cond=None) -> dict:
    """The pipeline's own ``__call__`` from start latents x0 [B, C, h, w] on ``PROMPTS`` (encoded by the pipeline), or
    on the given ``cond`` (``PromptEmbeds`` [B, ...]): its output, the transformer's calls (kwargs, output) and the
    latents after every step (in our layout)."""
    calls, states = [], [x0]
    prompts = (
        {"prompt": PROMPTS} if cond is None else {"prompt_embeds": cond.tokens, "pooled_prompt_embeds": cond.pooled}
    )
    guidance = dict(case.pipeline_guidance)
    if "negative_prompt" in guidance:  # one negative per row
        guidance["negative_prompt"] = [""] * len(x0)

    def hook(module, args, kwargs, out):
        calls.append((kwargs, out[0].detach().clone()))

    def step_end(pipe, i, t, tensors):
        states.append(case.from_pipeline(model, tensors["latents"].detach().clone()))
        return {}

    handle = model.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.pipe(
                **prompts,
                latents=case.to_pipeline(model, x0.clone()),
                num_inference_steps=STEPS,
                height=32,
                width=32,
                max_sequence_length=MAX_TOKENS,
                output_type=output_type,
                callback_on_step_end=step_end,
                return_dict=False,
                **guidance,
            )[0]
    finally:
        handle.remove()
    return {"out": out, "calls": calls, "states": states, "sigmas": model.pipe.scheduler.sigmas.clone()}


@pytest.fixture(scope="module")
def pair(case):
    """A gamma = 0 pair from fdfo's sampler."""
    name, c, model = case
    return sample_pairs(model, PROMPTS, seeds=[11, 12], num_steps=STEPS, gamma=0.0, guidance_scale=c.guidance)


@pytest.fixture(scope="module")
def reference(case, pair):
    """The pair and the pipeline's own run (prompts encoded by the pipeline) from the pair's start noise."""
    name, c, model = case
    return pair, run_pipeline(c, model, pair.xs[:, 0, 0], "latent")  # x0 [P, C, h, w] (= eps at gamma 0)


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_sigmas_are_the_pipelines_schedule(case, reference):
    name, c, model = case
    traj, ref = reference
    assert torch.equal(model.sigmas(STEPS), ref["sigmas"]) and torch.equal(traj.sigmas, ref["sigmas"])
    if name == "flux-dev":
        # by hand: 8x8 = 64 image tokens give mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256) = 0.4675, and each
        # t of linspace(1, 1/3, 3) goes to e^mu / (e^mu + 1/t - 1): 1, 0.7615, 0.4438, then 0 appended
        mu = 0.5 + 0.65 / 3840 * (64 - 256)
        by_hand = [math.exp(mu) / (math.exp(mu) + 1 / t - 1) for t in (1.0, 2 / 3, 1 / 3)] + [0.0]
        assert ref["sigmas"].tolist() == pytest.approx(by_hand, abs=1e-6)
        assert by_hand[1:3] == pytest.approx([0.7615, 0.4438], abs=1e-4)
    if name == "flux-schnell":  # no dynamic shift, shift 1: the plain linspace
        assert ref["sigmas"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0], abs=1e-7)


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_velocity_is_the_pipelines_transformer_call(case, reference):
    name, c, model = case
    traj, ref = reference
    cond = model.encode_prompts(PROMPTS)
    sigmas = model.sigmas(STEPS)
    assert len(ref["calls"]) == STEPS  # one forward per step: no CFG batch, embedded guidance
    for i, (kwargs, out) in enumerate(ref["calls"]):
        x_i = c.from_pipeline(model, kwargs["hidden_states"])
        assert torch.equal(x_i, ref["states"][i])
        v = model.velocity(x_i, sigmas[i], cond, c.guidance)
        assert v.dtype == torch.float32 and v.shape == (2, *model.latent_shape)
        assert torch.equal(v, c.from_pipeline(model, out).float()), f"{name}: step {i}"


@pytest.mark.parametrize("case", EXACT, indirect=True)
def test_churn_with_zero_gamma_is_the_pipelines_euler_step(case, reference):
    name, c, model = case
    traj, ref = reference
    sigmas = ref["sigmas"]
    for i, (kwargs, out) in enumerate(ref["calls"]):
        x_i, v_i = ref["states"][i], c.from_pipeline(model, out)
        stepped = churn_step(x_i, v_i, float(sigmas[i]), float(sigmas[i + 1]), 0.0, None)
        assert torch.equal(stepped, ref["states"][i + 1]), f"{name}: step {i}"


def test_gamma_zero_pair_lands_where_the_pipeline_does(case, pair):
    # The pipeline runs the sampler's batch (both branches of both prompts, 4 rows, the sampler's conditioning): a
    # float32 forward rounds differently at another batch size (by ~5e-7), so only the same batch is comparable bits.
    name, c, model = case
    traj = pair
    P, _, N = traj.xs.shape[:3]
    ref = run_pipeline(c, model, traj.xs[:, :, 0].flatten(0, 1), "latent", cond=model.encode_prompts(PROMPTS).repeat(2))
    final = c.from_pipeline(model, ref["out"]).view(P, 2, *model.latent_shape)
    states = torch.stack(ref["states"][:-1], 1).view(P, 2, N, *model.latent_shape)
    assert torch.equal(traj.xs[:, 0], traj.xs[:, 1])  # no churn: both branches are the plain Euler sample
    if c.cfg:  # the negative: encoded once here, per row there
        torch.testing.assert_close(traj.x_final, final, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(traj.xs, states, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(traj.x_final, final) and torch.equal(traj.xs, states)


@pytest.mark.parametrize("case", ["sd3", "flux-dev"], indirect=True)
def test_decode_is_the_pipelines_decode(case, reference):
    name, c, model = case
    traj, ref = reference
    images = run_pipeline(c, model, traj.xs[:, 0, 0], "pt")["out"]  # [P, 3, 32, 32] in [0, 1]
    ours = model.decode(c.from_pipeline(model, ref["out"]))
    assert ours.shape == (2, 3, 32, 32) and ours.dtype == torch.float32
    assert torch.equal(ours, images)
    assert ours.std() > 0.01  # a real picture's worth of variation, not a constant


def lora_cfg(guidance: float, gradient_checkpointing: bool = False):
    return load_config(
        "tiny-cpu",
        [
            "lora.enabled=true",
            "lora.rank=4",
            "lora.alpha=8",
            "train.lr=3e-2",
            "sampling.num_steps=2",
            "train.pairs_per_epoch=2",
            "train.updates_per_epoch=1",
            f"sampling.guidance_scale={guidance}",
            f"train.gradient_checkpointing={str(gradient_checkpointing).lower()}",
        ],
    )


@pytest.fixture(scope="module")
def trained(case, tmp_path_factory):
    """A rank-4 LoRA learner after one epoch on two real pairs of its own model, and its checkpoint folder."""
    name, c, model = case
    cfg = lora_cfg(c.guidance)
    sampler = Sampler(c.adapter(), cfg.sampling, cfg.lora, precision=cfg.train.precision)
    job, _ = sampler.sample(prompts=PROMPTS, prompt_ids=[0, 1], pair_ids=[0, 1], seeds=[3, 4])
    batch, report = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.2, 0.9]]))
    assert report["dropped"] == []
    learner = Learner(c.adapter(), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    learner.train_epoch(batch)
    return learner, save_checkpoint(tmp_path_factory.mktemp(name), learner, state={}, config={"train": {}}), batch


@pytest.mark.parametrize("case", ["sd3", "flux-dev"], indirect=True)
def test_lora_checkpoint_loads_with_the_models_pipeline(case, trained):
    name, c, model = case
    learner, folder, _ = trained
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    pipe = c.pipeline()
    assert type(pipe) is learner.model.lora_pipeline_class
    pipe.load_lora_weights(str(folder))  # the model's own diffusers pipeline class reads it
    loaded, base = c.wrap(pipe), c.adapter()
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = base.encode_prompts(PROMPTS)
    with torch.no_grad():
        v_trained = learner.model.velocity(x, torch.tensor(0.5), cond, c.guidance)
        v_loaded = loaded.velocity(x, torch.tensor(0.5), cond, c.guidance)
        v_base = base.velocity(x, torch.tensor(0.5), cond, c.guidance)
    torch.testing.assert_close(v_loaded, v_trained, rtol=1e-5, atol=1e-6)
    assert (v_trained - v_base).abs().max() > 1e-4  # the LoRA did change the model


@pytest.mark.parametrize("case", ["flux-dev"], indirect=True)
def test_gradient_checkpointing_changes_memory_not_the_update(case, trained):
    name, c, model = case
    plain, _, batch = trained
    cfg = lora_cfg(c.guidance, gradient_checkpointing=True)
    from models.device import repeated_blocks

    checkpointed = Learner(c.adapter(), cfg.train, Batching.of(cfg), cfg.lora, seed=0)
    assert checkpointed.model.transformer.gradient_checkpointing and not plain.model.transformer.gradient_checkpointing
    # the recompute is real: every block runs twice per transformer forward (the forward, then again in the backward
    # pass), where without checkpointing it runs once
    transformer, blocks = checkpointed.model.transformer, repeated_blocks(checkpointed.model.transformer)
    calls = {"transformer": 0} | {i: 0 for i in range(len(blocks))}
    hooks = [transformer.register_forward_pre_hook(lambda *_: calls.update(transformer=calls["transformer"] + 1))]
    hooks += [
        b.register_forward_pre_hook(lambda *_, i=i: calls.update({i: calls[i] + 1})) for i, b in enumerate(blocks)
    ]
    try:
        checkpointed.train_epoch(batch)
    finally:
        for h in hooks:
            h.remove()
    n = calls.pop("transformer")
    assert len(blocks) >= 2 and n >= 1 and calls == {i: 2 * n for i in range(len(blocks))}, (n, calls)
    a, b = plain.weights(), checkpointed.weights()
    assert a.version == b.version == 1 and a.tensors.keys() == b.tensors.keys()
    for n in a.tensors:
        torch.testing.assert_close(b.tensors[n], a.tensors[n], rtol=0, atol=1e-7)
