"""The OpenAI surface beyond plain chat: structured output, tools, sampling fields, n, logprobs,
/v1/completions, /v1/embeddings, /tokenize, /detokenize — through the official `openai` client
on the real app (tiny random model: grammars must hold even for a model that knows nothing)."""

from __future__ import annotations

import base64
import json
import struct

import openai
import pytest

from tests.service.conftest import read_sse

COLOR = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
    "required": ["color", "ok"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Seoul"]}}, "required": ["city"],
                   "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"], "additionalProperties": False}}}
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def oai(app):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=app.client, max_retries=0)


def error_of(app, path, body):
    r = app.client.post(path, json=body)
    return r.status_code, r.json()["error"]


# ------------------------------------------------------------------ structured output


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_always_valid(oai, seed):
    r = oai.chat.completions.create(
        model="m", messages=HI, max_tokens=40, seed=seed, temperature=1.0,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR, "strict": True}},
    )
    value = json.loads(r.choices[0].message.content)
    assert value["color"] in ("red", "green", "blue") and isinstance(value["ok"], bool)
    assert set(value) == {"color", "ok"}
    assert r.choices[0].finish_reason == "stop"
    # written as json.dumps writes JSON (", " and ": "), not compact: see structured.JSON_DEFAULTS
    assert r.choices[0].message.content == json.dumps(value, ensure_ascii=False)


def test_json_object_is_an_object(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=HI, max_tokens=64, seed=seed,
                                        response_format={"type": "json_object"})
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:  # cut by max_tokens: still a valid prefix of an object
            assert r.choices[0].message.content.startswith("{")


def test_grammar_requests_penalise_the_reply_repeating_itself_not_the_prompt(oai, app, monkeypatch):
    from service.structured import ReplyRepetitionPenalty

    seen = []
    real = app.rt.backend.stream

    def stream(prompt, params, **kw):
        seen.append((params.extra, kw["processors"]))
        return real(prompt, params, **kw)

    monkeypatch.setattr(app.rt.backend, "stream", stream)
    schema = {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}
    oai.chat.completions.create(model="m", messages=HI, max_tokens=8, response_format=schema)
    oai.chat.completions.create(model="m", messages=HI, max_tokens=8, tools=[WEATHER], tool_choice="required")
    oai.chat.completions.create(model="m", messages=HI, max_tokens=8, response_format=schema, presence_penalty=0.3)
    (extra1, procs1), (extra2, procs2), (extra3, procs3) = seen
    for extra, procs in ((extra1, procs1), (extra2, procs2)):
        assert "repetition_penalty" not in extra  # the engine's counts the prompt, which arguments copy
        assert any(isinstance(p, ReplyRepetitionPenalty) for p in procs)
    assert extra3["presence_penalty"] == 0.3 and not any(isinstance(p, ReplyRepetitionPenalty) for p in procs3)


def test_reply_repetition_penalty_counts_only_the_reply():
    import torch

    from model.sampling import apply_repetition_penalty
    from service.structured import ReplyRepetitionPenalty

    logits = torch.tensor([2.0, -2.0, 4.0, 1.0])
    penalty = ReplyRepetitionPenalty(2.0)
    assert torch.equal(penalty([], logits), logits)  # the first token: nothing of the reply yet
    out = penalty([0, 1, 1], logits)
    assert torch.equal(out, apply_repetition_penalty(logits, [0, 1], 2.0))
    assert out.tolist() == [1.0, -4.0, 4.0, 1.0]


def test_invalid_schema_is_400_naming_it(app):
    body = {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}}
    status, err = error_of(app, "/v1/chat/completions", body)
    assert status == 400 and err["param"] == "response_format.json_schema.schema"
    assert "objekt" in err["message"]


def test_schema_too_large_is_400(app):
    big = {"type": "object", "properties": {f"field_{i}": {"type": "string", "description": "x" * 50}
                                            for i in range(1000)}}
    body = {"messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": big}}}
    status, err = error_of(app, "/v1/chat/completions", body)
    assert status == 400 and err["code"] == "schema_too_large"
    assert err["param"] == "response_format.json_schema.schema"


def test_json_schema_streamed_is_the_same_json(app):
    body = {"messages": HI, "max_tokens": 40, "temperature": 0, "stream": True,
            "response_format": {"type": "json_schema", "json_schema": {"name": "c", "schema": COLOR}}}
    with app.client.stream("POST", "/v1/chat/completions", json=body) as r:
        events, _ = read_sse(r.iter_lines())
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert json.loads(text)["color"] in ("red", "green", "blue")


