"""`RemoteBackend`: the backend seam over an OpenAI-compatible engine (vLLM, llama.cpp's server,
llama-cpp-python's server, another Memento in stateless mode). MEMENTO_ENGINE_URL turns it on.

    backend = RemoteBackend.open(settings)      # probes the engine; tolerates it being down
    for ev in backend.stream(backend.render(messages), GenParams(max_tokens=64)):
        print(ev.text, end="")

What the engine is asked, and how its answers are read:
- the model: MEMENTO_ENGINE_MODEL, else the first entry of GET /v1/models;
- the context window: MEMENTO_CONTEXT_WINDOW, else /v1/models `max_model_len` (vLLM) or
  `context_window` (Memento), GET /props `n_ctx` (llama.cpp), or, for llama-cpp-python's server
  (which publishes none), the window its own "exceed context window of N" error names;
- counting: the real tokenizer from MEMENTO_MODEL when that is set (tokenizer and chat template
  only, never the weights), else the engine's tokenize endpoint, cached (service/remote_tokens.py);
- replies: streamed /v1/chat/completions; a reply that continues text already written (register
  repair, "continue") is a raw /v1/completions of the rendered prompt where we hold the template
  (llama.cpp), else `continue_final_message` (vLLM).
Failures are an APIError 503 `engine_unavailable` naming the URL: connection errors and 5xx are
retried with backoff only before the first token (after it, a retry would repeat text).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import httpx

from service.backend import Capabilities, Delta, GenParams, Rendered, Usage, context_too_long
from service.errors import APIError

log = logging.getLogger("memento.remote")

RETRY_DELAYS = (0.2, 0.5, 1.0)  # seconds between tries before the first token: about 2 s in all
MAX_ENGINE_STOPS = 4  # stop strings an OpenAI-compatible engine is guaranteed to accept
PROBE_TOKENS = 1 << 17  # an over-long prompt whose refusal names llama-cpp-python's window
_WINDOW_ERROR = re.compile(r"(?:context window of|maximum context length is) (\d+)")  # llama.cpp, OpenAI/vLLM
_RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError)


def engine_unavailable(url: str, reason: str) -> APIError:
    return APIError(503, f"the engine at {url} is unavailable ({reason}); your message was kept, retry shortly",
                    code="engine_unavailable", headers={"Retry-After": "2"})


class EngineHTTP:
    """A pooled HTTP client for one engine: JSON calls and SSE streams, with the retry policy."""

    def __init__(self, base_url: str, key: str | None, timeout: float, connect_timeout: float):
        self.base = base_url.rstrip("/")
        self.root = self.base.removesuffix("/v1")  # llama.cpp / vLLM extras live beside /v1
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=16),
        )

    def url(self, path: str, root: bool = False) -> str:
        return (self.root if root else self.base) + path

    def get(self, path: str, root: bool = False) -> Any:
        return self._send("GET", path, None, root)

    def post(self, path: str, body: dict[str, Any], root: bool = False) -> Any:
        return self._send("POST", path, body, root)

    def _send(self, method: str, path: str, body: Any, root: bool) -> Any:
        def once() -> httpx.Response:
            return self.client.request(method, self.url(path, root), json=body)

        r = self.with_retries(once)
        if r.status_code >= 400:
            raise EngineStatus(r.status_code, r.text[:500])
        return r.json()

    def with_retries(self, attempt: Callable[[], httpx.Response]) -> httpx.Response:
        """`attempt()` again after connection failures and 502/503/504 (an engine still loading),
        with backoff; then 503. Only ever called before any reply byte was read."""
        for delay in (*RETRY_DELAYS, None):
            try:
                response = attempt()
            except _RETRYABLE as exc:
                if delay is None:
                    raise engine_unavailable(self.base, describe(exc)) from exc
            except httpx.TimeoutException as exc:  # slow, not down: no retry (it would only wait longer)
                raise engine_unavailable(self.base, describe(exc)) from exc
            else:
                if response.status_code not in (502, 503, 504) or delay is None:
                    return response
                response.close()
            time.sleep(delay or 0)
        raise AssertionError("unreachable: the last try returns or raises")

    def stream(self, path: str, body: dict[str, Any]) -> Generator[dict[str, Any], None, None]:
        """The `data:` payloads of an SSE response, parsed; retried only until the response opens."""

        def open_() -> httpx.Response:
            request = self.client.build_request("POST", self.url(path), json=body)
            return self.client.send(request, stream=True)

        response = self.with_retries(open_)
        try:
            if response.status_code >= 400:
                raise EngineStatus(response.status_code, response.read().decode("utf-8", "replace")[:500])
            yield from sse_payloads(response.iter_lines())
        except httpx.TransportError as exc:  # the engine died or stalled mid-reply (timeouts included)
            raise engine_unavailable(self.base, describe(exc)) from exc
        finally:
            response.close()

    def close(self) -> None:
        self.client.close()


class EngineStatus(Exception):
    """The engine answered with an HTTP error (a 4xx is the request's fault, not the engine's)."""

    def __init__(self, status: int, text: str):
        super().__init__(f"engine answered {status}: {text}")
        self.status, self.text = status, text


def describe(exc: Exception) -> str:
    kind = "timed out" if isinstance(exc, httpx.TimeoutException) else "cannot connect"
    detail = str(exc) or type(exc).__name__
    return f"{kind}: {detail}"


def sse_payloads(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        if not line.startswith("data:"):
            continue  # comments (keep-alives), event names, blank separators
        data = line[5:].strip()
        if data == "[DONE]":
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and "error" in payload:  # an error sent after the headers
            raise EngineStatus(500, json.dumps(payload["error"])[:500])
        yield payload


def window_from(models: dict[str, Any], props: dict[str, Any] | None) -> int | None:
    """The context window as vLLM (max_model_len), Memento (context_window) or llama.cpp (/props) publish it."""
    first = (models.get("data") or [{}])[0]
    for value in (first.get("max_model_len"), first.get("context_window"), (first.get("meta") or {}).get("n_ctx")):
        if value:
            return int(value)
    settings = (props or {}).get("default_generation_settings") or {}
    n_ctx = settings.get("n_ctx") or (props or {}).get("n_ctx")
    return int(n_ctx) if n_ctx else None


class RemoteBackend:
    """The seam over HTTP. No logit processors (the logits are the engine's); counting is exact
    with a local tokenizer and the engine's own otherwise."""

    # cached tokens: only as the engine reports them (vLLM's prompt_tokens_details); llama.cpp sends none
    capabilities = Capabilities(logit_processors=False, cached_tokens=False, token_ids=False)

    def __init__(self, http: EngineHTTP, *, model: str | None, window: int | None, local_tokenizer: Any = None):
        from service.remote_tokens import EngineCounter

        self.http = http
        self.url = http.base
        self._model = model
        self._window = window
        self._window_fixed = window is not None  # MEMENTO_CONTEXT_WINDOW: never asked again
        self.local_tokenizer = local_tokenizer
        self.counter = local_tokenizer or EngineCounter(http, lambda: self._model)
        self.kind = "openai"  # "llama.cpp" (has /props) | "llama-cpp-python" | "vllm" | "memento"
        self._probe_lock = threading.Lock()
        self._probed = False

    @classmethod
    def open(cls, settings: Any) -> RemoteBackend:
        key = settings.engine_key.get_secret_value() if settings.engine_key else None
        http = EngineHTTP(settings.engine_url, key, settings.engine_timeout, settings.engine_connect_timeout)
        backend = cls(http, model=settings.engine_model, window=settings.context_window,
                      local_tokenizer=local_tokenizer(settings))
        try:
            backend.probe()
        except APIError as exc:  # start anyway: /readyz reports it, the first turn probes again
            log.warning("%s", exc.message)
        return backend

    # ---- what the engine is ------------------------------------------------------------------

    def probe(self) -> None:
        """Model name, window and kind from the engine; once it has answered, not again."""
        with self._probe_lock:
            if self._probed:
                return
            try:
                models = self.http.get("/models")
            except EngineStatus as exc:
                raise engine_unavailable(self.url, f"GET /models answered {exc.status}") from exc
            first = (models.get("data") or [{}])[0]
            self._model = self._model or first.get("id")
            props = self._props()
            self.kind = self._kind(first, props)
            if not self._window_fixed:
                self._window = window_from(models, props)
                if self._window is None and self.kind == "llama-cpp-python":
                    self._window = self._window_from_refusal()
            self._probed = True
            log.info("engine %s: %s, model %s, context window %s", self.url, self.kind, self._model, self._window)

    def _props(self) -> dict[str, Any] | None:
        try:
            props = self.http.get("/props", root=True)
        except EngineStatus:
            return None  # not llama.cpp's llama-server
        return props if isinstance(props, dict) else None

    @staticmethod
    def _kind(first: dict[str, Any], props: dict[str, Any] | None) -> str:
        if props is not None:
            return "llama.cpp"
        if "max_model_len" in first:
            return "vllm"
        if "context_window" in first:
            return "memento"
        return "llama-cpp-python" if first.get("owned_by") == "me" else "openai"

    def _window_from_refusal(self) -> int | None:
        """llama-cpp-python publishes no window, but refuses an over-long prompt naming it."""
        body = {"model": self._model, "prompt": "a " * PROBE_TOKENS, "max_tokens": 1}  # tokenized, never run
        try:
            self.http.post("/completions", body)
        except EngineStatus as exc:
            m = _WINDOW_ERROR.search(exc.text)
            if m:
                return int(m.group(1))
        return None

    # ---- the seam ----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._model or "remote"

    @property
    def tokenizer(self) -> Any:
        return self.counter

    @property
    def context_window(self) -> int:
        if self._window is None:
            self.probe()
        if self._window is None:
            raise APIError(503, f"the engine at {self.url} does not say its context window: "
                           "set MEMENTO_CONTEXT_WINDOW", code="engine_unavailable")
        return self._window

    @property
    def continue_mode(self) -> str:
        """How a reply is continued from text already written (reported in reply metadata)."""
        if self.kind in ("llama.cpp", "llama-cpp-python") and self.local_tokenizer is not None:
            return "raw_completion"
        return "continue_final_message"

    def render(self, messages: list[dict[str, str]], n_pinned: int = 0,
               tools: list[dict[str, Any]] | None = None) -> Rendered:
        # tools are unused: the engine renders its own prompt (ToolPlan is built with native_ok=False)
        tokens = self.counter.count_messages(messages)
        if tokens >= self.context_window:
            raise context_too_long(tokens, self.context_window)
        return Rendered(messages, tokens)

    def raw(self, ids: list[int]) -> Rendered:
        return Rendered([], len(ids), list(ids), raw=True)

    def extend(self, prompt: Rendered, text: str) -> Rendered:
        tokens = prompt.tokens + (self.counter.count(text) if text else 0)
        return Rendered(prompt.messages, tokens, prompt.ids, None, prompt.raw, prompt.continuation + text)

    def stream(self, prompt: Rendered, params: GenParams, *, session_id: str | None = None, owner: str = "",
               processors: Sequence[Any] = (), should_stop: Callable[[], bool] | None = None) -> Iterator[Delta]:
        if processors:
            raise APIError(400, f"the engine at {self.url} cannot apply logit processors", code="unsupported_by_engine")
        if params.extra.get("logprobs") is not None:
            raise APIError(400, f"logprobs are not relayed from the engine at {self.url}", param="logprobs",
                           code="unsupported_by_engine")
        self.probe()
        path, body = self._request(prompt, params)
        return self._deltas(prompt, path, body, list(params.stop), should_stop or (lambda: False))

    def complete(self, prompt: Rendered, params: GenParams, processors: Sequence[Any] = ()) -> str:
        return "".join(ev.text for ev in self.stream(prompt, params))

    def drop_session(self, session_id: str) -> None:
        pass  # the engine keeps no per-session state of ours

    def check_ready(self) -> dict[str, Any]:
        self.preflight()  # answers now, not just once at start-up
        return {"engine": True, "engine_url": self.url, "engine_kind": self.kind}

    def preflight(self) -> None:
        """Is the engine there? One GET on a pooled connection (about a millisecond), retried with
        backoff, so a streamed turn to a dead engine is a 503 rather than a 200 carrying an error."""
        self.probe()
        try:
            self.http.get("/models")
        except EngineStatus as exc:
            raise engine_unavailable(self.url, f"GET /models answered {exc.status}") from exc

    def close(self) -> None:
        self.http.close()

    # ---- requests and replies ----------------------------------------------------------------

    def _request(self, prompt: Rendered, params: GenParams) -> tuple[str, dict[str, Any]]:
        body = sampling_body(params)
        body.update(model=self._model, stream=True, stream_options={"include_usage": True})
        if prompt.raw:  # as text where we can (llama-cpp-python takes no ids); ids assume the engine's tokenizer
            text = self.local_tokenizer.decode(prompt.ids) if self.local_tokenizer is not None else prompt.ids
            return "/completions", {**body, "prompt": text}
        if not prompt.continuation:
            return "/chat/completions", {**body, "messages": prompt.messages}
        if self.continue_mode == "raw_completion":
            text = self.local_tokenizer.render_chat(prompt.messages, add_generation_prompt=True)
            return "/completions", {**body, "prompt": text + prompt.continuation}
        messages = [*prompt.messages, {"role": "assistant", "content": prompt.continuation}]
        return "/chat/completions", {**body, "messages": messages, "continue_final_message": True,
                                     "add_generation_prompt": False}

    def _deltas(self, prompt: Rendered, path: str, body: dict[str, Any], stops: list[str],
                should_stop: Callable[[], bool]) -> Iterator[Delta]:
        from model.sampling import StopMatcher

        matcher = StopMatcher(stops)  # all of them here; the engine was sent at most MAX_ENGINE_STOPS
        pieces: list[str] = []
        reason, usage = "stop", None
        payloads = self.http.stream(path, body)
        try:
            for payload in payloads:
                if should_stop():
                    reason = "cancelled"
                    break
                usage = payload.get("usage") or usage
                for choice in payload.get("choices") or []:
                    text = matcher.push(choice_text(choice))
                    if text:
                        pieces.append(text)
                        yield Delta(text)
                    if choice.get("finish_reason"):
                        reason = "length" if choice["finish_reason"] == "length" else "stop"
                if matcher.stopped:
                    reason = "stop"
                    break
        except EngineStatus as exc:
            raise self._status_error(exc) from exc
        finally:
            payloads.close()  # closes the response: the engine stops generating for a client gone
        tail = matcher.flush()
        if tail:
            pieces.append(tail)
        yield Delta(tail, finished=True, finish_reason=reason, usage=self._usage(prompt, pieces, usage))

    def _status_error(self, exc: EngineStatus) -> APIError:
        if exc.status >= 500:
            return engine_unavailable(self.url, f"answered {exc.status}: {exc.text[:200]}")
        m = _WINDOW_ERROR.search(exc.text)
        if m:  # the engine counts differently than we do: say so in the usual shape
            return APIError(400, f"the engine refused the prompt: {exc.text[:300]}", param="messages",
                            code="context_length_exceeded")
        return APIError(502, f"the engine at {self.url} refused the request ({exc.status}): {exc.text[:300]}",
                        code="engine_error")

    def _usage(self, prompt: Rendered, pieces: list[str], usage: dict[str, Any] | None) -> Usage:
        """The engine's usage when it sends one (cached tokens too), else our own count."""
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            return Usage(int(usage.get("prompt_tokens") or prompt.tokens),
                         int(usage.get("completion_tokens") or 0), int(details.get("cached_tokens") or 0))
        return Usage(prompt.tokens, self.counter.count("".join(pieces)) if pieces else 0, 0)


def choice_text(choice: dict[str, Any]) -> str:
    """A streamed choice's new text: chat `delta.content` or completions `text`."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        return delta.get("content") or ""
    return choice.get("text") or ""


def sampling_body(params: GenParams) -> dict[str, Any]:
    """GenParams as OpenAI request fields; repetition_penalty under both engines' names."""
    body: dict[str, Any] = {"max_tokens": params.max_tokens, "temperature": params.temperature,
                            "top_p": params.top_p}
    if params.seed is not None:
        body["seed"] = params.seed
    if params.stop:  # OpenAI (and Memento) take at most 4; the rest are matched on our side
        body["stop"] = list(params.stop)[:MAX_ENGINE_STOPS]
    extra = params.extra
    for key in ("presence_penalty", "frequency_penalty"):
        if extra.get(key):
            body[key] = extra[key]
    if extra.get("logit_bias"):
        body["logit_bias"] = {str(k): v for k, v in extra["logit_bias"].items()}
    if extra.get("repetition_penalty", 1.0) != 1.0:
        body["repetition_penalty"] = body["repeat_penalty"] = extra["repetition_penalty"]  # vLLM, llama.cpp
    return body


def local_tokenizer(settings: Any) -> Any:
    """The tokenizer (and chat template) MEMENTO_MODEL names, or None when it was not set: the
    default model's tokenizer would miscount any other engine's model."""
    if "model" not in settings.model_fields_set:
        return None
    from model.registry import _load_tokenizer, resolve_spec

    _name, path = resolve_spec(settings.model, settings.data_dir)
    return _load_tokenizer(path)
