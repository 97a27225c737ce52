"""The SD3.5 presets carry the reference's choices (ALGORITHM.md §6-§7) as config fields, and differ only where the
released runs differ: the reward and the CFG weight."""

import pytest

from cluster.build import check_run, reward_specs
from cluster.config import load_config
from models.lora import LORA_TARGET_MODULES

JUDGE = "vlm_judge"
PRESETS = {  # preset -> (guidance scale, {scorer: weight})
    "sd35m-combined": (1.0, {"pickscore": 1.0, JUDGE: 0.1}),
    "sd35m-pickscore": (1.0, {"pickscore": 1.0}),
    "sd35m-vlm": (1.0, {JUDGE: 1.0}),
    "sd35m-combined-cfg2.0": (2.0, {"pickscore": 1.0, JUDGE: 0.1}),
    "sd35m-combined-cfg4.5": (4.5, {"pickscore": 1.0, JUDGE: 0.1}),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_sd35m_presets_are_the_reference(preset):
    cfg = load_config(preset)
    check_run(cfg)
    m, lo, s, t = cfg.model, cfg.lora, cfg.sampling, cfg.train
    assert (m.kind, m.path, m.dtype, m.resolution, m.max_sequence_length) == (
        "sd3",
        "stabilityai/stable-diffusion-3.5-medium",
        "bfloat16",
        512,
        128,
    )
    assert (lo.enabled, lo.rank, lo.alpha, lo.init, lo.target_modules, lo.init_from) == (
        True,
        32,
        64.0,
        "gaussian",
        LORA_TARGET_MODULES,
        None,
    )
    assert all(target.startswith("attn.") for target in lo.target_modules)
    assert (s.num_steps, s.gamma, s.record_dtype, t.precision) == (40, 0.0025, "float16", "fp16")
    assert (t.lr, t.betas, t.weight_decay, t.adam_eps, t.grad_clip, t.epsilon, t.kl_weight) == (
        3e-5,
        (0.9, 0.999),
        1e-4,
        1e-8,
        1.0,
        0.03,
        0.0,
    )
    assert (t.pairs_per_epoch, t.updates_per_epoch, t.checkpoint_every, t.lr_schedule) == (432, 4, 20, "constant")
    guidance, weights = PRESETS[preset]
    assert s.guidance_scale == guidance
    assert {spec["name"]: spec["weight"] for spec in reward_specs(cfg.reward)} == weights


def test_init_from_override_and_cli_flag_are_the_same():
    from cluster.cli import _init_override

    class Args:
        init_from = "nvidia/finite-difference-flow-optimization/fdfo-combined-reward-cfg-4.5/epoch-0000100"

    cfg = load_config("sd35m-combined-cfg4.5", _init_override(Args()))
    assert cfg.lora.init_from == Args.init_from


def test_the_flow_grpo_preset_is_flow_grpos_published_sd35m_pickscore_run():
    import torch

    from cluster.config import Batching

    cfg = load_config("sd35m-flow-grpo-pickscore")
    check_run(cfg)
    m, lo, s, t, g = cfg.model, cfg.lora, cfg.sampling, cfg.train, cfg.grpo
    assert (m.path, m.resolution, m.max_sequence_length, lo.rank, lo.alpha, lo.target_modules) == (
        "stabilityai/stable-diffusion-3.5-medium",
        512,
        128,
        32,
        64.0,
        LORA_TARGET_MODULES,
    )
    assert (t.algorithm, s.num_steps, cfg.eval.num_steps, s.guidance_scale, t.precision) == (
        "flow_grpo",
        10,
        40,
        4.5,
        "fp16",
    )
    assert (t.lr, t.kl_weight, t.grad_clip, t.updates_per_epoch, t.timestep_fraction) == (3e-4, 0.01, 1.0, 2, 0.99)
    assert (g.group_size, g.noise_level, g.clip_range, g.adv_clip_max, g.global_std, g.sde_window) == (
        24,
        0.7,
        1e-4,
        5.0,
        True,
        0,
    )
    assert {spec["name"]: spec["weight"] for spec in reward_specs(cfg.reward)} == {"pickscore": 1.0}
    # 48 groups x 24 images x 10 steps = 11,520 (image, step) rows; 99 % of them in two updates
    b = Batching.of(cfg)
    assert (b.images_per_unit, b.recorded_steps, b.rows_per_epoch) == (24, 10, 11520)
    assert [len(u) for u in b.plan(b.rows_per_epoch, torch.Generator().manual_seed(0))] == [5703, 5702]
