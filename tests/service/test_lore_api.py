"""Lorebooks through the API: persona files, cards and world-info files; the context inspector
names each inserted entry and its cost in the model's tokens."""

from __future__ import annotations

import json

LORE_PERSONA = """---
name: village
display_name: 미나
language: ko
description: 미나는 바닷가 마을에 산다.
lorebook:
  scan_depth: 2
  token_budget: 200
  entries:
    - name: camellia
      keys: [동백]
      content: 동백꽃은 마을의 상징이고, 봄마다 축제가 열린다.
    - name: lighthouse
      keys: [등대]
      content: 등대지기는 미나의 할아버지다.
      position: at_depth
      depth: 0
---
"""


def test_context_names_inserted_entries_with_their_token_cost(app):
    c = app.client
    assert c.put("/v1/personas/village", content=LORE_PERSONA.encode()).status_code == 200
    s = c.post("/v1/sessions", json={"persona": "village"}).json()
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "동백꽃 축제 언제야?"}).json()
    assert [e["name"] for e in ctx["memory"]["lore"]] == ["camellia"]
    entry = ctx["memory"]["lore"][0]
    assert entry["position"] == "before_char" and entry["tokens"] > 0
    parts = ctx["budget"]["parts"]
    assert parts["lore"] >= entry["tokens"] > 0
    assert sum(parts.values()) == ctx["budget"]["used"] == ctx["tokens"]
    tok = app.rt.tokenizer
    assert ctx["tokens"] == tok.count_messages(ctx["messages"])  # the model's own tokens
    assert "동백꽃은 마을의 상징" in ctx["messages"][0]["content"]
    # nothing mentioned: no lore, no cost
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "안녕"}).json()
    assert "lore" not in ctx["memory"] and ctx["budget"]["parts"]["lore"] == 0
    # a turn that mentions the lighthouse generates with the entry at depth 0
    r = c.post(f"/v1/sessions/{s['id']}/messages", json={"content": "등대 보러 갈래?", "max_tokens": 3})
    assert r.status_code == 200, r.text
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "응"}).json()
    assert [e["name"] for e in ctx["memory"]["lore"]] == ["lighthouse"]  # scan_depth reaches the last turn
    assert "등대지기는" in ctx["messages"][-1]["content"]


def test_card_with_book_and_world_info_file(app):
    c = app.client
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Mina", "description": "Mina guards the gate.", "first_mes": "Halt!",
        "character_book": {"extensions": {}, "entries": [
            {"keys": ["gate"], "content": "The gate is made of oak.", "extensions": {}, "enabled": True,
             "insertion_order": 1, "name": "gate"}]}}}
    r = c.put("/v1/personas/mina", content=json.dumps(card).encode())
    assert r.status_code == 200, r.text
    assert r.json()["lorebook"]["entries"][0]["keys"] == ["gate"]
    wi = {"entries": {"0": {"uid": 0, "key": ["tower"], "content": "The tower is haunted.", "comment": "tower",
                            "order": 10, "position": 1, "disable": False}}}
    r = c.put("/v1/personas/mina/lorebook", content=json.dumps(wi).encode())
    assert r.status_code == 200, r.text
    s = c.post("/v1/sessions", json={"persona": "mina"}).json()
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "is the tower safe?"}).json()
    assert [(e["name"], e["position"]) for e in ctx["memory"]["lore"]] == [("tower", "after_char")]
    r = c.put("/v1/personas/mina/lorebook", content=b'{"entries": [{"keys": ["a"], "content": 5}]}')
    assert r.status_code == 422 and "entries.0.content" in r.text
    assert c.put("/v1/personas/nobody/lorebook", content=json.dumps(wi).encode()).status_code == 404
