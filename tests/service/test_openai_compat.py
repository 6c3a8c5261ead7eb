"""`/v1/chat/completions` and `/v1/models` through the official `openai` client and LangChain's ChatOpenAI."""

from __future__ import annotations

import openai
import pytest

from tests.service.conftest import read_sse


@pytest.fixture
def oai(app):
    # TestClient is an httpx.Client bound to the ASGI app: the real openai client, no network
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app.client, max_retries=0)


def test_models(oai, app):
    models = oai.models.list()
    assert [m.id for m in models.data] == ["tiny-random"]
    assert models.data[0].object == "model"


def test_non_stream(oai):
    r = oai.chat.completions.create(
        model="tiny-random", messages=[{"role": "user", "content": "Hello!"}], max_tokens=5, temperature=0
    )
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens_details.cached_tokens == 0


def test_stream_with_usage(oai):
    stream = oai.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"] or finish == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert chunks[0].choices[0].delta.role == "assistant"
    nonstream = oai.chat.completions.create(
        model="tiny-random",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=6, temperature=0,
    )
    assert text == nonstream.choices[0].message.content  # greedy: same text streamed or not


def test_stream_without_usage_has_no_usage_chunk(app):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "stream": True}
    with app.client.stream("POST", "/v1/chat/completions", json=body) as r:
        events, _ = read_sse(r.iter_lines())
    assert events[-1] == "[DONE]"
    assert all(e["choices"] for e in events[:-1])  # no trailing usage-only chunk
    assert all("usage" not in e or e["usage"] is None for e in events[:-1])


def test_seed_temperature_top_p_and_stop(oai):
    kw = dict(model="m", messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=12)
    a = oai.chat.completions.create(**kw, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    b = oai.chat.completions.create(**kw, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert a == b  # same seed, same reply
    greedy = oai.chat.completions.create(**kw, temperature=0).choices[0].message.content
    assert len(greedy) > 2
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    cut = oai.chat.completions.create(**kw, temperature=0, stop=[stop])
    assert stop not in cut.choices[0].message.content
    assert greedy.startswith(cut.choices[0].message.content)
    assert cut.choices[0].finish_reason == "stop"


def test_memory_mode_by_header(oai, app):
    extra = {"X-Session-ID": "chat-abc"}
    r1 = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "my cat is Tom"}], max_tokens=3, extra_headers=extra
    )
    r2 = oai.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "ignored earlier turn"}, {"role": "user", "content": "what is my cat?"}],
        max_tokens=3,
        extra_headers=extra,
    )
    assert r2.usage.prompt_tokens_details.cached_tokens > 0  # the session's KV cache was reused
    transcript = app.client.get("/v1/sessions/chat-abc/messages").json()["data"]
    assert [m["content"] for m in transcript if m["role"] == "user"] == ["my cat is Tom", "what is my cat?"]
    assert transcript[1]["content"] == r1.choices[0].message.content
    assert transcript[3]["content"] == r2.choices[0].message.content


def test_memory_mode_by_body_with_persona(oai, app):
    r = oai.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "ahoy"}], max_tokens=3,
        extra_body={"session_id": "body-sess", "persona": "pirate"},
    )
    assert r.choices[0].message.content is not None
    s = app.client.get("/v1/sessions/body-sess").json()
    assert s["persona"] == "pirate"
    ctx = app.client.get("/v1/sessions/body-sess/context").json()
    assert "pirate" in ctx["messages"][0]["content"]


def test_stateless_persona_by_header(app):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    from persona.prompt import build_prompt_parts

    plain = app.client.post("/v1/chat/completions", json=body).json()
    pirate = app.client.post("/v1/chat/completions", json=body, headers={"X-Persona": "pirate"}).json()
    tok = app.rt.tokenizer
    assert plain["usage"]["prompt_tokens"] == tok.count_messages(body["messages"])
    pinned = build_prompt_parts(app.rt.personas.get("pirate")).pinned
    assert "pirate" in pinned[0]["content"]
    assert pirate["usage"]["prompt_tokens"] == tok.count_messages(pinned + body["messages"])  # persona prepended
    assert app.client.get("/v1/sessions").json()["data"] == []  # stateless: nothing stored


def test_memory_mode_last_message_must_be_user(app):
    body = {"messages": [{"role": "assistant", "content": "hi"}], "session_id": "s1"}
    r = app.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "messages[0].role"


def test_langchain_chat_openai(app):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="tiny-random", base_url="http://testserver/v1", api_key="unused", http_client=app.client,
        max_tokens=5, temperature=0, max_retries=0,
    )
    msg = llm.invoke("Hello there")
    assert isinstance(msg.content, str)
    assert msg.usage_metadata["output_tokens"] <= 5
    streamed = "".join(chunk.content for chunk in llm.stream("Hello there"))
    assert streamed == msg.content


def test_near_zero_temperature_or_top_p_is_greedy(app):
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    greedy = app.client.post("/v1/chat/completions", json={**body, "temperature": 0}).json()
    for extra in ({"temperature": 5e-324}, {"top_p": 5e-324, "temperature": 1.0}):
        r = app.client.post("/v1/chat/completions", json={**body, **extra})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]
