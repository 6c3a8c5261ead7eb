"""Refusals before parsing (service/limits.py), against a real `memento serve`-style uvicorn server
where the wire matters (Content-Length, chunked bodies, Host) and the in-process app elsewhere."""

from __future__ import annotations

import os
import socket
import time

import httpx
import pytest

from tests.service.conftest import LiveServer, free_port, make_settings, start_app


@pytest.fixture
def small_limit(tmp_path, tiny_lm):
    yield from start_app(make_settings(tmp_path, max_body_bytes=4096), tiny_lm)


@pytest.fixture
def limited_server(tmp_path, tiny_lm):
    from service.main import create_app

    app = create_app(make_settings(tmp_path, max_body_bytes=1 << 20), lm=tiny_lm)
    with LiveServer(app, free_port()) as srv:
        yield srv


def test_declared_body_over_the_limit_is_413_before_it_is_read(small_limit):
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 8000 + b'"}]}'
    r = small_limit.client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    err = r.json()["error"]
    assert err["code"] == "body_too_large" and err["param"] == "body" and "MEMENTO_MAX_BODY_BYTES" in err["message"]


def test_chunked_body_over_the_limit_is_413(small_limit):
    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}]}'

    r = small_limit.client.post("/v1/sessions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text


def test_raw_body_routes_are_limited_too(small_limit):
    r = small_limit.client.put("/v1/personas/big", content=b"---\nname: big\n---\n" + b"z" * 5000)
    assert r.status_code == 413


def test_non_json_content_type_on_a_json_route_is_415(small_limit):
    c = small_limit.client
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = c.post("/v1/sessions", content=b"{}", headers=headers)
        assert r.status_code == 415, (ctype, r.text)
        assert r.json()["error"]["param"] == "Content-Type"
    assert c.post("/v1/sessions", content=b"{}", headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 201
    # a persona file is not JSON and its route takes raw text: not refused
    r = c.put("/v1/personas/plain", content=b"---\nname: plain\ndescription: P.\n---\n", headers={"Content-Type": "text/markdown"})
    assert r.status_code == 200


def test_unknown_host_is_refused_and_loopback_names_are_served(small_limit):
    c = small_limit.client
    r = c.get("/v1/sessions", headers={"Host": "evil.example"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_host" and "MEMENTO_ALLOWED_HOSTS" in r.json()["error"]["message"]
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert c.get("/v1/sessions", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_from_env(tmp_path, tiny_lm, monkeypatch):
    monkeypatch.setenv("MEMENTO_ALLOWED_HOSTS", "chat.example.com, *.corp.example")
    from service.settings import load_settings

    from_env = load_settings(data_dir=tmp_path / "d").allowed_hosts
    assert from_env == ["chat.example.com", "*.corp.example"]
    settings = make_settings(tmp_path, allowed_hosts=from_env)
    for h in start_app(settings, tiny_lm):
        c = h.client
        assert c.get("/healthz", headers={"Host": "chat.example.com"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "a.corp.example:443"}).status_code == 200
        assert c.get("/healthz", headers={"Host": "corp.example.evil"}).status_code == 400


def test_page_security_headers(small_limit):
    r = small_limit.client.get("/")
    assert r.status_code == 200
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_200mb_bodies_are_refused_fast_and_memory_stays_flat(limited_server):
    """Over the wire: a declared 200 MB body answers 413 without being sent; a chunked one is cut off."""
    pid = os.getpid()  # the live server runs in this process (a thread)
    before = _rss_kb(pid)
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", limited_server.port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 209715200\r\n\r\n")
        reply = s.recv(4096)
    declared_ms = (time.perf_counter() - t0) * 1000
    assert reply.startswith(b"HTTP/1.1 413"), reply[:80]

    def chunks():
        block = b"a" * (1 << 20)
        for _ in range(200):
            yield block

    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{limited_server.url}/v1/chat/completions", content=chunks(),
                       headers={"Content-Type": "application/json"}, timeout=30)
        status = r.status_code
    except httpx.HTTPError:  # the server may close while the client is still sending
        status = 413
    chunked_ms = (time.perf_counter() - t0) * 1000
    grown_mb = (_rss_kb(pid) - before) / 1024
    print(f"\n413 declared 200MB in {declared_ms:.1f} ms; chunked 200MB cut off in {chunked_ms:.0f} ms; "
          f"RSS grew {grown_mb:.1f} MB")
    assert status == 413
    assert grown_mb < 50


def test_request_caps_name_the_field(app):
    c = app.client
    hi = [{"role": "user", "content": "hi"}]
    r = c.post("/v1/chat/completions", json={"model": "x", "messages": hi * 1025})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"
    r = c.post("/v1/chat/completions", json={"model": "x", "messages": hi, "stop": ["a"] * 5})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("stop")
    r = c.post("/v1/chat/completions", json={"model": "x", "messages": hi, "stop": "a" * 257})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("stop")
    sid = c.post("/v1/sessions", json={}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "stop": ["b" * 300]})
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("stop")
    r = c.get(f"/v1/sessions/{sid}/context", params={"message": "x" * 40_000})
    assert r.status_code in (413, 422) and r.json()["error"]["param"] == "message"
    for memory, param in (({"strategy": "vector", "k": 10**6}, "memory.k"),
                          ({"strategy": "window", "turns": 10**6}, "memory.turns"),
                          ({"strategy": "token_buffer", "max_tokens": 10**9}, "memory.max_tokens")):
        r = c.post("/v1/sessions", json={"memory": memory})
        assert r.status_code == 422 and r.json()["error"]["param"] == param, r.text
    # max_tokens is a ceiling: far past the window it still answers (with what fits)
    r = c.post("/v1/chat/completions", json={"model": "x", "messages": hi, "max_tokens": 10**9})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 1024


def test_an_empty_stop_string_means_no_stop(app):
    """`"stop": ""` was passed to the engine as [''] and answered 500 (found by the schemathesis run)."""
    c = app.client
    r = c.post("/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2, "stop": ""})
    assert r.status_code == 200, r.text
    r = c.post("/v1/chat/completions", json={"model": "x", "max_tokens": 2, "stop": "",
                                             "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200, r.text
