"""What a run's config builds: its flow model and its rewards, every spec checked before anything is built.

Usage::

    check_run(cfg)                            # rewards, metrics and model files: fails fast with the fix named
    model = build_model(cfg.model)            # a FlowModel (the frozen weights; what trains is set by the roles)
    model = build_model(cfg.model, role="learner")    # the learner's: no VAE, text encoders per model.learner_encoders
    reward = make_reward(cfg.reward)          # CombinedReward: the weighted sum, raw components kept
    scorers = metric_scorers(cfg.eval)        # eval.metrics scorers, built once per process
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from models.adapter import FlowModel, SD3Adapter
from models.device import DTYPES, apply_compile, check_attention, pick_device


def _pretrained(adapter, model_cfg):
    """``adapter.from_pretrained`` with the config's path, device, dtype, resolution and prompt length."""
    return adapter.from_pretrained(
        model_cfg.path,
        device=pick_device(model_cfg.device),
        dtype=DTYPES[model_cfg.dtype],
        resolution=model_cfg.resolution,
        max_sequence_length=model_cfg.max_sequence_length,
    )


ROLES = ("sampler", "learner")  # build_model's roles: samplers and evaluation keep every component on the device
TINY_KINDS = ("sd3_tiny", "flux_tiny")  # random offline models: built on the CPU whatever model.device says


def build_model(model_cfg, role: str = "sampler") -> FlowModel:
    """model_cfg: ``cluster.config.ModelConfig``. The frozen weights load here; LoRA is added by the roles. role:
    "sampler" (samplers, evaluation: every component on ``model.device``) or "learner": loaded on the CPU, then
    placed by ``for_learner`` (the transformer on the device, the text encoders where ``model.learner_encoders``
    says, the VAE released), so T5 and the VAE never reach the learner's GPU unless asked."""
    if role not in ROLES:
        raise ValueError(f"build_model role must be one of {ROLES}, got {role!r}")
    device = "cpu" if model_cfg.kind in TINY_KINDS else pick_device(model_cfg.device)
    check_attention(model_cfg.attention, device)  # before anything loads
    if role == "learner":
        model = _load_model(dataclasses.replace(model_cfg, device="cpu"))
        model = model.for_learner(model_cfg.learner_encoders, device=device)
    else:
        model = _load_model(model_cfg)
    # the GPU switches, one place for every kind and role: the SDPA backend of every transformer call (the adapter's)
    # and torch.compile of the transformer (at its first call, so LoRA added by the roles is compiled with it)
    model.attention = model_cfg.attention
    apply_compile(model.transformer, model_cfg.compile)
    return model


def _load_model(model_cfg) -> FlowModel:
    """The adapter of ``model.kind`` with its frozen weights, every component on ``model.device``."""
    if model_cfg.kind == "sd3_tiny":
        return SD3Adapter.tiny(seed=model_cfg.seed)
    if model_cfg.kind == "shapes":
        from tasks.shapes.model import WEIGHTS_DIR, load_shapes_adapter

        # model.path: a folder with a re-built base model (tasks/shapes/pretrain*.py); default the shipped one
        return load_shapes_adapter(device=pick_device(model_cfg.device), weights_dir=model_cfg.path or WEIGHTS_DIR)
    if model_cfg.kind == "sd3":
        if not model_cfg.path:
            raise ValueError(
                "model.kind=sd3 needs model.path: a hub id such as stabilityai/stable-diffusion-3.5-medium or a local directory"
            )
        return _pretrained(SD3Adapter, model_cfg)
    if model_cfg.kind == "flux_tiny":
        from models.flux import FluxAdapter

        return FluxAdapter.tiny(seed=model_cfg.seed)
    if model_cfg.kind == "flux":
        from models.flux import FluxAdapter

        if not model_cfg.path:
            raise ValueError(
                "model.kind=flux needs model.path: a hub id such as black-forest-labs/FLUX.1-dev (or "
                "black-forest-labs/FLUX.1-schnell) or a local FluxPipeline directory"
            )
        return _pretrained(FluxAdapter, model_cfg)
    raise ValueError(f"unknown model.kind {model_cfg.kind!r}; use sd3, sd3_tiny, flux, flux_tiny or shapes")


