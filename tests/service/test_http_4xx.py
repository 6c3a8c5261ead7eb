"""Issue 10's 500s that must be 4xx (or 503), each driven over real HTTP against a live uvicorn
server on 127.0.0.1 (service/errors.py maps them; these tests check the wire answer)."""

from __future__ import annotations

import copy
import dataclasses
import json
import threading

import httpx
import pytest

from tests.service.conftest import LiveServer, free_port, make_settings

HI = [{"role": "user", "content": "hi"}]
CARD = {"spec": "chara_card_v2", "spec_version": "2.0",
        "data": {"name": "Mina", "description": "A cat.", "first_mes": "Hi."}}


def serve(tmp_path, lm):
    from service.main import create_app

    return LiveServer(create_app(make_settings(tmp_path, max_tokens=2), lm=lm), free_port())


def with_template(lm, template: str):
    tok = copy.copy(lm.tokenizer)
    tok.chat_template = template
    return dataclasses.replace(lm, tokenizer=tok)


@pytest.fixture
def srv(tmp_path, tiny_lm):
    with serve(tmp_path, tiny_lm) as s:
        yield s


def chat(srv, messages, **headers):
    return httpx.post(f"{srv.url}/v1/chat/completions", headers=headers, timeout=60,
                      json={"model": "x", "max_tokens": 2, "messages": messages})


def test_racing_first_calls_on_one_new_session_id_never_500(srv):
    codes: list[int] = []
    go = threading.Barrier(4)

    def call():
        go.wait()
        codes.append(chat(srv, HI, **{"X-Session-ID": "race-live"}).status_code)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(c in (200, 409, 429) for c in codes), codes
    assert 200 in codes
    assert len([s for s in srv.app.state.rt.store.list_sessions("local") if s.id == "race-live"]) == 1


def test_session_created_by_a_racer_between_lookup_and_create_is_joined(srv, monkeypatch):
    """Deterministic race: the other first call creates the session just before ours does, so the
    store raises SessionExists; the request joins that session instead of a 500."""
    store = srv.app.state.rt.store
    original = store.create_session

    def racer_wins(owner, *args, **kwargs):
        original(owner, *args, **kwargs)  # the concurrent first call
        return original(owner, *args, **kwargs)  # ours: SessionExists

    monkeypatch.setattr(store, "create_session", racer_wins)
    r = chat(srv, HI, **{"X-Session-ID": "race-det"})
    assert r.status_code == 200, r.text
    assert r.headers["x-session-id"] == "race-det"
    assert [m.role for m in store.list_messages("race-det")] == ["user", "assistant"]


@pytest.mark.parametrize("field,value", [("tags", 7), ("alternate_greetings", [1]), ("extensions", "s")])
def test_card_field_of_the_wrong_type_is_422_naming_it(srv, field, value):
    card = copy.deepcopy(CARD)
    card["data"][field] = value
    r = httpx.put(f"{srv.url}/v1/personas/mina", content=json.dumps(card).encode(),
                  headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert field in (err["param"] or "") + err["message"], err


@pytest.mark.parametrize("kind", ["json", "yaml"])
def test_deeply_nested_persona_body_is_422(srv, kind):
    if kind == "json":
        body, ctype = '{"spec": "chara_card_v2", "data": ' + "[" * 100_000 + "]" * 100_000 + "}", "application/json"
    else:
        body, ctype = "---\nname: deep\ndescription: " + "[" * 5000 + "]" * 5000 + "\n---\nbody\n", "text/markdown"
    r = httpx.put(f"{srv.url}/v1/personas/deep", content=body.encode(), headers={"Content-Type": ctype}, timeout=30)
    assert r.status_code == 422, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_non_alternating_messages_on_a_gemma_template_model(tmp_path, tiny_lm):
    """Gemma's template raises on user,user: the service merges same-role turns so it answers;
    a template that still refuses is a 4xx naming `messages`, never a 500."""
    from model.chat_template import GEMMA3_TEMPLATE

    with serve(tmp_path / "g", with_template(tiny_lm, GEMMA3_TEMPLATE)) as s:
        r = chat(s, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                     {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"},
                     {"role": "user", "content": "e"}])
        assert r.status_code == 200, r.text
    refusing = '{{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}'
    with serve(tmp_path / "r", with_template(tiny_lm, refusing)) as s:
        r = chat(s, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert err["param"] == "messages" and "alternate" in err["message"], err


def test_store_error_is_503_with_retry_after(srv, monkeypatch):
    from memory.store import StoreError

    def broken(*args, **kwargs):
        raise StoreError("disk I/O error")

    monkeypatch.setattr(srv.app.state.rt.store, "list_sessions", broken)
    r = httpx.get(f"{srv.url}/v1/sessions", timeout=30)
    assert r.status_code == 503, r.text
    assert r.headers.get("retry-after") and r.json()["error"]["code"] == "store_error"


def test_raw_body_routes_keep_their_content_types_and_json_routes_refuse_others(srv):
    """The 415 check applies to routes that take a JSON model only: persona files (markdown, text,
    card JSON, PNG bytes) and chat imports (JSONL) keep working over the wire."""
    persona = b"---\nname: rawp\ndescription: A raw persona.\n---\n"
    for ctype in ("text/markdown", "text/plain", "application/octet-stream", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.put(f"{srv.url}/v1/personas/rawp", content=persona, headers=headers, timeout=30)
        assert r.status_code == 200, (ctype, r.text)
    jsonl = (json.dumps({"user_name": "U", "character_name": "A"}) + "\n"
             + json.dumps({"name": "U", "is_user": True, "mes": "hello"}) + "\n"
             + json.dumps({"name": "A", "is_user": False, "mes": "hi there"}) + "\n").encode()
    for ctype in ("application/x-ndjson", "text/plain"):
        sid = f"imp-{ctype.split('/')[1]}"
        r = httpx.post(f"{srv.url}/v1/sessions/{sid}/import", content=jsonl, headers={"Content-Type": ctype},
                       timeout=30)
        assert r.status_code < 300, (ctype, r.text)
    r = httpx.post(f"{srv.url}/v1/chat/completions", content=json.dumps({"messages": HI}).encode(),
                   headers={"Content-Type": "text/plain"}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["param"] == "Content-Type", r.text
