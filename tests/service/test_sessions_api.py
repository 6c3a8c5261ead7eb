"""The native sessions API over the real app, on real SQLite and real Redis stores."""

from __future__ import annotations

from tests.service.conftest import read_sse


def create(client, **body):
    r = client.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_session_crud(app_any_store):
    c = app_any_store.client
    s = create(c, persona="pirate", memory={"strategy": "window", "turns": 3}, metadata={"title": "t"})
    assert s["persona"] == "pirate"
    assert s["memory"] == {"strategy": "window", "turns": 3}
    assert s["id"] and s["created_at"]

    assert c.get(f"/v1/sessions/{s['id']}").json()["id"] == s["id"]
    ids = [x["id"] for x in c.get("/v1/sessions").json()["data"]]
    assert s["id"] in ids

    r = c.patch(f"/v1/sessions/{s['id']}", json={"persona": "assistant", "memory": {"strategy": "buffer"}})
    assert r.status_code == 200, r.text
    assert r.json()["persona"] == "assistant" and r.json()["memory"] == {"strategy": "buffer"}

    assert c.delete(f"/v1/sessions/{s['id']}").status_code == 204
    r = c.get(f"/v1/sessions/{s['id']}")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


def test_defaults_come_from_settings(app):
    s = create(app.client)
    assert s["persona"] == "assistant"
    assert s["memory"] == {"strategy": "window", "turns": 4}  # make_settings' MEMENTO_MEMORY


def test_turn_stores_user_and_reply_with_metadata(app_any_store):
    c = app_any_store.client
    s = create(c)
    r = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "hello there", "max_tokens": 5, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    msg, usage = body["message"], body["usage"]
    assert msg["role"] == "assistant" and isinstance(msg["content"], str)
    assert set(usage) == {"prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"}
    assert 1 <= usage["completion_tokens"] <= 5
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert msg["metadata"]["finish_reason"] in ("stop", "length")
    assert msg["metadata"]["usage"] == usage

    transcript = c.get(f"/v1/sessions/{s['id']}/messages").json()["data"]
    assert [m["role"] for m in transcript] == ["user", "assistant"]
    assert transcript[0]["content"] == "hello there"
    assert transcript[1]["id"] == msg["id"] and transcript[1]["content"] == msg["content"]
    assert all({"id", "role", "content", "created_at", "metadata"} <= set(m) for m in transcript)


def test_second_turn_reuses_kv_cache(app):
    c = app.client
    s = create(c)
    first = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "one", "max_tokens": 4}).json()
    second = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "two", "max_tokens": 4}).json()
    assert first["usage"]["cached_tokens"] == 0
    # the first prompt is in the session's KV cache, in whole 16-token blocks (its last partial
    # block, and the reply's, depend on how the template re-tokenizes the reply)
    assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // 16 * 16 > 0
    assert second["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"]


def test_streaming_framing(app_any_store):
    c = app_any_store.client
    s = create(c)
    with c.stream("POST", f"/v1/sessions/{s['id']}/messages", json={"content": "hi", "stream": True, "max_tokens": 6}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events, raw = read_sse(r.iter_lines())
    assert all(line.startswith("data: ") or line.startswith(":") for line in raw)
    assert events[-1] == "[DONE]"
    final = events[-2]
    deltas = events[:-2]
    assert set(final) == {"message", "usage"}
    assert all(set(e) == {"delta"} for e in deltas)
    assert "".join(e["delta"] for e in deltas) == final["message"]["content"]
    stored = c.get(f"/v1/sessions/{s['id']}/messages").json()["data"]
    assert stored[-1]["id"] == final["message"]["id"]


def test_context_inspector(app):
    c = app.client
    s = create(c)
    c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "my dog is called Kong", "max_tokens": 3})
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "what is my dog called?"}).json()
    assert set(ctx) >= {"messages", "tokens", "budget", "memory"}
    assert ctx["messages"][0]["role"] == "system"
    assert ctx["messages"][-1] == {"role": "user", "content": "what is my dog called?"}
    assert any(m["content"] == "my dog is called Kong" for m in ctx["messages"])
    b = ctx["budget"]
    assert b["context_window"] == app.rt.context_window
    assert b["used"] == ctx["tokens"] == sum(b["parts"].values())
    assert b["used"] + b["reserved_for_reply"] <= b["context_window"]
    assert ctx["memory"]["strategy"] == "window"
    # exactly what the model would see: the tokenizer's count of these messages
    assert app.rt.tokenizer.count_messages(ctx["messages"]) == ctx["tokens"]


def test_window_strategy_limits_context(app):
    c = app.client
    s = create(c, memory={"strategy": "window", "turns": 1})
    for text in ("first message", "second message", "third message"):
        c.post(f"/v1/sessions/{s['id']}/messages", json={"content": text, "max_tokens": 2})
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "next"}).json()
    contents = [m["content"] for m in ctx["messages"]]
    assert "third message" in contents and "first message" not in contents and "second message" not in contents
    # the transcript itself is never trimmed
    assert len(c.get(f"/v1/sessions/{s['id']}/messages").json()["data"]) == 6


