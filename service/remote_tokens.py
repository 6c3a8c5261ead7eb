"""Counting in a remote engine's tokens when no local tokenizer is configured (MEMENTO_MODEL unset).

    counter = EngineCounter(http, model=lambda: "llama-3-8b")
    counter.count("hello")                   # POST the engine's tokenize endpoint, cached
    counter.count_messages(messages)         # contents counted exactly, the template's frame estimated

Endpoints tried in order, the first that answers is kept: llama.cpp's and Memento's
`POST /tokenize {"content"}`, vLLM's `POST /tokenize {"model", "prompt"}`, llama-cpp-python's
`POST /extras/tokenize {"input"}`. The chat template's own tokens (role headers, separators) are
not visible through these endpoints, so each message adds MESSAGE_FRAME tokens: a ChatML-sized
frame, generous for Llama 3 and Gemma. Set MEMENTO_MODEL to count exactly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

MESSAGE_FRAME = 6  # tokens a chat template adds around one message (ChatML: 5; Llama 3: 5; Gemma: 5)
GENERATION_FRAME = 4  # the assistant header that opens the reply
CACHE_ENTRIES = 8192  # distinct texts remembered; transcripts re-count the same messages every turn
UNKNOWN_VOCAB = 2**31 - 1  # the engine's vocabulary size is not published: it checks logit_bias ids itself


class EngineCounter:
    vocab_size = UNKNOWN_VOCAB
    bos_id = None

    def __init__(self, http: Any, model: Callable[[], str | None]):
        self.http = http
        self.model = model
        self._cache: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._endpoint: int | None = None  # index into _ENDPOINTS once one answered

    def count(self, text: str) -> int:
        if not text:
            return 0
        with self._lock:
            if text in self._cache:
                self._cache.move_to_end(text)
                return self._cache[text]
        n = self._tokenize(text)
        with self._lock:
            self._cache[text] = n
            if len(self._cache) > CACHE_ENTRIES:
                self._cache.popitem(last=False)
        return n

    def count_messages(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> int:
        body = sum(self.count(str(m.get("content") or "")) + MESSAGE_FRAME for m in messages)
        return body + (GENERATION_FRAME if add_generation_prompt else 0)

    def encode(self, text: str) -> list[int]:
        raise _needs_local("token ids")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        raise _needs_local("token ids")

    def _tokenize(self, text: str) -> int:
        from service.remote_engine import EngineStatus, engine_unavailable

        order = [self._endpoint] if self._endpoint is not None else range(len(_ENDPOINTS))
        for i in order:
            path, body = _ENDPOINTS[i](text, self.model())
            try:
                answer = self.http.post(path, body, root=True)
            except EngineStatus:
                continue
            self._endpoint = i
            return len(answer.get("tokens") or [])
        raise engine_unavailable(self.http.base, "no tokenize endpoint answered: set MEMENTO_MODEL to count locally")


_ENDPOINTS: list[Callable[[str, str | None], tuple[str, dict[str, Any]]]] = [
    lambda text, model: ("/tokenize", {"content": text}),  # llama.cpp, Memento
    lambda text, model: ("/tokenize", {"model": model, "prompt": text, "add_special_tokens": False}),  # vLLM
    lambda text, model: ("/extras/tokenize", {"input": text}),  # llama-cpp-python
]


def _needs_local(what: str) -> Exception:
    from service.errors import APIError

    return APIError(400, f"{what} need the engine's tokenizer here: set MEMENTO_MODEL to its GGUF or HF directory",
                    code="unsupported_by_engine")
