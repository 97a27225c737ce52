"""Build the flow model a config names: ``build_model(cfg.model)`` -> a ``FlowModel`` (SD3Adapter today)."""

from __future__ import annotations

import torch

from actors.adapter import FlowModel, SD3Adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device!r} but this process sees no GPU; give the actor num_gpus or use cpu")
    return device


def build_model(model_cfg) -> FlowModel:
    """model_cfg: ``cluster.config.ModelConfig``. The frozen weights load here; LoRA is added by the caller."""
    if model_cfg.kind == "sd3_tiny":
        return SD3Adapter.tiny(seed=model_cfg.seed)
    if model_cfg.kind == "shapes":
        from actors.shapes_model import WEIGHTS_DIR, load_shapes_adapter

        # model.path: a folder with a re-built base model (cluster/pretrain_shapes*.py); default the shipped one
        return load_shapes_adapter(device=pick_device(model_cfg.device), weights_dir=model_cfg.path or WEIGHTS_DIR)
    if model_cfg.kind == "sd3":
        if not model_cfg.path:
            raise ValueError("model.kind=sd3 needs model.path: a hub id such as stabilityai/stable-diffusion-3.5-medium or a local directory")
        return SD3Adapter.from_pretrained(
            model_cfg.path,
            device=pick_device(model_cfg.device),
            dtype=DTYPES[model_cfg.dtype],
            resolution=model_cfg.resolution,
            max_sequence_length=model_cfg.max_sequence_length,
        )
    raise ValueError(f"unknown model.kind {model_cfg.kind!r}; use sd3, sd3_tiny or shapes")
