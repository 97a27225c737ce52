"""FLUX.1 (dev and schnell) as a ``FlowModel``, through the components of a diffusers ``FluxPipeline``.

Usage::

    model = FluxAdapter.from_pretrained("black-forest-labs/FLUX.1-dev", device="cuda")    # or FLUX.1-schnell
    cond = model.encode_prompts(["a cat"])                  # T5 tokens [B, L, 4096], CLIP-L pooled [B, 768]
    v = model.velocity(x, sigma, cond, guidance_scale=3.5)  # x: [B, 16, H/8, W/8] -> v of the same shape

What FLUX does differently from SD3, and where it stays:
- **Packed latents.** The transformer reads 2x2 latent patches as tokens ``[B, (h/2)(w/2), 4C]`` with their
  positions ``img_ids`` (and ``txt_ids``, all zero, for the text tokens). Outside this adapter latents travel
  unpacked, ``[B, C, h, w]`` (``latent_shape``), as the pipeline draws its start noise; packing is a lossless
  permutation, so the churn step, the pair signal and the loss (all element-wise or means over elements) are the
  same in either layout, and the start noise of a seed is the pipeline's own.
- **Guidance.** FLUX.1-dev is guidance-distilled: ``guidance_scale`` is a transformer input (``guidance``
  = "embedded", one forward per velocity; the pipeline's default 3.5). FLUX.1-schnell has no guidance input:
  ``guidance_scale`` != 1 is then classifier-free guidance against the empty prompt, as for SD3 ("cfg").
- **Sigma schedule.** The pipeline's: sigmas ``linspace(1, 1/N, N)`` shifted by the scheduler with FLUX.1-dev's
  resolution-dependent ``mu`` (``calculate_shift`` of the image token count), then 0 appended.
- **Timesteps** reach the transformer as the pipeline passes them, ``(1000 sigma) / 1000`` in float32 (the
  transformer scales them by 1000 itself), so the velocity is the pipeline's own to the bit in float32.
- **Decoding** unpacked latents through FLUX's VAE normalisation (``x / 0.3611 + 0.1159`` for FLUX.1), as the
  pipeline's ``output_type="pt"`` does.
- **LoRA** is saved and loaded by ``FluxPipeline`` (``lora_pipeline_class``); the reference's ``attn.``-prefixed
  targets exist in FLUX's blocks: all eight in each of the 19 double-stream blocks, ``attn.to_q/k/v`` in each of
  the 38 single-stream blocks (their output projection ``proj_out`` lies outside ``attn``): 266 modules on FLUX.1.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from models.adapter import (
    NO_VAE,
    PromptEmbeds,
    component_placement,
    encoder_device,
    encoders_loaded,
    guided_velocity,
    load_pipeline,
    place_for_learner,
    vae_decode,
)
from models.device import attention, checkpoint_function, to_device


class FluxAdapter:
    """FLUX.1 through a ``FluxPipeline``'s components: CLIP-L pooled + T5 tokens (the pipeline's ``encode_prompt``),
    the ``FluxTransformer2DModel`` on packed latents, the pipeline's schedule and VAE decoding."""

    learner_encoders, vae_released, encoder_moves, _encoders_in = "device", False, 0, False  # a sampler's placement

    attention = "auto"  # model.attention (cluster.build.build_model sets it): the SDPA backend of transformer calls

    def __init__(
        self,
        pipe,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
    ):
        self.pipe = pipe
        self.device = torch.device(device)
        self.dtype = dtype
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(
                f"FLUX's T5 takes 1 to 512 prompt tokens; model.max_sequence_length is {max_sequence_length}"
            )
        self.max_sequence_length = max_sequence_length
        pipe.to(self.device)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.vae, pipe.transformer):
            module.requires_grad_(False)
            module.eval()
        self.transformer = pipe.transformer
        cfg = pipe.transformer.config
        self.guidance = "embedded" if cfg.guidance_embeds else "cfg"
        multiple = 2 * pipe.vae_scale_factor  # VAE downsampling x the 2x2 packing
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or height
        if height % multiple or width % multiple:
            raise ValueError(
                f"image size {height}x{width} must be a multiple of 2 * vae_scale_factor = {multiple} "
                f"(FLUX packs 2x2 latent patches); pick e.g. {height - height % multiple or multiple}"
            )
        self.image_size = (height, width)
        self.latent_shape = (cfg.in_channels // 4, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
        self._empty: PromptEmbeds | None = None
        self._img_ids: dict[tuple, torch.Tensor] = {}  # the pipeline's img_ids by (h, w, dtype), made once

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        resolution: int = 512,
        max_sequence_length: int = 512,
    ) -> "FluxAdapter":
        """Load FLUX.1 from a hub id (``black-forest-labs/FLUX.1-dev`` or ``black-forest-labs/FLUX.1-schnell``) or a
        local ``FluxPipeline`` folder; T5 prompts are cut at ``max_sequence_length`` tokens (the pipeline's 512)."""
        from diffusers import FluxPipeline

        pipe = load_pipeline(FluxPipeline, path, dtype)
        return cls(pipe, device, dtype, resolution, resolution, max_sequence_length)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, **pipeline_kwargs) -> "FluxAdapter":
        """The offline random-weight FLUX (32x32 images) of tests and the ``tiny-flux`` preset; ``pipeline_kwargs`` go
        to ``tiny_flux_pipeline`` (``guidance_embeds=False``: schnell's layout)."""
        from models.tiny import MAX_TOKENS, tiny_flux_pipeline

        pipe = tiny_flux_pipeline(seed, **pipeline_kwargs)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return cls(pipe, "cpu", dtype, 32, 32, max_sequence_length=MAX_TOKENS)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """T5 tokens [B, max_sequence_length, D] (padded to that length: FLUX attends to every token, as its
        pipeline does) and CLIP-L's pooled output [B, P], on the model's device in its dtype, encoded where
        ``learner_encoders`` says (``models.adapter.encoders_loaded``)."""
        with encoders_loaded(self):
            tokens, pooled, _ = self.pipe.encode_prompt(
                prompt=list(prompts),
                prompt_2=None,
                device=encoder_device(self),
                max_sequence_length=self.max_sequence_length,
            )
        return PromptEmbeds(tokens.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    def _transformer_out(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance: float | None = None
    ) -> torch.Tensor:
        """The transformer on x [B, C, h, w] packed to [B, hw/4, 4C]; its output unpacked to [B, C, h, w]."""
        B, C, h, w = x.shape
        pipe = self.pipe
        # as in SD3Adapter: under autocast x enters as given, without it in the weights' dtype
        x = x if torch.is_autocast_enabled(self.device.type) else x.to(self.dtype)
        packed = pipe._pack_latents(x.contiguous(), B, C, h, w)
        timestep = (to_device(sigma.float(), self.device) * 1000.0).expand(B) / 1000.0
        g = None if guidance is None else torch.full([B], guidance, device=self.device, dtype=torch.float32)
        with attention(self.attention):
            out = self.transformer(
                hidden_states=packed,
                timestep=timestep,
                guidance=g,
                pooled_projections=cond.pooled,
                encoder_hidden_states=cond.tokens,
                txt_ids=torch.zeros(cond.tokens.shape[1], 3, device=self.device, dtype=cond.tokens.dtype),
                img_ids=self._image_ids(h, w, cond.tokens.dtype),
                return_dict=False,
            )[0]
        return pipe._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor)

    def _image_ids(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """The pipeline's ``img_ids`` [(h/2)(w/2), 3] of an h x w latent (the same for any batch), made once per size:
        the pipeline builds them on the CPU, and a copy to the GPU at every call would wait for the GPU."""
        key = (h, w, dtype)
        if key not in self._img_ids:
            self._img_ids[key] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, dtype)
        return self._img_ids[key]

    def velocity(
        self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds, guidance_scale: float = 1.0
    ) -> torch.Tensor:
        """v(x, sigma | prompt) for x: [B, C, h, w]; sigma: scalar or [B]; ``guidance_scale``: FLUX.1-dev's embedded
        guidance, or CFG for a model without a guidance input (1.0 = none). Returns float32 [B, C, h, w]."""
        return guided_velocity(self, x, sigma, cond, guidance_scale)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The pipeline's schedule at this resolution: [num_steps + 1] floats from 1 down to 0."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipe.scheduler
        conf = scheduler.config
        _, h, w = self.latent_shape
        mu = calculate_shift(
            (h // 2) * (w // 2),
            conf.get("base_image_seq_len", 256),
            conf.get("max_image_seq_len", 4096),
            conf.get("base_shift", 0.5),
            conf.get("max_shift", 1.15),
        )
        sigmas = None if conf.get("use_flow_sigmas") else np.linspace(1.0, 1 / num_steps, num_steps)
        retrieve_timesteps(scheduler, num_steps, "cpu", sigmas=sigmas, mu=mu)
        return scheduler.sigmas.detach().clone().float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1]; a learner's model has no VAE
        (raises)."""
        if self.vae_released:
            raise RuntimeError(NO_VAE)
        return vae_decode(self.pipe.vae, latents, self.device, self.dtype)

    def for_learner(self, encoders: str = "offload", device: str | torch.device | None = None) -> "FluxAdapter":
        """This model placed for a learner (``models.adapter.place_for_learner``): the transformer on ``device``, CLIP
        and T5 where ``encoders`` says (``model.learner_encoders``), the VAE released. Returns self."""
        place_for_learner(self, encoders, device)
        return self

    def placement(self) -> dict[str, str]:
        """Where each component lives (``models.adapter.component_placement``)."""
        return component_placement(self)

    def pack(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] -> the pipeline's packed layout [B, hw/4, 4C] (e.g. its ``latents=`` argument)."""
        B, C, h, w = latents.shape
        return self.pipe._pack_latents(latents, B, C, h, w)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """The pipeline's packed [B, hw/4, 4C] (e.g. its ``output_type="latent"``) -> [B, C, h, w]."""
        H, W = self.image_size
        return self.pipe._unpack_latents(packed, H, W, self.pipe.vae_scale_factor)

    @property
    def lora_pipeline_class(self) -> type:
        """``FluxPipeline``: writes the LoRA checkpoints and loads them back (``load_lora_weights``)."""
        return type(self.pipe)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations in the backward pass (FLUX LoRA needs it to fit a GPU); forward
        values, and so v_theta, are unchanged (the recompute runs under the forward's SDPA backend)."""
        self.transformer.enable_gradient_checkpointing(checkpoint_function(self))
