"""Test helpers: an analytic 1-D Gaussian flow that satisfies the FlowModel contract."""

from __future__ import annotations

import json
from http.server import BaseHTTPRequestHandler

import torch

from models.adapter import PromptEmbeds


class Offset(torch.nn.Module):
    """The trainable part of the toy flow: a velocity offset b (one scalar)."""

    def __init__(self):
        super().__init__()
        self.b = torch.nn.Parameter(torch.zeros(1))


class GaussianFlow:
    """Rectified flow x_t = (1 - t) x0 + t n for data x0 ~ N(mu, s^2), with its exact velocity plus an offset b.

    E[x0 | x_t] and E[n | x_t] are Gaussian conditionals, so v(x, t) = E[n - x0 | x_t = x] in closed form:
    with a = 1 - t and var = a^2 s^2 + t^2, v = (t - a s^2) (x - a mu) / var - mu.
    """

    def __init__(self, mu: float = 0.5, s: float = 0.3, num_steps: int = 1, shape=(1, 1, 1)):
        self.mu, self.s = mu, s
        self.transformer = Offset()
        self.device = torch.device("cpu")
        self.latent_shape = shape

    def encode_prompts(self, prompts):
        return PromptEmbeds(torch.zeros(len(prompts), 1, 1), torch.zeros(len(prompts), 1))

    def velocity(self, x, sigma, cond, guidance_scale=1.0):
        t = (
            torch.as_tensor(sigma, dtype=torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
            if torch.as_tensor(sigma).ndim
            else torch.as_tensor(sigma, dtype=torch.float32)
        )
        a = 1 - t
        var = a * a * self.s**2 + t * t
        v = (t - a * self.s**2) * (x - a * self.mu) / var - self.mu
        return v + self.transformer.b

    def sigmas(self, num_steps):
        return torch.linspace(1.0, 0.0, num_steps + 1)

    def decode(self, latents):
        return latents.float()


def stop_after_epoch(monkeypatch, epoch: int, exc: type[BaseException] = RuntimeError) -> None:
    """Make the next run raise ``exc`` right after its epoch ``epoch`` closed: ``RuntimeError`` as a crash there
    would (the run keeps only its ``train.checkpoint_every`` checkpoints), ``KeyboardInterrupt`` as Ctrl-C or
    ``ray job stop`` (SIGTERM) would (the driver writes a checkpoint first). ``monkeypatch.undo()`` lets the
    following run go on normally."""
    from cluster.pipeline import Book

    end_epoch = Book.end_epoch

    def stopping(self, m):
        out = end_epoch(self, m)
        if self.epoch == epoch + 1:
            raise exc(f"stopped after epoch {epoch}")
        return out

    monkeypatch.setattr(Book, "end_epoch", stopping)


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet HTTP handler answering JSON: the base of the fake vLLM servers the judge tests run on 127.0.0.1."""

    def log_message(self, *args):
        pass

    def reply(self, code: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def three_pair_batch(cfg):
    """The learner-group tests' batch: 3 pairs of the tiny SD3 (seed 0) sampled with ``cfg``, fixed rewards."""
    import numpy as np

    from actors.sampler import Sampler
    from models.adapter import SD3Adapter

    sampler = Sampler(SD3Adapter.tiny(seed=0), cfg.sampling, cfg.lora)
    job, _ = sampler.sample(
        prompts=["a red circle", "a blue square", "two green triangles"],
        prompt_ids=[0, 1, 2],
        pair_ids=[0, 1, 2],
        seeds=[5, 6, 7],
    )
    out, _ = sampler.complete(job=job, rewards=np.array([[1.0, 0.0], [0.25, 0.75], [0.5, 0.6]]))
    return out
