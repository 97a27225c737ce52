"""VLM judge without vLLM: template checks, the formula, the transformers backend on the tiny VLM, and the
server client's protocol handling (logprob parsing, missing tokens, retries, per-sample failures) against a
stub HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from rewards.vlm_judge import DEFAULT_QUESTION, VLMJudge, check_question_template, judge_score
from tests.fixtures.tiny_vlm import build_tiny_vlm
from tests.helpers import JsonHandler

IMGS = np.random.default_rng(0).integers(0, 256, (3, 40, 40, 3), dtype=np.uint8)
PROMPTS = ["a cat", "a red car", "two dogs"]


def test_judge_score_formula():
    np.testing.assert_allclose(judge_score(np.array([0.0, np.log(3.0), -np.log(3.0)])), [50.0, 75.0, 25.0])
    assert judge_score(np.array([800.0]))[0] == 100.0 and judge_score(np.array([-800.0]))[0] == 0.0  # no overflow
    assert judge_score(np.array([1.0]), scale=1.0)[0] == pytest.approx(1 / (1 + np.exp(-1)))


@pytest.mark.parametrize(
    "template, match",
    [
        ("Is this a good image?", r"must contain the placeholder \{prompt\}"),
        ("Caption {caption}: yes?", r"found \['caption'\]"),
        ("{prompt} and {other}", r"and no other"),
        ("JSON {prompt} {", "write literal braces as"),
    ],
)
def test_malformed_template_fails_at_construction(template, match):
    with pytest.raises(ValueError, match=match):
        VLMJudge(model="/never/loaded", question=template)


def test_default_template_is_the_papers():
    paper = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
    assert check_question_template(DEFAULT_QUESTION) == paper
    assert check_question_template('Is "{prompt}" shown? {{strict}}') == 'Is "{prompt}" shown? {{strict}}'


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown judge backend 'sglang'"):
        VLMJudge(model="x", backend="sglang")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> str:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm"), seed=0)


def test_tiny_vlm_is_deterministic_in_its_seed(tiny_vlm, tmp_path):
    again = build_tiny_vlm(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json", "chat_template.jinja"):
        assert (
            hashlib.md5((Path(tiny_vlm) / name).read_bytes()).digest()
            == hashlib.md5((Path(again) / name).read_bytes()).digest()
        ), name
    other = build_tiny_vlm(tmp_path / "other", seed=1)
    assert (Path(other) / "model.safetensors").read_bytes() != (Path(tiny_vlm) / "model.safetensors").read_bytes()


def test_transformers_judge_batched_equals_one_by_one(tiny_vlm):
    judge = VLMJudge(model=tiny_vlm, backend="transformers", dtype="float32", batch_size=3, image_size=64)
    out = judge.score(IMGS, PROMPTS)
    judge.backend.batch_size = 1
    single = judge.score(IMGS, PROMPTS)
    np.testing.assert_allclose(out.scores, single.scores, atol=1e-3)  # left padding changes nothing material
    np.testing.assert_allclose(out.scores, judge_score(out.info["logit_diff"]))
    assert ((out.scores > 1) & (out.scores < 99)).all() and np.ptp(out.scores) > 0.1


# ----------------------------------------------------------------------------- stub OpenAI-compatible server
YES, NO = 7, 8


class Stub(JsonHandler):
    """Answers /tokenize and /v1/chat/completions the way vLLM does; behaviour keyed by the caption."""

    fail_once: set = set()

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self.reply(200, {"tokens": {"Yes": [YES], "No": [NO]}.get(req["prompt"], [1, 2])})
        question = req["messages"][0]["content"][1]["text"]
        assert req["max_tokens"] == 1 and req["messages"][0]["content"][0]["type"] == "image_url"
        if "flaky" in question and question not in Stub.fail_once:
            Stub.fail_once.add(question)
            return self.reply(503, {"error": "overloaded"})
        if "bad" in question:
            return self.reply(400, {"error": "bad request"})
        if req.get("logprob_token_ids") == [YES, NO]:
            top = [{"token": f"token_id:{YES}", "logprob": -0.2}, {"token": f"token_id:{NO}", "logprob": -1.8}]
        elif "only yes" in question:  # top-k mode, No is not among the returned tokens
            top = [{"token": f"token_id:{YES}", "logprob": -0.1}, {"token": "token_id:99", "logprob": -3.0}]
        else:
            top = [{"token": "token_id:98", "logprob": -0.1}, {"token": "token_id:99", "logprob": -3.0}]
        first = dict(top[0], top_logprobs=top)
        self.reply(200, {"choices": [{"logprobs": {"content": [first]}}]})


@pytest.fixture(scope="module")
def stub_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_server_client_parses_logprobs_retries_and_fails_per_sample(stub_url):
    judge = VLMJudge(model="m", backend="server", url=stub_url, retries=2, retry_backoff_s=0.01, image_size=32)
    out = judge.score(IMGS, ["flaky", "bad", "fine"])
    expected = 100 / (1 + np.exp(-(-0.2 - -1.8)))
    assert out.scores[0] == pytest.approx(expected) and out.scores[2] == pytest.approx(expected)  # 503 retried
    assert np.isnan(out.scores[1]) and "HTTP 400" in out.info["reasons"][1]  # 4xx: no retry
    assert out.info["reasons"][0] is None and out.info["reasons"][2] is None


def test_top_logprobs_mode_floors_a_missing_token_and_nans_when_both_missing(stub_url):
    judge = VLMJudge(model="m", backend="server", url=stub_url, logprob_request="top_logprobs", image_size=32)
    out = judge.score(IMGS[:2], ["only yes", "neither"])
    # No is missing: it gets the smallest returned top-k logprob (-3.0), an upper bound on its value.
    assert out.scores[0] == pytest.approx(100 / (1 + np.exp(-(-0.1 - -3.0))))
    assert out.info["floored"] == 1
    assert np.isnan(out.scores[1]) and "neither Yes nor No" in out.info["reasons"][1]


def test_multi_token_answer_word_is_rejected(stub_url):
    with pytest.raises(ValueError, match="single token"):
        VLMJudge(model="m", backend="server", url=stub_url, yes_token="Yes!")
