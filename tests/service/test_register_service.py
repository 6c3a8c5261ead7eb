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
