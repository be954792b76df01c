"""A disk cache of chat answers, so a re-run of autointerp sends no request it has sent before.

One JSON file per request, named by the SHA-256 of the canonical request (backend kind, model,
messages, max_tokens, top_logprobs, temperature) and written atomically: an interrupted run leaves
only whole answers, and concurrent runs at worst both ask the same question once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict
from pathlib import Path

from caft.autointerp.backends import ChatBackend, Completion, Message, Usage
from caft.io import write_json

logger = logging.getLogger(__name__)


def request_key(request: dict) -> str:
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CachedBackend:
    """Wraps a backend: answers from `folder` when the same request was answered before."""

    def __init__(self, backend: ChatBackend, folder: str | Path):
        self.backend = backend
        self.folder = Path(folder)
        self.kind = backend.kind
        self.model = backend.model
        self.concurrency = backend.concurrency
        self.hits = 0
        self._lock = threading.Lock()

    @property
    def usage(self) -> Usage:
        return self.backend.usage

    def request(
        self, messages: list[Message], *, max_tokens: int, top_logprobs: int | None
    ) -> dict:
        return {
            "backend": self.kind,
            "model": self.model,
            "messages": list(messages),
            "max_tokens": max_tokens,
            "top_logprobs": top_logprobs,
            "temperature": getattr(self.backend, "temperature", None),
        }

    def path_for(self, request: dict) -> Path:
        key = request_key(request)
        return self.folder / key[:2] / f"{key}.json"

    def complete(
        self, messages: list[Message], *, max_tokens: int, top_logprobs: int | None = None
    ) -> Completion:
        request = self.request(messages, max_tokens=max_tokens, top_logprobs=top_logprobs)
        path = self.path_for(request)
        if path.is_file():
            try:
                completion = Completion(**json.loads(path.read_text())["completion"])
            except (OSError, ValueError, KeyError, TypeError) as error:
                logger.warning("Ignoring an unreadable cache entry %s (%s).", path, error)
            else:
                with self._lock:
                    self.hits += 1
                return completion
        completion = self.backend.complete(
            messages, max_tokens=max_tokens, top_logprobs=top_logprobs
        )
        write_json(path, {"request": request, "completion": asdict(completion)})
        return completion
