"""API keys and isolation between users, and every error shape the service promises."""

from __future__ import annotations

import subprocess
import threading
import time

import httpx
import pytest

from tests.service.conftest import free_port, hold_worker, make_settings, start_app

ALICE, BOB = "key-alice-123", "key-bob-456"


@pytest.fixture
def keyed(tmp_path, tiny_lm):
    settings = make_settings(tmp_path, api_keys=f"{ALICE}:alice,{BOB}:bob")
    yield from start_app(settings, tiny_lm)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_every_v1_route_needs_a_key(keyed):
    c = keyed.client
    for method, path in [("GET", "/v1/models"), ("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                         ("GET", "/v1/personas"), ("POST", "/v1/chat/completions")]:
        r = c.request(method, path, json={})
        assert r.status_code == 401, (method, path)
        assert r.json()["error"]["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    assert c.get("/v1/sessions", headers=auth("wrong")).status_code == 401
    assert c.get("/v1/sessions", headers={"Authorization": ALICE}).status_code == 401  # no Bearer scheme
    assert c.get("/v1/sessions", headers=auth(ALICE)).status_code == 200
    assert c.get("/healthz").status_code == 200  # probes carry no keys


def test_users_are_isolated(keyed):
    c = keyed.client
    sid = c.post("/v1/sessions", json={}, headers=auth(ALICE)).json()["id"]
    c.post(f"/v1/sessions/{sid}/messages", json={"content": "alice's secret", "max_tokens": 2}, headers=auth(ALICE))

    assert c.get("/v1/sessions", headers=auth(BOB)).json()["data"] == []
    for method, path, body in [
        ("GET", f"/v1/sessions/{sid}", None),
        ("GET", f"/v1/sessions/{sid}/messages", None),
        ("GET", f"/v1/sessions/{sid}/context", None),
        ("POST", f"/v1/sessions/{sid}/messages", {"content": "x"}),
        ("PATCH", f"/v1/sessions/{sid}", {"persona": "pirate"}),
        ("DELETE", f"/v1/sessions/{sid}", None),
    ]:
        r = c.request(method, path, json=body, headers=auth(BOB))
        assert r.status_code == 404, (method, path, r.text)  # not 403: existence is not revealed
    # memory mode with someone else's session id: 404, not a takeover
    r = c.post("/v1/chat/completions", headers={**auth(BOB), "X-Session-ID": sid},
               json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 404
    msgs = c.get(f"/v1/sessions/{sid}/messages", headers=auth(ALICE)).json()["data"]
    assert [m["content"] for m in msgs][0] == "alice's secret" and len(msgs) == 2


def test_keys_never_logged(tmp_path, tiny_lm, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    settings = make_settings(tmp_path, api_keys=f"{ALICE}:alice")
    assert ALICE not in repr(settings)
    for h in start_app(settings, tiny_lm):
        h.client.get("/v1/sessions", headers=auth("nope"))
        h.client.get("/v1/sessions", headers=auth(ALICE))
    assert ALICE not in caplog.text and "nope" not in caplog.text


def test_validation_errors_name_the_field(app):
    c = app.client
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 5})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["param"] == "temperature" and err["type"] == "invalid_request_error"
    assert set(err) == {"message", "type", "param", "code"}

    r = c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages[0].role"

    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1})
    assert r.status_code == 422 and r.json()["error"]["param"] == "seed"  # found by fuzzing: was a 500

    r = c.post("/v1/sessions", json={"memory": {"strategy": "window", "turns": 0}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "memory.turns"

    r = c.post("/v1/sessions", json={"memory": {"strategy": "forgetful"}})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("memory")

    sid = c.post("/v1/sessions", json={}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": ""})
    assert r.status_code == 422 and r.json()["error"]["param"] == "content"

    r = c.post("/v1/sessions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 422


def test_not_found_errors(app):
    c = app.client
    r = c.get("/v1/sessions/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    r = c.get("/v1/personas/nobody")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = c.post("/v1/sessions", json={"persona": "nobody"})
    assert r.status_code == 404
    assert c.get("/v1/nothing-here").status_code == 404


def test_message_too_long_is_413(tmp_path, tiny_lm):
    for h in start_app(make_settings(tmp_path, max_message_chars=50), tiny_lm):
        c = h.client
        sid = c.post("/v1/sessions", json={}).json()["id"]
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "x" * 51})
        assert r.status_code == 413
        assert r.json()["error"]["param"] == "content" and "50" in r.json()["error"]["message"]
        assert c.get(f"/v1/sessions/{sid}/messages").json()["data"] == []  # nothing stored
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "y" * 51}]})
        assert r.status_code == 413 and r.json()["error"]["param"] == "messages[0].content"


def test_context_length_exceeded_is_400(app):
    long = "word " * 1500  # > the tiny model's 1024-token window
    r = app.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_full_queue_is_429_with_retry_after(tmp_path, tiny_lm):
    release = threading.Event()
    for h in start_app(make_settings(tmp_path, queue_size=1), tiny_lm):
        hold_worker(h.rt, release)  # occupies every job thread
        time.sleep(0.1)
        h.rt.worker.submit(lambda job: None, owner="local")  # the caller's own job fills the one slot
        try:
            r = h.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 429
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            sid = h.client.post("/v1/sessions", json={}).json()["id"]
            r = h.client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "stream": True})
            assert r.status_code == 429  # refused before the stream starts
            assert "memento_queue_rejected_total 2.0" in h.client.get("/metrics").text
        finally:
            release.set()
        time.sleep(0.3)
        r = h.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200


