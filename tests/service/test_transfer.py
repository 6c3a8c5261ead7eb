"""Chat import (Memento JSON and SillyTavern JSONL) and export, over the real app and real stores."""

from __future__ import annotations

import json
import time

from service.chat_files import parse_chat

TOPICS = [
    "my cat Mochi sleeps on the piano", "the train to Busan was late again", "I bought a red bicycle",
    "my sister plays the cello in Vienna", "we grew tomatoes on the balcony", "I fixed the kitchen tap",
]


def st_chat(turns: int, plant: dict[int, str] | None = None) -> str:
    """A SillyTavern chat file of `turns` exchanges (header line + 2 lines per exchange)."""
    plant = plant or {}
    lines = [json.dumps({"user_name": "Ada", "character_name": "Bot", "create_date": "2024-05-01@12h00m00s",
                         "chat_metadata": {"note_prompt": "[Bot is sleepy.]", "note_depth": 2, "note_interval": 3,
                                           "note_role": 0}})]
    for i in range(turns):
        said = plant.get(i, f"turn {i}: {TOPICS[i % len(TOPICS)]}")
        lines.append(json.dumps({"name": "Ada", "is_user": True, "is_system": False,
                                 "send_date": "May 1, 2024 12:00pm", "mes": said, "extra": {}}))
        reply = {"name": "Bot", "is_user": False, "is_system": False, "send_date": 1714564800000 + i,
                 "mes": f"noted {i}", "extra": {}}
        if i == 0:
            reply |= {"swipes": ["first take", "noted 0"], "swipe_id": 1}
        lines.append(json.dumps(reply, ensure_ascii=False))
    return "\n".join(lines) + "\n"


def wait_built(c, sid: str, timeout: float = 300) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = c.get(f"/v1/sessions/{sid}").json()["memory_status"]
        if status["pending"] == 0:
            return status
        assert status["state"] == "building", status
        time.sleep(0.2)
    raise AssertionError(f"memory build did not finish: {status}")


def test_import_messages_json_stores_without_generating(app_any_store):
    c = app_any_store.client
    body = {"messages": [
        {"role": "user", "content": "안녕, 나 민지야", "created_at": "2024-02-03T04:05:06Z"},
        {"role": "assistant", "content": "안녕 민지!"},
        {"role": "system", "content": "a note"},
    ]}
    r = c.post("/v1/sessions/imp-1/import", json=body)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["imported"] == 3 and out["format"] == "messages"
    msgs = c.get("/v1/sessions/imp-1/messages").json()["data"]
    assert [(m["role"], m["content"]) for m in msgs] == [(x["role"], x["content"]) for x in body["messages"]]
    assert msgs[0]["created_at"].startswith("2024-02-03T04:05:06")
    assert all(m["metadata"].get("imported") is True and "usage" not in m["metadata"] for m in msgs)
    status = wait_built(c, "imp-1")
    assert status == {"pending": 0, "imported": 3, "done": 3, "state": "ready", "strategy": "window"}
    # a session with no import says nothing is pending
    s = c.post("/v1/sessions", json={}).json()
    assert c.get(f"/v1/sessions/{s['id']}").json()["memory_status"]["pending"] == 0


