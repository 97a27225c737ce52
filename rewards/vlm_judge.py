"""VLM yes/no judge: score = scale * sigmoid(logit(Yes) - logit(No)) on the next token after the question.

Usage::

    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="transformers")   # in-process, GPU
    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="server", url="http://127.0.0.1:8000")
    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="vllm",          # vLLM engine in-process
                     engine_kwargs={"tensor_parallel_size": 2})
    out = judge.score(images_uint8_bhwc, prompts)       # out.scores [B] in [0, scale]; NaN = not scored

The paper's judge (ALGORITHM.md §5): the user turn is the image followed by the question
``'Does this image match the caption "{prompt}"? Answer Yes or No.'``, the image resized to 504x504, and the
score is ``100 * sigmoid(logit(Yes) - logit(No))`` on the next-token logits.

Image preprocessing (``resize=``): ``"float_bilinear"`` is the reference's training reward: pixels as floats in
[0, 1], ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False)`` to ``image_size``, and the
processor told ``do_rescale=False, do_resize=False``. Our images arrive as uint8 (what samplers send), so the
floats are ``uint8 / 255``; the server and vLLM-engine backends take encoded images, so they get the resized
floats rounded to uint8 (at most 0.5/255 off per channel). ``"pil_bicubic"`` (the default, unchanged) is uint8 +
PIL bicubic resize; ``image_size=None`` leaves the resize to the processor (the reference's evaluation:
uint8 images, the processor's resize). All three backends build the
same user turn (image first, then the question), apply the model's own chat template with the generation
prompt, and read the same two token ids, so they agree up to float error (the parity test shows it).

Architecture-agnostic: the chat template comes from the model's processor/tokenizer and the Yes/No token ids
from its tokenizer (each must be a single token, else construction fails), so the same code runs a tiny
Idefics3 on CPU and Qwen2.5-VL on a GPU.

Exactness of the server/engine paths: vLLM returns log-softmax values, and
``log p(Yes) - log p(No) = logit(Yes) - logit(No)`` exactly, whatever the normaliser. vLLM >= 0.32 can return
the log-probabilities of named token ids (``logprob_token_ids``), so both are always present (default,
``logprob_request="token_ids"``). Servers without that field can use ``logprob_request="top_logprobs"``:
the top ``top_logprobs`` entries are requested; if one of the two tokens is missing it is given the k-th
largest log-probability (an upper bound on its true value, so the score is pulled towards 50 at most by the
gap), counted in ``info["floored"]``; if both are missing the sample is NaN with the reason.

Backends (chosen by ``backend=``):
- ``"transformers"``: ``AutoModelForImageTextToText`` + ``AutoProcessor`` from a hub id or a local path.
- ``"server"``: an OpenAI-compatible vLLM server (``python -m vllm.entrypoints.openai.api_server``), one chat
  completion per image with ``max_tokens=1``, bounded concurrency, per-request timeout and retries. A sample
  whose request still fails is NaN with the reason in ``info["reasons"]``; the others are scored. A server that
  stops answering never hangs the run: each attempt waits at most ``timeout_s``, a request makes at most
  ``retries + 1`` attempts ``retry_backoff_s * 2**k`` apart, then its image is NaN with the reason
  ``reward/vlm_judge: judge_unavailable: ...`` (its pair dropped as ``reward_failure``). After
  ``breaker_failures`` consecutive attempts without an answer (refused, reset, timed out, HTTP 5xx) the circuit
  breaker opens: requests fail at once, without a network call, for ``breaker_cooldown_s``; then one request
  probes the server: an answer closes the breaker and scoring goes on as before, no answer opens it again.
  ``info["breaker"]`` and ``VLMJudge.stats()`` report its state and counters.
- ``"vllm"``: vLLM's offline engine (``vllm.LLM``) in this process: for a Ray reward actor whose
  ``runtime_env`` is a vLLM environment on a GPU node (``engine_kwargs`` go to ``vllm.LLM``, e.g.
  ``tensor_parallel_size``). Scripts that build it must have an ``if __name__ == "__main__":`` guard.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import string
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence

import numpy as np
from PIL import Image

from rewards.base import RewardOutput, check_images, register

DEFAULT_MODEL = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_QUESTION = 'Does this image match the caption "{prompt}"? Answer Yes or No.'
DEFAULT_URL = "http://127.0.0.1:8000"
RESIZE_MODES = ("pil_bicubic", "float_bilinear")
JUDGE_UNAVAILABLE = "judge_unavailable"  # the reason of an image the judge server did not score


def judge_score(logit_diff: np.ndarray, scale: float = 100.0) -> np.ndarray:
    """The judge formula: scale * sigmoid(logit(Yes) - logit(No)), computed stably for large |diff|."""
    d = np.asarray(logit_diff, dtype=np.float64)
    return scale * 0.5 * (1.0 + np.tanh(0.5 * d))


def check_question_template(question: str) -> str:
    """Return ``question`` if it has exactly one placeholder, ``{prompt}``; else raise naming the fix."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(question) if f is not None}
    except ValueError as e:
        raise ValueError(
            f"judge question template {question!r} is not a valid format string ({e}); "
            "write literal braces as {{ and }}"
        ) from None
    if fields != {"prompt"}:
        raise ValueError(
            f"judge question template {question!r} must contain the placeholder {{prompt}} and no other "
            f"(found {sorted(fields) or 'none'}); e.g. {DEFAULT_QUESTION!r}"
        )
    return question


