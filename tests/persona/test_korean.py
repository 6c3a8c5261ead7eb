"""Register detection against the hand-labelled set, plus the rules it must keep."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona.korean import classify_reply, classify_sentences, get_kiwi, to_banmal

DATA = Path(__file__).parent / "data" / "register_labelled.tsv"


def labelled_rows() -> list[tuple[str, str, str]]:
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            category, expected, text = line.split("\t")
            rows.append((category, expected, text))
    return rows


def test_labelled_set_accuracy():
    rows = labelled_rows()
    assert len(rows) >= 150
    failures = [(cat, exp, got, text) for cat, exp, text in rows if (got := classify_reply(text)) != exp]
    for cat, exp, got, text in failures:
        print(f"FAIL [{cat}] expected {exp}, got {got}: {text}  {classify_sentences(text)}")
    accuracy = 1 - len(failures) / len(rows)
    print(f"register accuracy {accuracy:.3f} on {len(rows)} replies")
    assert accuracy >= 0.98


@pytest.mark.parametrize(
    "text, labels",
    [
        ("아빠 어디 가셔?", ["banmal"]),  # honorific -시- is respect, not 존댓말
        ("밥 먹었어? 나는 먹었어요.", ["banmal", "polite"]),
        ('엄마가 "빨리 와요."라고 했어.', ["banmal"]),  # the quote's ending does not count
        ("응!", ["neutral"]),
        ("사랑해, 아빠! 💕", ["banmal"]),  # vocative and emoji stay with the sentence
        ("아빠 사랑해 ㅋㅋ 진짜야!", ["banmal", "banmal"]),
    ],
)
def test_sentence_rules(text, labels):
    assert [s.label for s in classify_sentences(text)] == labels


def test_multiline_and_empty():
    assert classify_reply("") == "none"
    assert classify_reply("밥 먹었어?\n\n네, 먹었어요.") == "mixed"


def test_kiwi_is_created_once():
    assert get_kiwi() is get_kiwi()


@pytest.mark.parametrize(
    "polite, banmal",
    [
        ("밥 먹었어요, 아빠?", "밥 먹었어, 아빠?"),
        ("감사합니다!", "감사해!"),
        ("그렇죠?", "그렇지?"),
        ("학생이에요.", "학생이야."),
        ('엄마가 "와요"라고 했어요.', '엄마가 "와요"라고 했어.'),
    ],
)
def test_to_banmal(polite, banmal):
    assert to_banmal(polite) == banmal
    assert classify_reply(to_banmal(polite)) == "banmal"
