"""Lorebooks: every entry/book field, Korean keys, cards (V2, V3, SillyTavern world info), export,
and the `lore` part of the context (fitted in the model's tokens)."""

from __future__ import annotations

import json

import pytest

from memory.context import build_context
from memory.strategies import MemoryView
from persona.cards import card_to_persona, parse_card_json, persona_to_card
from persona.errors import PersonaError
from persona.lorebook import Lorebook, activate, book_from_card, parse_world_info
from persona.schema import dump_persona, parse_persona_text
from tests.memory.strategy_helpers import GemmaTemplateCounter, WordCounter, msg, smollm2_counter


def book(*entries, **kw) -> Lorebook:
    return Lorebook.model_validate({"entries": list(entries), **kw})


def names(hits) -> list[str]:
    return [h.name for h in hits]


# ---------------------------------------------------------------- activation


def test_keys_case_and_whole_words():
    b = book(
        {"name": "cat", "keys": ["cat"], "content": "Cats."},
        {"name": "Rome", "keys": ["Rome"], "content": "Rome.", "case_sensitive": True},
        {"name": "sub", "keys": ["phone"], "content": "Phones.", "match_whole_words": False},
    )
    assert names(activate(b, [], "I CAT-sit on weekends")) == ["cat"]
    assert names(activate(b, [], "we concatenate strings")) == []  # whole words for Latin keys
    assert names(activate(b, [], "rome was not built")) == []  # case_sensitive
    assert names(activate(b, [], "Rome was not built")) == ["Rome"]
    assert names(activate(b, [], "my smartphones")) == ["sub"]


def test_korean_keys_match_inside_inflected_words_and_compounds():
    b = book(
        {"name": "camellia", "keys": ["동백"], "content": "동백꽃은 마을의 상징이다."},
        {"name": "ship", "keys": ["배"], "content": "배는 항구에 있다."},
    )
    for text in ("동백꽃 피었어?", "동백이 보고 싶어", "동백을 봤어", "어제 동백나무 아래에서"):
        assert "camellia" in names(activate(b, [], text)), text
    assert "camellia" not in names(activate(b, [], "동쪽 백화점"))
    # a one-syllable key must be a noun morpheme of its own, not a piece of another word
    assert "ship" in names(activate(b, [], "배가 항구에 들어왔어"))
    assert "ship" not in names(activate(b, [], "배고파 죽겠어"))
    assert "ship" not in names(activate(b, [], "배우가 되고 싶어"))


def test_selective_secondary_keys_and_logic():
    base = {"keys": ["sword"], "secondary_keys": ["fire", "ice"], "selective": True, "content": "x"}
    cases = {
        "and_any": {"sword": False, "sword fire": True, "sword fire ice": True},
        "and_all": {"sword fire": False, "sword fire ice": True},
        "not_any": {"sword": True, "sword ice": False},
        "not_all": {"sword fire": True, "sword fire ice": False},
    }
    for logic, expect in cases.items():
        b = book({**base, "name": logic, "selective_logic": logic})
        for text, fires in expect.items():
            assert bool(activate(b, [], text)) is fires, (logic, text)
    # selective off: secondary keys are ignored
    assert activate(book({**base, "selective": False}), [], "sword")


def test_enabled_constant_regex_and_insertion_order():
    b = book(
        {"name": "late", "keys": ["x"], "content": "late", "insertion_order": 50},
        {"name": "always", "keys": [], "content": "always", "constant": True, "insertion_order": 10},
        {"name": "off", "keys": ["x"], "content": "off", "enabled": False},
        {"name": "re", "keys": ["/drag(on|oon)s?/i"], "content": "re", "insertion_order": 30},
    )
    assert names(activate(b, [], "nothing here")) == ["always"]
    assert names(activate(b, [], "x and DRAGOONS")) == ["always", "re", "late"]  # insertion_order


