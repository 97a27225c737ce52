"""Which transformer parameters train: a peft LoRA on the attention projections, or every weight; and the weights a
run starts from (``lora.init_from``).

Usage::

    is_lora = make_trainable(model.transformer, cfg.lora)   # LoRA when cfg.lora.enabled, else full weights;
                                                            # then cfg.lora.init_from's weights, if set
    tensors = trainable(model.transformer)                  # the set the learner trains and samplers load

Samplers, the learner, evaluation and checkpoint loading all call ``make_trainable`` with the run's ``lora``
settings, so all of them hold the same parameter names and start from the same weights.

``lora.init_from`` is a PEFT LoRA folder (what peft's ``save_pretrained`` writes: ``adapter_config.json`` +
``adapter_model.safetensors``, e.g. the authors' released checkpoints), an fdfo checkpoint folder (``state.json`` +
``trainable.safetensors``) or run folder (its latest checkpoint), or a hub folder: ``owner/name/sub/folder``,
``hf:owner/name/sub/folder`` or ``https://huggingface.co/owner/name/tree/<revision>/sub/folder``, downloaded once
with ``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

# The reference's LoRA targets: the joint-attention projections of every SD3 transformer block. The ``attn.`` prefix
# keeps the second self-attention ``attn2`` of SD3.5's dual-attention blocks (blocks 0-12 of SD3.5 Medium) out:
# 191 modules on SD3.5 Medium, where the bare names would match 243 (ALGORITHM.md §6).
LORA_TARGET_MODULES = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_HUB = re.compile(
    r"(?:hf:|https://huggingface\.co/)?(?P<repo>[\w.-]+/[\w.-]+)(?:/tree/(?P<rev>[^/]+))?(?P<sub>(?:/[^/]+)*)/?"
)


def target_matches(module_name: str, target: str) -> bool:
    """peft's rule for a list of targets: the module's dotted name is the target or ends with ``.<target>``."""
    return module_name == target or module_name.endswith("." + target)


def lora_module_names(transformer: torch.nn.Module, target_modules=LORA_TARGET_MODULES) -> list[str]:
    """The modules a LoRA with ``target_modules`` adapts (peft's matching), in module order."""
    return [n for n, _ in transformer.named_modules() if n and any(target_matches(n, t) for t in target_modules)]


def add_lora(
    transformer: torch.nn.Module,
    rank: int = 32,
    alpha: float = 64.0,
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES,
    init: str = "gaussian",
) -> None:
    """Attach a peft LoRA adapter (diffusers' own ``add_adapter``) and keep its parameters trainable in fp32."""
    from peft import LoraConfig

    names = [n for n, _ in transformer.named_modules() if n]
    missing = [t for t in target_modules if not any(target_matches(n, t) for n in names)]
    if missing:
        raise ValueError(
            f"LoRA target modules {missing} are not in {type(transformer).__name__}; check lora.target_modules"
        )
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    )
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def make_trainable(transformer: torch.nn.Module, lora=None) -> bool:
    """Mark what trains (lora: ``LoraSettings``; None or disabled = full fine-tuning), then load
    ``lora.init_from`` into it when set; returns True for LoRA."""
    is_lora = lora is not None and lora.enabled
    if is_lora:
        add_lora(transformer, lora.rank, lora.alpha, tuple(lora.target_modules), lora.init)
    else:
        transformer.requires_grad_(True)
    if lora is not None and getattr(lora, "init_from", None):
        load_init(transformer, lora)
    return is_lora


