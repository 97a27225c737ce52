"""Model adapter: the small contract FDFO needs from a diffusers flow-matching text-to-image model.

Usage::

    model = SD3Adapter.from_pretrained("stabilityai/stable-diffusion-3.5-medium", device="cuda")
    cond = model.encode_prompts(["a cat"])
    v = model.velocity(x, sigma, cond, guidance_scale=1.0)

Any model that provides the ``FlowModel`` members works with the sampler and learner (compose, don't
inherit): SD3 / SD3.5 is implemented here, FLUX.1 in ``models.flux``. What differs between models stays inside
its adapter: how prompts are encoded (``PromptEmbeds``: pooled embedding, mask and extras optional), what
``guidance_scale`` means (CFG against the empty prompt, or FLUX-dev's embedded guidance), the sigma schedule (the
model's own scheduler, FLUX's resolution-dependent shift ``mu`` included), how latents are laid out for the
transformer (FLUX packs 2x2 patches) and decoded, and which diffusers pipeline class writes and reads its LoRA.

Conventions (SD3's): ``sigma`` runs from 1 (noise) to 0 (data); the model's velocity is
``v ~ noise - data``; an Euler step from sigma t to s is ``x + (s - t) * v``. Latents travel as
``[B, C, H, W]`` (``latent_shape``) everywhere outside the adapter.
"""

from __future__ import annotations

import collections
import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from models.device import attention, checkpoint_function, to_device


