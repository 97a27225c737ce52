"""Which prompt and seed each pair gets: prompts in a fresh seeded order each pass, pair ids counting up."""

from __future__ import annotations

import hashlib

import numpy as np


def pair_seed(seed: int, prompt: str, index: int = 0) -> int:
    """A stable 63-bit seed for one pair, from the run seed, the prompt text and a repeat index."""
    digest = hashlib.blake2b(f"{seed}\x00{index}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PairSchedule:
    def __init__(self, prompts: list[str], seed: int, start_pair_id: int = 0):
        if not prompts:
            raise ValueError("no prompts to sample from")
        self.prompts = prompts
        self.seed = seed
        self.next_pair_id = start_pair_id
        self._order: tuple[int, np.ndarray] | None = None  # (pass, its prompt order): one permutation per pass

    def _prompt_index(self, pair_id: int) -> int:
        n = len(self.prompts)
        k = pair_id // n
        if self._order is None or self._order[0] != k:
            self._order = (k, np.random.default_rng([self.seed, k]).permutation(n))
        return int(self._order[1][pair_id % n])

    def take(self, n: int) -> dict:
        """Keyword arguments for ``Sampler.sample`` for the next n pairs."""
        ids = list(range(self.next_pair_id, self.next_pair_id + n))
        self.next_pair_id += n
        pidx = [self._prompt_index(i) for i in ids]
        prompts = [self.prompts[i] for i in pidx]
        return {
            "prompts": prompts,
            "prompt_ids": pidx,
            "pair_ids": ids,
            "seeds": [pair_seed(self.seed, p, i) for p, i in zip(prompts, ids)],
        }
