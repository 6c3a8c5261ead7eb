"""SillyTavern as a client of `/v1/chat/completions` ("Chat Completion -> Custom (OpenAI-compatible)"):
request bodies of the shapes it sends (several system messages, some mid-chat; `name` fields;
`stop`; `logit_bias`; its extra sampler fields), against the real app."""

from __future__ import annotations

import copy
import json

from model.chat_template import GEMMA3_TEMPLATE, render
from service.client_messages import chat_messages
from service.schemas import ChatCompletionRequest
from tests.service.conftest import read_sse

# The shape of a SillyTavern 1.12 Custom-endpoint request (prompt manager defaults, one example
# dialogue, the first message, an author's note at depth 1, its sampler extras).
ST_BODY = {
    "messages": [
        {"role": "system", "content": "Write Mina's next reply in a fictional chat between Mina and Ada."},
        {"role": "system", "content": "Mina is an innkeeper in a seaside village."},
        {"role": "system", "content": "Mina's personality: warm, teasing."},
        {"role": "system", "content": "[Example Chat]"},
        {"role": "system", "name": "example_user", "content": "Got a room?"},
        {"role": "system", "name": "example_assistant", "content": "For you? Always."},
        {"role": "system", "content": "[Start a new Chat]"},
        {"role": "assistant", "content": "Welcome to the Gull's Rest!"},
        {"role": "user", "content": "Hi, one night please.", "name": "Ada"},
        {"role": "system", "content": "[Author's note: Mina is tired tonight.]"},
        {"role": "assistant", "content": "Sure thing.", "name": "Mina"},
        {"role": "user", "content": "How much is it?"},
    ],
    "model": "gpt-3.5-turbo",
    "temperature": 0,
    "max_tokens": 6,
    "stream": False,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "top_p": 1,
    "top_k": 0,
    "stop": ["\nAda:", "\nMina:"],
    "logit_bias": {},
    "seed": 7,
    "n": 1,
    "custom_include_body": "",
    "include_reasoning": False,
}


def test_the_prompt_fits_a_strict_template():
    req = ChatCompletionRequest.model_validate(ST_BODY)
    msgs = chat_messages(req.messages)
    render(GEMMA3_TEMPLATE, msgs, add_generation_prompt=True)  # raises on a mid-chat system message
    assert msgs[0]["role"] == "system" and msgs[0]["content"].count("\n\n") == 3  # the 4 leading ones
    roles = [m["role"] for m in msgs[1:]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert msgs[1]["content"] == "Got a room?" and msgs[2]["content"] == "For you? Always."  # examples as turns
    assert msgs[3]["content"] == "[System note: [Start a new Chat]]"  # opens before the first message
    assert msgs[5]["content"] == "Ada: Hi, one night please.\n\n[System note: [Author's note: Mina is tired tonight.]]"
    assert msgs[6]["content"] == "Mina: Sure thing."


def test_sillytavern_request_non_stream_and_stream(app):
    c = app.client
    r = c.post("/v1/chat/completions", json=ST_BODY)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["finish_reason"] in ("stop", "length")
    assert body["usage"]["completion_tokens"] <= 6
    stream = {**ST_BODY, "stream": True}
    with c.stream("POST", "/v1/chat/completions", json=stream) as s:
        assert s.status_code == 200
        events, _ = read_sse(s.iter_lines())
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    assert text == body["choices"][0]["message"]["content"]  # greedy: the same reply both ways


def test_logit_bias_and_stop_are_applied(app):
    c = app.client
    tok = app.rt.tokenizer
    target = tok.encode(" inn")[-1]
    body = copy.deepcopy(ST_BODY) | {"logit_bias": {str(target): 100}, "stop": [], "max_tokens": 3}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == tok.decode([target] * 3)  # +100 wins every step
    body["stop"] = ["inn inn"]  # the reply is cut where the stop string starts
    r = c.post("/v1/chat/completions", json=body).json()
    assert r["choices"][0]["message"]["content"] == " " and r["choices"][0]["finish_reason"] == "stop"
    body["logit_bias"] = {str(target): -100}
    out = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert tok.decode([target]) not in out  # -100 bans it


def test_bad_logit_bias_names_the_field(app):
    c = app.client
    for bias in ({"not-a-token": 1}, {"99999999": 1}, {"5": 500}):
        r = c.post("/v1/chat/completions", json=ST_BODY | {"logit_bias": bias})
        assert r.status_code == 422, (bias, r.text)
        assert r.json()["error"]["param"] == "logit_bias", json.dumps(r.json())
