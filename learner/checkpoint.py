"""Checkpoints as safetensors + JSON (never pickle).

Usage::

    path = save_checkpoint(run_dir, learner, state={"ledger": ..., "next_pair_id": ...}, config=cfg_dict)
    state = load_checkpoint(latest_checkpoint(run_dir), learner)      # restores weights + optimizer

A checkpoint folder ``<run_dir>/checkpoints/v<version>/`` holds:
- ``pytorch_lora_weights.safetensors``: the LoRA in diffusers' format, so
  ``StableDiffusion3Pipeline.load_lora_weights(folder)`` loads it directly (full fine-tuning instead writes
  ``transformer/`` with ``save_pretrained``, loadable by ``SD3Transformer2DModel.from_pretrained``);
- ``trainable.safetensors``: the learner's trainable tensors by parameter name (exact resume);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments and hyper-parameters;
- ``state.json``: version, counters, seeds and the run config.

``<run_dir>/checkpoints/latest`` names the newest folder (what ``--resume`` continues from); ``best`` beside
them is the hacking guard's copy of the best-scoring one (cluster/guard.py), never resumed from.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


def _save_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    sd = opt.state_dict()
    tensors = {
        f"{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu().contiguous()
        for idx, st in sd["state"].items()
        for key, val in st.items()
    }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))


def _load_optimizer(opt: torch.optim.Optimizer, folder: Path) -> None:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: str | Path, learner, state: dict, config: dict) -> Path:
    """Write the learner's weights, optimizer and ``state`` (JSON-able) under ``run_dir``; returns the folder."""
    folder = Path(run_dir) / "checkpoints" / f"v{learner.version:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    tr = learner.model.transformer
    w = learner.weights()
    save_file({k: v.contiguous() for k, v in w.tensors.items()}, str(folder / "trainable.safetensors"))
    if learner.lora:
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(tr).items()}
        # the adapter config (rank, alpha, targets) rides along, so loaders use alpha / r, not a scale of 1
        meta = tr.peft_config["default"].to_dict()
        StableDiffusion3Pipeline.save_lora_weights(
            str(folder), transformer_lora_layers=layers, safe_serialization=True, transformer_lora_adapter_metadata=meta
        )
    else:
        tr.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    _save_optimizer(learner.opt, folder)
    meta = {"version": learner.version, "checksum": w.checksum, "state": state, "config": config}
    (folder / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    (Path(run_dir) / "checkpoints" / LATEST).write_text(folder.name)
    prune_checkpoints(Path(run_dir) / "checkpoints", keep=int((config.get("train") or {}).get("keep_checkpoints", 0)))
    return folder


def prune_checkpoints(folder: Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest versioned checkpoints under ``folder`` (0 = keep all); the one ``latest``
    names and ``best`` always stay. Returns the names deleted."""
    import shutil

    if keep <= 0:
        return []
    marker = folder / LATEST
    latest = marker.read_text().strip() if marker.exists() else None
    versions = sorted((p for p in folder.glob("v[0-9]*") if p.is_dir() and re.fullmatch(r"v\d+", p.name)),
                      key=lambda p: int(p.name[1:]))
    gone = [p for p in versions[:-keep] if p.name != latest]
    for p in gone:
        shutil.rmtree(p)
    return [p.name for p in gone]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The folder the ``latest`` marker names (None without a marker): always a versioned ``v<version>`` folder,
    never ``best`` (the hacking guard's copy of the best-scoring checkpoint, cluster/guard.py), which may be older
    than the run's state and so must not be resumed from."""
    marker = Path(run_dir) / "checkpoints" / LATEST
    if not marker.exists():
        return None
    name = marker.read_text().strip()
    if not re.fullmatch(r"v\d+", name):
        newest = sorted(marker.parent.glob("v[0-9]*"))
        raise ValueError(f"{marker} names {name!r}, not a versioned checkpoint folder (v<version>): --resume continues "
                         f"only from the run's newest checkpoint, never from 'best'; write "
                         f"{newest[-1].name if newest else 'the newest v... folder name'!r} into it")
    return marker.parent / name


def load_checkpoint(folder: str | Path, learner) -> dict:
    """Restore weights, optimizer and version into ``learner``; returns the saved ``state`` dict."""
    folder = Path(folder)
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "trainable.safetensors"))
    params = dict(learner.model.transformer.named_parameters())
    missing = set(tensors) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(f"checkpoint {folder} does not match this model's trainable parameters (LoRA config?): {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)
    _load_optimizer(learner.opt, folder)
    learner.version = int(meta["version"])
    if learner.weights_info()[1] != meta["checksum"]:
        raise RuntimeError(f"checkpoint {folder}: restored weights do not match the saved checksum")
    return meta["state"]
