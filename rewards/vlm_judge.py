"""VLM yes/no judge: score = scale * sigmoid(logit(Yes) - logit(No)) on the next token after the question.

Usage::

    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="transformers")   # in-process, GPU
    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="server", url="http://127.0.0.1:8000")
    judge = VLMJudge(model="Qwen/Qwen2.5-VL-7B-Instruct", backend="vllm",          # vLLM engine in-process
                     engine_kwargs={"tensor_parallel_size": 2})
    out = judge.score(images_uint8_bhwc, prompts)       # out.scores [B] in [0, scale]; NaN = not scored

The paper's judge (ALGORITHM.md §5): the user turn is the image followed by the question
``'Does this image match the caption "{prompt}"? Answer Yes or No.'``, the image resized to 504x504, and the
score is ``100 * sigmoid(logit(Yes) - logit(No))`` on the next-token logits. All three backends build the
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
  whose request still fails is NaN with the reason in ``info["reasons"]``; the others are scored.
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


def prepare_image(image: np.ndarray, size: int | None) -> Image.Image:
    """uint8 [H, W, 3] -> RGB PIL image resized to size x size (bicubic); size None keeps it as is."""
    img = Image.fromarray(np.ascontiguousarray(image))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BICUBIC)
    return img


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
        **backend_kwargs: Any,
    ):
        self.question = check_question_template(question)
        if backend not in _BACKENDS:
            raise ValueError(f"unknown judge backend {backend!r}; choose one of {sorted(_BACKENDS)}")
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
        own = {"model", "image_size", "scale", "yes_token", "no_token"}
        check_kwargs(_BACKENDS[backend], {k: v for k, v in settings.items() if k not in own}, f"backend {backend!r}")

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> RewardOutput:
        """images uint8 [B, H, W, 3], B prompts -> scores [B] in [0, scale] (NaN where a request failed)."""
        check_images(images, prompts)
        pil = [prepare_image(img, self.image_size) for img in images]
        questions = [self.question.format(prompt=p) for p in prompts]
        diff, info = self.backend.logit_diff(pil, questions)
        info = {"logit_diff": diff, "backend": self.backend_name, **info}
        return RewardOutput(scores=judge_score(diff, self.scale), info=info)


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
        torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                       "float16": torch.float16}[dtype]
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

    def logit_diff(self, images: list[Image.Image], questions: list[str]) -> tuple[np.ndarray, dict]:
        out = []
        for lo in range(0, len(images), self.batch_size):
            imgs, qs = images[lo:lo + self.batch_size], questions[lo:lo + self.batch_size]
            texts = [
                self.processor.apply_chat_template(user_turn(q, {"type": "image"}), add_generation_prompt=True,
                                                   tokenize=False)
                for q in qs
            ]
            inputs = self.processor(text=texts, images=[[im] for im in imgs], padding=True, return_tensors="pt")
            inputs = inputs.to(self.device)
            with self.torch.inference_mode():
                logits = self.model(**inputs).logits[:, -1, :].float()  # [b, vocab]
            out.append((logits[:, self.yes_id] - logits[:, self.no_id]).cpu().numpy())
        return np.concatenate(out).astype(np.float64), {}


class ServerJudge:
    """Client of an OpenAI-compatible vLLM server: one ``max_tokens=1`` chat completion per image."""

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
    ):
        if logprob_request not in ("token_ids", "top_logprobs"):
            raise ValueError(f"logprob_request must be 'token_ids' or 'top_logprobs', got {logprob_request!r}")
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
        """POST JSON with retries on connection errors, timeouts and 5xx; a 4xx is raised at once."""
        data = json.dumps(body).encode()
        last = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.retry_backoff_s * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url + path, data=data, headers=self.headers, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    return json.loads(resp.read())
            except urllib.error.HTTPError as e:
                detail = e.read().decode(errors="replace")[:500]
                last = RuntimeError(f"HTTP {e.code} from {self.url}{path}: {detail}")
                if e.code < 500:
                    raise last from None
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
                last = RuntimeError(f"cannot reach judge server {self.url}{path}: {e}")
        raise last

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

    def _one(self, img: Image.Image, question: str) -> tuple[float, bool]:
        """logit(Yes) - logit(No) for one image, and whether a missing token was floored."""
        body = {
            "model": self.model,
            "messages": user_turn(question, {"type": "image_url", "image_url": {"url": png_data_url(img)}}),
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
            raise RuntimeError(f"server returned no logprob for token id(s) {missing}; does it support "
                               "logprob_token_ids (vLLM >= 0.32)? else use logprob_request='top_logprobs'")
        if len(missing) == 2:
            raise RuntimeError(f"neither Yes nor No is among the top {self.top_logprobs} tokens; raise "
                               "top_logprobs or use logprob_request='token_ids'")
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
            except Exception as e:  # one failed request costs one sample, not the batch
                reasons[i] = f"reward/vlm_judge: {type(e).__name__}: {e}"
        return diff, {"reasons": reasons, "floored": floored}


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
            user_turn(q, {"type": "image_url", "image_url": {"url": png_data_url(im)}})
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
