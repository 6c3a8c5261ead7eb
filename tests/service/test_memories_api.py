"""Core blocks and facts through the real app: `long_term` sessions, `/memory/blocks`, `/v1/memories`.

The tiny random model proposes block edits after each turn through the real llguidance grammar, so
its proposals always parse and are then validated; the facts come from the user's own lines.
"""

from __future__ import annotations

import pytest


def turn(c, sid: str, text: str) -> dict:
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": text, "max_tokens": 4})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture
def lt_session(app):
    c = app.client
    r = c.post("/v1/sessions", json={"memory": {"strategy": "long_term", "k": 2, "turns": 2}})
    assert r.status_code == 201, r.text
    assert r.json()["memory"] == {"strategy": "long_term", "k": 2, "turns": 2, "scope": "session", "max_facts": 12}
    sid = r.json()["id"]
    for text in ["My name is Ada.", "I live in Busan.", "The weather is nice.", "We moved to Daejeon."]:
        turn(c, sid, text)
    assert app.rt.background.wait_idle(timeout=120)
    return sid


def test_memory_config_bounds_come_from_the_one_union(app):
    c = app.client
    r = c.post("/v1/sessions", json={"memory": {"strategy": "long_term", "k": 65}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "memory.k"
    assert "less than or equal to 64" in r.json()["error"]["message"]
    r = c.post("/v1/sessions", json={"memory": {"strategy": "window", "turns": 3, "k": 1}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "memory.k"
    schema = c.get("/openapi.json").json()["components"]["schemas"]
    assert schema["WindowConfig"]["properties"]["turns"]["maximum"] == 256  # bounds visible to clients


def test_facts_supersede_and_the_user_lists_corrects_and_deletes(app, lt_session):
    c = app.client
    facts = c.get("/v1/memories", params={"session_id": lt_session}).json()["data"]
    home = [f for f in facts if f["subject"] == "home"]
    assert [(f["text"], f["current"]) for f in home] == [("We moved to Daejeon.", True), ("I live in Busan.", False)]
    assert home[1]["valid_to"] == home[0]["valid_from"] and home[1]["superseded_by"] == home[0]["id"]
    assert [f["text"] for f in c.get("/v1/memories", params={"current": "false"}).json()["data"]] == [
        "I live in Busan."]

    r = c.patch(f"/v1/memories/{home[0]['id']}", json={"text": "We live in Daejeon, Yuseong-gu."})
    assert r.status_code == 200 and r.json()["current"] and r.json()["origin"] == "user"
    current = {f["text"] for f in c.get("/v1/memories", params={"current": "true"}).json()["data"]}
    assert "We live in Daejeon, Yuseong-gu." in current and "We moved to Daejeon." not in current

    assert c.delete(f"/v1/memories/{r.json()['id']}").status_code == 204
    assert c.delete(f"/v1/memories/{r.json()['id']}").status_code == 404
    r = c.patch("/v1/memories/fact_nope", json={"text": ""})
    assert r.status_code == 422 and r.json()["error"]["param"] == "text"
    r = c.get("/v1/memories", params={"session_id": "sess_not_mine"})
    assert r.status_code == 404


def test_blocks_are_kept_from_facts_and_validated_model_edits(app, lt_session):
    c = app.client
    r = c.get(f"/v1/sessions/{lt_session}/memory/blocks/user")
    assert r.status_code == 200
    block = r.json()
    assert "My name is Ada." in block["value"] and "We moved to Daejeon." in block["value"]
    assert "I live in Busan." not in block["value"]  # the changed fact replaced its line
    assert block["tokens"] <= block["limit_tokens"]
    user_ids = {m["id"] for m in c.get(f"/v1/sessions/{lt_session}/messages").json()["data"] if m["role"] == "user"}
    assert block["history"] and all(h["message_id"] in user_ids for h in block["history"])
    sources = {h["source"] for h in block["history"]}
    assert "facts" in sources
    # the model's proposals (random weights: nonsense, but always well-formed JSON) were validated
    # against the block's limit before being applied
    for label in ("user", "relationship"):
        b = c.get(f"/v1/sessions/{lt_session}/memory/blocks/{label}").json()
        assert b["tokens"] <= b["limit_tokens"]
    edits = c.get(f"/v1/sessions/{lt_session}/memory/blocks").json()["edits"]["by_source"]
    assert edits["facts"] == {"proposed": 3, "applied": 3, "rejected": 0}
    model = edits.get("model", {"proposed": 0, "applied": 0, "rejected": 0})
    assert model["proposed"] == model["applied"] + model["rejected"]  # every proposal was judged

    ctx = c.get(f"/v1/sessions/{lt_session}/context", params={"message": "where do I live?"}).json()
    system = ctx["messages"][0]["content"]
    assert "[Core memory: user]" in system and "We moved to Daejeon." in system
    assert ctx["memory"]["blocks"]["user"] == block["value"]


def test_put_block_limits_and_errors(app, lt_session):
    c = app.client
    r = c.put(f"/v1/sessions/{lt_session}/memory/blocks/user", json={"value": "Ada, a chemist.", "limit_tokens": 32})
    assert r.status_code == 200 and r.json()["value"] == "Ada, a chemist." and r.json()["limit_tokens"] == 32
    assert r.json()["history"][-1]["source"] == "user"
    r = c.put(f"/v1/sessions/{lt_session}/memory/blocks/user", json={"value": "word " * 100})
    assert r.status_code == 422 and r.json()["error"]["param"] == "value"
    assert "limit_tokens=32" in r.json()["error"]["message"]
    r = c.put(f"/v1/sessions/{lt_session}/memory/blocks/user", json={"value": "x", "limit_tokens": 10**6})
    assert r.status_code == 422 and r.json()["error"]["param"] == "limit_tokens"
    assert c.get(f"/v1/sessions/{lt_session}/memory/blocks/nope").status_code == 404
    raw = b'{"value": "bad \\ud800 text"}'  # a lone surrogate: JSON-legal, not text the tokenizer takes
    r = c.put(f"/v1/sessions/{lt_session}/memory/blocks/user", content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "value"
    r = c.patch("/v1/memories/fact_x", content=b'{"text": "\\udc00"}', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["param"] == "text"
    r = c.put(f"/v1/sessions/{lt_session}/memory/blocks/hobbies", json={"value": "chess"})
    assert r.status_code == 200
    labels = [b["label"] for b in c.get(f"/v1/sessions/{lt_session}/memory/blocks").json()["data"]]
    assert labels == ["user", "relationship", "hobbies"]
    assert c.get("/v1/sessions/sess_nobody/memory/blocks/user").status_code == 404


def test_an_imported_history_builds_facts_and_blocks(app):
    """The import route (issue 12) feeds long_term like live turns: facts supersede, the block follows."""
    c = app.client
    sid = c.post("/v1/sessions", json={"memory": {"strategy": "long_term"}}).json()["id"]
    history = []
    for i in range(60):
        text = {3: "My name is Ada.", 10: "I live in Busan.", 50: "We moved to Daejeon."}.get(i, f"Just chatting ({i}).")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": f"Okay ({i})."}]
    r = c.post(f"/v1/sessions/{sid}/import", json={"messages": history})
    assert r.status_code in (200, 201, 202), r.text
    assert app.rt.background.wait_idle(timeout=180)
    assert c.get(f"/v1/sessions/{sid}").json()["memory_status"]["pending"] == 0
    current = [f["text"] for f in c.get("/v1/memories", params={"session_id": sid, "current": "true"}).json()["data"]]
    assert current == ["We moved to Daejeon.", "My name is Ada."]
    block = c.get(f"/v1/sessions/{sid}/memory/blocks/user").json()["value"]
    assert "We moved to Daejeon." in block and "Busan" not in block
