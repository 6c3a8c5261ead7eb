"""Persona files: parsing, error locations, the registry's directories, put/delete and path safety."""

from __future__ import annotations

import os
import textwrap

import pytest

from persona import Persona, PersonaError, PersonaNotFound, PersonaRegistry
from persona.errors import PersonaReadOnly
from persona.schema import dump_persona, parse_persona_text

GOOD = textwrap.dedent(
    """\
    ---
    name: jiwoo
    display_name: 지우
    language: ko
    register: banmal
    register_mode: guard
    user_name: 아빠
    examples:
      - user: 밥 먹었어?
        assistant: 응, 먹었어!
      - - role: assistant
          content: 아빠 왔어?
        - role: user
          content: 응.
    ---
    {{char}} is {{user}}'s daughter.
    """
)


def test_parse_good_file_body_is_description():
    p = parse_persona_text(GOOD, file="jiwoo.md")
    assert p.name == "jiwoo" and p.char == "지우" and p.register_mode == "guard"
    assert p.description == "{{char}} is {{user}}'s daughter."
    assert [[t.role for t in d] for d in p.examples] == [["user", "assistant"], ["assistant", "user"]]


def test_yaml_off_means_off():
    p = parse_persona_text("---\nname: a\nregister_mode: off\nlanguage: no\n---\nhi\n")
    assert p.register_mode == "off" and p.language == "no"


@pytest.mark.parametrize(
    "bad, line, field, words",
    [
        (GOOD.replace("register: banmal", "register: formal"), 5, "register", "banmal"),
        (GOOD.replace("language: ko", "langauge: ko"), 4, "langauge", "unknown field"),
        (GOOD.replace("name: jiwoo", "name: ../../etc/passwd"), 2, "name", "match pattern"),
        (
            GOOD.replace("    assistant: 응, 먹었어!", "    assistent: 응, 먹었어!"),
            10,
            "examples.0.assistent",
            "unknown key",
        ),
        (GOOD.replace("register: banmal", "register: any"), 6, "register_mode", "needs register"),
        (GOOD.replace("name: jiwoo\n", ""), 1, "name", "required"),
    ],
)
def test_errors_name_file_line_field(bad, line, field, words):
    with pytest.raises(PersonaError) as e:
        parse_persona_text(bad, file="jiwoo.md")
    assert (e.value.file, e.value.line, e.value.field) == ("jiwoo.md", line, field), str(e.value)
    assert words in str(e.value) and str(e.value).startswith(f"jiwoo.md:{line}: field '{field}'")


def test_yaml_syntax_error_has_line():
    with pytest.raises(PersonaError) as e:
        parse_persona_text("---\nname: a\nexamples: [unclosed\n---\nx\n", file="a.md")
    assert e.value.line is not None and e.value.line >= 3 and "invalid YAML" in str(e.value)


def test_yaml_aliases_refused():
    bomb = "---\nname: a\nx: &a [1, 1]\ntags: [*a, *a]\n---\nbody\n"
    with pytest.raises(PersonaError, match="anchors and aliases") as e:
        parse_persona_text(bomb, file="a.md")
    assert e.value.line == 3


def test_missing_front_matter_and_double_description():
    with pytest.raises(PersonaError, match="must start with a '---'"):
        parse_persona_text("name: a\n")
    with pytest.raises(PersonaError, match="given twice") as e:
        parse_persona_text("---\nname: a\ndescription: x\n---\nbody\n", file="a.md")
    assert e.value.line == 3


def test_dump_round_trip():
    p = parse_persona_text(GOOD)
    assert parse_persona_text(dump_persona(p)) == p


def test_bundled_personas_load():
    reg = PersonaRegistry()
    names = [p.name for p in reg.list()]
    assert {"assistant", "daughter-ko"} <= set(names) and reg.errors == []
    d = reg.get("daughter-ko")
    assert (d.register, d.register_mode, d.language, d.user_name) == ("banmal", "guard", "ko", "아빠")
    a = reg.get("assistant")
    assert (a.register, a.register_mode) == ("any", "off")


