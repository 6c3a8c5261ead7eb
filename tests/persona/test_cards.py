"""Character Card V2: JSON and PNG import, export back, and clear errors for bad cards."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from persona import PersonaRegistry
from persona.cards import (
    card_to_persona,
    export_card,
    parse_card_json,
    parse_mes_example,
    persona_to_card,
    png_chunks,
    png_text_chunks,
    read_card,
    tiny_png,
    write_png_card,
)
from persona.commands import import_card
from persona.errors import CardError, PersonaError

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Seraphina",
        "description": "{{char}} is a forest guardian who looks after <USER>.",
        "personality": "gentle, protective",
        "scenario": "{{user}} wakes up in {{char}}'s glade.",
        "first_mes": "*smiles* You're awake, {{user}}.",
        "mes_example": (
            "<START>\n{{user}}: Where am I?\n{{char}}: In my glade.\nYou are safe here.\n"
            "<START>\n{{char}}: Good morning!\n{{user}}: Morning.\n{{char}}: Tea?"
        ),
        "creator_notes": "demo",
        "system_prompt": "Stay in character.",
        "post_history_instructions": "Reply in two sentences.",
        "alternate_greetings": ["Hello again, {{user}}."],
        "tags": ["fantasy"],
        "creator": "someone",
        "character_version": "1",
        "extensions": {},
    },
}


def test_v2_json_mapping(tmp_path):
    path = tmp_path / "seraphina.json"
    path.write_text(json.dumps(CARD))
    p = card_to_persona(read_card(path))
    assert p.name == "seraphina" and p.char == "Seraphina" and p.language == "en"
    assert p.description == "{{char}} is a forest guardian who looks after {{user}}."  # <USER> macro mapped
    assert (p.personality, p.scenario, p.system_prompt) == (
        "gentle, protective",
        CARD["data"]["scenario"],
        "Stay in character.",
    )
    assert p.greeting == "*smiles* You're awake, {{user}}." and p.alternate_greetings == [
        "Hello again, {{user}}."
    ]
    assert p.post_history == "Reply in two sentences." and p.tags == ["fantasy"]
    assert [[(t.role, t.content) for t in d] for d in p.examples] == [
        [("user", "Where am I?"), ("assistant", "In my glade.\nYou are safe here.")],
        [("assistant", "Good morning!"), ("user", "Morning."), ("assistant", "Tea?")],
    ]


def test_parse_mes_example_char_name_prefix():
    out = parse_mes_example("<START>\n{{user}}: hi\nJiwoo: 안녕, 아빠!\n", "Jiwoo")
    assert out == [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "안녕, 아빠!"}]]


def test_png_round_trip_and_export(tmp_path):
    daughter = PersonaRegistry().get("daughter-ko")
    card = persona_to_card(daughter)
    png = write_png_card(card)
    assert [c for c, _ in png_chunks(png)] == [b"IHDR", b"IDAT", b"tEXt", b"IEND"]
    path = tmp_path / "jiwoo.png"
    path.write_bytes(png)
    back = card_to_persona(read_card(path))
    assert back == daughter  # every field survives, register settings via extensions.memento
    # rewriting a card PNG replaces the old chara chunk rather than adding a second one
    again = write_png_card(card, png)
    assert sum(1 for c, p in png_chunks(again) if c == b"tEXt") == 1
    assert json.loads(base64.b64decode(png_text_chunks(again)["chara"])) == card


@pytest.mark.parametrize("suffix", [".json", ".png"])
def test_export_card_round_trip(tmp_path, suffix):
    daughter = PersonaRegistry().get("daughter-ko")
    path = export_card(daughter, tmp_path / f"jiwoo{suffix}")
    card = read_card(path)
    assert card["spec"] == "chara_card_v2" and card["data"]["name"] == "지우"
    assert "<START>\n{{user}}: 지우야, 밥은 먹었니?\n{{char}}: " in card["data"]["mes_example"]
    assert card_to_persona(card) == daughter


def test_import_card_writes_persona_file(tmp_path):
    src = tmp_path / "card.png"
    src.write_bytes(write_png_card(CARD))
    out = import_card(src, tmp_path / "personas")
    assert out == tmp_path / "personas" / "seraphina.md"
    reg = PersonaRegistry(extra_dir=tmp_path / "personas")
    assert reg.get("seraphina").char == "Seraphina"
    with pytest.raises(PersonaError, match="already exists"):
        import_card(src, tmp_path / "personas")


def test_korean_name_falls_back_to_file_stem(tmp_path):
    card = json.loads(json.dumps(CARD))
    card["data"]["name"] = "지우"
    card["data"]["first_mes"] = "아빠 왔어?"
    src = tmp_path / "my-daughter.json"
    src.write_text(json.dumps(card, ensure_ascii=False))
    out = import_card(src, tmp_path)
    assert out.name == "my-daughter.md"
    p = PersonaRegistry(extra_dir=tmp_path).get("my-daughter")
    assert p.char == "지우" and p.language == "ko"


def _with_text_chunk(key: bytes, value: bytes) -> bytes:
    png = tiny_png()
    payload = key + b"\x00" + value
    chunk = (
        struct.pack(">I", len(payload)) + b"tEXt" + payload + struct.pack(">I", zlib.crc32(b"tEXt" + payload))
    )
    return png[:-12] + chunk + png[-12:]  # before IEND


@pytest.mark.parametrize(
    "content, words",
    [
        (b"not a png at all", "not a PNG"),
        (tiny_png(), "no 'chara' text chunk"),
        (_with_text_chunk(b"chara", b"%%%not base64%%%"), "not valid base64"),
        (
            _with_text_chunk(b"chara", base64.b64encode(b'{"spec": "chara_card_v1", "data": {}}')),
            "unsupported card spec",
        ),
        (tiny_png()[:41] + b"Z" + tiny_png()[42:], "bad CRC"),  # a byte of IDAT's payload changed
    ],
    ids=["not-png", "no-chara", "bad-base64", "wrong-spec", "bad-crc"],
)
def test_bad_png_cards(tmp_path, content, words):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(CardError, match=words) as e:
        read_card(path)
    assert str(path) in str(e.value)


@pytest.mark.parametrize(
    "card, words, field",
    [
        ({"spec": "chara_card_v1", "data": {"name": "x"}}, "unsupported card spec", "spec"),
        ({"name": "x", "first_mes": "hi"}, "unsupported card spec", "spec"),
        ({"spec": "chara_card_v2", "data": {"description": "x"}}, "no character name", "data.name"),
        ({"spec": "chara_card_v2"}, "no 'data' object", "data"),
        (
            {"spec": "chara_card_v2", "data": {"name": "x", "description": 5}},
            "must be text",
            "data.description",
        ),
    ],
)
def test_bad_json_cards(card, words, field):
    with pytest.raises(CardError, match=words) as e:
        parse_card_json(json.dumps(card))
    assert e.value.field == field


def test_not_json():
    with pytest.raises(CardError, match="not valid JSON"):
        parse_card_json("{oops")