# ------------------------------------------------------------------ tools


def test_required_tool_call_parses_against_the_schema(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=HI, max_tokens=60, seed=seed, tools=[WEATHER, TIME],
                                        tool_choice="required", parallel_tool_calls=False)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        args = json.loads(call.function.arguments)
        assert call.id.startswith("call_") and call.type == "function"
        assert (call.function.name, set(args)) in (("get_weather", {"city"}), ("get_time", {"utc"}))


def test_named_tool_choice_forces_that_function(oai):
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=60, tools=[WEATHER, TIME],
                                    tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert calls and all(c.function.name == "get_time" for c in calls)
    assert isinstance(json.loads(calls[0].function.arguments)["utc"], bool)


def test_tool_choice_none_answers_in_text(oai):
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=8, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_auto_gives_text_or_valid_calls(oai):
    for seed in range(4):
        r = oai.chat.completions.create(model="m", messages=HI, max_tokens=40, seed=seed, tools=[WEATHER])
        m = r.choices[0].message
        if m.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            assert json.loads(m.tool_calls[0].function.arguments)["city"] in ("Paris", "Seoul")
        else:
            assert not (m.content or "").startswith("<")


def test_unknown_tool_in_tool_choice_is_400(app):
    body = {"messages": HI, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}
    status, err = error_of(app, "/v1/chat/completions", body)
    assert status == 400 and err["param"] == "tool_choice.function.name" and "nope" in err["message"]


def test_bad_tool_parameters_are_400_naming_the_tool(app):
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}
    status, err = error_of(app, "/v1/chat/completions", {"messages": HI, "tools": [WEATHER, bad]})
    assert status == 400 and err["param"] == "tools[1].function.parameters"


def test_tool_history_is_rendered_and_accepted(oai, app):
    history = HI + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = oai.chat.completions.create(model="m", messages=history, max_tokens=4, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.role == "assistant"
    from service.schemas import ChatMessage
    from service.tools import history as tool_history

    rendered = tool_history([ChatMessage(**m) for m in history])
    assert rendered[1].content == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert rendered[2].role == "user" and "<tool_response>\nsunny, 21C\n</tool_response>" == rendered[2].content


def test_streamed_tool_calls_as_openai_deltas(oai):
    stream = oai.chat.completions.create(model="m", messages=HI, max_tokens=60, tools=[WEATHER], seed=3,
                                         tool_choice="required", parallel_tool_calls=False, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas if d.index == 0)
    assert json.loads(args)["city"] in ("Paris", "Seoul")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


# ------------------------------------------------------------------ sampling fields, n, logprobs


def test_n_choices_with_seeds(oai):
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=6, n=3, seed=7, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = oai.chat.completions.create(model="m", messages=HI, max_tokens=6, n=3, seed=7, temperature=1.0)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    assert len({c.message.content for c in r.choices}) > 1  # seeds seed+i differ
    single = oai.chat.completions.create(model="m", messages=HI, max_tokens=6, seed=8, temperature=1.0)
    assert single.choices[0].message.content == r.choices[1].message.content


def test_n_streamed_has_one_finish_per_choice(app):
    body = {"messages": HI, "max_tokens": 4, "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    with app.client.stream("POST", "/v1/chat/completions", json=body) as r:
        events, _ = read_sse(r.iter_lines())
    finishes = [(c["index"], c["finish_reason"]) for e in events[:-1] for c in e["choices"] if c["finish_reason"]]
    assert sorted(i for i, _ in finishes) == [0, 1]
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 8
    assert events[-1] == "[DONE]"


def test_n_in_memory_mode_is_422(app):
    status, err = error_of(app, "/v1/chat/completions", {"messages": HI, "n": 2, "session_id": "s1"})
    assert status == 422 and err["param"] == "n"


def test_logprobs_and_top_logprobs(oai):
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=4, temperature=0, logprobs=True,
                                    top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)  # greedy: the top token


def test_top_logprobs_over_20_is_422(app):
    status, err = error_of(app, "/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 21})
    assert status == 422 and "top_logprobs" in err["param"]


def test_top_logprobs_without_logprobs_is_400(app):
    status, err = error_of(app, "/v1/chat/completions", {"messages": HI, "top_logprobs": 2})
    assert status == 400 and err["param"] == "top_logprobs"


def test_logit_bias_forces_a_token(oai, app):
    [tid] = app.client.post("/tokenize", json={"content": " banana"}).json()["tokens"][-1:]
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=3, temperature=0,
                                    logit_bias={str(tid): 100})
    assert r.choices[0].message.content == " banana" * 3


def test_frequency_penalty_changes_greedy_output(oai):
    plain = oai.chat.completions.create(model="m", messages=HI, max_tokens=12, temperature=0)
    penal = oai.chat.completions.create(model="m", messages=HI, max_tokens=12, temperature=0, frequency_penalty=2.0)
    assert plain.choices[0].message.content != penal.choices[0].message.content


# ------------------------------------------------------------------ /v1/completions


def test_completions_echo_logprobs(oai, app):
    r = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=5, echo=True, logprobs=2,
                               temperature=0)
    c = r.choices[0]
    assert c.text.startswith("Once upon a time") and r.object == "text_completion"
    assert len(c.logprobs.tokens) == 5 == r.usage.completion_tokens
    assert c.logprobs.text_offset[0] == len("Once upon a time")
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    plain = oai.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert c.text == "Once upon a time" + plain.choices[0].text


