"""Chat backends for autointerp: any OpenAI-compatible endpoint, or a local Hugging Face model.

A backend answers `complete(messages, max_tokens=, top_logprobs=)` with a `Completion`: the text
and, when asked and available, the log-probabilities of the most likely tokens at each generated
position. Both count the requests and tokens they use (`backend.usage`).

The API backend (`OpenAICompatibleBackend`) works with OpenAI itself, vLLM, llama.cpp's server,
Ollama, ...: a base URL, a model name and the name of the environment variable holding the key. It
retries rate limits (429), server errors (5xx), time-outs and refused connections with exponential
backoff, caps the requests in flight, and turns what cannot be retried (unknown model, rejected key,
an endpoint still unreachable after the retries) into a `CaftError` that says what to fix.

The local backend (`LocalHFBackend`) runs a causal LM in-process with its chat template. For a score
request (`top_logprobs` set) it reports the probability of each whole number 0-100 as an answer,
even when the tokenizer splits numbers into digits (as SmolLM2's does), so the probability-weighted
score reads the same as with an API model whose numbers are single tokens.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from caft.errors import CaftError

logger = logging.getLogger(__name__)

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


@dataclass
class Completion:
    text: str
    top_logprobs: list[dict[str, float]] | None = None  # per generated position: token -> logprob
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Usage:
    """Requests actually sent (cache hits are not counted) and the tokens they used."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, completion: Completion) -> None:
        self.requests += 1
        self.prompt_tokens += completion.prompt_tokens
        self.completion_tokens += completion.completion_tokens

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class ChatBackend(Protocol):
    kind: str  # "openai", "local-hf", ...: part of every cache key
    model: str  # the model's name: part of every cache key
    concurrency: int  # how many requests may be in flight at once
    usage: Usage

    def complete(
        self, messages: list[Message], *, max_tokens: int, top_logprobs: int | None = None
    ) -> Completion: ...


