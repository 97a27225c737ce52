"""RewardBatcher with plain asyncio: merging, max wait, failures confined to their batch, stats."""

from __future__ import annotations

import asyncio
import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from rewards.base import RewardOutput
from rewards.batcher import RewardBatcher


class MeanPixel:
    """score = mean pixel value of the image + len(prompt); records every batch it is called with."""

    name = "mean_pixel"

    def __init__(self, delay_s: float = 0.0, fail_on: str | None = None, hang_on: str | None = None):
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay_s, self.fail_on, self.hang_on = delay_s, fail_on, hang_on

    def score(self, images, prompts):
        self.calls.append(len(prompts))
        self.threads.add(threading.current_thread().name)
        if self.fail_on in prompts:
            raise RuntimeError("model exploded")
        time.sleep(self.delay_s + (1.0 if self.hang_on in prompts else 0.0))
        s = images.reshape(len(prompts), -1).mean(1) + np.array([len(p) for p in prompts], float)
        s[[i for i, p in enumerate(prompts) if p == "inf"]] = np.inf
        return RewardOutput(scores=s, info={"per_sample": s * 2, "const": 7})


def imgs(values, hw=(4, 4)) -> np.ndarray:
    return np.stack([np.full((*hw, 3), v, np.uint8) for v in values])


def run(coro):
    return asyncio.run(coro)


def test_concurrent_callers_are_merged_into_fewer_batches():
    reward = MeanPixel(delay_s=0.02)
    b = RewardBatcher(reward=reward, max_batch_size=8, max_wait_s=0.2)

    async def main():
        calls = [b.score(images=imgs([10 * k, 10 * k + 1]), prompts=["ab", "c"]) for k in range(6)]
        return await asyncio.gather(*calls)

    outs = run(main())
    # 12 images, batches of <= 8, all arrive together -> exactly 2 scorer calls (8 + 4), not 6.
    assert reward.calls == [8, 4]
    for k, out in enumerate(outs):
        np.testing.assert_array_equal(out.scores, [10 * k + 2, 10 * k + 1 + 1])  # mean pixel + len(prompt)
        np.testing.assert_array_equal(out.info["per_sample"], 2 * out.scores)  # per-sample info is sliced
        assert out.info["const"] == 7 and out.info["reasons"] == [None, None]
    st = b.stats()
    assert (st["requests"], st["images"], st["batches"], st["backlog"]) == (6, 12, 2, 0)
    assert st["mean_batch_size"] == 6.0
    assert all(t.startswith("reward") for t in reward.threads)  # ran in the worker pool, not the event loop


def test_lone_request_returns_after_about_max_wait():
    b = RewardBatcher(reward=MeanPixel(), max_batch_size=64, max_wait_s=0.15)

    async def main():
        t0 = time.monotonic()
        out = await b.score(images=imgs([3]), prompts=["x"])
        return out, time.monotonic() - t0

    out, dt = run(main())
    assert out.scores.tolist() == [4.0]
    assert 0.14 <= dt < 0.6, dt


def test_full_batch_does_not_wait():
    b = RewardBatcher(reward=MeanPixel(), max_batch_size=2, max_wait_s=5.0)

    async def main():
        t0 = time.monotonic()
        await b.score(images=imgs([1, 2]), prompts=["a", "b"])
        return time.monotonic() - t0

    assert run(main()) < 1.0


def test_raising_scorer_fails_only_its_batch_with_the_reason():
    reward = MeanPixel(fail_on="boom")
    b = RewardBatcher(reward=reward, max_batch_size=2, max_wait_s=0.05)

    async def main():
        bad = b.score(images=imgs([1, 2]), prompts=["boom", "x"])  # fills batch 1
        good = b.score(images=imgs([5, 6]), prompts=["y", "zz"])  # batch 2
        return await asyncio.gather(bad, good)

    bad, good = run(main())
    assert np.isnan(bad.scores).all()
    assert bad.info["reasons"] == ["reward/mean_pixel: RuntimeError: model exploded"] * 2
    np.testing.assert_array_equal(good.scores, [6.0, 8.0])
    assert good.info["reasons"] == [None, None]
    assert b.stats()["failed_batches"] == 1 and b.stats()["nan_images"] == 2


def test_a_failing_request_does_not_fail_the_requests_batched_with_it():
    # the three requests share one batch; the scorer raises on it, so each request is scored again on its own:
    # only the request carrying the bad prompt fails
    reward = MeanPixel(fail_on="boom")
    b = RewardBatcher(reward=reward, max_batch_size=8, max_wait_s=0.2)

    async def main():
        return await asyncio.gather(
            b.score(images=imgs([1, 2]), prompts=["a", "b"]),
            b.score(images=imgs([3, 4]), prompts=["boom", "c"]),
            b.score(images=imgs([5, 6]), prompts=["dd", "e"]),
        )

    first, bad, last = run(main())
    assert reward.calls == [6, 2, 2, 2]
    np.testing.assert_array_equal(first.scores, [2.0, 3.0])
    np.testing.assert_array_equal(last.scores, [7.0, 7.0])
    assert np.isnan(bad.scores).all() and bad.info["reasons"] == ["reward/mean_pixel: RuntimeError: model exploded"] * 2
    assert first.info["reasons"] == last.info["reasons"] == [None, None]
    st = b.stats()
    assert (st["failed_batches"], st["nan_images"], st["batches"]) == (2, 2, 3)


def test_non_finite_score_is_nan_for_that_sample_only():
    b = RewardBatcher(reward=MeanPixel(), max_batch_size=4, max_wait_s=0.01)
    out = run(b.score(images=imgs([1, 2]), prompts=["inf", "ok"]))
    assert np.isnan(out.scores[0]) and out.scores[1] == 4.0
    assert "non-finite" in out.info["reasons"][0] and out.info["reasons"][1] is None