def prepare_image(image: np.ndarray, size: int | None, resize: str = "pil_bicubic") -> Image.Image | np.ndarray:
    """uint8 [H, W, 3] -> the judge's input at size x size (size None keeps it as is). ``pil_bicubic``: an RGB PIL
    image, PIL's bicubic resize. ``float_bilinear`` (the reference's training reward): float32 [size, size, 3] in
    [0, 1], ``F.interpolate(mode="bilinear", align_corners=False)`` of ``image / 255``."""
    if resize == "float_bilinear":
        import torch

        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].float() / 255.0  # [1, 3, H, W]
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        return x[0].permute(1, 2, 0).numpy()  # [S, S, 3]
    img = Image.fromarray(np.ascontiguousarray(image))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


def to_pil(image: Image.Image | np.ndarray) -> Image.Image:
    """What a backend that sends encoded images sends: a float image [H, W, 3] in [0, 1] rounded to uint8."""
    if isinstance(image, Image.Image):
        return image
    return Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8))


def user_turn(question: str, image_part: dict) -> list[dict]:
    """The one conversation every backend sends: a user turn with the image, then the question."""
    return [{"role": "user", "content": [image_part, {"type": "text", "text": question}]}]


def png_data_url(img: Image.Image) -> str:
    """Lossless encoding, so the server's processor sees exactly the pixels the transformers path sees."""
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def single_token_id(tokenizer, word: str) -> int:
    """The id of ``word`` as one token of this tokenizer; raise if the tokenizer splits it."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"the judge needs {word!r} to be a single token, but this tokenizer gives ids {ids}; "
            "set yes_token/no_token to words that are single tokens for this model (e.g. ' Yes')"
        )
    return int(ids[0])


@register("vlm_judge")
class VLMJudge:
    """Yes/No VLM judge behind the reward signature; see the module docstring for the three backends."""

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        backend: str = "transformers",
        question: str = DEFAULT_QUESTION,
        image_size: int | None = 504,
        scale: float = 100.0,
        yes_token: str = "Yes",
        no_token: str = "No",
        resize: str = "pil_bicubic",
        **backend_kwargs: Any,
    ):
        self.question = check_question_template(question)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown judge backend {backend!r}; choose one of {sorted(_BACKENDS)}")
        self.resize = check_resize(resize)
        self.image_size = image_size
        self.scale = float(scale)
        self.backend_name = backend
        self.backend = _BACKENDS[backend](model=model, yes_token=yes_token, no_token=no_token, **backend_kwargs)

    @staticmethod
    def check_settings(backend: str = "transformers", question: str = DEFAULT_QUESTION, **settings: Any) -> None:
        """Before any model loads: the question template, the backend name, and the backend's own settings."""
        from rewards.base import check_kwargs

        check_question_template(question)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown judge backend {backend!r}; choose one of {sorted(_BACKENDS)}")
        check_resize(settings.get("resize", "pil_bicubic"))
        own = {"model", "image_size", "scale", "yes_token", "no_token", "resize"}
        backend_settings = {k: v for k, v in settings.items() if k not in own}
        check_kwargs(_BACKENDS[backend], backend_settings, f"backend {backend!r}")
        if backend == "server":
            check_server_settings(**{k: v for k, v in backend_settings.items() if k in SERVER_LIMITS})

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> scores [B] in [0, scale] (NaN where a request failed)."""
        check_images(images, prompts)
        prepared = [prepare_image(img, self.image_size, self.resize) for img in images]
        questions = [self.question.format(prompt=p) for p in prompts]
        diff, info = self.backend.logit_diff(prepared, questions)
        info = {"logit_diff": diff, "backend": self.backend_name, **info}
        return RewardOutput(scores=judge_score(diff, self.scale), info=info)

    def stats(self) -> dict:
        """The backend's counters (the server backend: its circuit breaker); empty for in-process backends."""
        stats = getattr(self.backend, "stats", None)
        return stats() if stats is not None else {}


