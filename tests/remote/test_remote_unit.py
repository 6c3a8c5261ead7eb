"""RemoteBackend without a real engine: an httpx MockTransport stands in for it (runs everywhere)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from service.backend import GenParams
from service.errors import APIError
from service.remote_engine import EngineHTTP, RemoteBackend, sse_payloads, window_from
from service.remote_tokens import MESSAGE_FRAME, EngineCounter

URL = "http://engine.test/v1"


def sse(*payloads: dict) -> bytes:
    return b"".join(f"data: {json.dumps(p)}\n\n".encode() for p in payloads) + b"data: [DONE]\n\n"


def mock_http(handler) -> EngineHTTP:
    http = EngineHTTP(URL, "k", timeout=5, connect_timeout=1)
    http.client = httpx.Client(transport=httpx.MockTransport(handler), headers=http.client.headers)
    return http


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def engine(handler, window: int | None = 512) -> RemoteBackend:
    backend = RemoteBackend(mock_http(handler), model="m", window=window)
    backend._probed = True
    return backend


def test_window_from_each_engine():
    assert window_from({"data": [{"id": "m", "max_model_len": 8192}]}, None) == 8192  # vLLM
    assert window_from({"data": [{"id": "m", "context_window": 2048}]}, None) == 2048  # Memento
    assert window_from({"data": [{"id": "m"}]}, {"default_generation_settings": {"n_ctx": 4096}}) == 4096  # llama.cpp
    assert window_from({"data": [{"id": "m"}]}, None) is None


def test_sse_payloads_skip_comments_and_raise_on_error_events():
    lines = [": keep-alive", "", 'data: {"a": 1}', "data: [DONE]", 'data: {"never": 1}']
    assert list(sse_payloads(iter(lines))) == [{"a": 1}]
    with pytest.raises(Exception, match="boom"):
        list(sse_payloads(iter(['data: {"error": {"message": "boom"}}'])))


def test_stream_counts_usage_itself_and_applies_every_stop():
    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert len(body["stop"]) == 4 and request.headers["authorization"] == "Bearer k"
        return httpx.Response(200, content=sse(chunk("Hello "), chunk("world. END here")))

    backend = engine(handler)
    backend.counter = EngineCounter(backend.http, lambda: "m")
    backend.counter._cache.update({"Hello world. ": 3})
    params = GenParams(max_tokens=8, stop=["a1", "a2", "a3", "a4", "END"])  # the 5th only we can apply
    events = list(backend.stream(backend.raw([1, 2, 3]), params))
    assert "".join(e.text for e in events) == "Hello world. "
    assert events[-1].finished and events[-1].finish_reason == "stop"
    assert (events[-1].usage.prompt_tokens, events[-1].usage.completion_tokens) == (3, 3)


def test_dead_engine_is_503_naming_the_url_within_seconds():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    backend = engine(handler)
    t0 = time.monotonic()
    with pytest.raises(APIError) as err:
        list(backend.stream(backend.raw([1]), GenParams(max_tokens=4)))
    assert time.monotonic() - t0 < 3
    assert err.value.status == 503 and err.value.code == "engine_unavailable" and URL in err.value.message


def test_retries_only_before_the_first_token():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/tokenize":  # the reply's own count (the engine sent no usage)
            return httpx.Response(200, json={"tokens": [5]})
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(503, text="loading")
        return httpx.Response(200, content=sse(chunk("ok", "stop")))

    backend = engine(handler)
    text = backend.complete(backend.raw([1]), GenParams(max_tokens=4))
    assert text == "ok" and len(calls) == 2


def test_counter_falls_back_through_tokenize_endpoints_and_caches():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/extras/tokenize":  # llama-cpp-python
            return httpx.Response(200, json={"tokens": [1, 2, 3]})
        return httpx.Response(404, json={"detail": "Not Found"})

    counter = EngineCounter(mock_http(handler), lambda: "m")
    assert counter.count("three tokens here") == 3
    assert seen == ["/tokenize", "/tokenize", "/extras/tokenize"]
    assert counter.count("three tokens here") == 3 and len(seen) == 3  # cached
    assert counter.count("other") == 3 and seen[-1] == "/extras/tokenize"  # the endpoint is remembered
    assert counter.count_messages([{"role": "user", "content": "other"}]) == 3 + MESSAGE_FRAME + 4


def test_processors_and_logprobs_are_refused():
    backend = engine(lambda r: httpx.Response(500))
    with pytest.raises(APIError, match="logit processors"):
        backend.stream(backend.raw([1]), GenParams(max_tokens=4), processors=[object()])
    with pytest.raises(APIError, match="logprobs"):
        backend.stream(backend.raw([1]), GenParams(max_tokens=4, extra={"logprobs": 2}))


def test_a_silent_engine_is_503_without_retries():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ReadTimeout("no byte in time", request=request)

    backend = engine(handler)
    with pytest.raises(APIError) as err:
        list(backend.stream(backend.raw([1]), GenParams(max_tokens=4)))
    assert err.value.status == 503 and "timed out" in err.value.message
    assert len(calls) == 1  # slow is not down: waiting again would only double the wait


def test_local_window_override_only_shrinks(tiny_lm):
    from service.backend import LocalBackend

    assert LocalBackend(tiny_lm, None, 512).context_window == 512
    assert LocalBackend(tiny_lm, None, 10**6).context_window == tiny_lm.context_window