class OpenAICompatibleBackend:
    """Chat completions from an OpenAI-compatible HTTP endpoint, through the `openai` package."""

    kind = "openai"

    def __init__(
        self,
        base_url: str | None = None,
        model: str = "gpt-4o-mini",
        *,
        api_key_env: str | None = "OPENAI_API_KEY",
        concurrency: int = 4,
        max_retries: int = 5,
        timeout: float = 60.0,
        backoff: float = 1.0,
        max_backoff: float = 60.0,
        temperature: float = 0.0,
    ):
        try:
            import openai
        except ImportError:
            raise CaftError(
                "The API backend needs the `openai` package: pip install 'caft[autointerp]' "
                "(or pip install openai)."
            ) from None
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key.strip():
                raise CaftError(
                    f"The API key environment variable {api_key_env} is not set. Export it "
                    f"(export {api_key_env}=...), name another one with --api-key-env, or pass "
                    "--api-key-env '' for a local server that needs no key."
                )
        else:
            key = "no-key"  # local servers ignore it; the client insists on one
        self._openai = openai
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.model = model
        self.api_key_env = api_key_env
        self.concurrency = max(1, concurrency)
        self.max_retries = max(0, max_retries)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.temperature = temperature
        self.usage = Usage()
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout
        )
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()

    def complete(
        self, messages: list[Message], *, max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        params = {
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "temperature": self.temperature,
        }
        if top_logprobs:
            params.update(logprobs=True, top_logprobs=top_logprobs)
        with self._slots:
            response = self._create(params)
        completion = _completion_from_response(response, where=self.base_url)
        with self._lock:
            self.usage.add(completion)
        return completion

    def _create(self, params: dict):
        openai = self._openai
        attempts, failures = self.max_retries + 1, 0
        while True:
            try:
                return self._client.chat.completions.create(**params)
            except openai.APIStatusError as error:
                status = error.status_code
                if status == 400 and "logprobs" in params:
                    # some servers refuse log-probabilities: ask again without (a parsed score)
                    logger.warning(
                        "%s refused logprobs (%s); asking without.", self.base_url, error
                    )
                    params = {k: v for k, v in params.items() if "logprobs" not in k}
                    continue
                if status not in (408, 409, 429) and status < 500:
                    raise CaftError(self._describe_status(error)) from None
                last: Exception = error
            except openai.APIConnectionError as error:  # refused, reset, timed out
                last = error
            failures += 1
            if failures >= attempts:
                raise CaftError(self._describe_final(last, attempts)) from None
            time.sleep(self._delay(failures - 1, last))

    def _delay(self, attempt: int, error: Exception) -> float:
        delay = self.backoff * 2**attempt * (1 + 0.25 * random.random())
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        with contextlib.suppress(ValueError):
            delay = max(delay, float(retry_after)) if retry_after else delay
        return min(delay, self.max_backoff)

    def _describe_status(self, error) -> str:
        status, message = error.status_code, _error_message(error)
        if status == 404:
            return (
                f"The endpoint {self.base_url} does not know the model {self.model!r} (404: "
                f"{message}). Check the model name (GET {self.base_url.rstrip('/')}/models lists "
                "them) and the base URL (it usually ends in /v1)."
            )
        if status in (401, 403):
            return (
                f"The endpoint {self.base_url} rejected the API key from ${self.api_key_env} "
                f"({status}: {message})."
            )
        return f"The endpoint {self.base_url} refused the request ({status}: {message})."

    def _describe_final(self, error: Exception, attempts: int) -> str:
        if isinstance(error, self._openai.APIStatusError):
            what = "rate-limited" if error.status_code == 429 else "failing"
            return (
                f"The endpoint {self.base_url} is still {what} after {attempts} attempts "
                f"({error.status_code}: {_error_message(error)}). Try again later, or lower the "
                "concurrency."
            )
        return (
            f"Cannot reach the chat endpoint {self.base_url} after {attempts} attempts "
            f"({type(error).__name__}: {error}). Is the server running, and is the base URL right?"
        )


def _error_message(error) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(getattr(error, "message", "") or error)


def _completion_from_response(response, *, where: str) -> Completion:
    choices = getattr(response, "choices", None)
    if not choices:
        raise CaftError(f"The endpoint {where} answered without any choice: {response!r:.300}")
    choice = choices[0]
    text = (choice.message.content if choice.message else None) or ""
    content = getattr(choice.logprobs, "content", None) if choice.logprobs else None
    top_logprobs = None
    if content:
        top_logprobs = []
        for item in content:
            alternatives = {alt.token: alt.logprob for alt in (item.top_logprobs or [])}
            top_logprobs.append(alternatives or {item.token: item.logprob})
    usage = getattr(response, "usage", None)
    return Completion(
        text=text,
        top_logprobs=top_logprobs,
        prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
        completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
    )


_DIGITS = re.compile(r"(\s*)([0-9]+)(.*)", re.DOTALL)


class LocalHFBackend:
    """A causal LM run in-process with its chat template (greedy decoding)."""

    kind = "local-hf"
    concurrency = 1

    def __init__(
        self,
        model,
        tokenizer,
        *,
        name: str | None = None,
        max_number: int = 100,
        min_branch_prob: float = 1e-4,
    ):
        from caft.models import model_name

        if not getattr(tokenizer, "chat_template", None):
            raise CaftError(
                "The local autointerp backend needs a chat model whose tokenizer has a chat "
                "template (e.g. the embedded SmolLM2-135M-Instruct)."
            )
        self.hf_model = model
        self.tokenizer = tokenizer
        self.model = name or model_name(model) or type(model).__name__
        self.max_number = max_number
        self.min_branch_prob = min_branch_prob
        self.usage = Usage()
        self._lock = threading.Lock()
        self._digit_tokens: list[tuple[int, bool, str, str]] | None = None

    def complete(
        self, messages: list[Message], *, max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        ids = ids.to(self._device())
        with self._lock, torch.no_grad():
            if top_logprobs:
                answers, reply = self._answer_logprobs(ids, top_logprobs, max_tokens)
                completion = Completion(reply, [answers], ids.shape[1], max_tokens)
            else:
                new = self._generate(ids, max_tokens)
                reply = self.tokenizer.decode(new, skip_special_tokens=True)
                completion = Completion(reply, None, ids.shape[1], len(new))
            self.usage.add(completion)
        return completion

    def _device(self):
        return next(self.hf_model.parameters()).device

    def _generate(self, ids: torch.Tensor, max_tokens: int) -> list[int]:
        output = self.hf_model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return output[0, ids.shape[1] :].tolist()

    def _answer_logprobs(
        self, ids: torch.Tensor, top: int, max_tokens: int
    ) -> tuple[dict[str, float], str]:
        """Log-probabilities of whole answers: every number 0..max_number (summed over the ways
        to spell it in tokens, each followed by a non-digit), plus the `top` likeliest other
        tokens. The prompt is run once; number prefixes are continued from its cache."""
        output = self.hf_model(input_ids=ids, use_cache=True)
        cache = output.get("cache")
        cache = output.get("past_key_values") if cache is None else cache  # 4.x name
        length = ids.shape[1]
        first = output.logits[0, -1].float().softmax(-1)
        reply = self.tokenizer.decode(
            [int(first.argmax())] if max_tokens <= 1 else self._generate(ids, max_tokens),
            skip_special_tokens=True,
        )
        answers: dict[str, float] = {}
        frontier = [([], "", first, 1.0)]  # (token path, digits so far, next-token probs, prob)
        while frontier:
            path, digits, probs, prob = frontier.pop()
            continuing = 0.0
            for token_id, spaced, token_digits, rest in self._digits():
                if digits and spaced:
                    continue  # a space after digits ends the number
                continuing += float(probs[token_id])
                p = prob * float(probs[token_id])
                number = digits + token_digits
                if not self._valid(number):
                    continue  # mass on answers that are not numbers 0..max_number
                if rest or p < self.min_branch_prob:
                    answers[number] = answers.get(number, 0.0) + p  # ends here (or too unlikely)
                    continue
                next_probs = self._continue(cache, length, [*path, token_id])
                frontier.append(([*path, token_id], number, next_probs, p))
            if digits:  # the number ends unless a digit follows
                answers[digits] = answers.get(digits, 0.0) + prob * max(0.0, 1.0 - continuing)
        result = {number: math.log(p) for number, p in answers.items() if p > 0}
        others = first.clone()
        others[[token_id for token_id, *_ in self._digits()]] = 0.0
        values, indices = others.topk(min(top, len(others)))
        for value, index in zip(values.tolist(), indices.tolist(), strict=True):
            if value > 0:
                token = self.tokenizer.decode([index])
                result[token] = math.log(math.exp(result.get(token, -math.inf)) + value)
        return result, reply

    def _continue(self, cache, length: int, path: list[int]) -> torch.Tensor:
        """Next-token probabilities after the prompt and `path`, continuing the prompt's cache
        (cut back to the prompt afterwards, or copied where a cache cannot be cut)."""
        croppable = callable(getattr(cache, "crop", None)) and getattr(cache, "is_croppable", True)
        work = cache if croppable is True else copy.deepcopy(cache)
        device = self._device()
        output = self.hf_model(
            input_ids=torch.tensor([path], device=device),
            position_ids=torch.arange(length, length + len(path), device=device)[None],
            use_cache=True,
            **{self._cache_argument(): work},
        )
        if croppable is True:
            extra = cache.get_seq_length() - length
            if extra > 0:
                cache.crop(-extra)  # a negative count removes that many tokens (4.x and 5.x)
        return output.logits[0, -1].float().softmax(-1)

    def _cache_argument(self) -> str:
        from caft.models import unwrap_model

        parameters = inspect.signature(unwrap_model(self.hf_model).forward).parameters
        return "cache" if "cache" in parameters else "past_key_values"  # 5.x / 4.x name

    def _valid(self, number: str) -> bool:
        return (number == "0" or not number.startswith("0")) and int(number) <= self.max_number

    def _digits(self) -> list[tuple[int, bool, str, str]]:
        """(token id, has leading space, leading digits, rest) for tokens that start a number."""
        if self._digit_tokens is None:
            found = []
            for token_id in range(len(self.tokenizer)):
                match = _DIGITS.fullmatch(self.tokenizer.decode([token_id]))
                if match:
                    found.append((token_id, bool(match.group(1)), match.group(2), match.group(3)))
            self._digit_tokens = [t for t in found if t[0] < self._vocab_size()]
        return self._digit_tokens

    def _vocab_size(self) -> int:
        return int(self.hf_model.get_output_embeddings().weight.shape[0])