def check_resize(resize: str) -> str:
    if resize not in RESIZE_MODES:
        raise ValueError(
            f"judge resize={resize!r} is not one of {RESIZE_MODES}; 'float_bilinear' is the reference's "
            "training reward, 'pil_bicubic' uint8 + PIL bicubic"
        )
    return resize


class TransformersJudge:
    """In-process judge on transformers: batched forward passes, next-token logits of the last position."""

    def __init__(
        self,
        model: str,
        yes_token: str,
        no_token: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        attn_implementation: str | None = None,
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from rewards.hub import load_pretrained

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
            dtype
        ]
        self.processor = load_pretrained(AutoProcessor.from_pretrained, model, "judge processor")
        kwargs = {"dtype": torch_dtype}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        self.model = load_pretrained(AutoModelForImageTextToText.from_pretrained, model, "judge model", **kwargs)
        self.model.to(self.device).eval()
        tokenizer = self.processor.tokenizer
        # Left padding puts every sample's last prompt token at position -1 of the batch.
        tokenizer.padding_side = "left"
        self.yes_id = single_token_id(tokenizer, yes_token)
        self.no_id = single_token_id(tokenizer, no_token)
        self.batch_size = int(batch_size)

    def logit_diff(self, images: list[Image.Image | np.ndarray], questions: list[str]) -> tuple[np.ndarray, dict]:
        """PIL images (``pil_bicubic``) or float [S, S, 3] in [0, 1] already resized (``float_bilinear``: the
        processor neither rescales nor resizes them, as in the reference)."""
        out = []
        floats = (
            {"images_kwargs": {"do_rescale": False, "do_resize": False}}
            if images and isinstance(images[0], np.ndarray)
            else {}
        )
        for lo in range(0, len(images), self.batch_size):
            imgs, qs = images[lo : lo + self.batch_size], questions[lo : lo + self.batch_size]
            texts = [
                self.processor.apply_chat_template(
                    user_turn(q, {"type": "image"}), add_generation_prompt=True, tokenize=False
                )
                for q in qs
            ]
            inputs = self.processor(
                text=texts, images=[[im] for im in imgs], padding=True, return_tensors="pt", **floats
            )
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                logits = self.model(**inputs).logits[:, -1, :].float()  # [b, vocab]
            out.append((logits[:, self.yes_id] - logits[:, self.no_id]).cpu().numpy())
        return np.concatenate(out).astype(np.float64), {}


SERVER_LIMITS = {  # setting -> (lowest allowed value, what it bounds)
    "timeout_s": (1e-3, "seconds one HTTP attempt may wait"),
    "retries": (0, "extra attempts per request"),
    "retry_backoff_s": (0.0, "seconds before the first retry (doubling after)"),
    "breaker_failures": (1, "consecutive failed attempts that open the circuit breaker"),
    "breaker_cooldown_s": (0.0, "seconds the open breaker fails requests fast before one probe"),
    "max_concurrency": (1, "requests in flight"),
}


def check_server_settings(**settings: float) -> None:
    """The server backend's bounds (``SERVER_LIMITS``): raise naming the setting, its value and the least allowed."""
    for key, value in settings.items():
        low, what = SERVER_LIMITS[key]
        if not value >= low:
            raise ValueError(f"judge server setting {key}={value!r} must be >= {low} ({what})")


class JudgeUnavailable(RuntimeError):
    """The judge server gave no answer (refused, reset, timed out, HTTP 5xx) or its circuit breaker is open."""


