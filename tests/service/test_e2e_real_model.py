"""End to end with the real SmolLM2-135M-Instruct (loaded once per session): the default memory
strategy (summary_buffer, summaries written by the model), KV reuse across turns, the openai client."""

from __future__ import annotations

import openai
import pytest

from tests.service.conftest import make_settings, start_app

pytestmark = pytest.mark.slow


@pytest.fixture
def real_app(tmp_path, smol_lm):
    settings = make_settings(tmp_path, memory={"strategy": "summary_buffer", "max_tokens": 120},
                             max_tokens=24, summary_max_tokens=48)
    yield from start_app(settings, smol_lm)


def test_real_model_session_turns(real_app):
    c = real_app.client
    sid = c.post("/v1/sessions", json={}).json()["id"]
    first = c.post(f"/v1/sessions/{sid}/messages",
                   json={"content": "What is the name of the capital of France?", "temperature": 0}).json()
    assert "Paris" in first["message"]["content"]
    second = c.post(f"/v1/sessions/{sid}/messages",
                    json={"content": "And of Germany?", "temperature": 0}).json()
    # KV reuse across turns, in whole 16-token blocks: all of the first prompt but its last partial block
    assert second["usage"]["cached_tokens"] >= first["usage"]["prompt_tokens"] // 16 * 16
    for i in range(3):  # overflow the 120-token buffer so the model writes a running summary
        c.post(f"/v1/sessions/{sid}/messages", json={"content": f"Remember the number {i + 40}.", "temperature": 0})
    assert real_app.rt.background.wait_idle(timeout=300)
    ctx = c.get(f"/v1/sessions/{sid}/context", params={"message": "What did we talk about?"}).json()
    assert ctx["memory"].get("summary"), ctx["memory"]
    assert ctx["budget"]["parts"]["memory"] > 0
    assert len(c.get(f"/v1/sessions/{sid}/messages").json()["data"]) == 10  # transcript never trimmed


def test_real_model_openai_stream(real_app):
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=real_app.client, max_retries=0)
    stream = client.chat.completions.create(
        model="smollm2-135m-instruct",  # a wording that is no near-tie (tests/service/test_cli.py)
        messages=[{"role": "user", "content": "What is the name of the capital of France?"}],
        temperature=0, max_tokens=16, stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "Paris" in text
    assert chunks[-1].usage.completion_tokens >= 1
