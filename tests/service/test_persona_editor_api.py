"""The persona editor's API: checking drafts (line and field), fields -> file, the exact pinned
prompt with token costs, register flags, card import (PNG and JSON) and export with the lorebook."""

from __future__ import annotations

import json

from persona.cards import write_png_card

DRAFT = """---
name: jiwoo
display_name: 지우
language: ko
register: banmal
register_mode: guard
user_name: 아빠
greeting: 아빠 왔어요?
examples:
  - user: 밥 먹었어?
    assistant: 응, 먹었어! 아빠는 드셨어요?
lorebook:
  entries:
    - keys: [동백]
      content: 동백꽃은 마을의 상징이다.
---
지우는 아빠와 반말로 이야기하는 딸이다.
"""


def test_check_names_the_line_and_field(app):
    c = app.client
    ok = c.post("/v1/persona-drafts/check", content=DRAFT.encode()).json()
    assert ok["ok"] and ok["persona"]["lorebook"]["entries"][0]["keys"] == ["동백"]
    bad = c.post("/v1/persona-drafts/check", content=DRAFT.replace("register_mode: guard", "register_mode: loud").encode())
    err = bad.json()["error"]
    assert not bad.json()["ok"] and err["line"] == 6 and err["field"] == "register_mode"


def test_render_fields_to_a_file_and_back(app):
    c = app.client
    fields = {"name": "mina", "display_name": "Mina", "description": "An innkeeper.", "greeting": "Welcome!",
              "lorebook": {"entries": [{"keys": ["gull"], "content": "The inn is the Gull's Rest."}]}}
    text = c.post("/v1/persona-drafts/render", json={"fields": fields}).json()["text"]
    back = c.post("/v1/persona-drafts/check", content=text.encode()).json()["persona"]
    assert back["greeting"] == "Welcome!" and back["lorebook"]["entries"][0]["keys"] == ["gull"]
    r = c.post("/v1/persona-drafts/render", json={"fields": {**fields, "register": "loud"}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "register"


def test_preview_is_the_exact_prompt_with_costs_and_register_flags(app):
    c = app.client
    out = c.post("/v1/persona-drafts/preview", content=DRAFT.encode()).json()
    tok = app.rt.tokenizer
    assert out["messages"][0]["role"] == "system" and "지우" in out["messages"][0]["content"]
    costs = out["costs"]
    assert costs["system"] == tok.count_messages(out["messages"][:1], add_generation_prompt=False)
    assert costs["total"] == costs["system"] + costs["examples"] + costs["post_history"]
    flagged = {(f["field"], f["text"]) for f in out["register_flags"]}
    assert ("greeting", "아빠 왔어요?") in flagged
    assert any(field == "examples.0.1" and "드셨어요" in text for field, text in flagged)
    assert all(f["expected"] == "banmal" for f in out["register_flags"])


def test_card_import_png_and_json_and_export_keeps_the_book(app):
    c = app.client
    card = {"spec": "chara_card_v2", "spec_version": "2.0", "data": {
        "name": "Mina", "description": "d", "first_mes": "hi",
        "character_book": {"extensions": {}, "entries": [{"keys": ["gull"], "content": "Gulls.", "extensions": {},
                                                           "enabled": True, "insertion_order": 0}]}}}
    for raw, filename in ((json.dumps(card).encode(), "mina.json"), (write_png_card(card), "mina.png")):
        r = c.post("/v1/persona-drafts/card", params={"filename": filename}, content=raw)
        assert r.status_code == 200, r.text
        assert "gull" in r.json()["text"] and "name: mina" in r.json()["text"]
    r = c.post("/v1/persona-drafts/card", params={"filename": "x.png"}, content=b"\x89PNG\r\n\x1a\nbroken")
    assert r.status_code == 422
    assert c.put("/v1/personas/mina", content=json.dumps(card).encode()).status_code == 200
    exported = c.get("/v1/personas/mina/card").json()
    assert exported["data"]["character_book"]["entries"][0]["keys"] == ["gull"]
    png = c.get("/v1/personas/mina/card", params={"format": "png"})
    assert png.headers["content-type"] == "image/png" and png.content.startswith(b"\x89PNG")
    assert c.get("/v1/personas/nobody/card").status_code == 404