@pytest.fixture
def private_redis(tmp_path):
    """A redis-server of our own, so the test can kill and restart it."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
           "--dir", str(tmp_path)]
    state = {"proc": None}

    def start():
        state["proc"] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        for _ in range(100):
            try:
                redis.Redis(port=port).ping()
                return
            except redis.RedisError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop():
        state["proc"].kill()
        state["proc"].wait()

    start()
    yield port, start, stop
    if state["proc"].poll() is None:
        stop()


def test_store_down_is_503_and_recovers_without_restart(tmp_path, tiny_lm, private_redis):
    port, start, stop = private_redis
    settings = make_settings(tmp_path, store_url=f"redis://127.0.0.1:{port}/0")
    for h in start_app(settings, tiny_lm):
        c = h.client
        sid = c.post("/v1/sessions", json={}).json()["id"]
        stop()
        r = c.get(f"/v1/sessions/{sid}/messages")
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "store_unavailable" and "retry-after" in r.headers
        assert c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2}).status_code == 503
        assert c.get("/readyz").status_code == 503
        start()  # AOF on: the session survived the restart of Redis
        assert c.get("/readyz").status_code == 200
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_client_disconnect_cancels_generation(live_server):
    """Closing a stream mid-reply stops the model (the worker is free at once) and the partial
    reply is stored marked interrupted."""
    base = live_server.url
    rt = live_server.app.state.rt
    sid = httpx.post(f"{base}/v1/sessions", json={}).json()["id"]
    body = {"content": "go on and on", "stream": True, "max_tokens": 400, "temperature": 1.0}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{base}/v1/sessions/{sid}/messages", json=body) as r:
        deltas = 0
        for line in r.iter_lines():
            if line.startswith("data: {\"delta\""):
                deltas += 1
            if deltas >= 3:
                break  # leave mid-stream: closing the response drops the connection
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        msgs = httpx.get(f"{base}/v1/sessions/{sid}/messages").json()["data"]
        if len(msgs) == 2:
            break
        time.sleep(0.1)
    assert len(msgs) == 2, msgs
    reply = msgs[1]
    assert reply["metadata"]["interrupted"] is True
    assert reply["metadata"]["finish_reason"] == "cancelled"
    assert reply["metadata"]["usage"]["completion_tokens"] < 400
    assert not rt.worker.busy


def test_sse_keepalive_comments_while_waiting_for_the_model(live_server):
    """A request queued behind another sees `: keep-alive` comments, then its reply."""
    rt = live_server.app.state.rt
    release = threading.Event()
    hold_worker(rt, release)  # the model is busy
    sid = httpx.post(f"{live_server.url}/v1/sessions", json={}).json()["id"]
    threading.Timer(1.0, release.set).start()
    body = {"content": "hi", "stream": True, "max_tokens": 3}
    with httpx.stream("POST", f"{live_server.url}/v1/sessions/{sid}/messages", json=body, timeout=30) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[0] == ": keep-alive"  # keepalive_seconds=0.2 in the live_server settings
    assert lines[-1] == "data: [DONE]"
    assert any(line.startswith('data: {"message"') for line in lines)


def test_concurrent_turn_on_one_session_is_409(live_server):
    rt = live_server.app.state.rt
    base = live_server.url
    release = threading.Event()
    hold_worker(rt, release)  # hold the model so the first turn stays in flight
    sid = httpx.post(f"{base}/v1/sessions", json={}).json()["id"]
    other = httpx.post(f"{base}/v1/sessions", json={}).json()["id"]
    body = {"content": "first", "stream": True, "max_tokens": 3}
    with httpx.stream("POST", f"{base}/v1/sessions/{sid}/messages", json=body, timeout=30) as first:
        assert first.status_code == 200
        r = httpx.post(f"{base}/v1/sessions/{sid}/messages", json={"content": "second"})
        assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy"
        r = httpx.post(f"{base}/v1/chat/completions", headers={"X-Session-ID": sid},
                       json={"messages": [{"role": "user", "content": "third"}]})
        assert r.status_code == 409
        # other sessions are not blocked by it (they just queue)
        threading.Timer(0.5, release.set).start()
        assert httpx.post(f"{base}/v1/sessions/{other}/messages", json={"content": "hi", "max_tokens": 2},
                          timeout=30).status_code == 200
        lines = [line for line in first.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert httpx.post(f"{base}/v1/sessions/{sid}/messages", json={"content": "later", "max_tokens": 2},
                      timeout=30).status_code == 200
    users = [m["content"] for m in httpx.get(f"{base}/v1/sessions/{sid}/messages").json()["data"] if m["role"] == "user"]
    assert users == ["first", "later"]


def test_readyz_reports_an_unreachable_chroma_server(tmp_path, tiny_lm):
    settings = make_settings(tmp_path, chroma_url=f"http://127.0.0.1:{free_port()}")
    for h in start_app(settings, tiny_lm):
        r = h.client.get("/readyz")
        assert r.status_code == 200  # the store and the model are fine: still ready
        assert r.json()["vector"] is False and r.json()["vector_error"]
