"""Batch reward requests from many concurrent callers into few scorer calls (plain asyncio, no Ray).

Usage::

    batcher = RewardBatcher(reward_spec={"name": "pickscore"}, max_batch_size=32, max_wait_s=0.05)
    out = await batcher.score(images=imgs_uint8_bhwc, prompts=prompts)    # RewardOutput for these images
    # as a Ray async actor (the launch code does this, not this module):
    #   actor = ray.remote(num_gpus=1)(RewardBatcher).remote(reward_spec={...}, max_batch_size=32)
    #   out = ray.get(actor.score.remote(images=imgs, prompts=prompts)); ray.get(actor.stats.remote())

Contract:
- ``score`` returns the same ``RewardOutput`` shape as ``reward.score`` for the caller's own images:
  ``scores`` [B] float64 and ``info`` whose per-sample arrays/lists are sliced to the caller's samples,
  plus ``info["reasons"]`` (list of B ``str | None``: why a sample is NaN) and ``info["batch"]`` (how the
  request was served: batch size, latency, queue wait, and the pid of the process that scored it, which tells a
  Serve pool's replicas apart).
- Requests are merged first come, first served into batches of at most ``max_batch_size`` images; a request
  larger than that is split. Only images of the same [H, W] share a batch. A batch is started at the latest
  ``max_wait_s`` after its oldest request arrived, so a lone request never waits for company forever.
- The scorer runs in a worker thread (the event loop keeps accepting requests). A scorer that raises or
  exceeds ``timeout_s`` gives NaN for exactly that batch's samples, with the reason; other batches are
  unaffected. Non-finite scores are reported as NaN with a reason as well.
- Bad input (wrong dtype/shape, prompt count) raises to that caller only, before queueing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from rewards.base import Reward, RewardOutput, build_reward, check_images


@dataclass(eq=False)  # identity equality: deque.remove must not compare image arrays
class _Chunk:
    """Part of one caller's request: images[lo:hi] of that request, waiting for a batch."""

    images: np.ndarray
    prompts: list[str]
    future: asyncio.Future
    enqueued: float
    n: int = field(init=False)

    def __post_init__(self):
        self.n = int(self.images.shape[0])