def test_scan_depth_counts_recent_messages():
    b = book({"name": "tea", "keys": ["tea"], "content": "Tea."}, scan_depth=2)
    recent = ["I love tea", "ok", "fine"]
    assert activate(b, recent, "hi") == []  # "tea" is 3 messages back
    assert names(activate(b, recent[:2], "hi")) == ["tea"]
    assert activate(book({"name": "tea", "keys": ["tea"], "content": "T"}, scan_depth=0), ["tea"], "hi") == []


def test_recursive_scanning_and_its_exclusions():
    entries = [
        {"name": "castle", "keys": ["castle"], "content": "The castle belongs to the queen."},
        {"name": "queen", "keys": ["queen"], "content": "The queen rides a griffin."},
        {"name": "griffin", "keys": ["griffin"], "content": "Griffins eat gold.", "exclude_recursion": True},
    ]
    assert names(activate(book(*entries), [], "the castle")) == ["castle"]
    assert names(activate(book(*entries, recursive_scanning=True), [], "the castle")) == ["castle", "queen"]
    stop = [dict(entries[0], prevent_recursion=True), *entries[1:]]
    assert names(activate(book(*stop, recursive_scanning=True), [], "the castle")) == ["castle"]


def test_macros_are_rendered_in_entry_content():
    b = book({"keys": ["home"], "content": "{{char}} lives with {{user}}."})
    assert activate(b, [], "home", char="Mina", user="Ada")[0].content == "Mina lives with Ada."


# ---------------------------------------------------------------- persona files and cards


PERSONA_FILE = """---
name: village
description: "{{char}} lives in a village."
lorebook:
  scan_depth: 4
  token_budget: 64
  recursive_scanning: true
  entries:
    - name: camellia
      keys: [동백]
      content: 동백꽃은 마을의 상징이다.
      position: after_char
      priority: 5
    - name: well
      keys: [well]
      content: The well is cursed.
      position: at_depth
      depth: 1
      role: assistant
---
"""


def test_persona_file_lorebook_round_trips_and_errors_name_the_line():
    p = parse_persona_text(PERSONA_FILE)
    assert p.lorebook.scan_depth == 4 and p.lorebook.entries[1].position == "at_depth"
    assert parse_persona_text(dump_persona(p)) == p
    with pytest.raises(PersonaError) as e:
        parse_persona_text(PERSONA_FILE.replace("role: assistant", "role: narrator"))
    assert e.value.field == "lorebook.entries.1.role" and e.value.line == 19
    with pytest.raises(PersonaError, match="regular expression"):
        parse_persona_text(PERSONA_FILE.replace("keys: [well]", "keys: ['/we(ll/']"))


def v2_card(book_json):
    return {"spec": "chara_card_v2", "spec_version": "2.0",
            "data": {"name": "Mina", "description": "d", "first_mes": "hi", "character_book": book_json}}


V2_BOOK = {
    "name": "world", "scan_depth": 3, "token_budget": 200, "recursive_scanning": True, "extensions": {},
    "entries": [
        {"keys": ["moon"], "content": "The moon is red.", "extensions": {}, "enabled": True, "insertion_order": 2,
         "case_sensitive": True, "name": "moon", "priority": 7, "id": 1, "comment": "c", "selective": True,
         "secondary_keys": ["night"], "constant": False, "position": "after_char"},
        {"keys": ["tide"], "content": "Tides.", "extensions": {"position": 4, "depth": 2, "role": 1,
                                                                "selectiveLogic": 3},
         "enabled": False, "insertion_order": 1},
    ],
}


def test_v2_card_book_is_read_and_exported_back():
    p = card_to_persona(parse_card_json(json.dumps(v2_card(V2_BOOK))))
    b = p.lorebook
    assert (b.name, b.scan_depth, b.token_budget, b.recursive_scanning) == ("world", 3, 200, True)
    moon, tide = b.entries
    assert moon.keys == ["moon"] and moon.secondary_keys == ["night"] and moon.selective and moon.case_sensitive
    assert (moon.position, moon.priority, moon.insertion_order, moon.id) == ("after_char", 7, 2, 1)
    assert (tide.position, tide.depth, tide.role, tide.enabled, tide.selective_logic) == (
        "at_depth", 2, "user", False, "and_all")
    card = persona_to_card(p)
    again = card_to_persona(parse_card_json(json.dumps(card)))
    assert again.lorebook == b  # exported cards keep the book, every field
    assert card["data"]["character_book"]["entries"][1]["extensions"]["position"] == 4  # SillyTavern reads it


