"""Idempotent turns (service/idempotency.py): a retry with the same key is answered from the store."""

from __future__ import annotations

import threading

from tests.service.conftest import read_sse


def _session(c) -> str:
    return c.post("/v1/sessions", json={"memory": {"strategy": "buffer"}}).json()["id"]


def test_a_retry_returns_the_stored_reply_without_a_second_turn(app_any_store):
    c = app_any_store.client
    sid = _session(c)
    first = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hello"}, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 200
    again = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hello"}, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.json()["message"] == first.json()["message"]
    transcript = c.get(f"/v1/sessions/{sid}/messages").json()["data"]
    assert [m["role"] for m in transcript] == ["user", "assistant"]
    assert transcript[0]["id"] == "k-1" and transcript[1]["metadata"]["reply_to"] == "k-1"
    # streamed retry: the stored reply as one delta, then the final event
    with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "hello", "stream": True},
                  headers={"Idempotency-Key": "k-1"}) as r:
        events, _ = read_sse(r.iter_lines())
    assert events[0]["delta"] == first.json()["message"]["content"]
    assert events[1]["message"]["id"] == first.json()["message"]["id"] and events[-1] == "[DONE]"
    assert len(c.get(f"/v1/sessions/{sid}/messages").json()["data"]) == 2


def test_message_id_in_the_body_works_like_the_header(app):
    c = app.client
    sid = _session(c)
    a = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "message_id": "m-7"}).json()
    b = c.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "message_id": "m-7"}).json()
    assert a["message"]["id"] == b["message"]["id"]
    assert len(c.get(f"/v1/sessions/{sid}/messages").json()["data"]) == 2


def test_a_key_reused_for_other_content_or_bad_keys_are_refused(app):
    c = app.client
    sid = _session(c)
    c.post(f"/v1/sessions/{sid}/messages", json={"content": "one"}, headers={"Idempotency-Key": "k-2"})
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "two"}, headers={"Idempotency-Key": "k-2"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "idempotency_key_reused"
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "x"}, headers={"Idempotency-Key": "bad key!"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "Idempotency-Key"


def test_concurrent_tries_of_one_key_generate_once(app):
    c = app.client
    sid = _session(c)
    results = []

    def call():
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "same", "max_tokens": 8},
                   headers={"Idempotency-Key": "k-3"})
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=call) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [s for s, _ in results] == [200, 200, 200], results
    assert len({body["message"]["id"] for _, body in results}) == 1
    assert [m["role"] for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"]] == ["user", "assistant"]


def test_a_stored_user_turn_without_reply_is_answered_once(app):
    """The first try died after storing the user turn: the retry generates the reply, no second user turn."""
    c = app.client
    sid = _session(c)
    app.rt.store.append_message(sid, "user", "are you there?", message_id="k-4")
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "are you there?"}, headers={"Idempotency-Key": "k-4"})
    assert r.status_code == 200
    roles = [m["role"] for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"]]
    assert roles == ["user", "assistant"]


def test_memory_mode_chat_completions_retry_is_not_a_second_turn(app):
    c = app.client
    headers = {"X-Session-ID": "idem-chat", "Idempotency-Key": "c-1"}
    body = {"model": "x", "max_tokens": 6, "messages": [{"role": "user", "content": "hi there"}]}
    first = c.post("/v1/chat/completions", json=body, headers=headers)
    assert first.status_code == 200
    again = c.post("/v1/chat/completions", json=body, headers=headers)
    assert again.status_code == 200
    assert again.json()["choices"][0]["message"]["content"] == first.json()["choices"][0]["message"]["content"]
    with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=headers) as r:
        events, _ = read_sse(r.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == first.json()["choices"][0]["message"]["content"] and events[-1] == "[DONE]"
    transcript = c.get("/v1/sessions/idem-chat/messages").json()["data"]
    assert [m["role"] for m in transcript] == ["user", "assistant"] and transcript[0]["id"] == "c-1"