@pytest.mark.parametrize("name, register", [("daughter-ko", "banmal"), ("barista-ko", "polite")])
def test_bundled_korean_examples_match_their_register(name, register):
    from persona.korean import classify_reply

    p = PersonaRegistry().get(name)
    assert p.register == register
    for dialogue in p.examples:
        for turn in dialogue:
            if turn.role == "assistant":
                assert classify_reply(turn.content) == register, turn.content
    assert classify_reply(p.greeting) == register


def test_lookup_order_owners_put_delete(tmp_path, store):
    extra, local = tmp_path / "extra", tmp_path / "local"
    extra.mkdir()
    (extra / "assistant.md").write_text("---\nname: assistant\ndisplay_name: Extra\n---\nfrom extra\n")
    (extra / "broken.md").write_text("---\nname: [\n---\n")
    reg = PersonaRegistry(extra_dir=extra, local_dir=local, store=store)
    assert reg.get("assistant").char == "Extra"  # extra shadows bundled
    assert "broken" not in [p.name for p in reg.list()] and "broken.md" in str(reg.errors[0])

    with pytest.raises(PersonaReadOnly, match="shared persona"):  # a user cannot replace a shared one
        reg.put("assistant", "---\ndisplay_name: Mine\n---\nmine\n", "bob")
    p = reg.put("mine", "---\ndisplay_name: Mine\n---\nmine\n", "bob")  # name filled in
    assert isinstance(p, Persona) and p.name == "mine" and reg.origin("mine", "bob") == "own"
    assert reg.get("mine", "bob").char == "Mine"
    with pytest.raises(PersonaNotFound):  # another user's persona is not there for alice
        reg.get("mine", "alice")
    assert "mine" not in [q.name for q in reg.list("alice")] and "mine" in [q.name for q in reg.list("bob")]
    assert not local.exists()  # written to the store, not the local disk

    reg.put("assistant", "---\ndisplay_name: House\n---\nhouse\n", "root", admin=True)  # the shared copy
    assert reg.get("assistant", "alice").char == "House" and reg.origin("assistant") == "shared"
    reg.delete("assistant", "root", admin=True)
    assert reg.get("assistant").char == "Extra"
    with pytest.raises(PersonaReadOnly, match="read-only"):  # files stay, even for an admin
        reg.delete("assistant", "root", admin=True)
    with pytest.raises(PersonaNotFound):
        reg.delete("mine", "alice")
    reg.delete("mine", "bob")
    with pytest.raises(PersonaNotFound, match="no persona named 'mine'"):
        reg.get("mine", "bob")


def test_put_rejects_mismatch_and_bad_names(store):
    reg = PersonaRegistry(store=store)
    with pytest.raises(PersonaError, match="names 'other'"):
        reg.put("mine", "---\nname: other\n---\nx\n", "bob")
    for bad in ("../evil", "a/b", "..", "Upper", "", "x" * 65):
        with pytest.raises(PersonaError, match="invalid persona name"):
            reg.put(bad, "---\n---\nx\n", "bob")
        with pytest.raises(PersonaError, match="invalid persona name"):
            reg.get(bad)
    assert store.list_personas("bob") == {}


def test_put_card_json(store):
    import json

    from persona.cards import persona_to_card

    card = persona_to_card(PersonaRegistry().get("daughter-ko"))
    reg = PersonaRegistry(store=store)
    p = reg.put("jiwoo", json.dumps(card, ensure_ascii=False), "alice")
    assert p.name == "jiwoo" and p.register == "banmal" and reg.get("jiwoo", "alice").examples == p.examples


def test_a_registry_without_a_store_is_read_only():
    with pytest.raises(PersonaError, match="no store"):
        PersonaRegistry().put("mine", "---\n---\nx\n", "bob")


def test_symlink_outside_is_refused(tmp_path):
    outside = tmp_path / "secret.md"
    outside.write_text("---\nname: leak\n---\nsecret\n")
    d = tmp_path / "personas"
    d.mkdir()
    os.symlink(outside, d / "leak.md")
    reg = PersonaRegistry(extra_dir=d)
    with pytest.raises(PersonaError, match="outside the persona directory"):
        reg.get("leak")
    assert "leak" not in [p.name for p in reg.list()]


def test_file_name_must_match(tmp_path):
    (tmp_path / "a.md").write_text("---\nname: b\n---\nx\n")
    with pytest.raises(PersonaError, match="does not match the file name"):
        PersonaRegistry(extra_dir=tmp_path).get("a")
