"""PickScore, CLIPScore, HPSv2 and aesthetic on tiny random CLIPs: shapes, determinism, formulas by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.clip import Aesthetic, HPSv2, openclip_to_hf
from tests.fixtures.tiny_rewards import tiny_aesthetic, tiny_clip, tiny_clipscore, tiny_hpsv2, tiny_pickscore

IMGS = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3), dtype=np.uint8)
PROMPTS = ["a cat", "a red car on a street", "two dogs"]


def by_hand_embeddings(model, processor, images, prompts):
    """Preprocess with PIL + numpy (shortest edge to 32, bicubic; centre crop; normalise), then embed."""
    ip = processor.image_processor
    pixels = []
    for im in images:
        pil = Image.fromarray(im)
        w, h = pil.size
        s = 32 / min(w, h)
        pil = pil.resize((int(w * s), int(h * s)), Image.BICUBIC)  # long side truncated, as CLIP does
        w, h = pil.size
        left, top = (w - 32) // 2, (h - 32) // 2
        x = np.asarray(pil.crop((left, top, left + 32, top + 32)), np.float32) / 255.0
        pixels.append(((x - np.array(ip.image_mean)) / np.array(ip.image_std)).transpose(2, 0, 1))
    with torch.no_grad():
        img = model.get_image_features(pixel_values=torch.tensor(np.stack(pixels), dtype=torch.float32))
        tok = processor.tokenizer(prompts, padding=True, return_tensors="pt")
        txt = model.get_text_features(**tok)
    img, txt = getattr(img, "pooler_output", img).numpy(), getattr(txt, "pooler_output", txt).numpy()
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt


def test_pickscore_formula_by_hand():
    pick = tiny_pickscore(seed=0)
    out = pick.score(IMGS, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float64
    img, txt = by_hand_embeddings(pick.clip.model, pick.clip.processor, IMGS, PROMPTS)
    cos = (img * txt).sum(1)
    scale = float(np.exp(pick.clip.model.logit_scale.item()))
    assert scale == pytest.approx(np.exp(2.6592), rel=1e-4)  # CLIP's initial temperature log(1/0.07)
    np.testing.assert_allclose(out.scores, scale * cos, atol=2e-4)
    assert np.ptp(out.scores) > 0.1


def test_determinism_and_seed_dependence():
    a, b = tiny_pickscore(0).score(IMGS, PROMPTS), tiny_pickscore(0).score(IMGS, PROMPTS)
    c = tiny_pickscore(1).score(IMGS, PROMPTS)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.allclose(a.scores, c.scores)


def test_clipscore_and_hpsv2_formulas():
    clip = tiny_clipscore(seed=0)
    hps = tiny_hpsv2(seed=0)
    cos = hps.score(IMGS, PROMPTS).scores
    np.testing.assert_allclose(cos, tiny_pickscore(0).score(IMGS, PROMPTS).info["cosine"], atol=1e-6)
    assert (cos < 0).any() and (cos > 0).any()  # so the clamp below is exercised
    np.testing.assert_allclose(clip.score(IMGS, PROMPTS).scores, 100 * np.maximum(cos, 0), atol=1e-5)


def test_aesthetic_is_the_mlp_on_the_normalised_image_embedding(tmp_path):
    aes = tiny_aesthetic(seed=0)
    out = aes.score(IMGS, PROMPTS)
    img, _ = by_hand_embeddings(aes.clip.model, aes.clip.processor, IMGS, PROMPTS)
    with torch.no_grad():
        expected = aes.head(torch.tensor(img))[:, 0].numpy()
    np.testing.assert_allclose(out.scores, expected, atol=1e-5)
    np.testing.assert_allclose(out.scores, aes.score(IMGS, ["ignored"] * 3).scores)  # prompts play no part
    # The published head file has keys layers.0.weight ... layers.7.bias; loaded with weights_only=True.
    torch.save({f"layers.{k}": v for k, v in aes.head.state_dict().items()}, tmp_path / "head.pth")
    model, processor = tiny_clip(0)
    again = Aesthetic(head=str(tmp_path / "head.pth"), model=model, processor=processor, device="cpu", dtype="float32")
    np.testing.assert_allclose(again.score(IMGS, PROMPTS).scores, out.scores, atol=1e-6)


def hf_to_openclip(sd: dict, n_text: int, n_vision: int) -> dict:
    """The inverse renaming, written independently, to produce an OpenCLIP-layout checkpoint for the test."""
    out = {
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].T,
        "visual.proj": sd["visual_projection.weight"].T,
        "logit_scale": sd["logit_scale"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
    }
    for k in ("weight", "bias"):
        out[f"ln_final.{k}"] = sd[f"text_model.final_layer_norm.{k}"]
        out[f"visual.ln_pre.{k}"] = sd[f"vision_model.pre_layrnorm.{k}"]
        out[f"visual.ln_post.{k}"] = sd[f"vision_model.post_layernorm.{k}"]
    for src, dst, n in (("text_model", "transformer", n_text), ("vision_model", "visual.transformer", n_vision)):
        for i in range(n):
            s, d = f"{src}.encoder.layers.{i}.", f"{dst}.resblocks.{i}."
            for k in ("weight", "bias"):
                out[d + f"attn.in_proj_{k}"] = torch.cat([sd[s + f"self_attn.{p}_proj.{k}"] for p in "qkv"])
                out[d + f"attn.out_proj.{k}"] = sd[s + f"self_attn.out_proj.{k}"]
                out[d + f"ln_1.{k}"], out[d + f"ln_2.{k}"] = sd[s + f"layer_norm1.{k}"], sd[s + f"layer_norm2.{k}"]
                out[d + f"mlp.c_fc.{k}"], out[d + f"mlp.c_proj.{k}"] = sd[s + f"mlp.fc1.{k}"], sd[s + f"mlp.fc2.{k}"]
    return {k: v.clone().contiguous() for k, v in out.items()}


def test_hpsv2_loads_an_openclip_checkpoint(tmp_path):
    model, processor = tiny_clip(seed=3)
    model.config.save_pretrained(tmp_path / "base")
    ckpt = hf_to_openclip(model.state_dict(), 2, 2)
    torch.save({"state_dict": {f"module.{k}": v for k, v in ckpt.items()}}, tmp_path / "HPS_tiny.pt")
    ref = HPSv2(model=model, processor=processor, device="cpu", dtype="float32").score(IMGS, PROMPTS).scores
    loaded = HPSv2(
        checkpoint=str(tmp_path / "HPS_tiny.pt"),
        base=str(tmp_path / "base"),
        processor=processor,
        device="cpu",
        dtype="float32",
    )
    np.testing.assert_allclose(loaded.score(IMGS, PROMPTS).scores, ref, atol=1e-6)
    assert len(openclip_to_hf(ckpt, 2, 2)) == len([k for k in model.state_dict() if "position_ids" not in k])


def test_missing_weights_fail_with_the_fix():
    with pytest.raises(FileNotFoundError, match="download it and pass its path"):
        HPSv2(checkpoint="/nope/HPS_v2.1_compressed.pt")
    with pytest.raises(ValueError, match="exactly one of checkpoint"):
        HPSv2()
    with pytest.raises(ValueError, match="aesthetic needs head="):
        Aesthetic()


def test_openclip_converter_covers_every_key_of_the_published_layout():
    """A state dict written from OpenCLIP's published key list (not from our model): every key is used and
    every CLIPModel parameter is set with the right shape; fused q/k/v split in order, projections transposed."""
    from tests.fixtures.published_keys import openclip_keys

    model, _ = tiny_clip(seed=0)
    keys = openclip_keys(
        width=32,
        mlp=64,
        layers_text=2,
        layers_vision=2,
        vocab=model.config.text_config.vocab_size,
        context=77,
        image_size=32,
        patch=8,
        embed_dim=16,
    )
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in keys.items()}

    class Recording(dict):
        def __init__(self, d):
            super().__init__(d)
            self.used = set()

        def __getitem__(self, k):
            self.used.add(k)
            return super().__getitem__(k)

    src = Recording(sd)
    out = openclip_to_hf(src, 2, 2)
    assert set(sd) - src.used == set()  # no published key left unused
    target = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    assert set(out) == set(target)  # no target parameter left unset
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: tuple(s) for k, s in target.items()}
    q = out["vision_model.encoder.layers.1.self_attn.q_proj.weight"]
    v = out["vision_model.encoder.layers.1.self_attn.v_proj.bias"]
    assert torch.equal(q, sd["visual.transformer.resblocks.1.attn.in_proj_weight"][:32])
    assert torch.equal(v, sd["visual.transformer.resblocks.1.attn.in_proj_bias"][64:])
    assert torch.equal(out["text_projection.weight"], sd["text_projection"].T)
    assert torch.equal(out["visual_projection.weight"], sd["visual.proj"].T)
    model.load_state_dict(out, strict=False)
    assert torch.equal(
        model.text_model.encoder.layers[0].mlp.fc2.weight, sd["transformer.resblocks.0.mlp.c_proj.weight"]
    )
