"""The functions behind `memento persona ...` and `memento register`."""

from __future__ import annotations

import pytest

from persona import PersonaError, PersonaRegistry
from persona.commands import list_personas, register_lines, show_persona, validate_file


def test_list_personas():
    rows = list_personas(PersonaRegistry())
    assert ("daughter-ko", "지우", "ko", "banmal") in rows
    assert ("assistant", "Memento", "en", "any") in rows
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)


def test_show_persona_plain():
    text, count = show_persona(PersonaRegistry(), "daughter-ko")
    assert count is None
    assert text.startswith("[system]\n") and "[user]\n지우야, 밥은 먹었니?" in text
    assert text.rstrip().endswith("[user]\n[System note: 지우는 아빠에게 반말로 다정하게 짧게 대답한다.]")


def test_show_persona_with_tokenizer():
    class FakeTok:  # renders and counts exactly what it is given
        def render_chat(self, messages, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages)

        def count_messages(self, messages, add_generation_prompt=True):
            return len(self.render_chat(messages, add_generation_prompt))

    text, count = show_persona(PersonaRegistry(), "daughter-ko", FakeTok())
    assert text.startswith("<system>") and count == len(text)


def test_validate_file(tmp_path):
    good = tmp_path / "me.md"
    good.write_text("---\nname: me\n---\nhello\n")
    assert validate_file(good).name == "me"
    bad = tmp_path / "bad.md"
    bad.write_text("---\nname: bad\nregister: loud\n---\nx\n")
    with pytest.raises(PersonaError) as e:
        validate_file(bad)
    assert (e.value.file, e.value.line, e.value.field) == (str(bad), 3, "register")
    with pytest.raises(PersonaError, match="no such file"):
        validate_file(tmp_path / "missing.md")


def test_register_lines():
    lines = ["밥 먹었어?\n", "밥 먹었어요?\n", "밥 먹었어? 저는 먹었어요.\n", "\n", "응!\n"]
    assert list(register_lines(lines)) == ["banmal", "polite", "mixed", "none", "none"]
