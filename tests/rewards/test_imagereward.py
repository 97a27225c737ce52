"""ImageReward on a tiny random BLIP: shape, determinism, the head formula by hand, checkpoint conversion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.imagereward import MEAN, STD, ImageReward, _build_modules, convert_imagereward_checkpoint
from tests.fixtures.tiny_rewards import tiny_imagereward, tiny_imagereward_config

IMGS = np.random.default_rng(0).integers(0, 256, (3, 48, 40, 3), dtype=np.uint8)
PROMPTS = ["a cat", "a red car on a street", "two dogs " * 30]  # the last one is truncated to 35 tokens


@pytest.fixture(scope="module")
def reward():
    return tiny_imagereward(seed=0)


def by_hand_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """ImageReward's preprocessing with PIL + numpy: shortest edge to `size` (bicubic, long side truncated),
    centre crop, scale to [0, 1], normalise with CLIP's mean/std (the numbers of the authors' transform)."""
    mean = np.array([0.48145466, 0.4578275, 0.40821073])
    std = np.array([0.26862954, 0.26130258, 0.27577711])
    pixels = []
    for im in images:
        pil = Image.fromarray(im)
        w, h = pil.size
        s = size / min(w, h)
        pil = pil.resize((int(w * s), int(h * s)), Image.BICUBIC)
        w, h = pil.size
        left, top = (w - size) // 2, (h - size) // 2
        x = np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255.0
        pixels.append(((x - mean) / std).transpose(2, 0, 1))
    return torch.tensor(np.stack(pixels), dtype=torch.float32)


def test_shape_determinism_and_standardisation(reward):
    out = reward.score(IMGS, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float64
    np.testing.assert_array_equal(out.scores, tiny_imagereward(seed=0).score(IMGS, PROMPTS).scores)
    assert np.abs(out.scores - tiny_imagereward(seed=1).score(IMGS, PROMPTS).scores).max() > 1e-2
    # The raw model output, reached through this test's own preprocessing, then standardised by hand.
    pixels = by_hand_pixels(IMGS, 32)
    assert pixels.shape == (3, 3, 32, 32)
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        raw = reward.model(pixels, tok["input_ids"], tok["attention_mask"]).double().numpy()
    np.testing.assert_allclose(out.info["raw"], raw, atol=1e-5)
    np.testing.assert_allclose(out.scores, (raw - 0.16717362830052426) / 1.0333394966054072, atol=1e-5)
    assert np.ptp(out.scores) > 0.1


def test_head_by_hand(reward):
    """The MLP has no activations: it is one affine map of the [CLS] output, computed here in numpy."""
    m = reward.model
    pixels = reward.image_processor(images=list(IMGS), return_tensors="pt")["pixel_values"]
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    assert tok["input_ids"].shape == (3, 35)
    with torch.no_grad():
        img = m.vision_model(pixel_values=pixels).last_hidden_state
        h = (
            m.text_encoder(
                input_ids=tok["input_ids"],
                attention_mask=tok["attention_mask"],
                encoder_hidden_states=img,
                is_decoder=False,
            )
            .last_hidden_state[:, 0]
            .numpy()
        )
    linears = [l for l in m.mlp if isinstance(l, torch.nn.Linear)]
    x = h.astype(np.float64)
    for lin in linears:
        x = x @ lin.weight.detach().double().numpy().T + lin.bias.detach().double().numpy()
    np.testing.assert_allclose(reward.score(IMGS, PROMPTS).scores, (x[:, 0] - MEAN) / STD, atol=1e-5)
    # The image matters: cross-attention makes the [CLS] output depend on the picture.
    other = reward.score(IMGS[::-1].copy(), PROMPTS).scores
    assert np.abs(other - reward.score(IMGS, PROMPTS).scores).max() > 1e-2


def to_original(sd: dict) -> dict:
    """This module's keys back to the authors' names (written independently of original_to_hf)."""
    vit = {
        "layer_norm1": "norm1",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "layer_norm2": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {"blip.text_decoder.cls.predictions.bias": torch.zeros(3)}  # a BLIP head ImageReward does not use
    for k, v in sd.items():
        if k.startswith("vision_model.encoder.layers."):
            i, rest = k.removeprefix("vision_model.encoder.layers.").split(".", 1)
            name, kind = rest.rsplit(".", 1)
            out[f"blip.visual_encoder.blocks.{i}.{vit[name]}.{kind}"] = v
        elif k.startswith("vision_model.embeddings.patch_embedding."):
            out["blip.visual_encoder.patch_embed.proj." + k.rsplit(".", 1)[1]] = v
        elif k == "vision_model.embeddings.class_embedding":
            out["blip.visual_encoder.cls_token"] = v
        elif k == "vision_model.embeddings.position_embedding":
            out["blip.visual_encoder.pos_embed"] = v
        elif k.startswith("vision_model.post_layernorm."):
            out["blip.visual_encoder.norm." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("text_encoder."):
            out["blip." + k] = v
        elif k.startswith("mlp."):
            out["mlp.layers." + k.removeprefix("mlp.")] = v  # the authors' MLP keeps its Sequential in .layers
        else:
            out[k] = v
    return {k: v.clone() for k, v in out.items()}


def test_convert_authors_checkpoint_roundtrip(reward, tmp_path):
    torch.save({"state_dict": to_original(reward.model.state_dict())}, tmp_path / "ImageReward.pt")
    out_dir = convert_imagereward_checkpoint(
        str(tmp_path / "ImageReward.pt"), str(tmp_path / "hf"), config=tiny_imagereward_config(len(reward.tokenizer))
    )
    loaded = ImageReward(model=out_dir, tokenizer=reward.tokenizer, device="cpu", dtype="float32")
    np.testing.assert_allclose(loaded.score(IMGS, PROMPTS).scores, reward.score(IMGS, PROMPTS).scores, atol=1e-6)


def test_missing_model_names_the_fix():
    with pytest.raises(ValueError, match="convert_imagereward_checkpoint"):
        ImageReward()
    with pytest.raises(FileNotFoundError, match="download it and pass its path"):
        ImageReward(model="/nope/ImageReward-hf")


def test_converter_covers_every_key_of_the_published_layout(tmp_path):
    """A state dict written from the authors' published key list (not from our model): every ImageReward key is
    used, every parameter of our modules is set with its shape, BLIP's pre-training parts are dropped, and the
    head's ``mlp.layers.k`` lands on our ``mlp.k``."""
    from rewards.imagereward import original_to_hf
    from tests.fixtures.published_keys import imagereward_keys

    cfg = tiny_imagereward_config(99)
    keys = imagereward_keys(
        vision_width=32,
        vision_mlp=64,
        vision_layers=2,
        image_size=32,
        patch=8,
        text_width=32,
        text_mlp=64,
        text_layers=2,
        vocab=99,
        max_positions=64,
        encoder_width=32,
    )
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in keys.items()}
    out = original_to_hf(sd)
    target = {k: tuple(v.shape) for k, v in _build_modules(cfg).state_dict().items()}
    assert {k: tuple(v.shape) for k, v in out.items()} == target  # all set, nothing extra, shapes equal
    dropped = {
        k
        for k in sd
        if k.startswith(
            ("blip.vision_proj", "blip.text_proj", "blip.itm_head", "blip.visual_encoder_m", "blip.text_decoder")
        )
        or k.endswith("position_ids")
    }
    assert len(dropped) == 6 and sum(1 for k in sd if k not in dropped) == len(target)  # every other key used once
    assert torch.equal(out["mlp.7.weight"], sd["mlp.layers.7.weight"])
    assert torch.equal(
        out["vision_model.encoder.layers.1.self_attn.qkv.weight"], sd["blip.visual_encoder.blocks.1.attn.qkv.weight"]
    )
    assert torch.equal(
        out["text_encoder.encoder.layer.0.crossattention.self.key.weight"],
        sd["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"],
    )
    # and the whole published file converts and loads (the authors' .pt, read with weights_only=True)
    torch.save(sd, tmp_path / "ImageReward.pt")
    convert_imagereward_checkpoint(str(tmp_path / "ImageReward.pt"), str(tmp_path / "hf"), config=cfg)
    reward = ImageReward(
        model=str(tmp_path / "hf"), tokenizer=tiny_imagereward(0).tokenizer, device="cpu", dtype="float32"
    )
    assert torch.equal(reward.model.mlp[0].weight, sd["mlp.layers.0.weight"])