@dataclass
class PromptEmbeds:
    """Text conditioning for a batch of B prompts; every tensor it holds has the batch first.

    tokens: [B, L, D] per-token embeddings; pooled: [B, P] pooled embedding (None for a model without one);
    mask: [B, L] attention mask, 1 = a real token (None = every token attends); extras: model-specific tensors
    [B, ...] by name (an adapter reads its own keys).
    """

    tokens: torch.Tensor
    pooled: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "PromptEmbeds":
        """``fn`` applied to every tensor held (each has the batch first); absent fields stay absent."""
        opt = lambda t: None if t is None else fn(t)  # noqa: E731
        return PromptEmbeds(
            fn(self.tokens), opt(self.pooled), opt(self.mask), {k: fn(v) for k, v in self.extras.items()}
        )

    def index(self, idx: torch.Tensor | slice | list[int]) -> "PromptEmbeds":
        return self.map(lambda t: t[idx])

    def repeat(self, n: int) -> "PromptEmbeds":
        """Each prompt repeated n times in place: [p0, p0, p1, p1, ...] for n = 2."""
        return self.map(lambda t: t.repeat_interleave(n, 0))

    def expand(self, n: int) -> "PromptEmbeds":
        """A batch of one prompt seen as n rows (a view, no copy)."""
        return self.map(lambda t: t.expand(n, *t.shape[1:]))

    def to(self, device: torch.device | str) -> "PromptEmbeds":
        """On ``device`` (host to CUDA through pinned memory, without a host sync: ``models.device.to_device``)."""
        return self.map(lambda t: to_device(t, device))

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        """The batches of ``parts`` joined in order. They must hold the same fields at the same token length (an
        adapter pads its prompts to a fixed length, so that any prompts can share a batch)."""
        first = parts[0]
        for p in parts[1:]:
            if p.tokens.shape[1:] != first.tokens.shape[1:]:
                raise ValueError(
                    f"prompt embeddings of shapes {tuple(first.tokens.shape[1:])} and "
                    f"{tuple(p.tokens.shape[1:])} cannot share a batch: the adapter must pad every prompt "
                    "to one length (its max_sequence_length)"
                )
            if (p.pooled is None, p.mask is None, sorted(p.extras)) != (
                first.pooled is None,
                first.mask is None,
                sorted(first.extras),
            ):
                raise ValueError("prompt embeddings with different fields (pooled, mask, extras) cannot share a batch")
        join = lambda get: None if get(first) is None else torch.cat([get(p) for p in parts])  # noqa: E731
        return PromptEmbeds(
            join(lambda p: p.tokens),
            join(lambda p: p.pooled),
            join(lambda p: p.mask),
            {k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        )


class PromptCache:
    """Prompt embeddings by prompt text, each prompt encoded on its own (a batch of one), so that a prompt's embedding
    is the same bits wherever it is encoded: the sampler's recorded v and the learner's v_theta see the same
    conditioning (a batch of several prompts can round differently). Kept on the CPU, the ``max_prompts`` most
    recently used; what a call returns is on the model's device.

        prompts = PromptCache(model)
        cond = prompts(["a cat", "a dog", "a cat"])           # PromptEmbeds [3, ...]
    """

    def __init__(self, model: "FlowModel", max_prompts: int = 512):
        self.model, self.max_prompts = model, max_prompts
        self._cache: collections.OrderedDict[str, PromptEmbeds] = collections.OrderedDict()

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        return PromptEmbeds.cat(self._rows(prompts)).to(self.model.device)

    def prefetch(self, prompts: Sequence[str]) -> None:
        """Encode the prompts not yet cached (the first ``max_prompts`` distinct ones) in one window of the text
        encoders: an offloaded encoder (``model.learner_encoders``) then moves to the GPU once for an epoch's new
        prompts, not once for each micro-batch that meets one."""
        self._rows(list(dict.fromkeys(prompts))[: self.max_prompts])

    def _rows(self, prompts: Sequence[str]) -> list[PromptEmbeds]:
        """Each prompt's embedding (on the CPU), the misses encoded one by one inside one ``encoders_loaded``
        window; the cache then holds the ``max_prompts`` most recently used."""
        distinct = list(dict.fromkeys(prompts))
        got = {p: self._cache[p] for p in distinct if p in self._cache}
        missing = [p for p in distinct if p not in got]
        if missing:
            with encoders_loaded(self.model):
                got.update({p: self.model.encode_prompts([p]).to("cpu") for p in missing})
        for p in prompts:
            self._cache[p] = got[p]
            self._cache.move_to_end(p)
            while len(self._cache) > self.max_prompts:
                self._cache.popitem(last=False)
        return [got[p] for p in prompts]


class FlowModel(Protocol):
    """What the sampler, the learner and checkpoints use of a flow-matching text-to-image model."""

    transformer: torch.nn.Module  # the velocity network; the only module FDFO trains
    device: torch.device
    latent_shape: tuple[int, int, int]  # (C, H, W) of one latent, as the sampler and the Arrow batch hold it
    guidance: str  # what velocity's guidance_scale means: "cfg" (1.0 = none) or "embedded" (FLUX-dev's input)
    attention: str  # model.attention: the SDPA backend every transformer call runs under ("auto": torch's choice)

    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds: ...

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor: ...

    def sigmas(self, num_steps: int) -> torch.Tensor: ...

    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...

    @property
    def lora_pipeline_class(self) -> type: ...  # the diffusers pipeline whose save/load_lora_weights fit this model

    def enable_gradient_checkpointing(self) -> None: ...  # the learner's train.gradient_checkpointing


def cfg_velocity(
    forward: Callable[[torch.Tensor, torch.Tensor, PromptEmbeds], torch.Tensor],
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: PromptEmbeds,
    empty: PromptEmbeds,
    guidance_scale: float,
) -> torch.Tensor:
    """Classifier-free guidance ``v_neg + w * (v_pos - v_neg)`` with ``empty`` (the empty prompt, a batch of one) as
    the negative: both halves run as one batch of 2B through ``forward(x, sigma, cond)``. Combined in the dtype the
    transformer computed in (fp16 under the reference's autocast), as the reference does: a v recorded in that dtype
    is then exactly the v the sampler stepped with. Returns float32."""
    both = PromptEmbeds.cat([empty.expand(len(cond)), cond])
    sigma2 = sigma.expand(x.shape[0]).repeat(2) if sigma.ndim else sigma
    v_neg, v_pos = forward(torch.cat([x, x]), sigma2, both).chunk(2)
    return (v_neg + guidance_scale * (v_pos - v_neg)).float()


def guided_velocity(model, x: torch.Tensor, sigma, cond: PromptEmbeds, guidance_scale: float) -> torch.Tensor:
    """An adapter's velocity under its kind of guidance (``model.guidance``): the transformer's own input
    ("embedded", FLUX.1-dev), none (w = 1), or CFG against the empty prompt (encoded once, kept on the adapter as
    ``_empty``); ``model._transformer_out(x, sigma, cond[, guidance])`` is one transformer call. Returns float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    if model.guidance == "embedded":
        return model._transformer_out(x, sigma, cond, float(guidance_scale)).float()
    if guidance_scale == 1.0:
        return model._transformer_out(x, sigma, cond).float()
    if model._empty is None:
        model._empty = model.encode_prompts([""])
    return cfg_velocity(model._transformer_out, x, sigma, cond, model._empty, guidance_scale)


@torch.no_grad()
def vae_decode(vae, latents: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Normalised latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1] through the VAE's own latent
    normalisation (``x / scaling_factor + shift_factor``), as SD3's and FLUX's pipelines decode; ``vae=None`` is a
    pixel-space model whose latents are images in [-1, 1]."""
    if vae is None:
        return (latents.float() / 2 + 0.5).clamp(0, 1)
    z = latents.to(device, dtype) / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(z, return_dict=False)[0]
    return (images.float() / 2 + 0.5).clamp(0, 1)


# -- the learner's placement: what a learner does not need stays off its GPU ------------------------------------
# An adapter holds ``learner_encoders`` (where its text encoders live: "device" for samplers and evaluation),
# ``vae_released`` and ``encoder_moves`` (offload windows opened: host -> device copies of the encoders); the class
# defaults below are a sampler's, ``place_for_learner`` sets the learner's on the instance.
LEARNER_ENCODERS = ("device", "offload", "cpu")  # model.learner_encoders (cluster/config.py)
NO_VAE = (
    "the learner's model has no VAE: build_model(model_cfg, role='learner') released it (the learner never "
    "decodes); decode with a sampler's or evaluation's model, built by build_model(model_cfg)"
)


def text_encoders(model) -> dict[str, object]:
    """The model's prompt encoders by name: its pipeline's CLIP / T5 modules, and a ``prompt_encoder`` that can move
    (has ``to`` and ``device``, as the shapes task's MiniLM); a plain callable stays where it is and is not listed."""
    pipe = model.pipe
    out = {
        n: getattr(pipe, n)
        for n in ("text_encoder", "text_encoder_2", "text_encoder_3")
        if getattr(pipe, n, None) is not None
    }
    encoder = getattr(model, "prompt_encoder", None)
    if hasattr(encoder, "to") and hasattr(encoder, "device"):
        out["prompt_encoder"] = encoder
    return out


def encoder_device(model) -> torch.device:
    """Where an encode call runs: the CPU for ``learner_encoders="cpu"``, else the model's device."""
    return torch.device("cpu") if getattr(model, "learner_encoders", "device") == "cpu" else model.device


@contextlib.contextmanager
def encoders_loaded(model):
    """The text encoders on the device for the duration, when the model offloads them (``learner_encoders`` =
    "offload"): moved there on entry (``encoder_moves`` counts it) and back to the CPU on exit; a nested window and
    every other placement (or a model without one) move nothing."""
    if getattr(model, "learner_encoders", "device") != "offload" or model._encoders_in:
        yield
        return
    encoders = text_encoders(model).values()
    model._encoders_in = True
    model.encoder_moves += 1
    try:
        for e in encoders:
            e.to(model.device)
        yield
    finally:
        for e in encoders:
            e.to("cpu")
        model._encoders_in = False


def place_for_learner(model, encoders: str, device: str | torch.device | None = None) -> None:
    """The learner's placement of ``model``: the transformer on ``device`` (None: where it is; the model's
    ``device`` follows), the text encoders on it (``encoders`` = "device") or in CPU memory ("offload": on the
    device inside ``encoders_loaded`` only; "cpu": they encode there), and the VAE released (``decode`` raises)."""
    if encoders not in LEARNER_ENCODERS:
        raise ValueError(f"model.learner_encoders must be one of {LEARNER_ENCODERS}, got {encoders!r}")
    if device is not None:
        model.device = torch.device(device)
        model.transformer.to(model.device)
    for e in text_encoders(model).values():
        e.to(model.device if encoders == "device" else "cpu")
    model.learner_encoders, model.encoder_moves, model._encoders_in = encoders, 0, False
    model._empty = None  # CFG's empty prompt: encoded again where it now belongs
    if getattr(model, "_img_ids", None):  # FLUX's position ids, made on the old device
        model._img_ids = {}
    if model.pipe.vae is not None:
        model.pipe.vae = None
        model.vae_released = True


def component_placement(model) -> dict[str, str]:
    """Where each of the model's components lives: {"transformer": "cuda:0", "text_encoder": "cpu", ...,
    "vae": "cuda:0" | "released" (a learner's) | "none" (a pixel-space model)}."""
    out = {"transformer": str(next(model.transformer.parameters()).device)}
    out |= {name: str(e.device) for name, e in text_encoders(model).items()}
    vae = model.pipe.vae
    out["vae"] = "released" if model.vae_released else "none" if vae is None else str(next(vae.parameters()).device)
    return out


class SD3Adapter:
    """Stable Diffusion 3 / 3.5 through the components of a ``StableDiffusion3Pipeline``.

    Text encoding uses the pipeline's own ``encode_prompt`` (CLIP-L, CLIP-G, T5); the velocity is the
    ``SD3Transformer2DModel`` output with timestep = 1000 * sigma; with guidance w != 1 it is
    ``v_neg + w * (v_pos - v_neg)`` with the empty prompt as negative; decoding undoes SD3's latent
    scaling and maps the VAE output from [-1, 1] to [0, 1].
    """

    guidance = "cfg"
    attention = "auto"  # model.attention (cluster.build.build_model sets it): the SDPA backend of transformer calls
    learner_encoders, vae_released, encoder_moves, _encoders_in = "device", False, 0, False  # a sampler's placement

    def __init__(
        self,
        pipe,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        prompt_encoder: Callable[[Sequence[str]], PromptEmbeds] | None = None,
    ):
        """``prompt_encoder`` replaces the pipeline's CLIP/T5 ``encode_prompt`` (e.g. a sentence encoder for a
        small model); ``pipe.vae = None`` means the model works in pixel space (latents are images in [-1, 1])."""
        self.pipe = pipe
        self.prompt_encoder = prompt_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_sequence_length = max_sequence_length
        # from_pretrained already loaded in `dtype` (keeping the modules diffusers wants in fp32); only move here
        pipe.to(self.device)
        for module in (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3, pipe.vae, pipe.transformer):
            if module is not None:
                module.requires_grad_(False)
                module.eval()
        self.transformer = pipe.transformer
        cfg = pipe.transformer.config
        scale = pipe.vae_scale_factor if pipe.vae is not None else 1
        height = height or cfg.sample_size * scale
        width = width or cfg.sample_size * scale
        if height % (scale * cfg.patch_size) or width % (scale * cfg.patch_size):
            raise ValueError(
                f"image size {height}x{width} must be a multiple of vae_scale_factor * patch_size = "
                f"{scale * cfg.patch_size}; pick e.g. {height - height % (scale * cfg.patch_size)}"
            )
        self.latent_shape = (cfg.in_channels, height // scale, width // scale)
        self._empty: PromptEmbeds | None = None

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        resolution: int = 512,
        max_sequence_length: int = 128,
    ) -> "SD3Adapter":
        """Load SD3 / SD3.5 from a hub id (e.g. ``stabilityai/stable-diffusion-3.5-medium``) or a local path; T5
        prompts are cut at ``max_sequence_length`` tokens (the reference's 128)."""
        from diffusers import StableDiffusion3Pipeline

        pipe = load_pipeline(StableDiffusion3Pipeline, path, dtype)
        return cls(pipe, device, dtype, resolution, resolution, max_sequence_length)

    @classmethod
    def tiny(cls, seed: int = 0, dtype: torch.dtype = torch.float32, **pipeline_kwargs) -> "SD3Adapter":
        """The offline random-weight SD3 (32x32 images) used by tests and the CPU smoke preset; ``pipeline_kwargs``
        go to ``tiny_sd3_pipeline`` (e.g. ``dual_attention_layers=(0,)``), ``dtype`` is its weights' dtype."""
        from models.tiny import MAX_TOKENS, tiny_sd3_pipeline

        pipe = tiny_sd3_pipeline(seed, **pipeline_kwargs)
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
        return cls(pipe, "cpu", dtype, max_sequence_length=MAX_TOKENS)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> PromptEmbeds:
        """tokens [B, L, D] and pooled [B, P] on the model's device in its dtype, encoded where ``learner_encoders``
        says (an offloaded encoder visits the device for the call: ``encoders_loaded``)."""
        with encoders_loaded(self):
            if self.prompt_encoder is not None:
                emb = self.prompt_encoder(list(prompts))
                tokens, pooled = emb.tokens, emb.pooled
            else:
                tokens, _, pooled, _ = self.pipe.encode_prompt(
                    prompt=list(prompts),
                    prompt_2=None,
                    prompt_3=None,
                    device=encoder_device(self),
                    do_classifier_free_guidance=False,
                    max_sequence_length=self.max_sequence_length,
                )
        return PromptEmbeds(tokens.to(self.device, self.dtype), pooled.to(self.device, self.dtype))

    def _transformer_out(self, x: torch.Tensor, sigma: torch.Tensor, cond: PromptEmbeds) -> torch.Tensor:
        # Timesteps reach the transformer in float32 (1000 * sigma), as the reference passes them: the model embeds
        # them in float32 and casts the embedding itself (rounding t to bf16 would move it by up to 1.9 of 1000).
        timestep = (to_device(sigma.float(), self.device) * 1000.0).expand(x.shape[0])
        # Under autocast x enters as given (the patch embedding's conv casts it to the autocast dtype, as in the
        # reference); without it, x must match the weights' dtype.
        autocasting = torch.is_autocast_enabled(self.device.type)
        with attention(self.attention):
            return self.transformer(
                hidden_states=x if autocasting else x.to(self.dtype),
                encoder_hidden_states=cond.tokens,
                pooled_projections=cond.pooled,
                timestep=timestep,
                return_dict=False,
            )[0]

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: PromptEmbeds,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """v(x, sigma | prompt) for a batch x: [B, C, H, W]; sigma: scalar or [B]. Returns float32."""
        return guided_velocity(self, x, sigma, cond, guidance_scale)

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """The scheduler's sigma schedule: [num_steps + 1] floats from 1 down to 0 (shifted, SD3.5: 3.0)."""
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(num_steps, device="cpu")
        return scheduler.sigmas.detach().clone().float()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] float32 in [0, 1]; a learner's model has no VAE (raises)."""
        if self.vae_released:
            raise RuntimeError(NO_VAE)
        return vae_decode(self.pipe.vae, latents, self.device, self.dtype)

    def for_learner(self, encoders: str = "offload", device: str | torch.device | None = None) -> "SD3Adapter":
        """This model placed for a learner (``place_for_learner``): the transformer on ``device``, the text encoders
        where ``encoders`` says (``model.learner_encoders``), the VAE released. Returns self."""
        place_for_learner(self, encoders, device)
        return self

    def placement(self) -> dict[str, str]:
        """Where each component lives (``component_placement``), e.g. {"transformer": "cuda:0", "text_encoder_3":
        "cpu", "vae": "released"}."""
        return component_placement(self)

    @property
    def lora_pipeline_class(self) -> type:
        """``StableDiffusion3Pipeline``: writes the LoRA checkpoints and loads them back (``load_lora_weights``)."""
        return type(self.pipe)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each transformer block's activations in the backward pass (less memory, one more forward; the
        recompute under the forward's SDPA backend); the forward values, and so v_theta, are unchanged."""
        self.transformer.enable_gradient_checkpointing(checkpoint_function(self))


def load_pipeline(pipeline_class, path: str, dtype: torch.dtype):
    """``pipeline_class.from_pretrained(path, dtype=dtype)`` (the pinned diffusers' argument; its ``torch_dtype`` is
    deprecated and warns), with diffusers' and transformers' loading progress bars off when stderr is not a terminal
    (a Ray actor's log, ``ray job logs``), where carriage-return bars are noise."""
    if not sys.stderr.isatty():
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    return pipeline_class.from_pretrained(path, dtype=dtype)
