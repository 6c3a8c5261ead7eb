"""Prompt assembly: a persona -> the messages pinned at the top of every context.

    parts = build_prompt_parts(persona, user_name="아빠", remind=False)
    parts.pinned        # [system, user, assistant, user, assistant, ...] (examples after the system)
    parts.post_history  # instruction for after the history (+ register reminder when remind=True)
    token_costs(parts, tokenizer)   # {"system", "examples", "post_history", "total"} in model tokens

The example dialogues are real user/assistant turns, not text inside the system prompt: for a
반말 persona they are the strongest register demonstration a small model gets.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol

from persona.schema import Persona

_MACRO_RE = re.compile(r"\{\{\s*(char|user)\s*\}\}", re.IGNORECASE)

REGISTER_INSTRUCTION = {
    "banmal": (
        "{{char}}는 {{user}}에게 항상 반말(해체)로 말한다. 문장은 -어/-아, -지, -야, -자, -다, -니 같은 "
        "반말 어미로 끝내고, -요, -습니다, -ㅂ니다, -세요 같은 존댓말 어미는 절대 쓰지 않는다."
    ),
    "polite": (
        "{{char}}는 {{user}}에게 항상 존댓말(해요체)로 말한다. 문장은 -요 또는 -습니다로 끝내고, "
        "반말 어미(-어, -야, -지, -자)로 끝내지 않는다."
    ),
}
REGISTER_REMINDER = {
    "banmal": "(기억해: {{user}}에게는 반말로만 말해. -요, -습니다로 끝내지 마.)",
    "polite": "(기억하세요: {{user}}에게는 존댓말로 말하세요.)",
}
LABELS = {
    "ko": {
        "you_are": "이 대화에서 너는 {{char}} 역할을 한다.",
        "personality": "성격",
        "scenario": "상황",
        "first": "{{char}}의 첫 마디",
    },
    "en": {
        "you_are": "You are {{char}}.",
        "personality": "Personality",
        "scenario": "Scenario",
        "first": "How {{char}} opens a conversation",
    },
}


class MessageCounter(Protocol):
    def count_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> int: ...


@dataclass
class PromptParts:
    pinned: list[dict[str, str]]
    post_history: str | None
    costs: dict[str, int] | None = field(default=None)  # filled by token_costs()


def render_macros(text: str, char: str, user: str) -> str:
    """Replace `{{char}}` and `{{user}}` (any case, inner spaces allowed)."""
    return _MACRO_RE.sub(lambda m: char if m.group(1).lower() == "char" else user, text)


def user_name_for(persona: Persona, user_name: str | None = None) -> str:
    return user_name or persona.user_name or ("사용자" if persona.language == "ko" else "User")


def system_prompt(persona: Persona, user: str) -> str:
    """The system message: extra instructions, who the character is, personality, scenario, register rule."""
    labels = LABELS["ko" if persona.language == "ko" else "en"]
    lines = [persona.system_prompt.strip(), labels["you_are"], persona.description.strip()]
    if persona.personality.strip():
        lines.append(f"{labels['personality']}: {persona.personality.strip()}")
    if persona.scenario.strip():
        lines.append(f"{labels['scenario']}: {persona.scenario.strip()}")
    if persona.register in REGISTER_INSTRUCTION:
        lines.append(REGISTER_INSTRUCTION[persona.register])
    text = "\n\n".join(line for line in lines if line)
    return render_macros(text, persona.char, user)


def example_messages(persona: Persona, user: str) -> tuple[list[dict[str, str]], str | None]:
    """Example dialogues as alternating user/assistant messages, starting with user, ending with assistant.

    Returns (messages, opening): consecutive turns of one role are merged; an assistant line that
    opens the examples has no user turn to follow, so it is returned as `opening` for the system
    prompt; a trailing user line with no answer is dropped.
    """
    msgs: list[dict[str, str]] = []
    for dialogue in persona.examples:
        for turn in dialogue:
            content = render_macros(turn.content.strip(), persona.char, user)
            if msgs and msgs[-1]["role"] == turn.role:
                msgs[-1]["content"] += "\n" + content
            else:
                msgs.append({"role": turn.role, "content": content})
    opening = None
    if msgs and msgs[0]["role"] == "assistant":
        opening = msgs.pop(0)["content"]
    if msgs and msgs[-1]["role"] == "user":
        msgs.pop()
    return msgs, opening


def build_prompt_parts(persona: Persona, user_name: str | None = None, remind: bool = False) -> PromptParts:
    """System prompt + example dialogues (pinned) and the post-history instruction (see module doc)."""
    user = user_name_for(persona, user_name)
    system = system_prompt(persona, user)
    examples, opening = example_messages(persona, user)
    if opening:
        label = LABELS["ko" if persona.language == "ko" else "en"]["first"]
        system += "\n\n" + render_macros(f"{label}: {opening}", persona.char, user)
    post = render_macros(persona.post_history.strip(), persona.char, user)
    if remind and persona.register in REGISTER_REMINDER:
        reminder = render_macros(REGISTER_REMINDER[persona.register], persona.char, user)
        post = f"{post}\n{reminder}" if post else reminder
    return PromptParts(pinned=[{"role": "system", "content": system}, *examples], post_history=post or None)


def render_greeting(persona: Persona, user_name: str | None = None) -> str | None:
    """The persona's greeting with macros filled in, or None when it has none."""
    if not persona.greeting.strip():
        return None
    return render_macros(persona.greeting.strip(), persona.char, user_name_for(persona, user_name))


def post_history_note(text: str) -> str:
    """The post-history instruction as memory/context.py appends it to the new user message."""
    return f"\n\n[System note: {text}]"


def post_history_message(text: str, mode: str = "user_suffix") -> dict[str, str]:
    """The post-history instruction as a message of its own, for display: the marked note on a
    user turn ("user_suffix", accepted by every template) or a final system message ("system")."""
    if mode == "system":
        return {"role": "system", "content": text}
    return {"role": "user", "content": post_history_note(text).strip()}


def token_costs(
    parts: PromptParts, counter: MessageCounter, post_history_mode: str = "user_suffix"
) -> dict[str, int]:
    """Exact cost of each part in `counter`'s tokens: {"system", "examples", "post_history", "total"}.

    Each part costs the difference it makes to the rendered chat (no generation prompt), so chat
    template overhead goes to the part that causes it. The post-history instruction costs what
    appending it to a user message adds ("user_suffix", memory/context.py's default) or what a final
    system message adds ("system"). `total` is the sum. Sets and returns `parts.costs`.
    """
    n_system = counter.count_messages(parts.pinned[:1], add_generation_prompt=False)
    n_pinned = counter.count_messages(parts.pinned, add_generation_prompt=False)
    costs = {"system": n_system, "examples": n_pinned - n_system, "post_history": 0}
    if parts.post_history and post_history_mode == "system":
        with_post = parts.pinned + [post_history_message(parts.post_history, "system")]
        costs["post_history"] = counter.count_messages(with_post, add_generation_prompt=False) - n_pinned
    elif parts.post_history:
        bare = counter.count_messages(
            parts.pinned + [{"role": "user", "content": ""}], add_generation_prompt=False
        )
        note = [{"role": "user", "content": post_history_note(parts.post_history)}]
        costs["post_history"] = (
            counter.count_messages(parts.pinned + note, add_generation_prompt=False) - bare
        )
    costs["total"] = costs["system"] + costs["examples"] + costs["post_history"]
    parts.costs = costs
    return costs
