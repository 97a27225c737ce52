"""The server judge against a real HTTP server on 127.0.0.1 that fails, hangs, goes away and comes back: bounded
retries with backoff, ``judge_unavailable`` reasons, a circuit breaker that fails fast while open, probes after its
cool-down and closes when the server answers again. Every wait is bounded; each test states its time bound (generous: the counters of network calls carry the
"no waiting" claims, the clock only rules out a hang)."""

from __future__ import annotations

import json
import threading
import time
from http.server import ThreadingHTTPServer

import numpy as np
import pytest

from cluster.accounting import drop_reasons
from rewards.vlm_judge import CircuitBreaker, VLMJudge
from tests.helpers import JsonHandler

YES, NO = 7, 8
IMGS = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
SCORE = 100 / (1 + np.exp(-(-0.2 - -1.8)))
CHAT = "/v1/chat/completions"


class Judge(JsonHandler):
    """vLLM's two endpoints the client uses. ``server.mode``: ok | fail (HTTP 503) | hang (answers after 5 s or at
    teardown); ``server.chats`` counts chat requests."""

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/tokenize":
            return self.reply(200, {"tokens": {"Yes": [YES], "No": [NO]}[req["prompt"]]})
        self.server.chats += 1
        if self.server.mode == "fail":
            return self.reply(503, {"error": "overloaded"})
        if self.server.mode == "hang" and self.server.release.wait(5.0):
            return  # torn down: the client gave up long ago
        top = [{"token": f"token_id:{YES}", "logprob": -0.2}, {"token": f"token_id:{NO}", "logprob": -1.8}]
        self.reply(200, {"choices": [{"logprobs": {"content": [dict(top[0], top_logprobs=top)]}}]})


class Server:
    """A judge server that can be stopped and started again on the same port."""

    def __init__(self):
        self.port, self.httpd = 0, None
        self.start()

    def start(self, mode: str = "ok"):
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Judge)
        self.httpd.mode, self.httpd.chats, self.httpd.release = mode, 0, threading.Event()
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.stop()


def judge_for(server, **kw):
    settings = {
        "retries": 2,
        "retry_backoff_s": 0.01,
        "timeout_s": 2.0,
        "breaker_failures": 3,
        "breaker_cooldown_s": 60.0,
        "max_concurrency": 1,
        "image_size": 8,
    }
    return VLMJudge(model="m", backend="server", url=server.url, **{**settings, **kw})


def timed(judge, images, prompts=None):
    t0 = time.monotonic()
    out = judge.score(images, prompts or [f"p{i}" for i in range(len(images))])
    return out, time.monotonic() - t0


def test_failing_server_retries_then_opens_and_fails_fast(server):
    judge = judge_for(server)
    server.httpd.mode = "fail"
    out, took = timed(judge, IMGS[:3])
    assert np.isnan(out.scores).all() and took < 2.0
    assert out.info["reasons"][0] == (
        f"reward/vlm_judge: judge_unavailable: no answer from {server.url}{CHAT} after 3 "
        'attempt(s) (timeout 2s each): HTTP 503: {"error": "overloaded"}'
    )
    for why in out.info["reasons"][1:]:  # the breaker opened on the 3rd failed attempt: no network call
        assert why.startswith(
            f"reward/vlm_judge: judge_unavailable: {server.url}{CHAT}: circuit breaker open after 3 "
            "consecutive failed attempts; next probe in "
        ) and why.endswith("s")
    assert server.httpd.chats == 3
    assert {k: v for k, v in judge.stats().items() if k != "breaker/consecutive_failures"} == {
        "breaker/state": "open",
        "breaker/open": 1,
        "breaker/opened": 1,
        "breaker/fast_failed": 2,
        "breaker/failed_attempts": 3,
        "breaker/answers": 2,
    }  # the 2 answers: /tokenize at construction
    assert out.info["breaker"]["breaker/state"] == "open"
    # in the run, a pair with an unscored image is dropped as reward_failure, its reason in the log
    assert drop_reasons([10, 11], [10], out.info["reasons"][:2] + [None, None]) == {"reward_failure": 1}


