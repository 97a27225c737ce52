"""Tiny random-weight Stable Diffusion 3 and FLUX.1 components, built offline.

The classes are the real ones a GPU run loads with ``from_pretrained`` (``SD3Transformer2DModel``,
``AutoencoderKL``, two ``CLIPTextModelWithProjection``, ``T5EncoderModel``, their tokenizers and the
``FlowMatchEulerDiscreteScheduler``); only the configs are small and the weights random, so tests and the
CPU default exercise the same code path in seconds without a network.

Usage: ``pipe = tiny_sd3_pipeline(seed=0)`` -> a ``StableDiffusion3Pipeline`` producing 32x32 images;
``pipe = tiny_flux_pipeline(seed=0)`` -> a ``FluxPipeline`` (``FluxTransformer2DModel``, ``AutoencoderKL``,
``CLIPTextModel``, ``T5EncoderModel``) producing 32x32 images, guidance embedded like FLUX.1-dev (or not, like
FLUX.1-schnell, with ``guidance_embeds=False``).
"""

from __future__ import annotations

import string

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

# Sizes chosen so that every tensor contract of the real SD3.5 pipeline holds:
# CLIP-L and CLIP-G hidden states (32 + 32) are padded up to the T5 width (joint_attention_dim = 64),
# pooled projections concatenate to 2 * 32 = 64, and the transformer's inner dim (2 heads * 8) equals
# caption_projection_dim. The VAE has two blocks: one 2x downsampling, 16 latent channels like SD3.
CLIP_HIDDEN = 32
T5_D_MODEL = 64
LATENT_CHANNELS = 16
LATENT_SIZE = 16  # -> 32x32 images through the 2x VAE
MAX_TOKENS = 32


def _clip_tokenizer() -> CLIPTokenizer:
    """A byte-level-free CLIP BPE tokenizer over printable characters, from Python data.

    Each printable character is a token, with and without the end-of-word marker; no merges.
    """
    chars = [c for c in string.printable if not c.isspace()]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS)


def _t5_tokenizer() -> T5Tokenizer:
    """A unigram T5 tokenizer over single characters, from Python data."""
    chars = [c for c in string.printable if not c.isspace()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(c, -2.0) for c in chars] + [("\u2581" + c, -1.5) for c in chars]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TOKENS)


def _clip_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=CLIP_HIDDEN,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
    )


def _t5_encoder(vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=T5_D_MODEL,
            d_ff=64,
            d_kv=16,
            num_layers=1,
            num_heads=2,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _vae(shift_factor: float, scaling_factor: float) -> AutoencoderKL:
    """Two blocks (one 2x downsampling), 16 latent channels like SD3's and FLUX's VAEs, no quant convs."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def tiny_sd3_pipeline(
    seed: int = 0, shift: float = 3.0, num_layers: int = 2, dual_attention_layers: tuple[int, ...] = ()
) -> StableDiffusion3Pipeline:
    """Build a random-weight SD3 pipeline (about 0.5 M parameters) deterministically from ``seed``.
    ``dual_attention_layers``: the blocks with SD3.5's second self-attention ``attn2`` (SD3.5 Medium: 0-12)."""
    torch.manual_seed(seed)
    clip_tok = _clip_tokenizer()
    text_encoder = CLIPTextModelWithProjection(_clip_config(len(clip_tok)))
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config(len(clip_tok)))
    t5_tok = _t5_tokenizer()
    text_encoder_3 = _t5_encoder(len(t5_tok))
    transformer = SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=num_layers,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=16,
        pooled_projection_dim=2 * CLIP_HIDDEN,
        pos_embed_max_size=LATENT_SIZE,
        dual_attention_layers=tuple(dual_attention_layers),
    )
    vae = _vae(shift_factor=0.0609, scaling_factor=1.5305)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tok,
    )


# FLUX.1-dev's scheduler settings: a resolution-dependent shift mu between base_shift at 256 image tokens and max_shift
# at 4096 (FLUX.1-schnell: no dynamic shifting, shift 1.0)
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
FLUX_SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)


def tiny_flux_pipeline(
    seed: int = 0, guidance_embeds: bool = True, num_layers: int = 1, num_single_layers: int = 1
) -> FluxPipeline:
    """Build a random-weight FLUX.1 pipeline deterministically from ``seed``: 32x32 images, 16x16x16 latents packed
    into 8x8 = 64 tokens of 2x2x16 = 64 values. CLIP-L's pooled output (32) is ``pooled_projection_dim``, T5's width
    (64) ``joint_attention_dim``; the rotary axes (4 + 6 + 6) add up to the head dim 16. ``guidance_embeds``:
    FLUX.1-dev's embedded guidance (True) or FLUX.1-schnell's none (False, with schnell's scheduler)."""
    torch.manual_seed(seed)
    clip_tok, t5_tok = _clip_tokenizer(), _t5_tokenizer()
    text_encoder = CLIPTextModel(_clip_config(len(clip_tok)))
    text_encoder_2 = _t5_encoder(len(t5_tok))
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = _vae(shift_factor=0.1159, scaling_factor=0.3611)  # FLUX.1's VAE normalisation
    scheduler = FlowMatchEulerDiscreteScheduler(**(FLUX_DEV_SCHEDULER if guidance_embeds else FLUX_SCHNELL_SCHEDULER))
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )
