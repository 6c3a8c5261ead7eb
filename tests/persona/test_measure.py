"""The register measurement script: its script and its table (the model run itself is in test_guard_real)."""

from __future__ import annotations

from persona.korean import classify_reply
from persona.measure_register import FATHER_LINES, RunResult, format_table, summarise


def test_father_has_fifty_banmal_lines():
    assert len(FATHER_LINES) == 50 and len(set(FATHER_LINES)) == 50
    assert all(classify_reply(line) in ("banmal", "none") for line in FATHER_LINES)


def test_summary_table():
    off = RunResult("off", 1, ["밥 먹었어요? 나는 먹었어.", "응!"], [1.0, 3.0])
    guard = RunResult("guard", 1, ["밥 먹었어? 나는 먹었어."], [2.0], reminders=0)
    rows = summarise([off, guard])
    assert rows[0]["mode"] == "off" and rows[0]["banmal_sentence_share"] == 0.5
    assert rows[0]["clean_reply_share"] == 0.5 and rows[0]["mean_latency_s"] == 2.0
    assert rows[1]["banmal_sentence_share"] == 1.0
    table = format_table(rows)
    assert "| off | 1 | 2 | 50.0% | 50.0% | 2.00 | 0 |" in table
