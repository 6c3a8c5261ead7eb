"""Client mistakes that used to answer 500 (issue 10): each is a 4xx naming the field, or 503."""

from __future__ import annotations

import json
import threading

import pytest

CARD = {"spec": "chara_card_v2", "spec_version": "2.0",
        "data": {"name": "Mina", "description": "A cat.", "first_mes": "Hi."}}


@pytest.mark.parametrize("field,value", [("tags", 7), ("alternate_greetings", [1]), ("extensions", "s"),
                                         ("group_only_greetings", 3), ("character_book", "x")])
def test_card_fields_of_the_wrong_type_are_422(app, field, value):
    card = json.loads(json.dumps(CARD))
    card["data"][field] = value
    r = app.client.put("/v1/personas/mina", content=json.dumps(card).encode())
    assert r.status_code == 422, r.text
    assert field in (r.json()["error"]["param"] or "") + r.json()["error"]["message"]


def test_deeply_nested_card_json_is_422(app):
    deep = '{"spec": "chara_card_v2", "data": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = app.client.put("/v1/personas/deep", content=deep.encode())
    assert r.status_code == 422, r.text


def test_deeply_nested_persona_yaml_is_422(app):
    text = "---\nname: deep\ndescription: " + "[" * 5000 + "]" * 5000 + "\n---\nbody\n"
    r = app.client.put("/v1/personas/deep", content=text.encode())
    assert r.status_code == 422, r.text


def test_deeply_nested_json_body_is_4xx(app):
    body = '{"messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    r = app.client.post("/v1/chat/completions", content=body.encode(), headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


def test_concurrent_first_calls_with_one_new_session_id(app):
    results: list[int] = []

    def call():
        r = app.client.post("/v1/chat/completions", headers={"X-Session-ID": "race-1"},
                            json={"model": "x", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        results.append(r.status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(s in (200, 409, 429) for s in results), results
    assert 200 in results


def test_store_errors_map_to_4xx_or_503():
    """Every StoreError has a non-500 answer (as_api_error is what the handlers use)."""
    from memory.store import MessageNotFound, SessionExists, StoreError, StoreUnavailable
    from model.chat_template import ChatTemplateError
    from service.errors import as_api_error

    assert as_api_error(SessionExists("s1")).status == 409
    assert as_api_error(MessageNotFound("s1", "m1")).status == 404
    assert as_api_error(StoreUnavailable("down")).status == 503
    assert as_api_error(StoreError("disk I/O error")).status == 503
    err = as_api_error(ChatTemplateError("Conversation roles must alternate user/assistant"))
    assert err.status == 422 and err.param == "messages"


def test_session_exists_over_http_is_409(app):
    """A store-level SessionExists (two first calls racing on one id) reaches the client as a 409."""
    from memory.store import SessionExists

    app.rt.store.create_session("local", "assistant", {"strategy": "buffer"}, {}, session_id="taken-1")
    with pytest.raises(SessionExists):
        app.rt.store.create_session("local", "assistant", {"strategy": "buffer"}, {}, session_id="taken-1")
    r = app.client.post("/v1/sessions/taken-1/import", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code != 500
