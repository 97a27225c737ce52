"""The FLUX and SD3.5-Large presets, the reference's LoRA targets on the real FLUX.1 and SD3.5-Large layouts (built
on the meta device: no weights, no download), ``PromptEmbeds`` without a pooled embedding, and the build errors."""

import re
from dataclasses import replace

import pytest
import torch

from cluster.build import build_model, check_run
from cluster.config import load_config
from models.adapter import PromptEmbeds
from models.lora import LORA_TARGET_MODULES, lora_module_names


def lora_params(transformer, rank: int = 32) -> int:
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in lora_module_names(transformer))


def test_flux1_layout_gets_266_attention_loras():
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    # FLUX.1's transformer config with one block of each kind (19 double- and 38 single-stream in the real one), on
    # the meta device: every block of a kind has the same modules
    with init_empty_weights():
        tr = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    names = lora_module_names(tr, LORA_TARGET_MODULES)
    double = [n for n in names if n.startswith("transformer_blocks.0.attn.")]
    single = [n for n in names if n.startswith("single_transformer_blocks.0.attn.")]
    assert sorted(names) == sorted(double + single)
    assert [n.split(".attn.")[1] for n in double] == [t.removeprefix("attn.") for t in LORA_TARGET_MODULES]
    assert [n.split(".attn.")[1] for n in single] == ["to_q", "to_k", "to_v"]  # the output is proj_out, outside attn
    assert 19 * len(double) + 38 * len(single) == 266
    # every target is 3072 -> 3072: 32 * (3072 + 3072) = 196,608 parameters each, 52.3 M in all
    assert lora_params(tr) == len(names) * 196_608 and 266 * 196_608 == 52_297_728


def test_sd35_large_layout_gets_303_attention_loras():
    from accelerate import init_empty_weights
    from diffusers import SD3Transformer2DModel

    # SD3.5 Large's config with 2 of its 38 blocks: no attn2; the last block is context_pre_only (no to_add_out). The
    # position-embedding table (a buffer, no LoRA target) is shrunk from 192 x 192 to 8 x 8 positions
    with init_empty_weights():
        tr = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=38,
            joint_attention_dim=4096,
            caption_projection_dim=2432,
            pooled_projection_dim=2048,
            pos_embed_max_size=8,
            qk_norm="rms_norm",
        )
    names = lora_module_names(tr, LORA_TARGET_MODULES)
    assert len([n for n in names if n.startswith("transformer_blocks.0.")]) == 8
    assert len([n for n in names if n.startswith("transformer_blocks.1.")]) == 7
    assert 37 * 8 + 7 == 303 and lora_params(tr) == 15 * 32 * (2432 + 2432)  # 303 x 155,648 = 47.2 M in all


def test_flux_dev_preset():
    cfg = load_config("flux-dev-pickscore")
    check_run(cfg)
    m, lo, s, t = cfg.model, cfg.lora, cfg.sampling, cfg.train
    assert (m.kind, m.path, m.dtype, m.resolution, m.max_sequence_length) == (
        "flux",
        "black-forest-labs/FLUX.1-dev",
        "bfloat16",
        512,
        512,
    )
    assert (lo.enabled, lo.rank, lo.alpha, lo.target_modules) == (True, 32, 64.0, LORA_TARGET_MODULES)
    assert (s.num_steps, s.gamma, s.guidance_scale, s.record_dtype) == (28, 0.0025, 3.5, "bfloat16")
    assert (t.precision, t.gradient_checkpointing, t.lr, t.epsilon, t.pairs_per_epoch, t.updates_per_epoch) == (
        "bf16",
        True,
        3e-5,
        0.03,
        432,
        4,
    )
    assert cfg.runtime.learner.num_gpus == 1 and cfg.runtime.sampler.num_gpus == 1


def test_sd35_large_preset_is_sd35m_combined_but_the_model_and_memory():
    large, medium = load_config("sd35l-combined"), load_config("sd35m-combined")
    check_run(large)
    assert large.model == replace(medium.model, path="stabilityai/stable-diffusion-3.5-large")
    assert (large.lora, large.sampling, large.reward, large.prompts, large.runtime) == (
        medium.lora,
        medium.sampling,
        medium.reward,
        medium.prompts,
        medium.runtime,
    )
    # the reference's numerics; only memory settings differ (micro-batches sum to the same update)
    assert large.train == replace(medium.train, gradient_checkpointing=True, micro_batch_rows=16)


def test_tiny_flux_preset_builds_the_tiny_flux():
    cfg = load_config("tiny-flux")
    check_run(cfg)
    model = build_model(cfg.model)
    assert type(model).__name__ == "FluxAdapter" and model.guidance == "embedded" and model.latent_shape == (16, 16, 16)
    assert cfg.train.gradient_checkpointing and cfg.lora.enabled


def test_flux_config_errors_name_the_fix():
    cfg = load_config("flux-dev-pickscore")
    with pytest.raises(
        ValueError, match=re.escape("model.kind=flux needs model.path: a hub id such as black-forest-labs/FLUX.1-dev")
    ):
        build_model(replace(cfg.model, path=None))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.max_sequence_length=600: FLUX's T5 takes 1 to 512 prompt "
            "tokens (its pipeline's default is 512); set model.max_sequence_length=512"
        ),
    ):
        check_run(replace(cfg, model=replace(cfg.model, max_sequence_length=600)))
    with pytest.raises(
        ValueError,
        match=re.escape(
            "model.resolution=500: FLUX packs 2x2 patches of its 8x-downsampled "
            "latents, so the image size must be a multiple of 16; e.g. model.resolution=496"
        ),
    ):
        check_run(replace(cfg, model=replace(cfg.model, resolution=500)))
    with pytest.raises(FileNotFoundError, match="point it at a downloaded FluxPipeline folder"):
        check_run(replace(cfg, model=replace(cfg.model, path="./no/such/flux")))
    with pytest.raises(ValueError, match="config key 'model.kind' must be one of"):
        load_config("tiny-flux", ["model.kind=flux2"])


def test_prompt_embeds_without_pooled_with_mask_and_extras():
    a = PromptEmbeds(torch.ones(1, 3, 2), mask=torch.tensor([[1, 1, 0]]), extras={"lens": torch.tensor([2])})
    b = PromptEmbeds(torch.zeros(1, 3, 2), mask=torch.tensor([[1, 0, 0]]), extras={"lens": torch.tensor([1])})
    ab = PromptEmbeds.cat([a, b]).repeat(2)
    assert ab.pooled is None and ab.tokens.shape == (4, 3, 2)
    assert ab.mask.tolist() == [[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0]] and ab.extras["lens"].tolist() == [
        2,
        2,
        1,
        1,
    ]
    assert ab.index([2]).extras["lens"].tolist() == [1] and len(a.expand(3)) == 3
    with pytest.raises(
        ValueError,
        match=re.escape(
            "prompt embeddings of shapes (3, 2) and (4, 2) cannot share a batch: "
            "the adapter must pad every prompt to one length"
        ),
    ):
        PromptEmbeds.cat(
            [a, PromptEmbeds(torch.zeros(1, 4, 2), mask=torch.ones(1, 4), extras={"lens": torch.tensor([4])})]
        )
    with pytest.raises(ValueError, match="different fields"):
        PromptEmbeds.cat([a, PromptEmbeds(torch.zeros(1, 3, 2))])