def test_completions_stream_matches_non_stream(oai):
    plain = oai.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0)
    chunks = list(oai.completions.create(model="m", prompt="Hello", max_tokens=6, temperature=0, stream=True,
                                         stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == plain.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 6


def test_completions_many_prompts_token_ids_and_n(oai, app):
    ids = app.client.post("/tokenize", json={"content": "Hello"}).json()["tokens"]
    r = oai.completions.create(model="m", prompt=[ids, ids[:1]], max_tokens=3, n=2, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    texts = oai.completions.create(model="m", prompt=["Hello", "Bye"], max_tokens=3, temperature=0)
    assert len(texts.choices) == 2 and texts.usage.completion_tokens == 6


def test_completions_bad_input(app):
    assert error_of(app, "/v1/completions", {"prompt": [[5, 10**9]]})[1]["param"] == "prompt[1]"  # the bad id
    assert error_of(app, "/v1/completions", {"prompt": "x", "suffix": "y"})[1]["param"] == "suffix"
    status, err = error_of(app, "/v1/completions", {"prompt": "x", "logit_bias": {"abc": 1}})
    assert status == 422 and err["param"] == "logit_bias"
    for stop in (["a"] * 5, "a" * 257):  # the one `stop` field every request schema shares
        status, err = error_of(app, "/v1/completions", {"prompt": "x", "stop": stop})
        assert status == 422 and err["param"].startswith("stop")


def test_stop_sequences_shared_by_the_request_schemas():
    from service.schemas import ChatCompletionRequest, CompletionRequest, MessageCreate

    for schema, base in ((ChatCompletionRequest, {"messages": HI}), (CompletionRequest, {"prompt": "x"}),
                         (MessageCreate, {"content": "hi"})):
        assert schema(**base, stop="\n").stop_list() == ["\n"]
        assert schema(**base, stop=["", "END"]).stop_list() == ["END"]  # "" is no stop
        assert schema(**base).stop_list() == []


# ------------------------------------------------------------------ /v1/embeddings, /tokenize, /detokenize, models


def test_embeddings_are_memorys_vectors(oai, app):
    from memory.embeddings import get_embedder

    embedder = get_embedder(app.rt.settings.embeddings)
    r = oai.embeddings.create(model="m", input=["안녕하세요", "hello"])
    assert r.model == embedder.name and [d.index for d in r.data] == [0, 1]
    expected = embedder.embed(["안녕하세요", "hello"])
    assert r.data[0].embedding == pytest.approx(expected[0], abs=1e-6)
    assert len(r.data[1].embedding) == embedder.dim and r.usage.prompt_tokens > 0
    b64 = app.client.post("/v1/embeddings", json={"input": "hello", "encoding_format": "base64"}).json()
    raw = base64.b64decode(b64["data"][0]["embedding"])
    assert list(struct.unpack(f"<{embedder.dim}f", raw)) == pytest.approx(expected[1], abs=1e-6)
    status, err = error_of(app, "/v1/embeddings", {"input": "x", "dimensions": 3})
    assert status == 400 and err["param"] == "dimensions"
    assert error_of(app, "/v1/embeddings", {"input": ["ok", ""]})[1]["param"] == "input[1]"


def test_tokenize_detokenize_llama_cpp_shapes(app):
    r = app.client.post("/tokenize", json={"content": "Hello 媽 <|im_end|>"}).json()
    assert all(isinstance(t, int) for t in r["tokens"])
    assert r["tokens"][-1] == app.rt.tokenizer.specials.find("<|im_end|>").__next__()[2]
    plain = app.client.post("/tokenize", json={"content": "<|im_end|>", "parse_special": False}).json()["tokens"]
    assert len(plain) > 1
    pieces = app.client.post("/tokenize", json={"content": "Hello 媽", "with_pieces": True}).json()["tokens"]
    assert pieces[0] == {"id": r["tokens"][0], "piece": "Hello"}
    assert all(isinstance(p["piece"], (str, list)) for p in pieces)
    assert app.client.post("/detokenize", json={"tokens": r["tokens"][:-1]}).json() == {"content": "Hello 媽 "}
    status, err = error_of(app, "/detokenize", {"tokens": [1, -4]})
    assert status == 400 and err["param"] == "tokens[1]"


def test_models_report_the_context_window(app):
    card = app.client.get("/v1/models").json()["data"][0]
    assert card["context_window"] == app.rt.context_window


# ------------------------------------------------------------------ memory mode, auto decision, closed schemas


def test_memory_mode_stores_tool_calls_and_results(oai, app):
    headers = {"X-Session-ID": "tools-1"}
    r = oai.chat.completions.create(model="m", messages=HI, max_tokens=60, tools=[WEATHER], seed=1,
                                    tool_choice="required", parallel_tool_calls=False, extra_headers=headers)
    call = r.choices[0].message.tool_calls[0]
    result = [{"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    oai.chat.completions.create(model="m", messages=result, max_tokens=3, tools=[WEATHER], tool_choice="none",
                                extra_headers=headers)
    stored = app.client.get("/v1/sessions/tools-1/messages").json()["data"]
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[1]["content"].startswith("<tool_call>{\"name\": \"get_weather\"")
    assert stored[1]["metadata"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert stored[2]["content"] == "<tool_response>\nsunny\n</tool_response>"
    context = app.client.get("/v1/sessions/tools-1/context").json()["messages"]
    assert any("<tool_call>" in m["content"] for m in context if m["role"] == "assistant")


def test_auto_decision_follows_the_call_mass(smol_tokenizer):
    import torch

    from service.tools import AUTO_CALL_MIN_P, AutoDecision, call_start_ids

    starts = call_start_ids(smol_tokenizer)
    decide = AutoDecision(smol_tokenizer)
    logits = torch.zeros(smol_tokenizer.vocab_size)
    share = len(starts) / smol_tokenizer.vocab_size  # uniform logits: the call mass is the share of '<' tokens
    out = decide([], logits.clone())
    kept = torch.isfinite(out)
    if share >= AUTO_CALL_MIN_P:
        assert kept[starts].all() and int(kept.sum()) == len(starts)
    else:
        assert not kept[starts].any()
    logits[starts] = 10.0  # the model clearly wants a call
    assert torch.isfinite(decide([], logits.clone()))[starts].all()
    assert int(torch.isfinite(decide([], logits.clone())).sum()) == len(starts)
    assert torch.equal(decide([5], logits), logits)  # only the first token is decided


def test_closed_schemas_get_additional_properties_false():
    from service.structured import closed

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {}},
                                               "b": {"type": "object", "additionalProperties": True}}}
    out = closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["b"]["additionalProperties"] is True  # the client's choice stays


def test_native_sessions_api_applies_penalties_and_bias(app):
    [tid] = app.client.post("/tokenize", json={"content": " banana"}).json()["tokens"][-1:]
    sid = app.client.post("/v1/sessions", json={}).json()["id"]
    r = app.client.post(f"/v1/sessions/{sid}/messages", json={
        "content": "hi", "max_tokens": 3, "temperature": 0, "logit_bias": {str(tid): 100}})
    assert r.status_code == 200 and r.json()["message"]["content"] == " banana" * 3
    r = app.client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "frequency_penalty": 3})
    assert r.status_code == 422
    r = app.client.post(f"/v1/sessions/{sid}/messages", json={"content": "hi", "logit_bias": {"x": 1}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logit_bias"


def test_one_call_unless_parallel_is_asked(oai):
    for seed in range(3):
        r = oai.chat.completions.create(model="m", messages=HI, max_tokens=80, seed=seed, tools=[WEATHER],
                                        tool_choice="required")
        assert len(r.choices[0].message.tool_calls) == 1