def test_timeout_gives_nan_and_reason_and_the_loop_goes_on():
    b = RewardBatcher(reward=MeanPixel(hang_on="slow"), max_batch_size=1, max_wait_s=0.0, timeout_s=0.2, max_threads=2)

    async def main():
        return await asyncio.gather(
            b.score(images=imgs([1]), prompts=["slow"]), b.score(images=imgs([2]), prompts=["ok"])
        )

    slow, ok = run(main())
    assert np.isnan(slow.scores[0]) and "timed out after 0.2s" in slow.info["reasons"][0]
    assert ok.scores.tolist() == [4.0]
    assert b.stats()["timeouts"] == 1


def test_large_request_is_split_and_rejoined_in_order():
    reward = MeanPixel()
    b = RewardBatcher(reward=reward, max_batch_size=3, max_wait_s=0.01)
    out = run(b.score(images=imgs(range(7)), prompts=["a"] * 7))
    assert reward.calls == [3, 3, 1]
    np.testing.assert_array_equal(out.scores, np.arange(7) + 1.0)
    assert out.info["reasons"] == [None] * 7


def test_split_request_keeps_per_image_components():
    from rewards.combined import CombinedReward

    class Const:
        def __init__(self, value):
            self.value = value

        def score(self, images, prompts):
            return RewardOutput(scores=np.full(len(prompts), self.value))

    reward = CombinedReward(
        [{"key": "a", "reward": MeanPixel(), "weight": 1.0}, {"key": "b", "reward": Const(4.0), "weight": 0.5}]
    )
    b = RewardBatcher(reward=reward, max_batch_size=3, max_wait_s=0.01)
    out = run(b.score(images=imgs(range(5)), prompts=["a"] * 5))
    np.testing.assert_array_equal(out.info["components"]["a"], np.arange(5) + 1.0)
    np.testing.assert_array_equal(out.info["components"]["b"], np.full(5, 4.0))
    np.testing.assert_array_equal(out.scores, np.arange(5) + 1.0 + 2.0)


def test_images_of_different_sizes_are_not_mixed():
    reward = MeanPixel()
    b = RewardBatcher(reward=reward, max_batch_size=8, max_wait_s=0.05)

    async def main():
        return await asyncio.gather(
            b.score(images=imgs([1], hw=(4, 4)), prompts=["a"]),
            b.score(images=imgs([2], hw=(8, 8)), prompts=["a"]),
            b.score(images=imgs([3], hw=(4, 4)), prompts=["a"]),
        )

    outs = run(main())
    assert sorted(reward.calls) == [1, 2]
    assert [o.scores[0] for o in outs] == [2.0, 3.0, 4.0]


def test_bad_input_raises_to_that_caller_and_config_errors_name_the_fix():
    b = RewardBatcher(reward=MeanPixel())
    with pytest.raises(ValueError, match="uint8"):
        run(b.score(images=np.zeros((1, 4, 4, 3), np.float32), prompts=["a"]))
    with pytest.raises(ValueError, match="exactly one of reward"):
        RewardBatcher()
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        RewardBatcher(reward_spec={"name": "nope"})


def jpeg_kb(images: np.ndarray, quality: int) -> np.ndarray:
    """JPEG size in kB of each image at the given quality, computed here with PIL."""
    sizes = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        sizes.append(len(buf.getvalue()) / 1000.0)
    return np.asarray(sizes)


def textured(seed: int, n: int = 2, hw=(16, 24)) -> np.ndarray:
    """Images whose JPEG sizes differ from each other (flat images would all compress alike)."""
    rng = np.random.default_rng(seed)
    return np.stack([(rng.integers(0, 256, (*hw, 3)) * (k + 1) // n).astype(np.uint8) for k in range(n)])


def test_built_from_spec_with_plain_kwargs():
    b = RewardBatcher(reward_spec={"name": "jpeg_compressibility", "quality": 90}, max_batch_size=4)
    images = textured(0)
    out = run(b.score(images=images, prompts=["a", "b"]))
    expected = -jpeg_kb(images, 90)
    assert len(set(expected.tolist())) == 2  # the two images really differ
    assert not np.array_equal(expected, -jpeg_kb(images, 95))  # and the quality kwarg matters
    np.testing.assert_array_equal(out.scores, expected)
    np.testing.assert_array_equal(out.info["jpeg_kb"], -expected)


def test_works_as_a_ray_async_actor(ray_local):
    """What the launch code does: ray.remote(RewardBatcher) with plain kwargs; concurrent calls get batched."""
    ray = pytest.importorskip("ray")
    from rewards.jpeg import JpegCompressibility

    batches = [textured(1), textured(2) // 4]  # the second call's images are smoother: smaller files
    actor = None
    try:
        actor = (
            ray.remote(RewardBatcher)
            .options(name="reward_test_0")
            .remote(reward_spec={"name": "jpeg_compressibility"}, max_batch_size=4, max_wait_s=0.5)
        )
        refs = [actor.score.remote(images=x, prompts=["a", "b"]) for x in batches]
        outs = ray.get(refs, timeout=120)
        stats = ray.get(actor.stats.remote())
    finally:
        if actor is not None:
            ray.kill(actor)
    local = JpegCompressibility()  # default quality 95, same as the spec without kwargs
    for x, o in zip(batches, outs):
        np.testing.assert_array_equal(o.scores, local.score(x, ["a", "b"]).scores)
        np.testing.assert_array_equal(o.scores, -jpeg_kb(x, 95))
    assert not np.array_equal(outs[0].scores, outs[1].scores)
    assert stats["requests"] == 2 and stats["images"] == 4 and stats["batches"] == 1  # merged in the actor