class CircuitBreaker:
    """Thread-safe breaker of one server. closed: requests go; ``failures`` consecutive failed attempts -> open:
    ``admit`` refuses at once for ``cooldown_s``; then half-open: one request (the probe) goes, the rest are
    refused; the probe's answer -> closed, its failure -> open again. Any answer (``success``) closes it."""

    def __init__(self, failures: int, cooldown_s: float, clock=time.monotonic):
        self.threshold, self.cooldown_s, self.clock = int(failures), float(cooldown_s), clock
        self.lock = threading.Lock()
        self.state, self.consecutive, self.opened_at, self.probing = "closed", 0, 0.0, False
        self.counts = {"opened": 0, "fast_failed": 0, "failed_attempts": 0, "answers": 0}

    def admit(self) -> str | None:
        """None: go ahead (perhaps as the probe). Else why the request must fail now, without a network call."""
        with self.lock:
            if self.state == "closed":
                return None
            now = self.clock()
            if self.state == "open" and now - self.opened_at >= self.cooldown_s:
                self.state, self.probing = "half_open", False
            if self.state == "half_open" and not self.probing:
                self.probing = True
                return None
            self.counts["fast_failed"] += 1
            when = (
                "a probe is in flight"
                if self.state == "half_open"
                else f"next probe in {max(0.0, self.opened_at + self.cooldown_s - now):.1f}s"
            )
            return f"circuit breaker open after {self.consecutive} consecutive failed attempts; {when}"

    def success(self) -> None:
        with self.lock:
            self.state, self.consecutive, self.probing = "closed", 0, False
            self.counts["answers"] += 1

    def failure(self) -> None:
        with self.lock:
            self.consecutive += 1
            self.counts["failed_attempts"] += 1
            if self.state == "half_open" or (self.state == "closed" and self.consecutive >= self.threshold):
                self.state, self.opened_at, self.probing = "open", self.clock(), False
                self.counts["opened"] += 1

    def stats(self) -> dict:
        """State (``closed`` / ``open`` / ``half_open``; ``breaker/open`` 1 unless closed) and counters."""
        with self.lock:
            return {
                "breaker/state": self.state,
                "breaker/open": int(self.state != "closed"),
                "breaker/consecutive_failures": self.consecutive,
                **{f"breaker/{k}": v for k, v in self.counts.items()},
            }


