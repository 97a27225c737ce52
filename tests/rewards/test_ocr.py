"""OCR reward with the real PP-OCR models shipped in rapidocr-onnxruntime, on text rendered here with PIL."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from rewards.ocr import levenshtein, quoted_text, text_similarity

# No skip when rapidocr-onnxruntime is missing: the OCR reward is part of the package, and a skipped test
# would hide a missing install step (.ci/setup.sh installs it).


def render(text: str, size=(320, 96)) -> np.ndarray:
    img = Image.new("RGB", size, (255, 255, 255))
    font = ImageFont.load_default(size=40)  # Pillow's bundled FreeType font: no system fonts needed
    ImageDraw.Draw(img).text((12, 22), text, fill=(0, 0, 0), font=font)
    return np.asarray(img)


@pytest.fixture(scope="module")
def ocr():
    from rewards.ocr import OCRReward

    return OCRReward()


def test_right_text_scores_high_wrong_text_low(ocr):
    images = np.stack([render("HELLO 42"), render("HELLO 42"), np.full((96, 320, 3), 255, np.uint8)])
    prompts = ['a sign that says "HELLO 42"', 'a sign that says "GOODBYE"', 'a sign that says "HELLO 42"']
    out = ocr.score(images, prompts)
    assert out.scores[0] >= 0.85, out.info["recognised"]
    assert out.scores[1] <= 0.3, out.info["recognised"]
    assert out.scores[2] == 0.0 and out.info["recognised"][2] == ""  # a blank image reads nothing
    # The formula on what was actually read: 1 - min(lev, len)/len on lower-cased, space-free strings.
    rec = out.info["recognised"][1].replace(" ", "").lower()
    assert out.scores[1] == pytest.approx(1 - min(levenshtein(rec, "goodbye"), 7) / 7)


def test_prompt_without_quotes_is_nan_with_reason(ocr):
    out = ocr.score(render("HELLO")[None], ["a sign saying hello"])
    assert np.isnan(out.scores[0]) and "no quoted text" in out.info["reasons"][0]


def test_text_helpers_by_hand():
    assert quoted_text('a sign "OPEN" and “24 h”') == "OPEN 24 h"
    assert quoted_text("the dog's ball") is None
    assert levenshtein("kitten", "sitting") == 3
    assert text_similarity("Hel lo", "hello") == 1.0
    assert text_similarity("help", "hello") == pytest.approx(1 - 2 / 5)
    assert text_similarity("a much longer wrong string", "hi") == 0.0
