"""Checkpoints as safetensors + JSON (never pickle).

Usage::

    path = save_checkpoint(run_dir, learner, state={"ledger": ..., "next_pair_id": ...}, config=cfg_dict)
    state = load_checkpoint(latest_checkpoint(run_dir), learner)      # restores weights + optimizer
    folder = learner.save(run_dir, state, config)   # the same through the Learner (its part ``Checkpointing``)

A checkpoint folder ``<run_dir>/checkpoints/v<version>/`` holds:
- ``pytorch_lora_weights.safetensors``: the LoRA in diffusers' format, written by the model's own pipeline class
  (``model.lora_pipeline_class``: ``StableDiffusion3Pipeline``, ``FluxPipeline``), so that class's
  ``load_lora_weights(folder)`` loads it directly (full fine-tuning instead writes ``transformer/`` with
  ``save_pretrained``, loadable by the transformer class's ``from_pretrained``);
- ``trainable.safetensors``: the learner's trainable tensors by parameter name (exact resume);
- ``optimizer.safetensors`` + ``optimizer.json``: AdamW moments and hyper-parameters (and ``masters.safetensors``,
  the fp32 master weights, when the trained weights are half precision);
- ``state.json``: version, counters, seeds and the run config.

A sharded learner group (``sharding="fsdp"``) writes the same files: every rank gathers the full tensors and AdamW
moments, rank 0 writes them, so a checkpoint resumes at any number of ranks (each rank loads its own chunks).

``<run_dir>/checkpoints/latest`` names the newest folder (what ``--resume`` continues from); ``best`` beside
them is the hacking guard's copy of the best-scoring one (cluster/guard.py), never resumed from. ``run_dir`` may be
an object-store URI (``runtime.storage_path``, learner/storage.py): the learner writes there from whichever node
it runs on, and ``--resume`` or a restarted learner reads from there.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from learner.collective import LearnerGroupBroken
from learner.sharded import full_optimizer_state, full_state, peer_lost
from learner.storage import Storage, is_uri

LATEST = "latest"


def _save_optimizer(sd: dict, folder: Path) -> None:
    """An optimizer's state dict (unsharded, or a sharded one's ``full_optimizer_state``): moments by index."""
    tensors = {
        f"{idx}.{key}": (val if torch.is_tensor(val) else torch.tensor(val)).detach().cpu().contiguous()
        for idx, st in sd["state"].items()
        for key, val in st.items()
    }
    save_file(tensors, str(folder / "optimizer.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    (folder / "optimizer.json").write_text(json.dumps({"param_groups": groups}, indent=1))


def _read_optimizer(folder: Path) -> dict:
    tensors = load_file(str(folder / "optimizer.safetensors"))
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    for g in groups:
        g["betas"] = tuple(g["betas"])
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: str | Path, learner, state: dict, config: dict, gathered: dict | None = None
) -> Path | str:
    """Write the learner's weights, optimizer and ``state`` (JSON-able) under ``run_dir`` (a local folder or a storage
    URI, learner/storage.py); returns the folder (a Path, or the URI under a URI). Into an object store the folder is
    written locally, uploaded, and only then named by ``latest``. ``gathered``: a sharded learner's full tensors,
    ``{"state": the transformer's fp32 state dict, "dtype": the trained dtype, "optimizer": full_optimizer_state}``."""
    store, name = Storage(run_dir), f"v{learner.version:06d}"
    if store.local:
        folder = Path(run_dir) / "checkpoints" / name
        _write_folder(folder, learner, state, config, gathered)
    else:
        with tempfile.TemporaryDirectory(prefix="fdfo-checkpoint-") as tmp:
            store.upload(_write_folder(Path(tmp) / name, learner, state, config, gathered), f"checkpoints/{name}")
        folder = store.uri("checkpoints", name)
    store.write_text(f"checkpoints/{LATEST}", name)
    prune_checkpoints(store.uri("checkpoints"), keep=int((config.get("train") or {}).get("keep_checkpoints", 0)))
    return folder


def _write_folder(folder: Path, learner, state: dict, config: dict, gathered: dict | None = None) -> Path:
    """The checkpoint's files in the local folder ``folder`` (created); returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    tr = learner.model.transformer
    w = learner.weights()
    save_file({k: v.contiguous() for k, v in w.tensors.items()}, str(folder / "trainable.safetensors"))
    if learner.lora:
        from peft.utils import get_peft_model_state_dict

        layers = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(tr).items()}
        # the adapter config (rank, alpha, targets) rides along, so loaders use alpha / r, not a scale of 1
        meta = tr.peft_config["default"].to_dict()
        learner.model.lora_pipeline_class.save_lora_weights(  # the model's own diffusers pipeline
            str(folder), transformer_lora_layers=layers, safe_serialization=True, transformer_lora_adapter_metadata=meta
        )
    elif gathered is not None:
        _save_gathered_transformer(tr, gathered, folder / "transformer")
    else:
        tr.save_pretrained(str(folder / "transformer"), safe_serialization=True)
    _save_optimizer(gathered["optimizer"] if gathered is not None else learner.opt.state_dict(), folder)
    names = [n for n, p in tr.named_parameters() if p.requires_grad]
    masters = None  # fp32 masters of half-precision weights: exact resume
    if getattr(learner, "masters", None) is not None:
        masters = dict(zip(names, learner.masters))
    elif gathered is not None and gathered["dtype"] != torch.float32:
        masters = {n: gathered["state"][n] for n in names}  # a sharded learner's fp32 shards, gathered
    if masters is not None:
        save_file({n: m.contiguous() for n, m in masters.items()}, str(folder / "masters.safetensors"))
    meta = {"version": learner.version, "checksum": w.checksum, "state": state, "config": config}
    (folder / "state.json").write_text(json.dumps(meta, indent=1, default=str))
    return folder


def _save_gathered_transformer(tr: torch.nn.Module, gathered: dict, folder: Path) -> None:
    """A sharded transformer's ``transformer/`` as ``save_pretrained`` writes the unsharded one: its gathered state in
    the trained dtype, assigned (no copy) into an unsharded model of the same config built on the meta device."""
    dtype = gathered["dtype"]
    with torch.device("meta"):
        plain = type(tr).from_config(tr.config)  # an FSDP2 class builds the model's own class
    plain.load_state_dict(
        {k: v.to(dtype) if v.is_floating_point() else v for k, v in gathered["state"].items()}, assign=True
    )
    plain.save_pretrained(str(folder), safe_serialization=True)


def prune_checkpoints(folder: str | Path, keep: int) -> list[str]:
    """Delete all but the ``keep`` newest versioned checkpoints under ``folder`` (a local folder or a storage URI;
    0 = keep all); the one ``latest`` names and ``best`` always stay. Returns the names deleted."""
    if keep <= 0:
        return []
    store = Storage(folder)
    latest = store.read_text(LATEST).strip() if store.exists(LATEST) else None
    versions = sorted(
        (n for n in store.listdir() if re.fullmatch(r"v\d+", n) and store.is_dir(n)), key=lambda n: int(n[1:])
    )
    gone = [n for n in versions[:-keep] if n != latest]
    for n in gone:
        store.remove(n)
    return gone


def latest_checkpoint(run_dir: str | Path) -> Path | str | None:
    """The folder the ``latest`` marker names (None without a marker; a Path under a local ``run_dir``, the URI under
    a storage URI): always a versioned ``v<version>`` folder, never ``best`` (the hacking guard's copy of the
    best-scoring checkpoint, cluster/guard.py), which may be older than the run's state and so must not be resumed
    from."""
    store = Storage(run_dir)
    marker = f"checkpoints/{LATEST}"
    if not store.exists(marker):
        return None
    name = store.read_text(marker).strip()
    if not re.fullmatch(r"v\d+", name):
        newest = sorted(n for n in store.listdir("checkpoints") if re.fullmatch(r"v\d+", n))
        raise ValueError(
            f"{store.uri(marker)} names {name!r}, not a versioned checkpoint folder (v<version>): --resume "
            f"continues only from the run's newest checkpoint, never from 'best'; write "
            f"{newest[-1] if newest else 'the newest v... folder name'!r} into it"
        )
    return Path(run_dir) / "checkpoints" / name if not is_uri(run_dir) else store.uri("checkpoints", name)


def load_checkpoint(folder: str | Path, learner) -> dict:
    """Restore weights, optimizer and version into ``learner`` from a local folder or a storage URI (downloaded to a
    temporary folder first); returns the saved ``state`` dict."""
    if is_uri(folder):
        with tempfile.TemporaryDirectory(prefix="fdfo-checkpoint-") as tmp:
            return _load_folder(Storage(folder).download("", Path(tmp) / "checkpoint"), learner)
    return _load_folder(Path(folder), learner)


def _load_folder(folder: Path, learner) -> dict:
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "trainable.safetensors"))
    params = dict(learner.model.transformer.named_parameters())
    missing = set(tensors) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise ValueError(
            f"checkpoint {folder} does not match this model's trainable parameters (LoRA config?): {sorted(missing)[:3]}"
        )
    if getattr(learner, "sharding", "replicate") == "fsdp":
        _load_sharded(folder, learner, tensors)
    else:
        with torch.no_grad():
            for name, t in tensors.items():
                params[name].copy_(t)
        learner.opt.load_state_dict(_read_optimizer(folder))
    learner.version = int(meta["version"])
    if learner.weights_info()[1] != meta["checksum"]:
        raise RuntimeError(f"checkpoint {folder}: restored weights do not match the saved checksum")
    state = meta["state"]
    if getattr(learner, "masters", None) is not None and (folder / "masters.safetensors").exists():
        saved = load_file(str(folder / "masters.safetensors"))
        with torch.no_grad():
            for (n, p), m in zip(((n, p) for n, p in params.items() if p.requires_grad), learner.masters):
                m.copy_(saved[n])
        state = {**state, "_masters_loaded": True}
    return state


def _load_sharded(folder: Path, learner, tensors: dict[str, torch.Tensor]) -> None:
    """A sharded (fsdp) learner, every rank at once: each keeps its chunks of the full trainable tensors, of the fp32
    masters over them when saved (half-precision weights) and of AdamW's moments; then the group gathers what rank 0
    publishes (``Learner.gather_weights``), which the checksum check reads."""
    from learner.sharded import load_full_optimizer_state, load_full_state

    tr = learner.model.transformer
    load_full_state(tr, tensors, strict=False)
    if (folder / "masters.safetensors").exists():
        load_full_state(tr, load_file(str(folder / "masters.safetensors")), strict=False)
    load_full_optimizer_state(learner.opt, _read_optimizer(folder))
    learner.gather_weights()


class Checkpointing:
    """A ``Learner``'s checkpoint I/O (``Learner`` takes it as a base): ``save`` and ``load`` through the functions
    above, with the learner's own state (skipped steps, the fp16 loss scale, fp32 masters)."""

    def save(self, run_dir: str, state: dict, config: dict) -> str | None:
        """Checkpoint weights, optimizer and ``state`` under ``run_dir``; returns the folder. Sharded (fsdp), every
        rank calls it at once (the full weights and AdamW moments are gathered: collectives), rank 0 writes them in
        one learner's layout and returns the folder, the others None."""
        ours = {"skipped_steps": self.skipped_steps, "grad_scaler": self.scaler.state_dict()}
        gathered = None
        if self.sharding == "fsdp":
            try:
                gathered = {
                    "state": full_state(self.model.transformer, device="cpu"),
                    "dtype": self._dtype,
                    "optimizer": full_optimizer_state(self.opt),
                }
            except RuntimeError as e:
                if peer_lost(e):
                    raise LearnerGroupBroken(f"learner rank {self.rank}: a checkpoint's gather failed ({e})") from e
                raise
            if self.rank != 0:
                return None
        return str(save_checkpoint(run_dir, self, {**state, "learner": ours}, config, gathered=gathered))

    def load(self, folder: str) -> dict:
        """Restore from a checkpoint folder (of any number of ranks); returns its saved ``state``. Sharded (fsdp),
        every rank calls it at once."""
        state = dict(load_checkpoint(folder, self))
        if self.masters is not None and not state.pop("_masters_loaded", False):
            with torch.no_grad():  # a checkpoint without masters: start them from its weights
                for m, p in zip(self.masters, self.params):
                    m.copy_(p)
        ours = state.pop("learner", {})
        self.skipped_steps = int(ours.get("skipped_steps", 0))
        if ours.get("grad_scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(ours["grad_scaler"])
        return state
