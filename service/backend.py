"""The backend seam: how the service asks for a reply without knowing who computes it.

    backend = LocalBackend(lm, engine)                 # our model (model/engine.py), in process
    backend = RemoteBackend.open(settings)             # an OpenAI-compatible engine (service/remote_engine.py)
    prompt = backend.render(messages, n_pinned=2)      # -> Rendered (counted; 400 if it cannot fit)
    for ev in backend.stream(prompt, GenParams(max_tokens=64), session_id="s1", owner="alice"):
        print(ev.text, end="")                         # ev.finished / finish_reason / usage on the last

What crosses the seam is messages and text; token ids stay inside a backend. The memory layer
counts through `backend.tokenizer` (`count`, `count_messages` in the model's own tokens) and
budgets against `backend.context_window`. `capabilities` tells the service what it may ask for:
logit processors (grammars, the register guard) run only where the logits are ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.errors import APIError


@dataclass(frozen=True)
class Capabilities:
    logit_processors: bool  # grammars and the RegisterGuard can run inside sampling
    cached_tokens: bool  # usage.cached_tokens is measured (else reported as 0)
    token_ids: bool  # raw token-id prompts, logprobs with ids, session KV reuse


@dataclass
class GenParams:
    """Sampling for one generation, in OpenAI's terms (a backend maps them to its own)."""

    max_tokens: int
    temperature: float = 0.7
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # penalties, logit_bias, logprobs, repetition_penalty


@dataclass
class Rendered:
    """A prompt ready to send: the messages, their size in tokens and (local only) the ids."""

    messages: list[dict[str, str]]
    tokens: int  # prompt length in the model's tokens
    ids: list[int] | None = None  # local backend: the chat template's ids
    prefix_len: int | None = None  # local: tokens of the pinned persona prefix (KV shared across owners)
    raw: bool = False  # a plain continuation (POST /v1/completions): no chat template
    continuation: str = ""  # assistant text already written, which the reply continues (repair, continue)


@dataclass
class Delta:
    """One streamed piece of a remote reply (the local backend yields model.GenerationEvent, same fields)."""

    text: str
    token_id: int | None = None
    finished: bool = False
    finish_reason: str | None = None  # stop | length | cancelled on the final delta
    usage: Any = None  # an object with prompt_tokens, completion_tokens, cached_tokens
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


class Backend(Protocol):
    name: str  # the model's name as /v1/models and reply metadata show it
    capabilities: Capabilities

    @property
    def tokenizer(self) -> Any: ...  # count(text), count_messages(messages); local: the full Tokenizer

    @property
    def context_window(self) -> int: ...

    def render(self, messages: list[dict[str, str]], n_pinned: int = 0,
               tools: list[dict[str, Any]] | None = None) -> Rendered: ...  # tools: the template's `tools=`

    def stream(self, prompt: Rendered, params: GenParams, *, session_id: str | None = None, owner: str = "",
               processors: Sequence[Any] = (), should_stop: Callable[[], bool] | None = None) -> Iterator[Any]: ...

    def raw(self, ids: list[int]) -> Rendered: ...  # POST /v1/completions: a continuation, no template

    def extend(self, prompt: Rendered, text: str) -> Rendered: ...  # the reply so far, to continue from

    def complete(self, prompt: Rendered, params: GenParams, processors: Sequence[Any] = ()) -> str: ...

    def drop_session(self, session_id: str) -> None: ...

    def check_ready(self) -> dict[str, Any]: ...  # raises APIError(503) when the engine cannot answer

    def preflight(self) -> None: ...  # before a stream's headers: a 503 now beats an error event later

    def close(self) -> None: ...


def context_too_long(tokens: int, window: int) -> APIError:
    return APIError(
        400,
        f"the prompt is {tokens} tokens but the model's context window is {window}; "
        "send fewer or shorter messages (or use a session: memory mode trims to fit)",
        param="messages",
        code="context_length_exceeded",
    )


class LocalBackend:
    """Our own model through model.Engine: today's behaviour, with token ids kept on this side."""

    capabilities = Capabilities(logit_processors=True, cached_tokens=True, token_ids=True)

    def __init__(self, lm: Any, engine: Any, context_window: int | None = None):
        self.lm = lm
        self.engine = engine
        self.name = lm.name
        # MEMENTO_CONTEXT_WINDOW may shrink the model's window, never grow it (the engine would refuse)
        self._window = min(int(context_window), int(lm.context_window)) if context_window else int(lm.context_window)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def context_window(self) -> int:
        return self._window

    def render(self, messages: list[dict[str, str]], n_pinned: int = 0,
               tools: list[dict[str, Any]] | None = None) -> Rendered:
        tok = self.tokenizer
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tools=tools)
        if len(ids) >= self._window:
            raise context_too_long(len(ids), self._window)
        prefix_len = None
        if n_pinned:  # the persona prefix as the template renders it alone: what every session shares
            pinned_ids = tok.apply_chat_template(messages[:n_pinned], add_generation_prompt=False, tools=tools)
            prefix_len = common_prefix(pinned_ids, ids) or None
        return Rendered(messages, len(ids), ids, prefix_len)

    def stream(self, prompt: Rendered, params: GenParams, *, session_id: str | None = None, owner: str = "",
               processors: Sequence[Any] = (), should_stop: Callable[[], bool] | None = None) -> Iterator[Any]:
        assert prompt.ids is not None, "the local backend renders its own prompts"
        return self.engine.generate(prompt.ids, sampling_params(params), session_id=session_id,
                                    logits_processors=list(processors), should_stop=should_stop,
                                    prefix_len=prompt.prefix_len, owner=owner)

    def raw(self, ids: list[int]) -> Rendered:
        return Rendered([], len(ids), list(ids), raw=True)

    def extend(self, prompt: Rendered, text: str) -> Rendered:
        assert prompt.ids is not None
        ids = prompt.ids + (self.tokenizer.encode(text) if text else [])
        return Rendered(prompt.messages, len(ids), ids, prompt.prefix_len, prompt.raw, prompt.continuation + text)

    def complete(self, prompt: Rendered, params: GenParams, processors: Sequence[Any] = ()) -> str:
        assert prompt.ids is not None
        return self.engine.complete(prompt.ids, sampling_params(params), logits_processors=list(processors)).text

    def drop_session(self, session_id: str) -> None:
        self.engine.drop_session(session_id)

    def check_ready(self) -> dict[str, Any]:
        return {}

    def preflight(self) -> None:
        pass  # in process: nothing to reach

    def close(self) -> None:
        pass  # the engine's scheduler thread is a daemon; tests share one engine across apps


def sampling_params(params: GenParams) -> Any:
    from model import SamplingParams

    return SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                          seed=params.seed, stop=params.stop, **params.extra)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
