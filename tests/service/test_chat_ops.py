"""Chat operations (regenerate/swipes, continue, edit, delete, truncate, fork) over the real app on
real SQLite and real Redis, durable across a restart of the app."""

from __future__ import annotations

from tests.service.conftest import make_settings, start_app
from tests.store_fixtures import make_store_spec


def turn(c, sid, text, **kw):
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": text, "max_tokens": 4, "seed": 1, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def transcript(c, sid):
    return c.get(f"/v1/sessions/{sid}/messages").json()["data"]


def ops_on(c):
    """Run every operation on a new session; returns (session id, fork id, expected transcripts)."""
    sid = c.post("/v1/sessions", json={}).json()["id"]
    turn(c, sid, "first question")
    reply = turn(c, sid, "second question")["message"]
    base = f"/v1/sessions/{sid}/messages/{reply['id']}"

    # regenerate twice: three swipes, the newest shown
    r = c.post(f"{base}/regenerate", json={"seed": 2, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1
    again = c.post(f"{base}/regenerate", json={"seed": 3, "max_tokens": 4}).json()["message"]
    assert again["id"] == reply["id"]
    sw = c.get(f"{base}/swipes").json()
    assert len(sw["swipes"]) == 3 and sw["swipe_id"] == 2 and sw["swipes"][0] == reply["content"]
    assert again["content"] == sw["swipes"][2] and len(again["metadata"]["swipe_info"]) == 3
    chosen = c.post(f"{base}/swipes/0").json()
    assert chosen["content"] == reply["content"] and chosen["metadata"]["swipe_id"] == 0
    bad = c.post(f"{base}/swipes/7")
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "index"

    # continue extends the shown reply; the old text stays in history
    before = transcript(c, sid)[-1]["content"]
    r = c.post(f"{base}/continue", json={"max_tokens": 3, "seed": 4})
    assert r.status_code == 200, r.text
    cont = r.json()["message"]
    assert cont["content"].startswith(before) and len(cont["content"]) > len(before)
    assert cont["metadata"]["history"][-1]["content"] == before and cont["metadata"]["continued"] == 1
    assert cont["metadata"]["swipes"][0] == cont["content"]

    # only the last reply can be regenerated
    first_user = transcript(c, sid)[0]
    r = c.post(f"/v1/sessions/{sid}/messages/{first_user['id']}/regenerate", json={})
    assert r.status_code == 409 and r.json()["error"]["code"] == "not_last_reply"

    # edit keeps the previous text
    r = c.patch(f"/v1/sessions/{sid}/messages/{first_user['id']}", json={"content": "FIRST, edited"})
    assert r.status_code == 200, r.text
    edited = r.json()
    assert edited["content"] == "FIRST, edited" and edited["metadata"]["edited"] is True
    assert edited["metadata"]["history"] == [{"content": "first question", "at": edited["metadata"]["history"][0]["at"],
                                              "op": "edit"}]

    # fork at the first reply, then a third turn and delete/truncate on the parent
    msgs = transcript(c, sid)
    r = c.post(f"/v1/sessions/{sid}/messages/{msgs[1]['id']}/fork", json={"metadata": {"title": "branch"}})
    assert r.status_code == 201, r.text
    fork = r.json()
    assert fork["metadata"]["forked_from"] == {"session_id": sid, "message_id": msgs[1]["id"]}
    assert [m["content"] for m in transcript(c, fork["id"])] == [m["content"] for m in msgs[:2]]
    turn(c, sid, "third question")
    msgs = transcript(c, sid)
    assert len(msgs) == 6
    assert c.delete(f"/v1/sessions/{sid}/messages/{msgs[4]['id']}").status_code == 204
    r = c.post(f"/v1/sessions/{sid}/messages/{msgs[3]['id']}/truncate")
    assert r.status_code == 200 and r.json()["deleted"] == 1
    kept = transcript(c, sid)
    assert [m["id"] for m in kept] == [m["id"] for m in msgs[:4]]
    assert c.delete(f"/v1/sessions/{sid}/messages/msg_nope").status_code == 404
    assert c.patch(f"/v1/sessions/{sid}/messages/msg_nope", json={"content": "x"}).status_code == 404
    return sid, fork["id"], transcript(c, sid), transcript(c, fork["id"])


def test_every_operation_is_durable_across_a_restart(store_kind, tmp_path, tiny_lm):
    with make_store_spec(store_kind, tmp_path) as spec:
        settings = make_settings(tmp_path, store_url=spec.url)
        for h in start_app(settings, tiny_lm, store=spec.open()):
            sid, fork_id, parent, child = ops_on(h.client)
            assert h.rt.background.wait_idle(timeout=60)
        for h in start_app(settings, tiny_lm, store=spec.open()):  # a new process' view of the same store
            c = h.client
            assert transcript(c, sid) == parent and transcript(c, fork_id) == child
            assert parent[0]["metadata"]["history"][0]["content"] == "first question"
            assert len(parent[3]["metadata"]["swipes"]) == 3 and parent[3]["metadata"]["swipe_id"] == 0
            turn(c, sid, "after the restart")  # the edited session keeps working


def test_fork_first_turn_reuses_the_parents_cache(app):
    c = app.client
    sid = c.post("/v1/sessions", json={"memory": {"strategy": "buffer"}}).json()["id"]
    for text in ("tell me about the sea", "and about the mountains", "and the rivers too"):
        turn(c, sid, text)
    msgs = transcript(c, sid)
    fork = c.post(f"/v1/sessions/{sid}/messages/{msgs[-1]['id']}/fork", json={}).json()
    fresh = c.post("/v1/sessions", json={"memory": {"strategy": "buffer"}}).json()["id"]
    fresh_cached = turn(c, fresh, "what next?")["usage"]["cached_tokens"]  # persona prefix only
    usage = turn(c, fork["id"], "what next?")["usage"]
    # the fork's prompt starts with the parent's whole conversation: all of it comes from the cache
    assert usage["cached_tokens"] > fresh_cached + 20, (usage, fresh_cached)
    assert usage["cached_tokens"] >= usage["prompt_tokens"] - 30


def test_regenerate_a_greeting_and_ownership(tmp_path, tiny_lm):
    settings = make_settings(tmp_path, api_keys="ka:alice,kb:bob")
    for h in start_app(settings, tiny_lm):
        c = h.client
        alice, bob = {"Authorization": "Bearer ka"}, {"Authorization": "Bearer kb"}
        body = {"messages": [{"role": "assistant", "content": "Welcome, traveller."}]}
        assert c.post("/v1/sessions/greet-1/import", json=body, headers=alice).status_code == 201
        mid = transcript_as(c, "greet-1", alice)[0]["id"]
        r = c.post(f"/v1/sessions/greet-1/messages/{mid}/regenerate", json={"max_tokens": 3}, headers=alice)
        assert r.status_code == 200, r.text
        assert r.json()["message"]["metadata"]["swipes"][0] == "Welcome, traveller."
        m = f"/v1/sessions/greet-1/messages/{mid}"
        calls = [("POST", f"{m}/regenerate", {}), ("POST", f"{m}/continue", {}), ("GET", f"{m}/swipes", None),
                 ("POST", f"{m}/swipes/0", None), ("POST", f"{m}/fork", {}), ("POST", f"{m}/truncate", None),
                 ("PATCH", m, {"content": "x"}), ("DELETE", m, None), ("POST", "/v1/sessions/greet-1/greeting", None),
                 ("PUT", "/v1/sessions/greet-1/authors_note", {"text": "x"}),
                 ("DELETE", "/v1/sessions/greet-1/authors_note", None), ("GET", "/v1/sessions/greet-1/export", None),
                 ("POST", "/v1/sessions/greet-1/import", {"messages": [{"role": "user", "content": "x"}]})]
        for method, path, body in calls:  # bob: 404 everywhere, nothing changes
            r = c.request(method, path, json=body, headers=bob)
            assert r.status_code == 404, (method, path, r.status_code)
        after = transcript_as(c, "greet-1", alice)
        assert len(after) == 1 and after[0]["content"] == r_content(after)


def r_content(after):
    return after[0]["metadata"]["swipes"][after[0]["metadata"]["swipe_id"]]


def transcript_as(c, sid, headers):
    return c.get(f"/v1/sessions/{sid}/messages", headers=headers).json()["data"]


GREETER = ("---\nname: greeter\ndisplay_name: Mina\ndescription: Mina runs an inn.\ngreeting: Welcome, {{user}}!\n"
           "alternate_greetings:\n  - Back again?\n  - Hello there.\nuser_name: Ada\n---\n")


def test_greeting_with_alternates_as_swipes(app):
    c = app.client
    assert c.put("/v1/personas/greeter", content=GREETER.encode()).status_code == 200
    sid = c.post("/v1/sessions", json={"persona": "greeter"}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/greeting")
    assert r.status_code == 201, r.text
    g = r.json()
    assert g["role"] == "assistant" and g["content"] == "Welcome, Ada!"
    assert g["metadata"]["swipes"] == ["Welcome, Ada!", "Back again?", "Hello there."]
    assert c.post(f"/v1/sessions/{sid}/messages/{g['id']}/swipes/2").json()["content"] == "Hello there."
    assert c.post(f"/v1/sessions/{sid}/greeting").status_code == 409  # not an empty session any more
    no_greeting = c.post("/v1/sessions", json={}).json()["id"]
    assert c.post(f"/v1/sessions/{no_greeting}/greeting").status_code == 422
    turn(c, sid, "a room for one, please")  # the chat goes on from the chosen greeting
    assert transcript(c, sid)[0]["content"] == "Hello there."


def test_authors_note_at_depth_every_n_turns(app):
    c = app.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    r = c.put(f"/v1/sessions/{sid}/authors_note", json={"text": "Keep it short.", "depth": 0, "every": 2})
    assert r.status_code == 200 and r.json()["metadata"]["authors_note"]["every"] == 2

    def note_in_context() -> bool:
        ctx = c.get(f"/v1/sessions/{sid}/context", params={"message": "hi"}).json()
        return any(e["name"] == "authors_note" for e in ctx["memory"].get("lore", []))

    assert not note_in_context()  # turn 1 of every 2
    turn(c, sid, "one")
    ctx = c.get(f"/v1/sessions/{sid}/context", params={"message": "two"}).json()
    assert ctx["memory"]["lore"] == [{"name": "authors_note", "position": "at_depth 0 as system",
                                      "tokens": ctx["budget"]["parts"]["lore"]}]
    assert ctx["messages"][-1]["content"].endswith("[System note: Keep it short.]")
    bad = c.put(f"/v1/sessions/{sid}/authors_note", json={"text": "x", "every": 0})
    assert bad.status_code == 422 and "every" in bad.text
    assert "authors_note" not in c.delete(f"/v1/sessions/{sid}/authors_note").json()["metadata"]
    assert not note_in_context()


def test_hand_written_swipe_metadata_never_breaks_an_operation(app):
    c = app.client
    odd = {"swipes": "not a list", "swipe_id": "x", "swipe_info": {"a": 1}, "history": "nope"}
    body = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "metadata": odd}]}
    assert c.post("/v1/sessions/odd-meta/import", json=body).status_code == 201
    mid = transcript(c, "odd-meta")[1]["id"]
    base = f"/v1/sessions/odd-meta/messages/{mid}"
    assert c.get(f"{base}/swipes").json() == {"message_id": mid, "swipe_id": 0, "swipes": ["a"]}
    assert c.post(f"{base}/swipes/0").status_code == 200
    assert c.patch(base, json={"content": "edited"}).json()["metadata"]["history"][0]["content"] == "a"
    r = c.post(f"{base}/regenerate", json={"max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["message"]["metadata"]["swipes"][0] == "edited"
    assert c.post(f"{base}/continue", json={"max_tokens": 2}).status_code == 200


def test_changes_wait_for_a_running_turn(app):
    """While a turn runs on the session, edits, deletes, truncates, swipes and regenerations get 409."""
    c = app.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    reply = turn(c, sid, "hello")["message"]
    m = f"/v1/sessions/{sid}/messages/{reply['id']}"
    release = app.rt.in_flight.claim(sid)  # what a running turn holds
    try:
        for method, path, body in (("PATCH", m, {"content": "x"}), ("DELETE", m, None), ("POST", f"{m}/truncate", None),
                                   ("POST", f"{m}/swipes/0", None), ("POST", f"{m}/regenerate", {}),
                                   ("POST", f"{m}/continue", {})):
            r = c.request(method, path, json=body)
            assert r.status_code == 409 and r.json()["error"]["code"] == "session_busy", (method, path)
    finally:
        release()
    assert c.patch(m, json={"content": "x"}).status_code == 200


def test_regenerate_and_continue_stream(app):
    from tests.service.conftest import read_sse

    c = app.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    reply = turn(c, sid, "stream it")["message"]
    m = f"/v1/sessions/{sid}/messages/{reply['id']}"
    with c.stream("POST", f"{m}/regenerate", json={"stream": True, "max_tokens": 4, "seed": 5}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events, _ = read_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert "".join(e["delta"] for e in events if isinstance(e, dict) and "delta" in e) == final["message"]["content"]
    assert final["message"]["metadata"]["swipe_id"] == 1
    before = final["message"]["content"]
    with c.stream("POST", f"{m}/continue", json={"stream": True, "max_tokens": 3}) as r:
        events, _ = read_sse(r.iter_lines())
    final = events[-2]
    deltas = "".join(e["delta"] for e in events if isinstance(e, dict) and "delta" in e)
    assert final["message"]["content"] == before + deltas  # the deltas are the new text only
    assert transcript(c, sid)[-1]["content"] == final["message"]["content"]
