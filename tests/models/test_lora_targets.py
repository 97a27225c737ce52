"""LoRA targets (ALGORITHM.md §6): the reference's ``attn.``-prefixed names adapt the joint attention of every SD3
block and leave SD3.5's second self-attention ``attn2`` alone; the bare names would adapt attn2 too."""

import re

import pytest
import torch
from diffusers import SD3Transformer2DModel

from models.lora import LORA_TARGET_MODULES, add_lora, lora_module_names

BARE = tuple(t.removeprefix("attn.") for t in LORA_TARGET_MODULES)


def transformer(num_layers: int, dual: tuple[int, ...]) -> SD3Transformer2DModel:
    """An SD3 transformer of ``num_layers`` blocks, ``dual`` of them with attn2, at toy width (2 heads x 8)."""
    torch.manual_seed(0)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=8,
        dual_attention_layers=dual,
    )


def adapted(tr: torch.nn.Module) -> list[str]:
    """The modules peft actually wrapped (they own a ``lora_A``)."""
    return sorted(n for n, m in tr.named_modules() if hasattr(m, "lora_A"))


def test_prefixed_targets_skip_attn2_in_a_dual_attention_block():
    # 2 blocks, block 0 with attn2. Block 0: to_q, to_k, to_v, to_out.0 (image side) + add_q/k/v_proj, to_add_out
    # (context side) = 8. Block 1 is the last: context_pre_only, so its attn has no to_add_out: 7. Total 15.
    # attn2 (block 0 only) has to_q, to_k, to_v, to_out.0 and no context side: the bare names add those 4 = 19.
    tr = transformer(2, dual=(0,))
    assert tr.transformer_blocks[0].attn2 is not None and tr.transformer_blocks[1].attn.to_add_out is None
    add_lora(tr, rank=2, alpha=4.0)
    names = adapted(tr)
    assert len(names) == 15 and names == sorted(lora_module_names(tr, LORA_TARGET_MODULES))
    assert not any(".attn2." in n for n in names)
    assert "transformer_blocks.0.attn.to_add_out" in names and "transformer_blocks.1.attn.to_add_out" not in names
    bare = transformer(2, dual=(0,))
    add_lora(bare, rank=2, alpha=4.0, target_modules=BARE)
    extra = sorted(set(adapted(bare)) - set(names))
    assert extra == [f"transformer_blocks.0.attn2.{m}" for m in ("to_k", "to_out.0", "to_q", "to_v")]


def test_sd35_medium_layout_gets_the_reference_module_count():
    # SD3.5 Medium: 24 blocks, attn2 in blocks 0-12. Prefixed: 23 x 8 + 7 = 191; bare: + 13 x 4 = 243 (§6).
    tr = transformer(24, dual=tuple(range(13)))
    assert len(lora_module_names(tr, LORA_TARGET_MODULES)) == 191
    assert len(lora_module_names(tr, BARE)) == 243
    add_lora(tr, rank=2, alpha=4.0)
    assert len(adapted(tr)) == 191


def test_missing_dotted_targets_are_named():
    tr = transformer(2, dual=())  # no attn2 anywhere
    msg = "LoRA target modules ['attn2.to_q', 'attn.to_qq'] are not in SD3Transformer2DModel; check lora.target_modules"
    with pytest.raises(ValueError, match=re.escape(msg)):
        add_lora(tr, target_modules=("attn.to_q", "attn2.to_q", "attn.to_out.0", "attn.to_qq"))
