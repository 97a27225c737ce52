"""ImageReward (Xu et al. 2023): BLIP image-grounded text encoder + MLP head, on transformers' BLIP classes.

Usage::

    convert_imagereward_checkpoint("ImageReward.pt", "ImageReward-hf")     # once, from the authors' file
    reward = ImageReward(model="ImageReward-hf")                            # tokenizer: bert-base-uncased
    reward.score(images_uint8_bhwc, prompts).scores                         # [B], standardised (~N(0, 1))

The architecture as the authors run it: a BLIP ViT-L/16 encodes the 224x224 image (resize shortest side to
224, bicubic; centre crop; CLIP mean/std); the BERT text encoder reads the prompt (max 35 tokens, [CLS]
first) with cross-attention to every image token; the [CLS] output goes through a 5-layer linear MLP, and

    score = (MLP(h_CLS) - 0.16717362830052426) / 1.0333394966054072

Here the vision tower is ``BlipVisionModel`` and the text encoder ``BlipTextModel`` (BERT with cross-attention,
run bidirectionally); ``convert_imagereward_checkpoint`` renames the authors' ``ImageReward.pt`` state dict
(loaded with ``weights_only=True``) to these modules and saves safetensors + config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from rewards.base import RewardOutput, check_images, register
from rewards.hub import load_pretrained, require_file

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TEXT_TOKENS = 35
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

# BLIP ViT-L/16 at 224 and its BERT-base text encoder (med_config.json of the ImageReward release).
FULL_CONFIG = {
    "vision": dict(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=224,
        patch_size=16,
        layer_norm_eps=1e-6,
        hidden_act="gelu",
    ),
    "text": dict(
        vocab_size=30524,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        encoder_hidden_size=1024,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        hidden_act="gelu",
        pad_token_id=0,
        is_decoder=True,
    ),
    "image_size": 224,
}


def _build_modules(cfg: dict):
    import torch.nn as nn
    from transformers import BlipTextConfig, BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    class ImageRewardModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_model = BlipVisionModel(BlipVisionConfig(**cfg["vision"]))
            # is_decoder=True only creates the cross-attention layers; forward runs it bidirectionally.
            self.text_encoder = BlipTextModel(BlipTextConfig(**cfg["text"]), add_pooling_layer=False)
            d = cfg["text"]["hidden_size"]
            self.mlp = nn.Sequential(
                nn.Linear(d, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, pixel_values, input_ids, attention_mask):
            """pixel_values [B, 3, S, S], input_ids/attention_mask [B, T] -> raw MLP output [B]."""
            image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # [B, 1 + P, Dv]
            image_atts = image_embeds.new_ones(image_embeds.shape[:-1], dtype=attention_mask.dtype)
            h = self.text_encoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_atts,
                is_decoder=False,
            ).last_hidden_state  # [B, T, D]
            return self.mlp(h[:, 0, :].float())[:, 0]

    return ImageRewardModel()


def _image_processor(size: int):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


@register("imagereward")
class ImageReward:
    """ImageReward scores: standardised MLP output on BLIP's image-grounded [CLS] embedding."""

    def __init__(
        self,
        model: Any = None,
        tokenizer: Any = "bert-base-uncased",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
    ):
        """``model``: a directory written by ``convert_imagereward_checkpoint`` (or a built module, with
        ``config`` attached as ``model.fdfo_config``); ``tokenizer``: bert-base-uncased id/path or built."""
        import torch
        from transformers import AutoTokenizer

        if model is None:
            raise ValueError(
                "imagereward needs model= : a directory made by rewards.imagereward."
                "convert_imagereward_checkpoint('ImageReward.pt', out_dir) from the authors' weights"
            )
        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = ("float16" if self.device.startswith("cuda") else "float32") if dtype == "auto" else dtype
        if isinstance(model, (str, os.PathLike)):
            model = load_imagereward_dir(str(model))
        if isinstance(tokenizer, str):
            tokenizer = load_pretrained(AutoTokenizer.from_pretrained, tokenizer, "ImageReward tokenizer")
        self.model = model.to(self.device, getattr(torch, dtype)).eval()
        self.model.mlp.float()
        self.tokenizer = tokenizer
        self.image_processor = _image_processor(model.fdfo_config["image_size"])
        self.batch_size = int(batch_size)

    @staticmethod
    def check_settings(model: Any = None, **_: Any) -> None:
        """Before any model loads: model= names a converted directory that exists."""
        if model is None:
            raise ValueError(
                "imagereward needs model= : a directory made by convert_imagereward_checkpoint('ImageReward.pt', out_dir)"
            )
        if isinstance(model, (str, os.PathLike)) and not os.path.isdir(os.path.expanduser(str(model))):
            raise FileNotFoundError(
                f"imagereward model={str(model)!r} is not a directory; make it with "
                "rewards.imagereward.convert_imagereward_checkpoint('ImageReward.pt', out_dir)"
            )

    def raw(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        """The MLP output before standardisation, [B] float64."""
        out = []
        for lo in range(0, len(prompts), self.batch_size):
            pixels = self.image_processor(images=list(images[lo : lo + self.batch_size]), return_tensors="pt")[
                "pixel_values"
            ]
            tok = self.tokenizer(
                list(prompts[lo : lo + self.batch_size]),
                padding="max_length",
                truncation=True,
                max_length=MAX_TEXT_TOKENS,
                return_tensors="pt",
            )
            with self.torch.inference_mode():
                r = self.model(
                    pixels.to(self.device, next(self.model.vision_model.parameters()).dtype),
                    tok["input_ids"].to(self.device),
                    tok["attention_mask"].to(self.device),
                )
            out.append(r.float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> [B] ImageReward (standardised)."""
        check_images(images, prompts)
        raw = self.raw(images, prompts)
        return RewardOutput(scores=(raw - MEAN) / STD, info={"raw": raw})


def original_to_hf(sd: dict) -> dict:
    """Rename the authors' ImageReward state dict (BLIP's timm ViT + BERT 'med' + mlp) to this module's keys.

    ViT: patch_embed.proj -> embeddings.patch_embedding, cls_token/pos_embed -> class/position_embedding,
    blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2} -> encoder.layers.i.{layer_norm1,self_attn.qkv,
    self_attn.projection,layer_norm2,mlp.fc1,mlp.fc2}, norm -> post_layernorm. The BERT names already match
    transformers' BlipTextModel. Keys outside blip.visual_encoder / blip.text_encoder / mlp (BLIP's
    pre-training heads, the momentum encoders) are not used by ImageReward and are dropped, as is the text
    encoder's fixed ``position_ids`` buffer; the head's ``mlp.layers.k`` becomes ``mlp.k``.
    """
    out = {}
    vit_names = {
        "norm1": "layer_norm1",
        "attn.qkv": "self_attn.qkv",
        "attn.proj": "self_attn.projection",
        "norm2": "layer_norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for key, value in sd.items():
        if key.startswith("blip.visual_encoder."):
            k = key.removeprefix("blip.visual_encoder.")
            if k.startswith("blocks."):
                _, i, rest = k.split(".", 2)
                name, kind = rest.rsplit(".", 1)
                out[f"vision_model.encoder.layers.{i}.{vit_names[name]}.{kind}"] = value
            elif k.startswith("patch_embed.proj."):
                out["vision_model.embeddings.patch_embedding." + k.rsplit(".", 1)[1]] = value
            elif k == "cls_token":
                out["vision_model.embeddings.class_embedding"] = value
            elif k == "pos_embed":
                out["vision_model.embeddings.position_embedding"] = value
            elif k.startswith("norm."):
                out["vision_model.post_layernorm." + k.rsplit(".", 1)[1]] = value
        elif key.startswith("blip.text_encoder.") and ".pooler." not in key and not key.endswith(".position_ids"):
            out["text_encoder." + key.removeprefix("blip.text_encoder.")] = value  # position_ids: a fixed buffer
        elif key.startswith("mlp.layers."):  # the authors' MLP wraps its Sequential in .layers; ours is the Sequential
            out["mlp." + key.removeprefix("mlp.layers.")] = value
    return out


def convert_imagereward_checkpoint(checkpoint: str, out_dir: str, config: dict | None = None) -> str:
    """Authors' ``ImageReward.pt`` -> ``out_dir/{model.safetensors, config.json}`` loadable by ImageReward."""
    import torch
    from safetensors.torch import save_file

    sd = torch.load(require_file(checkpoint, "ImageReward checkpoint"), map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd)
    cfg = config or FULL_CONFIG
    model = _build_modules(cfg)
    converted = original_to_hf(sd)
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"{checkpoint} does not match ImageReward's architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"))
    Path(out_dir, "config.json").write_text(json.dumps(cfg, indent=1))
    return out_dir


def load_imagereward_dir(path: str):
    from safetensors.torch import load_file

    cfg = json.loads(Path(require_file(os.path.join(path, "config.json"), "ImageReward config")).read_text())
    model = _build_modules(cfg)
    model.load_state_dict(load_file(require_file(os.path.join(path, "model.safetensors"), "ImageReward weights")))
    model.fdfo_config = cfg
    return model
