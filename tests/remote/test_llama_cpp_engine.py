"""Memento in front of a real llama.cpp engine (llama-cpp-python's OpenAI server, SmolLM2 GGUF):
the OpenAI client plain and streamed, session memory, the engine's context window, outages."""

from __future__ import annotations

import time

import openai

from tests.remote.conftest import N_CTX, remote_settings, start_app

FACT = "My cat is called Pickles and she is orange."


def client_for(app) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app.client, max_retries=0)


def test_no_local_weights_and_the_engines_window(remote_app, llama_server):
    rt = remote_app.rt
    assert rt.lm is None and rt.engine is None  # nothing loaded here: the engine holds the model
    assert rt.backend.kind == "llama-cpp-python"
    assert rt.context_window == N_CTX  # read from the engine (its context-length refusal), not configured
    ready = remote_app.client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["engine"] is True and ready["engine_url"] == llama_server.url


def test_openai_client_plain_and_streamed(remote_app):
    client = client_for(remote_app)
    reply = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hello."}],
                                           max_tokens=8, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hello."}],
                                                 max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same words, streamed
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_session_memory_reaches_the_engines_prompt(remote_app, monkeypatch):
    http = remote_app.rt.backend.http
    sent: list[dict] = []
    original = http.stream

    def spy(path, body):
        sent.append(body)
        return original(path, body)

    monkeypatch.setattr(http, "stream", spy)
    c = remote_app.client
    r = c.post("/v1/sessions", json={"memory": {"strategy": "window", "turns": 4}})
    sid = r.json()["id"]
    assert c.post(f"/v1/sessions/{sid}/messages", json={"content": FACT}).status_code == 200
    context = c.get(f"/v1/sessions/{sid}/context", params={"message": "What is my cat called?"}).json()
    assert any("Pickles" in m["content"] for m in context["messages"])
    assert context["budget"]["context_window"] == N_CTX
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "What is my cat called?"})
    assert r.status_code == 200
    last = sent[-1]["messages"]
    assert any("Pickles" in m["content"] for m in last)  # the engine saw the planted fact
    assert last[-1] == {"role": "user", "content": "What is my cat called?"}


def test_context_window_override(tmp_path, llama_server):
    for app in start_app(remote_settings(tmp_path, llama_server, context_window=2048), None):
        assert app.rt.context_window == 2048
        long = "word " * 3000  # fits the engine's 4096, not our 2048
        r = app.client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": long}]})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_engine_killed_then_back(tmp_path, own_llama_server):
    for app in start_app(remote_settings(tmp_path, own_llama_server), None):
        c = app.client
        sid = c.post("/v1/sessions", json={}).json()["id"]
        assert c.post(f"/v1/sessions/{sid}/messages", json={"content": "first"}).status_code == 200
        own_llama_server.kill()
        t0 = time.monotonic()
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "second"})
        assert time.monotonic() - t0 < 5  # retried with backoff, then a clear answer
        assert r.status_code == 503
        error = r.json()["error"]
        assert error["code"] == "engine_unavailable" and own_llama_server.url in error["message"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["engine"] is False
        with c.stream("POST", f"/v1/sessions/{sid}/messages", json={"content": "third", "stream": True}) as s:
            assert s.status_code == 503  # before any header: not a 200 carrying an error event
        own_llama_server.start()
        r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "fourth"})
        assert r.status_code == 200  # no restart of Memento
        assert c.get("/readyz").status_code == 200
        contents = [(m["role"], m["content"]) for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"]]
        users = [text for role, text in contents if role == "user"]
        assert users[:2] == ["first", "second"] and users[-1] == "fourth"  # the user's words were kept
        assert contents[-1][0] == "assistant"


def test_running_summary_is_written_by_the_engine(remote_app, monkeypatch):
    """The facts summarizer asks the engine whether the line is worth keeping, and the summary holds
    the line exactly when the engine said yes. (SmolLM2 through llama.cpp says yes on AVX-512 hosts
    and no on the AVX2 one: which answer is the model's, what is done with it is ours.)"""
    http = remote_app.rt.backend.http
    paths: list[str] = []
    answers: list[str] = []
    original = http.stream

    def spy(path, body):
        messages = str(body.get("messages"))
        paths.append(messages)
        payloads = original(path, body)
        return record(payloads) if "Worth remembering?" in messages else payloads

    def record(payloads):
        text = []
        for p in payloads:
            text += [(ch.get("delta") or {}).get("content") or "" for ch in p.get("choices") or []]
            yield p
        answers.append("".join(text))

    monkeypatch.setattr(http, "stream", spy)
    c = remote_app.client
    sid = c.post("/v1/sessions", json={"memory": {"strategy": "summary"}}).json()["id"]
    assert c.post(f"/v1/sessions/{sid}/messages", json={"content": FACT}).status_code == 200
    assert remote_app.rt.background.wait_idle(120)
    assert any("Worth remembering?" in p for p in paths)  # the summarizer's (facts style) prompt went to the engine
    assert len(answers) == 1, answers  # one user sentence, one decision
    kept = answers[0].strip().strip('"').lower().startswith("yes")
    summary = c.get(f"/v1/sessions/{sid}/context", params={"message": "hi"}).json()["memory"].get("summary")
    assert ("Pickles" in (summary or "")) if kept else not summary, (answers, summary)
