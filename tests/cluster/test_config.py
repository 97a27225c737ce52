"""The typed config: presets load, overrides apply, unknown keys and bad arithmetic fail with the fix named."""

import pytest
import torch

from cluster.config import Batching, load_config


def test_presets_load_and_overrides_apply():
    cfg = load_config("tiny-cpu", ["train.lr=1e-4", "runtime.sampler.count=2", "train.betas=[0.8, 0.9]"])
    assert cfg.train.lr == 1e-4 and cfg.runtime.sampler.count == 2 and cfg.train.betas == (0.8, 0.9)
    for preset in ("sd35m-combined", "sd35m-pickscore"):
        c = load_config(preset)
        assert c.model.path == "stabilityai/stable-diffusion-3.5-medium"
        b = Batching.of(c)
        # the reference: 432 pairs per epoch, 4 updates, each on 216 images x 40 steps = 8640 rows
        assert (b.pairs_per_epoch, b.rows_per_epoch, b.updates_per_epoch) == (432, 34560, 4)
        updates = b.plan(b.rows_per_epoch, torch.Generator().manual_seed(0))
        assert [len(u) for u in updates] == [8640] * 4  # one global shuffle split in four
        assert torch.equal(torch.cat(updates).sort().values, torch.arange(34560))  # every row exactly once


def test_unknown_key_is_named_with_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"unknown config key 'train.lrr'; valid keys here: train.algorithm, train.lr, "
    ):
        load_config("tiny-cpu", ["train.lrr=1"])
    with pytest.raises(ValueError, match=r"unknown config key 'bogus'"):
        load_config("tiny-cpu", ["bogus=1"])


def test_wrong_types_and_bad_arithmetic_explain_themselves():
    with pytest.raises(ValueError, match=r"config key 'sampling.num_steps' wants int"):
        load_config("tiny-cpu", ["sampling.num_steps=many"])
    with pytest.raises(
        ValueError, match=r"2 branches x 3 pairs x 8 steps = 48 rows, which train.updates_per_epoch = 5"
    ):
        load_config("tiny-cpu", ["train.pairs_per_epoch=3", "train.updates_per_epoch=5"])
    grpo = ["train.algorithm=flow_grpo", "grpo.group_size=3", "train.pairs_per_epoch=3", "train.updates_per_epoch=5"]
    with pytest.raises(ValueError, match=r"3 images x 3 groups x 2 steps = 18 rows, which train.updates_per_epoch = 5"):
        load_config("tiny-cpu", [*grpo, "grpo.sde_window=2"])
    with pytest.raises(
        ValueError, match=r"grpo.sde_window = 9 must be 0 \(every step\) or lie in \[1, grpo.sde_window_range = 8\]"
    ):
        load_config("tiny-cpu", [*grpo, "grpo.sde_window=9"])
    with pytest.raises(ValueError, match=r"grpo.group_size must be >= 2"):
        load_config("tiny-cpu", [*grpo, "grpo.group_size=1"])
    with pytest.raises(ValueError, match="max_policy_lag = 0 is below updates_per_epoch - 1 = 1"):
        load_config("tiny-cpu", ["train.max_policy_lag=0"])
    with pytest.raises(ValueError, match=r"train.timestep_fraction must be in \(0, 1\]"):
        load_config("tiny-cpu", ["train.timestep_fraction=0"])
    with pytest.raises(ValueError, match=r"train.lr_final must lie in \[0, train.lr = 0.0001\]"):
        load_config("tiny-cpu", ["train.lr=1e-4", "train.lr_final=2e-4"])
    with pytest.raises(ValueError, match=r"'train.lr_schedule' must be one of \('constant', 'cosine', 'linear'\)"):
        load_config("tiny-cpu", ["train.lr_schedule=step"])
    with pytest.raises(FileNotFoundError, match="presets: .*tiny-cpu"):
        load_config("no-such-preset")
    with pytest.raises(ValueError, match="section.key=value"):
        load_config("tiny-cpu", ["train.lr"])


def test_a_config_written_before_train_precision_still_loads():
    # checkpoints keep the config they were trained with: train.amp (bf16 autocast on CUDA, or none) is train.precision
    from cluster.config import config_from_dict

    assert config_from_dict({"train": {"amp": True}}).train.precision == "bf16"
    assert config_from_dict({"train": {"amp": False, "lr": 1e-4}}).train.precision == "fp32"
    assert config_from_dict({"train": {"amp": False, "precision": "fp16"}}).train.precision == "fp16"


def test_the_runtime_is_grouped_by_role():
    """One block per role: the sampler pool, the reward pool, the learner group, each with its count and asks."""
    cfg = load_config("sd35m-combined", ["runtime.reward.max_count=4", "runtime.learner.resources={learner: 1}"])
    sampler, reward, learner = cfg.runtime.sampler, cfg.runtime.reward, cfg.runtime.learner
    assert (sampler.count, sampler.max_count, sampler.num_gpus, sampler.num_cpus) == (4, 16, 1.0, 4.0)
    assert (reward.count, reward.max_count, reward.num_gpus, reward.max_batch) == (1, 4, 1.0, 64)
    assert (learner.count, learner.num_gpus, learner.num_cpus, learner.resources) == (1, 1.0, 8.0, {"learner": 1})
    with pytest.raises(ValueError, match=r"^unknown config key 'runtime.sampler.gpus'; valid keys here: "):
        load_config("tiny-cpu", ["runtime.sampler.gpus=1"])


@pytest.mark.parametrize(
    "old, new, value",
    [
        ("sampler_num_gpus", "sampler.num_gpus", "1"),
        ("num_samplers", "sampler.count", "2"),
        ("max_reward_actors", "reward.max_count", "2"),
        ("reward_target_ongoing", "reward.target_ongoing", "1.0"),
        ("learner_sharding", "learner.sharding", "fsdp"),
        ("learner_resources", "learner.resources", "{learner: 1}"),
    ],
)
def test_an_old_runtime_key_is_refused_naming_the_new_one(old, new, value):
    from cluster.config import RENAMED, config_from_dict

    assert RENAMED[f"runtime.{old}"] == f"runtime.{new}"
    message = f"^runtime.{old} was renamed: use runtime.{new}$"
    with pytest.raises(ValueError, match=message):  # an override
        load_config("tiny-cpu", [f"runtime.{old}={value}"])
    with pytest.raises(ValueError, match=message):  # a preset's own key
        config_from_dict({"runtime": {old: value}})


def test_a_checkpoint_written_before_the_roles_loads_with_its_keys_moved():
    """A checkpoint keeps the config it was trained with (``upgraded`` reads it); the new key wins when both are set."""
    from cluster.config import config_from_dict, to_dict, upgraded

    saved = {
        "runtime": {
            "overlap": True,
            "num_samplers": 3,
            "max_samplers": 5,
            "sampler_num_cpus": 2.0,
            "reward_backend": "actors",
            "num_learners": 2,
            "learner_resources": {"learner": 1},
            "learner": {"num_cpus": 4.0},
        }
    }
    rt = config_from_dict(upgraded(saved)).runtime
    assert rt.overlap and (rt.sampler.count, rt.sampler.max_count, rt.sampler.num_cpus) == (3, 5, 2.0)
    assert (rt.reward.backend, rt.learner.count, rt.learner.resources) == ("actors", 2, {"learner": 1})
    assert rt.learner.num_cpus == 4.0 and saved["runtime"]["num_samplers"] == 3  # the saved dict is left as it was
    assert to_dict(config_from_dict(upgraded(saved)))["runtime"]["sampler"]["count"] == 3