def test_summary_buffer_summarises_in_background(app):
    c = app.client
    s = create(c, memory={"strategy": "summary_buffer", "max_tokens": 40})
    for i in range(3):
        r = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": f"fact number {i} is important", "max_tokens": 8})
        assert r.status_code == 200
    assert app.rt.background.wait_idle(timeout=60)
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "recap"}).json()
    assert ctx["memory"]["strategy"] == "summary_buffer"
    assert ctx["memory"].get("summary"), ctx["memory"]  # written by the model, off the critical path
    assert ctx["budget"]["parts"]["memory"] > 0


def test_persona_routes(app):
    c = app.client
    names = [p["name"] for p in c.get("/v1/personas").json()["data"]]
    assert {"assistant", "pirate", "daughter-ko"} <= set(names)
    p = c.get("/v1/personas/daughter-ko").json()
    assert p["register"] == "banmal" and p["display_name"] == "지우"

    text = "---\nname: chef\ndescription: You are a chef who loves garlic.\n---\n"
    r = c.put("/v1/personas/chef", content=text.encode(), headers={"Content-Type": "text/markdown"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "chef" and r.json()["writable"] is True
    assert c.get("/v1/personas/chef").json()["description"].startswith("You are a chef")
    s = create(c, persona="chef")
    ctx = c.get(f"/v1/sessions/{s['id']}/context").json()
    assert "garlic" in ctx["messages"][0]["content"]

    card = {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Nova", "description": "{{char}} is a star pilot.", "first_mes": "Hi!"}}
    r = c.put("/v1/personas/nova", json=card)
    assert r.status_code == 200, r.text
    assert "star pilot" in r.json()["description"]

    assert c.delete("/v1/personas/chef").status_code == 204
    assert c.get("/v1/personas/chef").status_code == 404
    r = c.delete("/v1/personas/pirate")  # from MEMENTO_PERSONA_DIR: read-only
    assert r.status_code == 409 and r.json()["error"]["code"] == "persona_read_only"


def test_bad_persona_body_names_the_problem(app):
    r = app.client.put("/v1/personas/broken", content=b"---\nname: broken\nregister: shouting\n---\n")
    assert r.status_code == 422
    err = r.json()["error"]
    assert "register" in err["message"]


def test_health_ready_metrics(app):
    c = app.client
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    s = create(c)
    c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "a", "max_tokens": 3})
    c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "b", "max_tokens": 3})
    text = c.get("/metrics").text
    for name in ("memento_requests_total", "memento_queue_depth", "memento_time_to_first_token_seconds_count",
                 "memento_decode_tokens_per_second", "memento_cached_prompt_tokens_total",
                 "memento_register_replies_total"):
        assert name in text, name
    cached = [line for line in text.splitlines() if line.startswith("memento_cached_prompt_tokens_total ")]
    assert float(cached[0].split()[-1]) > 0
    assert 'route="/v1/sessions/{session_id}/messages",status="200"' in text


def test_web_page_is_served(app):
    r = app.client.get("/")
    assert r.status_code == 200 and "Memento" in r.text
    assert app.client.get("/static/app.js").status_code == 200


def test_vector_strategy_retrieves_past_exchange(app):
    """Embedded Chroma under the data dir + the multilingual USE embedder, opened on first use."""
    c = app.client
    assert app.rt._vector is None  # not opened until a vector session needs it
    s = create(c, memory={"strategy": "vector", "k": 1, "turns": 1, "scope": "session"})
    for text in ("My dog is called Kong and he loves apples.", "The weather is rainy today.",
                 "I am learning to play the violin."):
        assert c.post(f"/v1/sessions/{s['id']}/messages", json={"content": text, "max_tokens": 2}).status_code == 200
    assert app.rt.background.wait_idle(timeout=120)
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "What is my dog's name?"}).json()
    retrieved = ctx["memory"].get("retrieved")
    assert retrieved, ctx
    assert "Kong" in retrieved[0][0]["content"]
    assert ctx["budget"]["parts"]["memory"] > 0
    assert any("Kong" in m["content"] for m in ctx["messages"])


def test_deleted_persona_falls_back_to_default(app):
    c = app.client
    c.put("/v1/personas/temp", content=b"---\nname: temp\ndescription: Temporary.\n---\n")
    s = create(c, persona="temp")
    assert c.delete("/v1/personas/temp").status_code == 204
    r = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "still there?", "max_tokens": 2})
    assert r.status_code == 200
    ctx = c.get(f"/v1/sessions/{s['id']}/context").json()
    assert any("temp" in w for w in ctx["warnings"])
    assert r.json()["message"]["metadata"]["persona"] == "assistant"
