"""Tools through the model's own chat template (a template with a tools section) or the documented
fallback prompt (templates without one, as both built-in models have): over HTTP with the official
`openai` client on the real app, a tiny random model (the grammar must hold for a model that knows
nothing) with SmolLM2's tokenizer carrying Qwen2.5's or Llama 3.1's genuine template."""

from __future__ import annotations

import copy
import dataclasses
import json

import openai
import pytest

from tests.model.test_chat_template_tools import LLAMA31_TEMPLATE, QWEN25_TEMPLATE
from tests.service.conftest import make_settings, read_sse, start_app

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Seoul"]}}, "required": ["city"],
                   "additionalProperties": False}}}
HI = [{"role": "user", "content": "What is the weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = HI + [{"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
# the same chat in transformers' shapes: arguments as an object, the result as a `tool` message
HF_HISTORY = HI + [{"role": "assistant", "content": "", "tool_calls": [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": "sunny, 21C"}]
TEMPLATES = {"qwen2.5": QWEN25_TEMPLATE, "llama3.1": LLAMA31_TEMPLATE}
CALL_START = {"qwen2.5": "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": ",  # as Qwen writes it
              "llama3.1": "{\"name\": \"get_weather\", \"parameters\": {\"city\": "}


@pytest.fixture(params=list(TEMPLATES))
def native(request, tmp_path, tiny_lm):
    """(template name, app, tokenizer): the tiny model whose tokenizer has that template."""
    tok = copy.copy(tiny_lm.tokenizer)
    tok.chat_template = TEMPLATES[request.param]
    lm = dataclasses.replace(tiny_lm, tokenizer=tok)
    for harness in start_app(make_settings(tmp_path, max_tokens=60), lm):
        yield request.param, harness, tok


def client(harness):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=harness.client, max_retries=0)


def spy_renders(harness, monkeypatch) -> list[tuple[list, list | None]]:
    """Every (messages, tools) the backend renders a prompt from."""
    backend, seen = harness.rt.backend, []
    real = backend.render

    def render(messages, n_pinned=0, tools=None):
        seen.append((messages, tools))
        return real(messages, n_pinned, tools=tools)

    monkeypatch.setattr(backend, "render", render)
    return seen


def test_native_template_gets_tools_and_tool_traffic_as_transformers_would(native):
    name, harness, tok = native
    r = client(harness).chat.completions.create(model="m", messages=HISTORY, max_tokens=2, tools=[WEATHER])
    assert r.usage.prompt_tokens == tok.count_messages(HF_HISTORY, tools=[WEATHER])
    fallback_tokens = tok.count_messages(HI)  # no tools at all
    assert r.usage.prompt_tokens > fallback_tokens
    r = client(harness).chat.completions.create(model="m", messages=HISTORY, max_tokens=2, tools=[WEATHER],
                                                tool_choice="none")  # history still native, no tools shown
    assert r.usage.prompt_tokens == tok.count_messages(HF_HISTORY)


def test_native_calls_follow_the_templates_format_and_the_schema(native):
    name, harness, tok = native
    oai = client(harness)
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=HI, seed=seed, tools=[WEATHER], tool_choice="required",
                                        extra_headers={"X-Session-ID": f"native-{seed}"})
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] in ("Paris", "Seoul")
        stored = harness.client.get(f"/v1/sessions/native-{seed}/messages").json()["data"][-1]["content"]
        assert stored.startswith(CALL_START[name])  # the template's own call text, as it shows calls in history


def test_native_streamed_calls_are_openai_deltas(native):
    name, harness, tok = native
    body = {"messages": HI, "tools": [WEATHER], "tool_choice": "required", "stream": True}
    with harness.client.stream("POST", "/v1/chat/completions", json=body) as resp:
        events, _ = read_sse(resp.iter_lines())
    deltas = [c["choices"][0]["delta"] for c in events[:-1] if c["choices"]]
    calls = [d["tool_calls"][0] for d in deltas if d.get("tool_calls")]
    assert len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["function"]["arguments"])["city"] in ("Paris", "Seoul")
    assert [c["choices"][0].get("finish_reason") for c in events[:-1] if c["choices"]][-1] == "tool_calls"


def test_auto_and_parallel_in_the_templates_format(native):
    name, harness, tok = native
    oai = client(harness)
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=HI, tools=[WEATHER], parallel_tool_calls=True,
                                        max_tokens=120, seed=seed)
        m = r.choices[0].message
        if m.tool_calls:  # the model chose (no AutoDecision: a native template means a tools-tuned model)
            assert all(json.loads(c.function.arguments)["city"] in ("Paris", "Seoul") for c in m.tool_calls)
            assert len(m.tool_calls) == 1 or name == "qwen2.5"  # Llama 3.1's template raises on two calls
        else:
            assert not m.content.lstrip().startswith(CALL_START[name][0])


def test_memory_mode_native_history_is_rebuilt_from_the_transcript(native, monkeypatch):
    name, harness, tok = native
    oai, headers = client(harness), {"X-Session-ID": "native-mem"}
    r = oai.chat.completions.create(model="m", messages=HI, tools=[WEATHER], tool_choice="required",
                                    extra_headers=headers)
    call = r.choices[0].message.tool_calls[0]
    seen = spy_renders(harness, monkeypatch)
    result = [{"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    oai.chat.completions.create(model="m", messages=result, max_tokens=2, tools=[WEATHER], extra_headers=headers)
    messages, tools = seen[-1]
    assert tools == [WEATHER]
    assistant = next(m for m in messages if m.get("tool_calls"))
    assert assistant["tool_calls"][0]["function"] == {"name": "get_weather",
                                                      "arguments": json.loads(call.function.arguments)}
    assert messages[-1] == {"role": "tool", "content": "sunny"}  # the result, kept right after its call
    assert messages[-2] is assistant


def test_fallback_prompt_for_templates_without_a_tools_section(app, monkeypatch):
    from service.tools import tools_prompt

    tok = app.rt.tokenizer
    assert not tok.has_tools_template  # SmolLM2's template
    seen = spy_renders(app, monkeypatch)
    oai = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app.client, max_retries=0)
    r = oai.chat.completions.create(model="m", messages=HISTORY, max_tokens=2, tools=[WEATHER])
    messages, tools = seen[-1]
    assert tools is None and messages[0] == {"role": "system", "content": tools_prompt([WEATHER])}
    assert messages[2]["content"] == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert r.usage.prompt_tokens == tok.count_messages(messages)