def test_v3_card_decorators_and_group_only_greetings():
    card = {
        "spec": "chara_card_v3", "spec_version": "3.0",
        "data": {"name": "Mina", "description": "d", "first_mes": "hi", "group_only_greetings": ["hi all"],
                 "character_book": {"extensions": {}, "entries": [
                     {"keys": ["ghost"], "content": "@@depth 0\n@@role user\nA ghost is near.", "extensions": {},
                      "enabled": True, "insertion_order": 0, "use_regex": False},
                     {"keys": [], "content": "@@activate\nAlways.", "extensions": {}, "enabled": True,
                      "insertion_order": 1, "use_regex": False},
                     {"keys": ["/^x+$/"], "content": "@@dont_activate\nNever.", "extensions": {}, "enabled": True,
                      "insertion_order": 2, "use_regex": True},
                 ]}},
    }
    p = card_to_persona(parse_card_json(json.dumps(card)))
    ghost, always, never = p.lorebook.entries
    assert (ghost.position, ghost.depth, ghost.role, ghost.content) == ("at_depth", 0, "user", "A ghost is near.")
    assert always.constant and always.content == "Always."
    assert not never.enabled and never.use_regex
    assert p.group_only_greetings == ["hi all"]
    assert persona_to_card(p)["data"]["group_only_greetings"] == ["hi all"]


def test_sillytavern_world_info_file():
    wi = {"name": "Lands", "entries": {
        "0": {"uid": 0, "key": ["Eldoria"], "keysecondary": ["war"], "comment": "Eldoria", "content": "A kingdom.",
              "constant": False, "selective": True, "selectiveLogic": 2, "order": 100, "position": 4, "depth": 3,
              "role": 2, "disable": False, "caseSensitive": True, "matchWholeWords": False,
              "excludeRecursion": True, "preventRecursion": False},
        "1": {"uid": 1, "key": ["x"], "content": "y", "disable": True, "position": 1, "order": 5},
    }}
    b = parse_world_info(json.dumps(wi))
    e0, e1 = b.entries
    assert e0.keys == ["Eldoria"] and e0.secondary_keys == ["war"] and e0.selective_logic == "not_any"
    assert (e0.position, e0.depth, e0.role, e0.case_sensitive, e0.match_whole_words) == (
        "at_depth", 3, "assistant", True, False)
    assert e0.exclude_recursion and e0.label == "Eldoria"
    assert not e1.enabled and e1.position == "after_char" and e1.insertion_order == 5
    assert names(activate(b, [], "Eldoria is calm")) == ["Eldoria"]
    assert activate(b, [], "Eldoria at war") == []  # not_any
    with pytest.raises(PersonaError, match="entries"):
        parse_world_info('{"name": "x"}')
    odd = book_from_card({"entries": [{"keys": ["a"], "content": "b", "position": "sideways",
                                       "extensions": {"role": 1, "depth": -5}}]}, "<t>")
    assert (odd.entries[0].position, odd.entries[0].depth, odd.entries[0].role) == ("before_char", 0, "user")
    sloppy = book_from_card({"entries": [{"keys": ["a"], "content": "b", "insertion_order": "7", "priority": "high"},
                                         {"keys": ["c"], "content": "d", "insertion_order": {"x": 1},
                                          "extensions": {"position": [4], "role": {}, "depth": "deep"}}]}, "<t>")
    assert [(e.insertion_order, e.priority) for e in sloppy.entries] == [(7, 10), (0, 10)]  # never a crash
    with pytest.raises(PersonaError, match="data.character_book.entries.0"):
        book_from_card({"entries": ["not an entry"]}, "<t>")


# ---------------------------------------------------------------- the context manager