class ServerJudge:
    """Client of an OpenAI-compatible vLLM server: one ``max_tokens=1`` chat completion per image, behind retries
    with backoff and a circuit breaker (module docstring)."""

    def __init__(
        self,
        model: str,
        yes_token: str,
        no_token: str,
        url: str = DEFAULT_URL,
        served_model_name: str | None = None,
        max_concurrency: int = 8,
        timeout_s: float = 60.0,
        retries: int = 2,
        retry_backoff_s: float = 0.5,
        logprob_request: str = "token_ids",
        top_logprobs: int = 20,
        api_key: str | None = None,
        breaker_failures: int = 5,
        breaker_cooldown_s: float = 30.0,
    ):
        if logprob_request not in ("token_ids", "top_logprobs"):
            raise ValueError(f"logprob_request must be 'token_ids' or 'top_logprobs', got {logprob_request!r}")
        check_server_settings(
            timeout_s=timeout_s,
            retries=retries,
            retry_backoff_s=retry_backoff_s,
            breaker_failures=breaker_failures,
            breaker_cooldown_s=breaker_cooldown_s,
            max_concurrency=max_concurrency,
        )
        self.breaker = CircuitBreaker(breaker_failures, breaker_cooldown_s)
        self.url = url.rstrip("/")
        self.model = served_model_name or model
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.retry_backoff_s = float(retry_backoff_s)
        self.logprob_request = logprob_request
        self.top_logprobs = int(top_logprobs)
        self.headers = {"Content-Type": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="judge")
        # The ids come from the server's own tokenizer, so client and server cannot disagree on them.
        self.yes_id = self._single_token_id(yes_token)
        self.no_id = self._single_token_id(no_token)

    def _post(self, path: str, body: dict) -> dict:
        """POST JSON: at most ``retries + 1`` attempts of at most ``timeout_s`` each, ``retry_backoff_s * 2**k``
        apart, each first admitted by the circuit breaker. A 4xx is raised at once (the server answered); no
        answer after the last attempt, or a breaker that refuses, raises ``JudgeUnavailable``."""
        data = json.dumps(body).encode()
        last = "no attempt made"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            refused = self.breaker.admit()
            if refused is not None:
                after = f" (last error: {last})" if attempt else ""
                raise JudgeUnavailable(f"{JUDGE_UNAVAILABLE}: {self.url}{path}: {refused}{after}")
            req = urllib.request.Request(self.url + path, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                if e.code < 500:
                    self.breaker.success()
                    raise RuntimeError(f"HTTP {e.code} from {self.url}{path}: {detail}") from None
                last = f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            else:
                self.breaker.success()
                return json.loads(raw)
            self.breaker.failure()
        raise JudgeUnavailable(
            f"{JUDGE_UNAVAILABLE}: no answer from {self.url}{path} after {self.retries + 1} "
            f"attempt(s) (timeout {self.timeout_s:g}s each): {last}"
        )

    def stats(self) -> dict:
        return self.breaker.stats()

    def _single_token_id(self, word: str) -> int:
        try:
            ids = self._post("/tokenize", {"model": self.model, "prompt": word, "add_special_tokens": False})["tokens"]
        except RuntimeError as e:
            raise RuntimeError(
                f"{e}; start the server first (python -m vllm.entrypoints.openai.api_server --model ... "
                "--host 127.0.0.1) or pass url= to where it runs"
            ) from None
        if len(ids) != 1:
            raise ValueError(
                f"the judge needs {word!r} to be a single token, but the server's tokenizer gives {ids}; "
                "set yes_token/no_token to single-token words for this model"
            )
        return int(ids[0])

    def _one(self, img: Image.Image | np.ndarray, question: str) -> tuple[float, bool]:
        """logit(Yes) - logit(No) for one image, and whether a missing token was floored."""
        body = {
            "model": self.model,
            "messages": user_turn(question, {"type": "image_url", "image_url": {"url": png_data_url(to_pil(img))}}),
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "return_tokens_as_token_ids": True,  # vLLM names tokens "token_id:<id>": no string matching
        }
        if self.logprob_request == "token_ids":
            body["logprob_token_ids"] = [self.yes_id, self.no_id]
        else:
            body["top_logprobs"] = self.top_logprobs
        first = self._post("/v1/chat/completions", body)["choices"][0]["logprobs"]["content"][0]
        top = {_token_id(e["token"]): e["logprob"] for e in first.get("top_logprobs") or []}
        lp = dict(top)
        lp.setdefault(_token_id(first["token"]), first["logprob"])  # the sampled token's value is exact too
        missing = [t for t in (self.yes_id, self.no_id) if t not in lp]
        if missing and self.logprob_request == "token_ids":
            raise RuntimeError(
                f"server returned no logprob for token id(s) {missing}; does it support "
                "logprob_token_ids (vLLM >= 0.32)? else use logprob_request='top_logprobs'"
            )
        if len(missing) == 2:
            raise RuntimeError(
                f"neither Yes nor No is among the top {self.top_logprobs} tokens; raise "
                "top_logprobs or use logprob_request='token_ids'"
            )
        floored = bool(missing)
        for tid in missing:
            # Not in the top k: its logprob is at most the k-th largest; use that bound.
            lp[tid] = min(top.values())
        return lp[self.yes_id] - lp[self.no_id], floored

    def logit_diff(self, images: list[Image.Image], questions: list[str]) -> tuple[np.ndarray, dict]:
        futures = [self.pool.submit(self._one, im, q) for im, q in zip(images, questions)]
        diff = np.full(len(images), np.nan)
        reasons: list[str | None] = [None] * len(images)
        floored = 0
        for i, f in enumerate(futures):
            try:
                diff[i], fl = f.result()
                floored += fl
            except JudgeUnavailable as e:  # no answer: "reward/vlm_judge: judge_unavailable: ..."
                reasons[i] = f"reward/vlm_judge: {e}"
            except Exception as e:  # one failed request costs one sample, not the batch
                reasons[i] = f"reward/vlm_judge: {type(e).__name__}: {e}"
        return diff, {"reasons": reasons, "floored": floored, "breaker": self.breaker.stats()}


class VLLMEngineJudge:
    """vLLM's offline engine in this process (a Ray reward actor with a vLLM runtime_env on a GPU node)."""

    def __init__(self, model: str, yes_token: str, no_token: str, engine_kwargs: dict | None = None):
        from vllm import LLM, SamplingParams  # only in the vLLM environment; never imported by `import rewards`

        kwargs = {"limit_mm_per_prompt": {"image": 1}, "max_model_len": 4096}
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(model=model, **kwargs)
        tokenizer = self.llm.get_tokenizer()
        self.yes_id = single_token_id(tokenizer, yes_token)
        self.no_id = single_token_id(tokenizer, no_token)
        self.params = SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=[self.yes_id, self.no_id])

    def logit_diff(self, images: list[Image.Image], questions: list[str]) -> tuple[np.ndarray, dict]:
        conversations = [
            user_turn(q, {"type": "image_url", "image_url": {"url": png_data_url(to_pil(im))}})
            for im, q in zip(images, questions)
        ]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        diff = np.empty(len(outputs))
        for i, o in enumerate(outputs):
            lp = o.outputs[0].logprobs[0]  # {token_id: Logprob} for the first generated position
            diff[i] = lp[self.yes_id].logprob - lp[self.no_id].logprob
        return diff, {}


def _token_id(token: str) -> int | str:
    """vLLM's "token_id:123" -> 123; any other token string is kept as is (never equal to an int id)."""
    return int(token.split(":", 1)[1]) if token.startswith("token_id:") else token


_BACKENDS = {"transformers": TransformersJudge, "server": ServerJudge, "vllm": VLLMEngineJudge}
