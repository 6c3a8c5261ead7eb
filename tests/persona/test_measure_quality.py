"""persona/measure_quality.py on a scripted engine: what it counts, and that the stored replies are
the checked ones (the real-model runs are quoted in README)."""

from __future__ import annotations

from types import SimpleNamespace

from persona.measure_quality import PROBES, SCRIPTS, converse, format_table
from persona.registry import PersonaRegistry

CLEAN = ["응, 학교 재밌었어!", "밥은 방금 먹었지.", "아빠 허리는 좀 어때?", "토요일에 갈게!",
         "초코 보고 싶다.", "나 지우잖아!", "우리 아빠지.", "일요일엔 김치찌개!", "자전거 탔잖아."]


class ScriptedEngine:
    """Every first try echoes the note (as gemma-3-270m did); a regeneration (another seed) is clean."""

    def __init__(self):
        self.lm = SimpleNamespace(tokenizer=SimpleNamespace(apply_chat_template=lambda messages: [len(messages)]))
        self.calls = []

    def complete(self, ids, params, logits_processors=()):
        self.calls.append(params)
        if params.seed < 10_000:  # the turn's own seed, 7 * 1000 + turn; a retry adds 7919
            return SimpleNamespace(text="응, 아빠, 아빠, 아빠, 아빠!\n\n[System note: 지우는 아빠에게 반말로 대답한다.]")
        turn = params.seed - 7919 - 7000
        return SimpleNamespace(text=CLEAN[turn])


def test_leaks_are_caught_never_stored_and_probes_scored():
    persona = PersonaRegistry.from_env().get("daughter-ko")
    engine = ScriptedEngine()
    run = converse(engine, persona, "off", turns=5, sampling={"temperature": 0.7}, seed=7, max_tokens=16)
    assert run.raw_leaks == 5 and run.stored_leaks == 0  # every echo caught
    assert run.raw_degenerate == 5 and run.degenerate == 0  # every loop regenerated
    assert run.replies == CLEAN[:5]
    assert run.probes == len(PROBES["daughter-ko"]) and run.probe_hits == 4  # 지우, 아빠, 김치찌개, 자전거
    assert "[System note" in engine.calls[0].stop  # the carrier stops are on
    row = format_table([run], {"daughter-ko": "banmal"}).splitlines()[-1]
    assert row.startswith("| daughter-ko | off | 5 | 100% | 0 (5) | 0 (5) | 0 |") and "| 4/4 |" in row


def test_raw_mode_measures_the_model_alone():
    persona = PersonaRegistry.from_env().get("daughter-ko")
    run = converse(ScriptedEngine(), persona, "off", turns=3, sampling={}, seed=7, max_tokens=16, checked=False,
                   probe=False)
    assert run.stored_leaks == 3 and run.degenerate == 3 and run.probes == 0


def test_every_bundled_persona_has_a_script_and_probes():
    for name in ("daughter-ko", "barista-ko", "assistant"):
        assert len(SCRIPTS[name]) >= 15 and PROBES[name]
