"""The persona's register around a generation: labels stored, guard on, repair before storing."""

from __future__ import annotations

from persona.schema import Persona
from service import register
from service.metrics import Metrics


def banmal_persona(mode: str = "guard") -> Persona:
    return Persona(name="ko", language="ko", register="banmal", register_mode=mode, description="딸")


def test_post_check_repairs_polite_sentence_in_guard_mode():
    metrics = Metrics()
    calls = []

    def regenerate(prefix: str) -> str:
        calls.append(prefix)
        return "응, 나도 좋아!"

    text, meta = register.post_check(banmal_persona(), "아빠 왔어? 저도 좋아요.", metrics, regenerate)
    assert "좋아요" not in text and text.startswith("아빠 왔어?")
    assert meta["register"] == "banmal" and meta["register_repairs"] >= 1
    assert calls and calls[0] == "아빠 왔어?"  # regenerated after the sentences that were fine
    assert 'memento_register_replies_total{consistent="true",register="banmal"} 1.0' in metrics.render().decode()


def test_remind_mode_labels_without_repair():
    metrics = Metrics()
    text, meta = register.post_check(banmal_persona("remind"), "감사합니다.", metrics, None)
    assert text == "감사합니다." and meta == {"register": "polite"}
    assert 'consistent="false"' in metrics.render().decode()


def test_persona_without_register_is_not_checked():
    p = Persona(name="en", description="x")
    assert register.post_check(p, "Thank you, sir.", None, None) == ("Thank you, sir.", {})
    assert register.guard_for(p, None) is None


def test_drift_triggers_reminder():
    from memory.types import Message

    def reply(label: str) -> Message:
        return Message("m", "s", "assistant", "x", "t", {"register": label})

    p = banmal_persona("remind")
    assert not register.drifted(p, [reply("banmal"), reply("none")])
    assert register.drifted(p, [reply("banmal"), reply("polite")])


def test_guarded_persona_turn_stores_register_label(app):
    c = app.client
    sid = c.post("/v1/sessions", json={"persona": "daughter-ko"}).json()["id"]
    r = c.post(f"/v1/sessions/{sid}/messages", json={"content": "지우야 뭐해?", "max_tokens": 8})
    assert r.status_code == 200, r.text
    meta = r.json()["message"]["metadata"]
    assert meta["register"] in ("banmal", "none")  # the guard + repair leave no polite ending
    assert meta["persona"] == "daughter-ko"
    assert "memento_register_replies_total{" in c.get("/metrics").text


POLITE_REPLY = "저도 좋아요. 고마워요. 내일 봬요. 잘 자요. 안녕히 계세요. 감사합니다. 알겠습니다. 좋아요."


def test_repair_obeys_a_total_budget_across_sentences():
    calls = []

    def stubborn(prefix: str) -> str:  # never comes back in register: every try is spent
        calls.append(prefix)
        return "네, 알겠습니다."

    text, meta = register.post_check(banmal_persona(), POLITE_REPLY, Metrics(), stubborn, budget=3)
    assert len(calls) == 3  # 8 polite sentences x 2 tries each would be 16 model runs
    assert meta["register_repairs"] == 3 and meta["register_repair_cut"] == "budget"
    assert meta["register"] in ("banmal", "none")  # the rest rewritten by rule, still stored in register


def test_repair_stops_calling_the_model_once_cancelled():
    calls = []
    cancelled = {"now": False}

    def regenerate(prefix: str) -> str:
        calls.append(prefix)
        cancelled["now"] = True  # the client leaves during the first repair
        return "응, 나도 좋아!"

    text, meta = register.post_check(banmal_persona(), POLITE_REPLY, Metrics(), regenerate,
                                     should_stop=lambda: cancelled["now"])
    assert len(calls) == 1
    assert meta["register_repair_cut"] == "cancelled"
    assert "좋아요" not in text.split(".")[0]
