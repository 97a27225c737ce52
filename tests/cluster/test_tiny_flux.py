"""The tiny FLUX.1 through the Ray runtime (the ``tiny-flux`` preset, shortened): every pair accounted for, every
sampler proven to hold the learner's final weights, and the LoRA checkpoint readable by ``FluxPipeline``."""

import json

import torch

from cluster.config import load_config
from models.flux import FluxAdapter
from models.lora import add_lora
from models.tiny import tiny_flux_pipeline

SHORT = [
    "name=tiny-flux-e2e",
    "train.epochs=2",
    "train.pairs_per_epoch=4",
    "train.updates_per_epoch=2",
    "sampling.pairs_per_call=2",
    "sampling.num_steps=3",
    "runtime.sampler.count=1",
    "runtime.sampler.num_cpus=1",
    "runtime.learner.num_cpus=1",
    "eval.num_prompts=2",
    "eval.seeds_per_prompt=1",
    "train.checkpoint_every=4",
]


def test_tiny_flux_trains_through_ray(ray_local, tmp_path):
    from cluster.runtime import run_ray

    cfg = load_config("tiny-flux", SHORT + [f"output_dir={tmp_path}"])
    assert (cfg.model.kind, cfg.lora.enabled, cfg.train.gradient_checkpointing) == ("flux_tiny", True, True)
    out = run_ray(cfg)
    # accounting: 2 epochs x 4 pairs requested, all trained, none dropped or left in flight
    ledger = out["ledger"]
    assert ledger["pairs_requested"] == ledger["pairs_trained"] + sum(ledger["pairs_dropped"].values())
    assert ledger == {"pairs_requested": 8, "pairs_trained": 8, "pairs_dropped": {}, "pairs_in_flight": 0}
    assert out["version"] == 4 and [h["learner/version"] for h in out["history"]] == [2, 4]
    # verified sync: the sampler holds version 4 with the checksum the learner saved with it, and each of its 4 calls
    # (2 an epoch) sampled with a version it had proven (lock-step: the epoch's start, 0 then 2)
    folder = tmp_path / "tiny-flux-e2e" / "checkpoints" / "v000004"
    final_checksum = json.loads((folder / "state.json").read_text())["checksum"]
    assert [(s["sampler"], s["version"], s["checksum"], s["pending_pairs"]) for s in out["samplers"]] == [
        (0, 4, final_checksum, 0)
    ]
    assert out["sampled_versions"] == {0: 2, 2: 2}
    # the LoRA checkpoint loads into a fresh FluxPipeline and reproduces the trained velocity
    pipe = tiny_flux_pipeline(seed=0)
    pipe.load_lora_weights(str(folder))
    loaded = FluxAdapter(pipe, height=32, width=32, max_sequence_length=32)
    from safetensors.torch import load_file

    trained = FluxAdapter.tiny(seed=0)
    add_lora(trained.transformer, cfg.lora.rank, cfg.lora.alpha)
    missing, unexpected = trained.transformer.load_state_dict(
        load_file(str(folder / "trainable.safetensors")), strict=False
    )
    assert unexpected == [] and all("lora_" not in k for k in missing)
    x = torch.randn(2, *trained.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = trained.encode_prompts(["a red circle", "a black cat"])
    with torch.no_grad():
        v_trained = trained.velocity(x, torch.tensor(0.5), cond, cfg.sampling.guidance_scale)
        v_loaded = loaded.velocity(x, torch.tensor(0.5), cond, cfg.sampling.guidance_scale)
        v_base = FluxAdapter.tiny(seed=0).velocity(x, torch.tensor(0.5), cond, cfg.sampling.guidance_scale)
    torch.testing.assert_close(v_loaded, v_trained, rtol=1e-5, atol=1e-6)
    assert (v_trained - v_base).abs().max() > 1e-4  # the LoRA did change the model