def test_import_errors_name_the_line_and_field(app):
    c = app.client
    r = c.post("/v1/sessions/bad/import", json={"messages": [{"role": "bot", "content": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages.0.role"
    r = c.post("/v1/sessions/bad/import", json={"messages": [{"role": "user", "content": "x", "created_at": "soon"}]})
    assert r.status_code == 422 and "ISO-8601" in r.json()["error"]["message"]
    r = c.post("/v1/sessions/bad/import", content=b'{"user_name": "a"}\n{"mes": "ok", "is_user": true}\nnot json\n')
    assert r.status_code == 422 and "line 3" in r.json()["error"]["message"]
    r = c.post("/v1/sessions/bad/import", content=b'{"user_name": "a"}\n{"is_user": true}\n')
    assert r.status_code == 422 and r.json()["error"]["param"] == "mes"
    r = c.post("/v1/sessions/bad/import", content=b"")
    assert r.status_code == 422
    r = c.post("/v1/sessions/bad/import", json={"messages": [{"role": "user", "content": "x" * 40_000}]})
    assert r.status_code == 413 and r.json()["error"]["param"] == "messages.0.content"
    assert c.get("/v1/sessions/bad/messages").json()["data"] == []  # nothing half-imported


def test_export_is_sillytavern_jsonl_and_round_trips(app_any_store):
    c = app_any_store.client
    assert c.post("/v1/sessions/rt-1/import", content=st_chat(3).encode()).status_code == 201
    r = c.get("/v1/sessions/rt-1/export")
    assert r.status_code == 200 and "attachment" in r.headers["content-disposition"]
    lines = [json.loads(x) for x in r.text.splitlines()]
    header, first_user, first_reply = lines[0], lines[1], lines[2]
    assert header["chat_metadata"]["memento"]["session_id"] == "rt-1"
    assert {"user_name", "character_name", "create_date"} <= set(header)
    assert first_user["is_user"] is True and first_user["mes"].startswith("turn 0")
    assert first_reply["is_user"] is False and first_reply["swipes"] == ["first take", "noted 0"]
    assert first_reply["swipe_id"] == 1 and first_reply["send_date"].startswith("May 1, 2024")
    # SillyTavern's author's note became the session's and goes back out
    note = c.get("/v1/sessions/rt-1").json()["metadata"]["authors_note"]
    assert note == {"text": "[Bot is sleepy.]", "depth": 2, "every": 3, "role": "system"}
    assert (header["chat_metadata"]["note_prompt"], header["chat_metadata"]["note_interval"]) == ("[Bot is sleepy.]", 3)
    # importing the export again gives the same transcript (and keeps swipes)
    assert c.post("/v1/sessions/rt-2/import", content=r.content).status_code == 201
    a = c.get("/v1/sessions/rt-1/messages").json()["data"]
    b = c.get("/v1/sessions/rt-2/messages").json()["data"]
    assert [(m["role"], m["content"]) for m in a] == [(m["role"], m["content"]) for m in b]
    assert b[1]["metadata"]["swipes"] == ["first take", "noted 0"]


def test_import_to_someone_elses_session_is_404(tmp_path, tiny_lm):
    from tests.service.conftest import make_settings, start_app

    settings = make_settings(tmp_path, api_keys="ka:alice,kb:bob")
    for h in start_app(settings, tiny_lm):
        c = h.client
        ok = c.post("/v1/sessions/shared-id/import", json={"messages": [{"role": "user", "content": "mine"}]},
                    headers={"Authorization": "Bearer ka"})
        assert ok.status_code == 201
        r = c.post("/v1/sessions/shared-id/import", json={"messages": [{"role": "user", "content": "x"}]},
                   headers={"Authorization": "Bearer kb"})
        assert r.status_code == 404
        assert c.get("/v1/sessions/shared-id/export", headers={"Authorization": "Bearer kb"}).status_code == 404


def test_300_turn_sillytavern_import_builds_vector_memory(app):
    """300 exchanges imported at once; the background build indexes them all (pending reaches 0)
    and a fact said in turn 37 is retrieved for a question about it."""
    c = app.client
    s = c.post("/v1/sessions", json={"memory": {"strategy": "vector", "k": 2, "turns": 2, "scope": "session"}}).json()
    fact = "my grandmother's parrot is named Captain Biscuit"
    t0 = time.monotonic()
    r = c.post(f"/v1/sessions/{s['id']}/import", content=st_chat(300, {37: fact}).encode())
    assert r.status_code == 201, r.text
    assert r.json()["imported"] == 600 and r.json()["format"] == "sillytavern"
    store_s = time.monotonic() - t0
    assert len(c.get(f"/v1/sessions/{s['id']}/messages").json()["data"]) == 600
    status = wait_built(c, s["id"])
    print(f"\n300-turn import: stored in {store_s:.2f} s, memory built in {time.monotonic() - t0:.1f} s")
    assert status["state"] == "ready" and status["done"] == 600
    # the build itself indexed every exchange (before any context call could index on the fly)
    key = f"vector:{app.rt.vector().embedder.name}"
    assert app.rt.store.get_state(s["id"], key)["count"] == 600
    ctx = c.get(f"/v1/sessions/{s['id']}/context", params={"message": "What is the parrot called?"}).json()
    retrieved = [m["content"] for ex in ctx["memory"]["retrieved"] for m in ex]
    assert fact in retrieved


def test_parse_chat_roles_hidden_and_dates():
    text = "\n".join(json.dumps(x) for x in [
        {"user_name": "U", "character_name": "C"},
        {"name": "U", "is_user": True, "mes": "hi", "send_date": "2024-01-01T00:00:00Z"},
        {"name": "Narrator", "is_user": False, "is_system": True, "mes": "night falls", "extra": {"type": "narrator"}},
        {"name": "C", "is_user": False, "is_system": True, "mes": "hidden reply", "send_date": "gibberish"},
    ])
    chat = parse_chat(text)
    assert [m["role"] for m in chat.messages] == ["user", "system", "assistant"]
    assert chat.messages[2]["metadata"]["hidden"] is True and chat.messages[2]["created_at"] is None
    assert chat.user_name == "U" and chat.character_name == "C"


def test_cli_chat_import_and_export(live_server, tmp_path):
    import httpx
    from typer.testing import CliRunner

    from service.cli import app as cli

    runner = CliRunner()
    chat = tmp_path / "chat.jsonl"
    chat.write_text(st_chat(4), encoding="utf-8")
    r = runner.invoke(cli, ["chat", "import", str(chat), "--session", "cli-1", "--url", live_server.url])
    assert r.exit_code == 0, r.output
    assert "imported 8 messages into session cli-1" in r.output
    out = tmp_path / "out.jsonl"
    r = runner.invoke(cli, ["chat", "export", "cli-1", "--out", str(out), "--url", live_server.url])
    assert r.exit_code == 0, r.output
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 9 and json.loads(lines[1])["mes"].startswith("turn 0")
    assert len(httpx.get(f"{live_server.url}/v1/sessions/cli-1/messages").json()["data"]) == 8
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\"user_name\": \"a\"}\nnope\n", encoding="utf-8")
    r = runner.invoke(cli, ["chat", "import", str(bad), "--session", "cli-2", "--url", live_server.url])
    assert r.exit_code == 2 and "line 2" in r.output
    r = runner.invoke(cli, ["chat", "export", "nope", "--url", live_server.url])
    assert r.exit_code == 2 and "not found" in r.output.lower()


def test_odd_times_and_ids_are_clear_errors(app):
    c = app.client
    for when in (1e308, "9999-12-31T23:59:59-14:00", -1e20):
        r = c.post("/v1/sessions/odd/import", json={"messages": [{"role": "user", "content": "x", "created_at": when}]})
        assert r.status_code == 422, (when, r.text)
    r = c.post("/v1/sessions/bad%20id!/import", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 422 and r.json()["error"]["param"] == "session_id"
    st = '{"user_name": "a"}\n{"mes": "hi", "is_user": true, "send_date": 1e308}\n'
    assert c.post("/v1/sessions/odd-2/import", content=st.encode()).status_code == 201  # a lenient ST date


def test_import_builds_a_running_summary(tmp_path, tiny_lm):
    """summary_buffer: the imported history is folded into the summary by the background build."""
    from tests.service.conftest import make_settings, start_app

    settings = make_settings(tmp_path, memory={"strategy": "summary_buffer", "max_tokens": 64})
    for h in start_app(settings, tiny_lm):
        c = h.client
        assert c.post("/v1/sessions/sum-1/import", content=st_chat(12).encode()).status_code == 201
        status = wait_built(c, "sum-1", timeout=120)
        assert status["strategy"] == "summary_buffer" and status["done"] == 24
        state = h.rt.store.get_state("sum-1", "summary_buffer")
        assert state and state["count"] > 0  # older exchanges are in the summary now
        ctx = c.get("/v1/sessions/sum-1/context", params={"message": "hi"}).json()
        assert ctx["memory"].get("summary")


def test_a_build_cut_by_a_restart_resumes(store_kind, tmp_path, tiny_lm):
    """The app went away mid-build (state says building, 0 of 8 done): after a restart the next
    GET reschedules the build and pending reaches 0; a build that failed is retried the same way."""
    from tests.service.conftest import make_settings, start_app
    from tests.store_fixtures import make_store_spec

    with make_store_spec(store_kind, tmp_path) as spec:
        settings = make_settings(tmp_path, store_url=spec.url)
        for h in start_app(settings, tiny_lm, store=spec.open()):
            assert h.client.post("/v1/sessions/cut-1/import", content=st_chat(4).encode()).status_code == 201
            wait_built(h.client, "cut-1")
            h.rt.store.put_state("cut-1", "import", {"start": 0, "imported": 8, "done": 0, "state": "building"})
        for h in start_app(settings, tiny_lm, store=spec.open()):
            assert wait_built(h.client, "cut-1") == {"pending": 0, "imported": 8, "done": 8, "state": "ready",
                                                     "strategy": "window"}
            h.rt.store.put_state("cut-1", "import", {"start": 0, "imported": 8, "done": 4, "state": "failed",
                                                      "error": "VectorUnavailable: down"})
            first = h.client.get("/v1/sessions/cut-1").json()["memory_status"]
            assert first["pending"] == 4 and first["error"].startswith("VectorUnavailable")
            assert wait_built(h.client, "cut-1")["state"] == "ready"
