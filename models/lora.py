"""Which transformer parameters train: a peft LoRA on the attention projections, or every weight.

Usage::

    is_lora = make_trainable(model.transformer, cfg.lora)   # LoRA when cfg.lora.enabled, else full weights
    tensors = trainable(model.transformer)                  # the set the learner trains and samplers load

Samplers, the learner and checkpoint loading all call ``make_trainable`` with the run's ``lora`` settings, so
the three hold the same parameter names.
"""

from __future__ import annotations

import torch

# The reference's LoRA targets: the joint-attention projections of every SD3 transformer block.
LORA_TARGET_MODULES = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
)


def add_lora(
    transformer: torch.nn.Module,
    rank: int = 32,
    alpha: float = 64.0,
    target_modules: tuple[str, ...] = LORA_TARGET_MODULES,
    init: str = "gaussian",
) -> None:
    """Attach a peft LoRA adapter (diffusers' own ``add_adapter``) and keep its parameters trainable in fp32."""
    from peft import LoraConfig

    present = {name.split(".")[-1] for name, _ in transformer.named_modules()} | {
        ".".join(name.split(".")[-2:]) for name, _ in transformer.named_modules()
    }
    missing = [t for t in target_modules if t not in present]
    if missing:
        raise ValueError(f"LoRA target modules {missing} are not in {type(transformer).__name__}; check lora.target_modules")
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(target_modules))
    )
    for name, p in transformer.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
            p.requires_grad_(True)


def make_trainable(transformer: torch.nn.Module, lora=None) -> bool:
    """Mark what trains (lora: ``LoraSettings``; None or disabled = full fine-tuning); returns True for LoRA."""
    if lora is not None and lora.enabled:
        add_lora(transformer, lora.rank, lora.alpha, tuple(lora.target_modules), lora.init)
        return True
    transformer.requires_grad_(True)
    return False


def trainable(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The broadcast set by name, as views of the live parameters (no copy)."""
    return {n: p.detach() for n, p in transformer.named_parameters() if p.requires_grad}
