"""The judge's image preprocessing (``resize=``): ``pil_bicubic`` is exactly PIL's bicubic resize of the uint8 image;
``float_bilinear`` (the reference's training reward) is bilinear interpolation of floats in [0, 1] without corner
alignment, checked in closed form, handed to the processor with ``do_rescale=False, do_resize=False``, and rounded to
uint8 only where a backend must encode the image (the server)."""

from __future__ import annotations

import base64
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from rewards import vlm_judge
from rewards.vlm_judge import VLMJudge, prepare_image

RNG = np.random.default_rng(0)


def test_pil_bicubic_is_pils_resize_of_the_uint8_image():
    img = RNG.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ours = prepare_image(img, 32, "pil_bicubic")
    assert isinstance(ours, Image.Image)
    assert np.array_equal(np.asarray(ours), np.asarray(Image.fromarray(img).resize((32, 32), Image.BICUBIC)))
    assert np.array_equal(np.asarray(prepare_image(img, None)), img)  # None: the processor resizes


def test_float_bilinear_in_closed_form():
    # up 2 -> 4 without corner alignment: output pixel i samples input position (i + 0.5) / 2 - 0.5 = -0.25, 0.25,
    # 0.75, 1.25, clamped to [0, 1]: weights give 0, 1/4, 3/4, 1 of the step from 0 to 255
    step = np.zeros((2, 2, 3), np.uint8)
    step[:, 1] = 255
    up = prepare_image(step, 4, "float_bilinear")
    assert up.dtype == np.float32 and up.shape == (4, 4, 3)
    np.testing.assert_allclose(up[:, :, 0], np.tile([0.0, 0.25, 0.75, 1.0], (4, 1)), atol=1e-7)
    # down 2x: output pixel i samples 2i + 0.5, midway between 2i and 2i + 1: the mean of each 2x2 block
    img = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    blocks = img.astype(np.float64).reshape(4, 2, 4, 2, 3).mean(axis=(1, 3)) / 255.0
    np.testing.assert_allclose(prepare_image(img, 4, "float_bilinear"), blocks, atol=1e-6)
    assert np.abs(prepare_image(img, 4, "float_bilinear") - np.asarray(prepare_image(img, 4)) / 255.0).max() > 0.01


def test_unknown_resize_mode_fails_at_construction():
    with pytest.raises(ValueError) as e:
        VLMJudge.check_settings(resize="bicubic")
    assert str(e.value) == (
        "judge resize='bicubic' is not one of ('pil_bicubic', 'float_bilinear'); 'float_bilinear' "
        "is the reference's training reward, 'pil_bicubic' uint8 + PIL bicubic"
    )


class FakeProcessor:
    """Records what the transformers backend hands the processor; returns inputs for FakeModel."""

    def __init__(self):
        self.calls = []

    def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
        return conversation[0]["content"][1]["text"]

    def __call__(self, text, images, padding, return_tensors, **kwargs):
        import torch

        self.calls.append({"images": images, **kwargs})

        class Inputs(dict):
            def to(self, device):
                return self

        return Inputs(n=torch.zeros(len(text)))


class FakeModel:
    def __call__(self, n):
        import torch

        logits = torch.zeros(len(n), 1, 10)
        logits[:, -1, 1] = 2.0  # logit(Yes) - logit(No) = 2
        return type("Out", (), {"logits": logits})()


def fake_transformers_backend(**kwargs):
    import torch

    backend = object.__new__(vlm_judge.TransformersJudge)
    backend.torch, backend.device, backend.batch_size = torch, "cpu", 8
    backend.processor, backend.model, backend.yes_id, backend.no_id = FakeProcessor(), FakeModel(), 1, 2
    return backend


def test_transformers_backend_hands_floats_to_the_processor_unrescaled_and_unresized(monkeypatch):
    monkeypatch.setitem(vlm_judge._BACKENDS, "transformers", fake_transformers_backend)
    imgs = RNG.integers(0, 256, (2, 12, 12, 3), dtype=np.uint8)
    judge = VLMJudge(model="m", image_size=6, resize="float_bilinear")
    out = judge.score(imgs, ["a", "b"])
    np.testing.assert_allclose(out.scores, 100 / (1 + np.exp(-2.0)))
    call = judge.backend.processor.calls[0]
    assert call["images_kwargs"] == {"do_rescale": False, "do_resize": False}
    for sent, img in zip(call["images"], imgs):
        np.testing.assert_array_equal(sent[0], prepare_image(img, 6, "float_bilinear"))
    pil = VLMJudge(model="m", image_size=6)  # the default: PIL images, no kwargs
    pil.score(imgs, ["a", "b"])
    call = pil.backend.processor.calls[0]
    assert "images_kwargs" not in call and isinstance(call["images"][0][0], Image.Image)


class Capture(BaseHTTPRequestHandler):
    """A judge server that keeps the PNG of every chat request."""

    pngs: ClassVar[list] = []

    def log_message(self, *args):
        pass

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            body = {"tokens": {"Yes": [7], "No": [8]}[req["prompt"]]}
        else:
            url = req["messages"][0]["content"][0]["image_url"]["url"]
            Capture.pngs.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))))
            top = [{"token": "token_id:7", "logprob": -0.2}, {"token": "token_id:8", "logprob": -1.8}]
            body = {"choices": [{"logprobs": {"content": [dict(top[0], top_logprobs=top)]}}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_server_backend_sends_the_float_image_rounded_to_uint8():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Capture)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        step = np.zeros((1, 2, 2, 3), np.uint8)
        step[0, :, 1] = 255
        judge = VLMJudge(
            model="m",
            backend="server",
            url=f"http://127.0.0.1:{httpd.server_address[1]}",
            image_size=4,
            resize="float_bilinear",
        )
        assert judge.score(step, ["a"]).info["reasons"] == [None]
    finally:
        httpd.shutdown()
        httpd.server_close()
    # 0, 63.75, 191.25, 255 rounded
    np.testing.assert_array_equal(Capture.pngs[-1][:, :, 0], np.tile([0, 64, 191, 255], (4, 1)))
