"""Issue 15 in the service: sampling layers (preset < persona < request), carrier stops, and the
reply check that never stores a leaked instruction and regenerates a degenerate reply."""

from __future__ import annotations

from model.engine import GenerationEvent, Usage
from model.presets import preset_for
from persona.quality import rules_for
from persona.schema import Persona, PersonaSampling
from service import reply_check
from service.conversation import Sampling

DAUGHTER = Persona(name="daughter-ko", display_name="지우", language="ko", register="banmal", register_mode="off",
                   user_name="아빠", description="{{char}}는 {{user}}의 딸이다.",
                   post_history="{{char}}는 {{user}}에게 반말로 다정하게 짧게 대답한다.")
LEAKED = "응, 오늘 재밌었어!\n\n[System note: 지우는 아빠에게 반말로 대답한다.]"


def test_preset_then_persona_then_request_and_the_carrier_stops():
    persona = DAUGHTER.model_copy(update={"sampling": PersonaSampling(min_p=0.2, dry_multiplier=1.5)})
    req = Sampling(temperature=None, top_p=None, stop=["END"], extra={"dry_multiplier": 0.5, "logprobs": 2})
    out = reply_check.turn_sampling(req, "gemma-3-270m", persona, persona_prompt=True)
    assert out.temperature == 0.7 and out.top_p == 1.0  # the preset's
    assert out.extra["min_p"] == 0.2  # the persona's, over the preset's 0.1
    assert out.extra["dry_multiplier"] == 0.5 and out.extra["logprobs"] == 2  # the request's, kept
    assert out.stop[0] == "END" and preset_for("gemma-3-270m")["stop"][0] in out.stop and "[System note" in out.stop and "\n아빠:" in out.stop
    bare = reply_check.turn_sampling(Sampling(temperature=0.0), "some-gguf", DAUGHTER, persona_prompt=False)
    assert bare.temperature == 0.0 and bare.stop == [] and bare.extra == {}  # no preset, no persona prompt
    grammar = reply_check.turn_sampling(Sampling(processors=list), "gemma-3-270m", DAUGHTER, persona_prompt=False)
    assert grammar.extra == {} and grammar.stop == []  # JSON / tool calls: no DRY, no newline stop


def test_settle_reply_cuts_then_regenerates_and_stops_when_the_client_left():
    rules = rules_for(DAUGHTER, "지우는 아빠에게 반말로 다정하게 짧게 대답한다.", [])
    text, meta = reply_check.settle_reply(rules, LEAKED, None)
    assert text == "응, 오늘 재밌었어!" and meta == {"leak_cut": True}
    looping = "응, 아빠, 아빠, 아빠, 아빠, 아빠!"
    text, meta = reply_check.settle_reply(rules, looping, lambda attempt: "응, 학교 재밌었어. 아빠는 밥 먹었어?")
    assert text == "응, 학교 재밌었어. 아빠는 밥 먹었어?" and meta["quality_regenerations"] == 1
    calls = []
    text, meta = reply_check.settle_reply(rules, looping, lambda a: calls.append(a) or looping, lambda: True)
    assert calls == [] and text == "응, 아빠" and meta["repetition_cut"]


class Scripted:
    """Wraps the app's backend: the turn's stream yields `first`, a regeneration returns `again`."""

    def __init__(self, backend, first: str, again: str):
        self.inner, self.first, self.again, self.params = backend, first, again, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def stream(self, prompt, params, **kw):
        self.params.append(params)
        yield GenerationEvent(self.first, 1)
        yield GenerationEvent("", None, True, "stop", Usage(prompt.tokens, 1, 0))

    def complete(self, prompt, params, processors=()):
        return self.again


def scripted_app(app, first: str, again: str) -> Scripted:
    fake = Scripted(app.rt.backend, first, again)
    app.rt.backend = fake
    return fake


def test_a_leaked_note_is_never_stored_and_a_degenerate_reply_is_replaced(app):
    c = app.client
    fake = scripted_app(app, LEAKED, "응, 재밌었어!")
    sid = c.post("/v1/sessions", json={"persona": "daughter-ko"}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "오늘 학교 어땠어?", "dry_multiplier": 1.2})
    assert r.status_code == 200, r.text
    msg = r.json()["message"]
    assert "System note" not in msg["content"] and "대답한다" not in msg["content"]
    assert msg["content"] == "응, 오늘 재밌었어!" and msg["metadata"]["leak_cut"] is True
    assert fake.params[-1].extra["dry_multiplier"] == 1.2 and "[System note" in fake.params[-1].stop
    fake.first = "응, 아빠, 아빠, 아빠, 아빠, 아빠, 아빠!"
    msg = c.post(f"/v1/sessions/{sid}/messages", json={"content": "뭐 먹었어?"}).json()["message"]
    assert msg["content"] == "응, 재밌었어!" and msg["metadata"]["quality_regenerations"] == 1
    stored = [m["content"] for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"] if m["role"] == "assistant"]
    assert not any("System note" in m for m in stored)


TAIL_LOOP = "응, 아빠! 오늘은 학교에서 친구들이랑 점심 먹고.겪는데.겪는데.겪어.겪어.겪는다.겪는다.겪다.겪다.겪는다.겪는다.겪는다."


def test_a_reply_ending_in_a_loop_is_regenerated_or_stored_cut_over_http(app):
    c = app.client
    fake = scripted_app(app, TAIL_LOOP, "응, 점심은 친구들이랑 김밥 먹었어!")
    sid = c.post("/v1/sessions", json={"persona": "daughter-ko"}).json()["id"]
    msg = c.post(f"/v1/sessions/{sid}/messages", json={"content": "점심 뭐 먹었어?"}).json()["message"]
    assert msg["content"] == "응, 점심은 친구들이랑 김밥 먹었어!" and msg["metadata"]["quality_regenerations"] == 1
    fake.again = TAIL_LOOP  # every regeneration loops too: the words before the loop are stored
    msg = c.post(f"/v1/sessions/{sid}/messages", json={"content": "그래서?"}).json()["message"]
    assert msg["content"] == "응, 아빠! 오늘은 학교에서 친구들이랑 점심 먹고." and msg["metadata"]["repetition_cut"]
    stored = [m["content"] for m in c.get(f"/v1/sessions/{sid}/messages").json()["data"] if m["role"] == "assistant"]
    assert not any("겪는다" in m for m in stored)


def test_openai_chat_with_a_persona_cuts_the_leak_and_models_show_presets(app):
    c = app.client
    scripted_app(app, "Sure, here you go.\n[System note: Answer briefly.]", "unused")
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "persona": "assistant",
                                              "min_p": 0.05})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "Sure, here you go."
    card = c.get("/v1/models").json()["data"][0]
    assert "sampling" in card  # the tiny test model has no preset: null; built-in models show theirs


def test_a_persona_file_sets_its_sampling_and_a_bad_field_is_named():
    import pytest

    from persona.errors import PersonaError
    from persona.schema import dump_persona, parse_persona_text

    text = "---\nname: calm\nsampling: {min_p: 0.05, dry_multiplier: 1.0}\n---\nA calm friend.\n"
    p = parse_persona_text(text)
    assert reply_check.persona_sampling(p) == {"min_p": 0.05, "dry_multiplier": 1.0}
    assert "sampling:" in dump_persona(p) and "dry_base" not in dump_persona(p)
    with pytest.raises(PersonaError, match="sampling"):
        parse_persona_text("---\nname: hot\nsampling: {temprature: 3}\n---\nx\n")