PERSONA = {"role": "system", "content": "You are Mina."}


def ctx_for(b, new, recent=(), counter=None, window=400, budget=None, **kw):
    history = list(recent)
    hits = activate(b, [m.content for m in history], new)
    return build_context([PERSONA], None, MemoryView(recent=history), new, counter or WordCounter(), window, 20,
                         "window", lore=hits, lore_budget=b.token_budget if budget is None else budget, **kw)


def test_positions_in_the_context_and_parts_add_up():
    b = book(
        {"name": "before", "keys": ["moon"], "content": "BEFORE moon lore", "position": "before_char"},
        {"name": "after", "keys": ["moon"], "content": "AFTER moon lore", "position": "after_char"},
        {"name": "deep", "keys": ["moon"], "content": "DEEP lore", "position": "at_depth", "depth": 2,
         "role": "assistant"},
        {"name": "note", "keys": ["moon"], "content": "NOTE lore", "position": "at_depth", "depth": 0},
    )
    recent = [msg(0, "user", "hello"), msg(1, "assistant", "hi there")]
    ctx = ctx_for(b, "the moon?", recent)
    system = ctx.messages[0]["content"]
    assert system.index("BEFORE") < system.index("You are Mina.") < system.index("AFTER")
    # depth 2 = before the last two messages (the assistant reply and the new message): merged into it
    assert "DEEP lore" in ctx.messages[2]["content"] and ctx.messages[2]["role"] == "assistant"
    assert ctx.messages[-1]["role"] == "user" and ctx.messages[-1]["content"].endswith("[System note: NOTE lore]")
    parts = ctx.budget["parts"]
    assert parts["lore"] > 0
    assert parts["persona"] + parts["memory"] + parts["lore"] + parts["recent"] == ctx.budget["used"]
    lore = ctx.memory["lore"]
    assert [e["name"] for e in lore] == ["before", "after", "deep", "note"]
    assert lore[0] == {"name": "before", "position": "before_char", "tokens": 3}  # "BEFORE moon lore"
    assert lore[2]["position"] == "at_depth 2 as assistant"


def test_token_budget_drops_lowest_priority_first_in_model_tokens():
    counter = smollm2_counter()
    b = book(
        {"name": "low", "keys": ["moon"], "content": "low priority lore about the moon " * 3, "priority": 1},
        {"name": "high", "keys": ["moon"], "content": "high priority lore about the moon", "priority": 9},
        {"name": "mid", "keys": ["moon"], "content": "mid priority lore about the moon", "priority": 5},
    )
    full = ctx_for(b, "moon", counter=counter, window=1024, budget=10_000)
    costs = {e["name"]: e["tokens"] for e in full.memory["lore"]}
    budget = costs["high"] + costs["mid"] + 1
    ctx = ctx_for(b, "moon", counter=counter, window=1024, budget=budget)
    assert [e["name"] for e in ctx.memory["lore"]] == ["high", "mid"]
    assert ctx.budget["parts"]["lore"] <= budget
    assert ctx.tokens == counter.count_messages(ctx.messages)
    alone = ctx_for(book(b.entries[1].model_dump()), "moon", counter=counter, window=1024, budget=10_000)
    tight = ctx_for(b, "moon", counter=counter, window=1024, budget=alone.budget["parts"]["lore"])
    assert [e["name"] for e in tight.memory["lore"]] == ["high"]


def test_lore_gives_way_when_the_window_is_full_and_gemma_accepts_it():
    b = book(
        {"name": "big", "keys": ["moon"], "content": "word " * 60, "priority": 1},
        {"name": "small", "keys": ["moon"], "content": "tiny lore", "priority": 2, "position": "at_depth",
         "depth": 1},
    )
    ctx = ctx_for(b, "moon", window=60, budget=10_000, counter=GemmaTemplateCounter())
    assert [e["name"] for e in ctx.memory["lore"]] == ["small"]
    assert ctx.tokens + 20 <= 60
    assert ctx.messages[0]["role"] == "system" and [m["role"] for m in ctx.messages[1:]] == ["user"]
