"""The prompt-embedding cache the learner and samplers keep: on the CPU, bounded, least recently used out first, and
an evicted prompt encodes to the same bits again."""

import torch

from models.adapter import PromptCache, SD3Adapter


def test_the_cache_stays_on_the_cpu_within_its_bound_and_evicts_the_least_recently_used():
    model = SD3Adapter.tiny(seed=0)
    cache = PromptCache(model, max_prompts=3)
    first = cache(["p0"]).tokens.clone()
    for k in range(1, 4):
        cache([f"p{k}"])
    cache(["p1"])  # p1 used again: p2 is now the oldest
    cache(["p4"])
    assert list(cache._cache) == ["p3", "p1", "p4"]  # p0 and p2 went, in that order
    assert all(e.tokens.device.type == "cpu" and e.pooled.device.type == "cpu" for e in cache._cache.values())
    per_prompt = sum(t.numel() * t.element_size() for t in (cache._cache["p1"].tokens, cache._cache["p1"].pooled))
    held = sum(
        e.tokens.numel() * e.tokens.element_size() + e.pooled.numel() * e.pooled.element_size()
        for e in cache._cache.values()
    )
    assert held == 3 * per_prompt  # bounded: max_prompts embeddings
    assert torch.equal(cache(["p0"]).tokens, first)  # re-encoded bit for bit after eviction
