"""CLIP-family rewards: PickScore, CLIPScore, HPSv2, logit-scaled CLIP and the LAION aesthetic predictor.

Usage::

    pick = PickScore()                                   # yuvalkirstain/PickScore_v1 on the GPU if there is one
    out = pick.score(images_uint8_bhwc, prompts)         # out.scores [B], about 20-23 for good images

All five share ``ClipEmbedder``: a transformers ``CLIPModel`` plus its processor, returning L2-normalised
image and text embeddings. Image preprocessing is transformers' PIL image processor (resize, centre crop,
normalise), so no torchvision is needed. Formulas, with cos = <normalised text emb, normalised image emb>:

- PickScore (Kirstain et al. 2023):      logit_scale.exp() * cos          (the model's learned temperature)
- CLIPScore (torchmetrics convention):  scale * max(cos, 0), scale = 100  (Hessel et al. use w = 2.5)
- HPSv2 (Wu et al. 2023):               cos                               (as the hpsv2 package reports; the
                                                                           training reward's definition)
                                        logit_scale.exp() * cos           (``logit_scale=True``: the FDFO paper's
                                                                           evaluation, about 28)
- clip_logit:                           logit_scale.exp() * cos of any CLIPModel (the paper's CLIP-H/14 and
                                                                           CLIP-L/14 evaluation metrics)
- aesthetic (LAION predictor v2):       MLP(normalised CLIP ViT-L/14 image emb); prompts are ignored

PickScore and clip_logit run in float32 unless told otherwise (as the reference's training and evaluation do;
fp16 shifts the scores); the others default to ``auto`` (fp16 on CUDA).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from rewards.base import RewardOutput, check_images, register
from rewards.hub import load_pretrained, require_file

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def _device_dtype(device: str | None, dtype: str):
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


class ClipEmbedder:
    """CLIPModel + processor -> normalised embeddings; ``model``/``processor`` may be passed built (tests)."""

    def __init__(
        self,
        model: Any = CLIP_L14,
        processor: Any = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
    ):
        """``model``: a hub id, a local directory, or a built ``CLIPModel``; ``processor`` likewise (defaults
        to the model's own)."""
        import torch
        from transformers import AutoProcessor, CLIPModel

        self.torch = torch
        self.device, self.dtype = _device_dtype(device, dtype)
        if isinstance(model, str):
            processor = processor or model
            model = load_pretrained(CLIPModel.from_pretrained, model, "CLIP model", dtype=self.dtype)
        if isinstance(processor, str):
            processor = load_pretrained(AutoProcessor.from_pretrained, processor, "CLIP processor")
        if processor is None:
            raise ValueError("a built CLIP model needs its processor: pass processor=")
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.batch_size = int(batch_size)

    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def embed_images(self, images: np.ndarray):
        """uint8 [B, H, W, 3] -> float32 tensor [B, D], unit norm."""
        out = []
        for lo in range(0, images.shape[0], self.batch_size):
            batch = [im for im in images[lo : lo + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"]
            with self.torch.inference_mode():
                emb = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
            emb = getattr(emb, "pooler_output", emb)  # transformers returns a tensor or an output object
            out.append(emb.float())
        emb = self.torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def embed_texts(self, prompts: Sequence[str]):
        """B strings -> float32 tensor [B, D], unit norm (truncated to the model's 77 tokens)."""
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            tok = self.processor(
                text=list(prompts[lo : lo + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            )
            with self.torch.inference_mode():
                emb = self.model.get_text_features(
                    input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
                )
            emb = getattr(emb, "pooler_output", emb)
            out.append(emb.float())
        emb = self.torch.cat(out)
        return emb / emb.norm(dim=-1, keepdim=True)

    def cosine(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """Per-pair cosine [B] between image i and prompt i."""
        img, txt = self.embed_images(images), self.embed_texts(prompts)
        return (img * txt).sum(-1).cpu().numpy().astype(np.float64)


@register("pickscore")
class PickScore:
    """PickScore: logit_scale.exp() * cos(text, image) with the PickScore_v1 CLIP-H/14 fine-tune."""

    FORWARDS_SETTINGS_TO = (ClipEmbedder,)  # **embedder_kwargs: device, dtype, batch_size

    def __init__(
        self,
        model: Any = PICKSCORE_MODEL,
        processor: Any = PICKSCORE_PROCESSOR,
        dtype: str = "float32",
        **embedder_kwargs: Any,
    ):
        """dtype: float32 by default, as the reference (``auto`` = fp16 on CUDA, faster but shifted)."""
        self.clip = ClipEmbedder(model=model, processor=processor, dtype=dtype, **embedder_kwargs)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> [B] PickScore."""
        check_images(images, prompts)
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(scores=self.clip.logit_scale() * cos, info={"cosine": cos})


@register("clipscore")
class CLIPScore:
    """CLIPScore: scale * max(cos, 0); default CLIP ViT-L/14 (pass laion CLIP-H/14 for the paper's eval)."""

    FORWARDS_SETTINGS_TO = (ClipEmbedder,)  # **embedder_kwargs: device, dtype, batch_size

    def __init__(self, model: Any = CLIP_L14, processor: Any = None, scale: float = 100.0, **embedder_kwargs: Any):
        self.clip = ClipEmbedder(model=model, processor=processor, **embedder_kwargs)
        self.scale = float(scale)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(scores=self.scale * np.maximum(cos, 0.0), info={"cosine": cos})


@register("hpsv2")
class HPSv2:
    """HPSv2 / v2.1: cos(text, image) of an OpenCLIP ViT-H/14 fine-tuned on human preferences; with
    ``logit_scale=True`` logit_scale.exp() * cos, the number the FDFO paper's evaluation reports (28.29 for its
    combined policy, with the transformers conversion ``adams-story/HPSv2-hf``).

    Weights: the authors publish an OpenCLIP checkpoint (``HPS_v2.1_compressed.pt``, a torch state dict).
    Pass it as ``checkpoint=`` (loaded with ``torch.load(weights_only=True)`` and converted to transformers'
    CLIPModel by ``openclip_to_hf``, onto the architecture of ``base``, the laion CLIP-H/14 it was tuned
    from), or pass ``model=`` a directory holding that conversion saved with ``save_pretrained``.
    """

    FORWARDS_SETTINGS_TO = (ClipEmbedder,)  # **embedder_kwargs: device, dtype, batch_size

    def __init__(
        self,
        model: Any = None,
        checkpoint: str | None = None,
        base: str = CLIP_H14,
        processor: Any = None,
        logit_scale: bool = False,
        **embedder_kwargs: Any,
    ):
        self.logit_scale = bool(logit_scale)
        if (model is None) == (checkpoint is None):
            raise ValueError(
                "HPSv2 needs exactly one of checkpoint= (path to HPS_v2.1_compressed.pt from the "
                "HPSv2 authors) or model= (a converted CLIPModel directory, or a built model)"
            )
        if checkpoint is not None:
            model = load_openclip_checkpoint(checkpoint, base)
            processor = processor or base
        self.clip = ClipEmbedder(model=model, processor=processor, **embedder_kwargs)

    @staticmethod
    def check_settings(model: Any = None, checkpoint: str | None = None, **_: Any) -> None:
        """Before any model loads: exactly one of model= / checkpoint=, and a checkpoint file that exists."""
        if (model is None) == (checkpoint is None):
            raise ValueError(
                "give exactly one of checkpoint= (path to HPS_v2.1_compressed.pt) or model= (a converted "
                "CLIPModel directory)"
            )
        if checkpoint is not None:
            require_file(checkpoint, "HPSv2 checkpoint")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(scores=self.clip.logit_scale() * cos if self.logit_scale else cos, info={"cosine": cos})


@register("clip_logit")
class ClipLogitScore:
    """logit_scale.exp() * cos(text, image) of any CLIPModel: the FDFO paper's CLIP-H/14 (``model=`` CLIP_H14,
    about 35.8 for its combined policy) and CLIP-L/14 (the default, about 28.2) evaluation metrics. The same
    formula as PickScore, without PickScore's weights; float32 by default, as the reference."""

    FORWARDS_SETTINGS_TO = (ClipEmbedder,)  # **embedder_kwargs: device, batch_size

    def __init__(self, model: Any = CLIP_L14, processor: Any = None, dtype: str = "float32", **embedder_kwargs: Any):
        self.clip = ClipEmbedder(model=model, processor=processor, dtype=dtype, **embedder_kwargs)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> [B] logit_scale.exp() * cos."""
        check_images(images, prompts)
        cos = self.clip.cosine(images, prompts)
        return RewardOutput(scores=self.clip.logit_scale() * cos, info={"cosine": cos})


def openclip_to_hf(sd: dict, num_layers_text: int, num_layers_vision: int) -> dict:
    """Rename an OpenCLIP (OpenAI-layout) CLIP state dict to transformers' CLIPModel keys.

    OpenCLIP fuses q/k/v into ``attn.in_proj_weight`` [3D, D] and stores projections as matrices applied on
    the right (x @ proj); transformers keeps separate q/k/v Linear layers and Linear projections (x @ W.T).
    """
    out = {}

    def blocks(src: str, dst: str, n: int):
        for i in range(n):
            s, d = f"{src}.resblocks.{i}.", f"{dst}.encoder.layers.{i}."
            for kind in ("weight", "bias"):
                q, k, v = sd[s + f"attn.in_proj_{kind}"].chunk(3, dim=0)
                out[d + f"self_attn.q_proj.{kind}"], out[d + f"self_attn.k_proj.{kind}"] = q, k
                out[d + f"self_attn.v_proj.{kind}"] = v
                out[d + f"self_attn.out_proj.{kind}"] = sd[s + f"attn.out_proj.{kind}"]
                out[d + f"layer_norm1.{kind}"] = sd[s + f"ln_1.{kind}"]
                out[d + f"layer_norm2.{kind}"] = sd[s + f"ln_2.{kind}"]
                out[d + f"mlp.fc1.{kind}"] = sd[s + f"mlp.c_fc.{kind}"]
                out[d + f"mlp.fc2.{kind}"] = sd[s + f"mlp.c_proj.{kind}"]

    blocks("transformer", "text_model", num_layers_text)
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for kind in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{kind}"] = sd[f"ln_final.{kind}"]
        out[f"vision_model.pre_layrnorm.{kind}"] = sd[f"visual.ln_pre.{kind}"]
        out[f"vision_model.post_layernorm.{kind}"] = sd[f"visual.ln_post.{kind}"]
    out["text_projection.weight"] = sd["text_projection"].T.contiguous()
    out["visual_projection.weight"] = sd["visual.proj"].T.contiguous()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    blocks("visual.transformer", "vision_model", num_layers_vision)
    out["vision_model.embeddings.class_embedding"] = sd["visual.class_embedding"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out["vision_model.embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    return out


def load_openclip_checkpoint(checkpoint: str, base: str):
    """An OpenCLIP checkpoint file (.pt state dict, or .safetensors) onto ``base``'s CLIPModel architecture."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    path = require_file(checkpoint, "HPSv2 checkpoint")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    sd = sd.get("state_dict", sd)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    config = load_pretrained(CLIPConfig.from_pretrained, base, "HPSv2 base CLIP config")
    model = CLIPModel(config)
    converted = openclip_to_hf(sd, config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{checkpoint} does not match {base}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


class AestheticHead:
    """The LAION improved-aesthetic-predictor MLP; module indices match its published state-dict keys."""

    def __new__(cls, dim: int = 768):
        import torch.nn as nn

        return nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )


@register("aesthetic")
class Aesthetic:
    """LAION aesthetic predictor v2: MLP on the unit-norm CLIP ViT-L/14 image embedding (scores ~1-10).

    ``head``: path to the MLP weights (``sac+logos+ava1-l14-linearMSE.pth`` from the improved-aesthetic-
    predictor repository, loaded with ``weights_only=True``, or a .safetensors with the same keys), or a built
    ``nn.Module`` mapping [B, D] -> [B, 1]. Prompts are ignored.
    """

    FORWARDS_SETTINGS_TO = (ClipEmbedder,)  # **embedder_kwargs: device, dtype, batch_size

    def __init__(self, head: Any = None, model: Any = CLIP_L14, processor: Any = None, **embedder_kwargs: Any):
        import torch

        if head is None:
            raise ValueError(
                "aesthetic needs head= : the path to the LAION aesthetic MLP weights "
                "(sac+logos+ava1-l14-linearMSE.pth, or a .safetensors with the same keys)"
            )
        self.clip = ClipEmbedder(model=model, processor=processor, **embedder_kwargs)
        if isinstance(head, (str, os.PathLike)):
            path = require_file(head, "aesthetic head weights")
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                sd = load_file(path)
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            sd = {k.removeprefix("layers."): v for k, v in sd.items()}
            head = AestheticHead(dim=sd["0.weight"].shape[1])
            head.load_state_dict(sd)
        self.head = head.to(self.clip.device, torch.float32).eval()

    def check_settings(head: Any = None, **_: Any) -> None:
        """Before any model loads: the head weights are given and, as a path, exist."""
        if head is None:
            raise ValueError("aesthetic needs head= : the path to sac+logos+ava1-l14-linearMSE.pth (or a .safetensors)")
        if isinstance(head, (str, os.PathLike)):
            require_file(head, "aesthetic head weights")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        check_images(images, prompts)
        emb = self.clip.embed_images(images)
        with self.clip.torch.inference_mode():
            s = self.head(emb)[:, 0]
        return RewardOutput(scores=s.cpu().numpy().astype(np.float64), info={})