def test_server_goes_away_then_comes_back(server):
    judge = judge_for(server, retries=1, breaker_failures=2, breaker_cooldown_s=0.5)
    assert np.allclose(judge.score(IMGS[:2], ["a", "b"]).scores, SCORE)
    server.stop()  # connection refused from now on
    out, took = timed(judge, IMGS[:2])
    assert np.isnan(out.scores).all() and took < 2.0
    assert out.info["reasons"][0].startswith(
        f"reward/vlm_judge: judge_unavailable: no answer from {server.url}{CHAT} after 2 attempt(s) (timeout 2s each): "
    )
    assert "Connection refused" in out.info["reasons"][0] and "circuit breaker open" in out.info["reasons"][1]
    out, took = timed(judge, IMGS)  # open: everything fails at once
    assert took < 0.5 and all("circuit breaker open" in r for r in out.info["reasons"])
    server.start()  # back, on the same port
    time.sleep(0.55)  # the cool-down passes: the next request probes
    out, took = timed(judge, IMGS)
    assert np.allclose(out.scores, SCORE) and out.info["reasons"] == [None] * 4 and took < 2.0
    stats = judge.stats()
    assert stats["breaker/state"] == "closed" and stats["breaker/opened"] == 1 and server.httpd.chats == 4


def test_a_failed_probe_opens_the_breaker_again(server):
    judge = judge_for(server, breaker_failures=1, breaker_cooldown_s=0.2)
    server.httpd.mode = "fail"
    judge.score(IMGS[:1], ["a"])  # 1 failed attempt: open
    time.sleep(0.25)
    out, took = timed(judge, IMGS[:2])
    assert server.httpd.chats == 2 and took < 2.0  # the probe only, not its retries
    assert out.info["reasons"][0].endswith(
        'consecutive failed attempts; next probe in 0.2s (last error: HTTP 503: {"error": "overloaded"})'
    )
    assert "circuit breaker open" in out.info["reasons"][1]
    assert judge.stats()["breaker/opened"] == 2 and judge.stats()["breaker/state"] == "open"


def test_a_hung_server_costs_one_timeout_not_a_hang(server):
    judge = judge_for(server, timeout_s=0.3, retries=3, breaker_failures=2, max_concurrency=4)
    server.httpd.mode = "hang"
    out, took = timed(judge, IMGS)
    # the requests time out together after 0.3 s; the breaker is open by then, so none of them retries (a request
    # whose thread started after two had timed out fails at once, without a network call)
    assert np.isnan(out.scores).all() and 0.3 <= took < 2.5, took
    assert all(r.startswith("reward/vlm_judge: judge_unavailable: ") for r in out.info["reasons"])
    timed_out = [r for r in out.info["reasons"] if "timed out" in r]
    assert len(timed_out) == server.httpd.chats >= 2 and judge.stats()["breaker/failed_attempts"] == server.httpd.chats


def test_breaker_states_on_a_fake_clock():
    now = [0.0]
    b = CircuitBreaker(failures=2, cooldown_s=10.0, clock=lambda: now[0])
    b.failure()
    assert b.admit() is None  # 1 < 2 failures: still closed
    b.failure()
    assert b.admit() == "circuit breaker open after 2 consecutive failed attempts; next probe in 10.0s"
    now[0] = 10.0
    assert b.admit() is None  # half-open: this caller is the probe
    assert b.admit() == "circuit breaker open after 2 consecutive failed attempts; a probe is in flight"
    b.success()
    assert (
        b.admit() is None and b.stats()["breaker/state"] == "closed" and b.stats()["breaker/consecutive_failures"] == 0
    )


@pytest.mark.parametrize(
    "setting, message",
    [
        (
            {"breaker_failures": 0},
            "breaker_failures=0 must be >= 1 (consecutive failed attempts that open the circuit breaker)",
        ),
        ({"timeout_s": 0}, "timeout_s=0 must be >= 0.001 (seconds one HTTP attempt may wait)"),
        ({"retries": -1}, "retries=-1 must be >= 0 (extra attempts per request)"),
    ],
)
def test_bad_server_settings_fail_before_any_connection(setting, message):
    with pytest.raises(ValueError) as e:
        VLMJudge.check_settings(backend="server", url="http://127.0.0.1:9", **setting)
    assert str(e.value) == f"judge server setting {message}"