def reward_specs(reward_cfg) -> list[dict]:
    """The run's weighted scorer list, from explicit components or a preset (not yet checked: ``check_run``)."""
    from rewards.combined import PRESETS

    if reward_cfg.components:
        return [dict(c) for c in reward_cfg.components]
    if reward_cfg.preset in PRESETS:
        return [dict(c) for c in PRESETS[reward_cfg.preset]]
    raise ValueError(
        f"unknown reward.preset {reward_cfg.preset!r}; presets: {sorted(PRESETS)}, or list reward.components"
    )


def check_run(cfg) -> None:
    """Everything a run will build that can be checked without building it, so that a bad config fails here,
    before any Ray resource is taken: each reward component and ``eval.metrics`` scorer (names, settings and
    their types, weights files, the judge template), the model's local files and ``lora.init_from``'s folder."""
    from rewards.base import check_spec
    from rewards.combined import CombinedReward

    specs = reward_specs(cfg.reward)
    where = "reward.components" if cfg.reward.components else f"reward.preset {cfg.reward.preset!r}"
    try:
        CombinedReward.check_settings(specs=specs)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: {e}") from None
    for i, spec in enumerate(cfg.eval.metrics):
        check_spec(spec, f"eval.metrics[{i}]")
    if cfg.train.staleness_correction and cfg.train.algorithm != "fdfo":
        from learner.loss import STALENESS_FDFO_ONLY

        raise ValueError(STALENESS_FDFO_ONLY.format(algorithm=cfg.train.algorithm))
    m = cfg.model
    if m.kind == "shapes" and m.path and not Path(m.path).is_dir():
        raise FileNotFoundError(
            f"model.path={m.path!r} is not a folder; build one with `python -m tasks.shapes.pretrain "
            "--out-dir <folder>` or drop model.path to use the shipped model"
        )
    if (
        m.kind in ("sd3", "flux")
        and m.path
        and m.path.startswith(("/", ".", "~"))
        and not Path(m.path).expanduser().is_dir()
    ):
        pipeline = "StableDiffusion3Pipeline" if m.kind == "sd3" else "FluxPipeline"
        raise FileNotFoundError(
            f"model.path={m.path!r} does not exist; point it at a downloaded {pipeline} folder or use a hub id"
        )
    if m.kind == "flux" and not 1 <= m.max_sequence_length <= 512:
        raise ValueError(
            f"model.max_sequence_length={m.max_sequence_length}: FLUX's T5 takes 1 to 512 prompt tokens "
            "(its pipeline's default is 512); set model.max_sequence_length=512"
        )
    if m.kind == "flux" and m.resolution % 16:
        raise ValueError(
            f"model.resolution={m.resolution}: FLUX packs 2x2 patches of its 8x-downsampled latents, so "
            f"the image size must be a multiple of 16; e.g. model.resolution={m.resolution - m.resolution % 16 or 16}"
        )
    if cfg.lora.init_from:
        from models.lora import check_init_from

        check_init_from(cfg.lora.init_from)  # a local folder must hold a PEFT LoRA or an fdfo checkpoint


def make_reward(reward_cfg):
    """The run's reward: a ``CombinedReward`` (weighted sum, raw components kept in info)."""
    from rewards.combined import CombinedReward

    return CombinedReward(specs=reward_specs(reward_cfg))


_METRICS: dict[str, object] = {}


def metric_scorers(eval_cfg) -> dict:
    """The ``eval.metrics`` scorers (built once per process): metrics the run reports but does not train on."""
    from rewards.base import build_reward

    out = {}
    for spec in eval_cfg.metrics:
        key = json.dumps(dict(spec), sort_keys=True)
        if key not in _METRICS:
            _METRICS[key] = build_reward(dict(spec))
        out[spec["name"]] = _METRICS[key]
    return out