def trainable(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The broadcast set by name, as views of the live parameters (no copy)."""
    return {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad}


# -- lora.init_from ------------------------------------------------------------------------------------------------
def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def check_init_from(source: str) -> None:
    """Fail fast (before any model loads) on a local ``lora.init_from`` that is not a loadable folder; a hub id is
    only checked for its form (downloading is left to the roles)."""
    if _looks_local(source):
        _local_init_folder(source)
    elif not _HUB.fullmatch(source):
        raise ValueError(
            f"lora.init_from={source!r} is neither a local folder nor a hub folder such as "
            "nvidia/finite-difference-flow-optimization/fdfo-combined-reward-no-cfg/epoch-0000100"
        )


def _local_init_folder(source: str) -> Path:
    """A local PEFT folder, fdfo checkpoint folder or fdfo run folder (-> its latest checkpoint)."""
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"lora.init_from={source!r} is not a folder; give a PEFT LoRA folder ({PEFT_CONFIG} + "
            f"{PEFT_WEIGHTS}), an fdfo checkpoint or run folder, or a hub folder"
        )
    marker = folder / "checkpoints" / "latest"
    if marker.is_file():  # an fdfo run folder: its latest checkpoint
        folder = marker.parent / marker.read_text().strip()
    if not ((folder / PEFT_CONFIG).is_file() or (folder / "state.json").is_file()):
        raise FileNotFoundError(
            f"lora.init_from={source!r}: {folder} holds neither {PEFT_CONFIG} (a PEFT LoRA) nor "
            "state.json (an fdfo checkpoint); point it at the folder that holds one of them"
        )
    return folder


def resolve_init_from(source: str) -> Path:
    """``lora.init_from`` -> the local folder to load (downloading a hub folder first)."""
    if _looks_local(source):
        return _local_init_folder(source)
    m = _HUB.fullmatch(source)
    if m is None:
        check_init_from(source)  # raises, naming the accepted forms
    import huggingface_hub

    sub = m["sub"].strip("/")
    try:
        root = huggingface_hub.snapshot_download(
            repo_id=m["repo"], revision=m["rev"] or "main", allow_patterns=[f"{sub}/*"] if sub else None
        )
    except Exception as e:  # noqa: BLE001 - the hub client raises many types; all mean "not downloadable"
        raise FileNotFoundError(
            f"lora.init_from={source!r}: downloading {m['repo']} from the hub failed ({e}); "
            "download it yourself and give the local folder"
        ) from e
    return _local_init_folder(str(Path(root, *sub.split("/")) if sub else Path(root)))


def load_init(transformer: torch.nn.Module, lora) -> None:
    """Copy the weights of ``lora.init_from`` into the trainable parameters of ``transformer`` (after
    ``make_trainable``'s LoRA or full-weight marking), checking that they describe the same adapter."""
    folder = resolve_init_from(lora.init_from)
    if (folder / PEFT_CONFIG).is_file():
        tensors = _peft_tensors(folder, lora)
    else:
        tensors = _fdfo_tensors(folder, lora)
    params = {n: p for n, p in transformer.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ValueError(
            f"lora.init_from={lora.init_from!r} ({folder}) does not fit this model's trainable parameters: "
            f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. "
            f"{unexpected[:2]}); check model.path and lora.target_modules"
        )
    with torch.no_grad():
        for name, t in tensors.items():
            if t.shape != params[name].shape:
                raise ValueError(
                    f"lora.init_from: {name} has shape {tuple(t.shape)}, the model's is "
                    f"{tuple(params[name].shape)}; check lora.rank and model.path"
                )
            params[name].copy_(t)


def _check_same(source: str, found: dict, lora) -> None:
    """found: {setting: value in the saved adapter} against the run's ``lora`` settings; names the first mismatch."""
    ours = {"rank": lora.rank, "alpha": float(lora.alpha), "target_modules": sorted(lora.target_modules)}
    shown = lambda v: "[" + ",".join(v) + "]" if isinstance(v, list) else v  # noqa: E731 - as an override is written
    for key, value in found.items():
        if value != ours[key]:
            raise ValueError(
                f"lora.init_from={source!r} was trained with lora.{key}={shown(value)} but this run has "
                f"lora.{key}={shown(ours[key])}; set lora.{key}={shown(value)} (an override or the preset) "
                "to load it"
            )


def _peft_tensors(folder: Path, lora) -> dict[str, torch.Tensor]:
    """A PEFT LoRA folder -> tensors named as this model's parameters (``base_model.model.<m>.lora_A.weight`` or
    diffusers' ``transformer.<m>.lora_A.weight`` -> ``<m>.lora_A.default.weight``)."""
    from safetensors.torch import load_file

    if not lora.enabled:
        raise ValueError(f"lora.init_from={lora.init_from!r} is a PEFT LoRA; it needs lora.enabled=true")
    conf = json.loads((folder / PEFT_CONFIG).read_text())
    if conf.get("peft_type", "LORA") != "LORA" or conf.get("use_dora") or conf.get("use_rslora"):
        raise ValueError(
            f"lora.init_from={lora.init_from!r}: {folder / PEFT_CONFIG} is not a plain LoRA "
            f"(peft_type={conf.get('peft_type')}, use_dora={conf.get('use_dora')}, "
            f"use_rslora={conf.get('use_rslora')}); only plain LoRA adapters load"
        )
    if conf.get("rank_pattern") or conf.get("alpha_pattern"):
        raise ValueError(f"lora.init_from={lora.init_from!r}: per-module rank_pattern/alpha_pattern are not supported")
    targets = conf.get("target_modules")
    if not isinstance(targets, list):
        raise ValueError(
            f"lora.init_from={lora.init_from!r}: target_modules {targets!r} in {PEFT_CONFIG} is not a list "
            "of module names; only adapters saved with a list of targets load"
        )
    _check_same(
        lora.init_from, {"rank": conf["r"], "alpha": float(conf["lora_alpha"]), "target_modules": sorted(targets)}, lora
    )
    if not (folder / PEFT_WEIGHTS).is_file():
        raise FileNotFoundError(f"lora.init_from={lora.init_from!r}: {folder} has {PEFT_CONFIG} but no {PEFT_WEIGHTS}")
    out = {}
    for key, t in load_file(str(folder / PEFT_WEIGHTS)).items():
        name = re.sub(r"^(base_model\.model\.|transformer\.)", "", key)
        out[re.sub(r"\.(lora_[A-Za-z]+)\.", r".\1.default.", name, count=1)] = t
    return out


def _fdfo_tensors(folder: Path, lora) -> dict[str, torch.Tensor]:
    """An fdfo checkpoint folder -> its trainable tensors (already named as the parameters), after checking that
    the checkpoint's LoRA settings are this run's."""
    from safetensors.torch import load_file

    saved = json.loads((folder / "state.json").read_text()).get("config", {}).get("lora", {})
    if bool(saved.get("enabled", True)) != bool(lora.enabled):
        raise ValueError(
            f"lora.init_from={lora.init_from!r} is a checkpoint with lora.enabled={saved.get('enabled')} "
            f"but this run has lora.enabled={lora.enabled}; set lora.enabled={saved.get('enabled')}"
        )
    if lora.enabled:
        _check_same(
            lora.init_from,
            {
                "rank": saved.get("rank"),
                "alpha": float(saved.get("alpha", "nan")),
                "target_modules": sorted(saved.get("target_modules", [])),
            },
            lora,
        )
    return load_file(str(folder / "trainable.safetensors"))