class RewardBatcher:
    """Async front of one scorer: many callers await ``score``; one worker loop feeds the scorer in batches."""

    def __init__(
        self,
        reward: Reward | None = None,
        reward_spec: Mapping[str, Any] | None = None,
        max_batch_size: int = 32,
        max_wait_s: float = 0.05,
        timeout_s: float = 120.0,
        max_threads: int = 1,
        torch_threads: int | None = None,
    ):
        """Pass exactly one of ``reward`` (a built scorer) or ``reward_spec`` (``{"name": ..., **kwargs}``,
        built here, so a Ray actor loads the model on its own device). ``max_threads`` bounds how many
        scorer calls may be alive at once. A timed-out call cannot be killed: with 1 thread (the default,
        right for scorers that are not thread-safe, such as vLLM's engine) the next batches queue behind it
        and time out too, visibly, until it returns; with 2 the next batch runs beside the abandoned one.
        ``torch_threads``: torch intra-op threads of this process (a Ray actor gets ``runtime.torch_threads``)."""
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        if (reward is None) == (reward_spec is None):
            raise ValueError("RewardBatcher needs exactly one of reward= (a scorer) or reward_spec= ({'name': ...})")
        if max_batch_size < 1 or max_wait_s < 0 or timeout_s <= 0:
            raise ValueError(
                f"need max_batch_size >= 1, max_wait_s >= 0, timeout_s > 0; got "
                f"{max_batch_size}, {max_wait_s}, {timeout_s}"
            )
        self.reward = reward if reward is not None else build_reward(reward_spec)
        self.name = getattr(self.reward, "name", type(self.reward).__name__)
        self.pid = os.getpid()  # tags each answer: which process (reward actor, Serve replica) scored it
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.timeout_s = float(timeout_s)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_threads, thread_name_prefix="reward")
        self._pending: collections.deque[_Chunk] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._stats = dict(
            requests=0,
            images=0,
            scored_images=0,
            batches=0,
            failed_batches=0,
            timeouts=0,
            nan_images=0,
            latency_sum_s=0.0,
            last_latency_s=float("nan"),
            wait_sum_s=0.0,
        )

    # ---------------------------------------------------------------- public API
    async def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """Score one caller's images [B, H, W, 3] uint8 with their B prompts; awaits until its batch(es) ran."""
        check_images(images, prompts)
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        prompts = list(prompts)
        futures = []
        for lo in range(0, images.shape[0], self.max_batch_size):
            hi = min(lo + self.max_batch_size, images.shape[0])
            fut = loop.create_future()
            self._pending.append(_Chunk(images[lo:hi], prompts[lo:hi], fut, now))
            futures.append(fut)
        self._stats["requests"] += 1
        self._stats["images"] += int(images.shape[0])
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return parts[0] if len(parts) == 1 else _concat(parts)

    def stats(self) -> dict[str, float]:
        """Counters since start: requests, images, batches, failures, latency (scorer time), backlog (queued images)."""
        s = self._stats
        batches = max(s["batches"], 1)
        return {
            "requests": s["requests"],
            "images": s["images"],
            "batches": s["batches"],
            "failed_batches": s["failed_batches"],
            "timeouts": s["timeouts"],
            "nan_images": s["nan_images"],
            "mean_batch_size": s["scored_images"] / batches if s["batches"] else 0.0,
            "mean_latency_s": s["latency_sum_s"] / batches if s["batches"] else float("nan"),
            "last_latency_s": s["last_latency_s"],
            "mean_queue_wait_s": s["wait_sum_s"] / batches if s["batches"] else float("nan"),
            "backlog": self.backlog(),
            "torch_threads": _torch_threads(),
        }

    def backlog(self) -> int:
        """Images queued and not yet handed to the scorer (the autoscaling signal)."""
        return sum(c.n for c in self._pending)

    # ---------------------------------------------------------------- worker
    def _ensure_worker(self) -> None:
        # Created lazily: a Ray async actor's __init__ may run outside the event loop that serves calls.
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                batch = await self._collect()
                await self._score_batch(batch)
        except Exception as e:  # a bug here must not leave callers waiting forever
            while self._pending:
                chunk = self._pending.popleft()
                if not chunk.future.done():
                    chunk.future.set_exception(RuntimeError(f"reward batcher worker failed: {e!r}"))
            raise

    async def _collect(self) -> list[_Chunk]:
        """Take chunks (same image size as the oldest) until the batch is full or the oldest waited max_wait_s."""
        oldest = self._pending[0]
        deadline = oldest.enqueued + self.max_wait_s
        while True:
            fits, room = self._select(oldest.images.shape[1:3])
            if room == 0:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except asyncio.TimeoutError:
                pass
        fits, _ = self._select(oldest.images.shape[1:3])
        for c in fits:
            self._pending.remove(c)
        return fits

    def _select(self, hw: tuple[int, int]) -> tuple[list[_Chunk], int]:
        """First-come chunks of size hw that fit in one batch, and the room left."""
        chosen, total = [], 0
        for c in self._pending:
            if c.images.shape[1:3] != hw:
                continue
            if total + c.n > self.max_batch_size:
                break  # keep arrival order: a later small chunk does not jump an earlier large one
            chosen.append(c)
            total += c.n
        return chosen, self.max_batch_size - total

    async def _score_batch(self, batch: list[_Chunk]) -> None:
        images = np.concatenate([c.images for c in batch], axis=0)
        prompts = [p for c in batch for p in c.prompts]
        n = images.shape[0]
        start = time.monotonic()
        self._stats["wait_sum_s"] += start - batch[0].enqueued
        loop = asyncio.get_running_loop()
        error = None
        try:
            call = loop.run_in_executor(self._pool, self.reward.score, images, prompts)
            out = await asyncio.wait_for(call, self.timeout_s)
            scores = np.asarray(out.scores, dtype=np.float64).reshape(-1)
            if scores.shape[0] != n:
                raise ValueError(f"scorer returned {scores.shape[0]} scores for {n} images")
            info = dict(out.info)
        except asyncio.TimeoutError:
            self._stats["timeouts"] += 1
            error = f"reward/{self.name}: timed out after {self.timeout_s:.1f}s on a batch of {n}"
        except Exception as e:  # the scorer's failure is data for the caller, not a crash of the actor
            error = f"reward/{self.name}: {type(e).__name__}: {e}"
            if len(batch) > 1:  # one caller's bad input must not fail the callers it was batched with
                self._stats["failed_batches"] += 1
                for c in batch:
                    await self._score_batch([c])
                return
        latency = time.monotonic() - start
        if error is not None:
            self._stats["failed_batches"] += 1
            scores, info = np.full(n, np.nan), {"error": error}
        reasons = list(info.pop("reasons", [None] * n))
        nonfinite = ~np.isfinite(scores)
        for i in np.flatnonzero(nonfinite):
            reasons[i] = reasons[i] or error or f"reward/{self.name}: non-finite score {float(scores[i])}"
        scores = np.where(nonfinite, np.nan, scores)
        self._stats["nan_images"] += int(nonfinite.sum())
        self._stats["batches"] += 1
        self._stats["scored_images"] += n
        self._stats["latency_sum_s"] += latency
        self._stats["last_latency_s"] = latency
        lo = 0
        for c in batch:
            hi = lo + c.n
            part_info = _slice_info(info, lo, hi, n)
            part_info["reasons"] = reasons[lo:hi]
            part_info["batch"] = {"size": n, "latency_s": latency, "queue_wait_s": start - c.enqueued, "pid": self.pid}
            if not c.future.done():  # a caller that was cancelled no longer listens
                c.future.set_result(RewardOutput(scores=scores[lo:hi].copy(), info=part_info))
            lo = hi


def _slice_info(info: Mapping[str, Any], lo: int, hi: int, n: int) -> dict[str, Any]:
    """Per-sample entries (arrays/lists of length n, also inside nested dicts) sliced to [lo:hi]; the rest kept."""
    out = {}
    for k, v in info.items():
        if isinstance(v, np.ndarray) and v.ndim >= 1 and v.shape[0] == n:
            out[k] = v[lo:hi]
        elif isinstance(v, list) and len(v) == n:
            out[k] = v[lo:hi]
        elif isinstance(v, Mapping):
            out[k] = _slice_info(v, lo, hi, n)
        else:
            out[k] = v
    return out


def _concat(parts: list[RewardOutput]) -> RewardOutput:
    """Re-join the chunks of one split request: scores, reasons and per-image components concatenated, other
    info per chunk."""
    scores = np.concatenate([p.scores for p in parts])
    reasons = [r for p in parts for r in p.info["reasons"]]
    info = {"reasons": reasons, "chunks": [p.info for p in parts]}
    if all("components" in p.info for p in parts):
        info["components"] = {
            k: np.concatenate([np.asarray(p.info["components"][k]) for p in parts]) for k in parts[0].info["components"]
        }
    return RewardOutput(scores=scores, info=info)


def _torch_threads() -> int:
    """This process's torch intra-op threads (0 where a scorer never imported torch)."""
    import sys

    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else 0
