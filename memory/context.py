"""Context-window assembly: what the model sees for the next turn, guaranteed to fit.

Order of `ctx.messages`:
1. the persona's system prompt, with the memory block (summary and/or retrieved exchanges,
   clearly labelled) appended to that FIRST system message. Templates such as Gemma's accept a
   system message only in first position, so this renders everywhere. Effect on KV prefix reuse:
   the persona text is a stable prefix every turn; the cache is reused up to the memory block,
   which changes only when the summary is folded (summary strategies) or retrieval changes (vector).
2. the persona's example dialogues,
3. recent turns verbatim, oldest first,
4. the new user message; the post-history instruction is appended to it as a marked
   "[System note: ...]" (post_history_mode="user_suffix", the default, accepted by every template)
   or sent as a final system message (post_history_mode="system", for templates that allow it).
Adjacent messages of the same role are merged, transcript system messages become marked user-side
notes, and a conversation opening with the assistant gets a marked user opener, so strict
templates (Gemma: system first only, then strict user/assistant alternation) accept the result.

Guarantee: `counter.count_messages(ctx.messages) + reserved_for_reply <= context_window`,
counted exactly. When it does not fit, drop in this order: oldest recent exchanges (whole),
then retrieved exchanges (least relevant first), then the facts, the summary, the core blocks,
then example dialogues (last first); then the new message is truncated with "…[truncated]" and a warning. The persona system
prompt, the post-history note and (a part of) the new message are never dropped; if they cannot
fit, `ContextOverflow` is raised.

Budget attribution (parts add up to `used` exactly): persona = count of the persona system prompt
+ kept examples alone; memory = count with the memory block added minus persona; lore = count of
the whole context minus the same context without lorebook entries; recent = the rest (recent turns,
the new message, the post-history note and the generation prompt).

Lorebook entries (`lore=`, activated by persona/lorebook.py, prompt order): `before_char` entries
go before the persona's system text, `after_char` right after it (both in the first system
message, so a lore change costs KV reuse from there on), `at_depth` ones become a message `depth`
messages before the end of the conversation (0: after the new message) with their role (a system
one as a marked user-side note, as transcript system messages are). First the entries over
`lore_budget` tokens are dropped (lowest priority first, later entries before earlier ones on a
tie); when the context does not fit, lore is dropped the same way right after retrieved exchanges.
`ctx.memory["lore"]` names each inserted entry with its marginal token cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from memory.strategies.base import MemoryView, TokenCounter, group_exchanges, most_that_fit
from memory.types import Message

TRUNCATION_MARKER = "…[truncated]"
POST_HISTORY_MODES = ("user_suffix", "system")
CONVERSATION_START = "[The conversation starts.]"


class LoreItem(Protocol):
    """An activated lorebook entry (persona.lorebook.Activated fits)."""

    name: str
    content: str
    position: str  # before_char | after_char | at_depth
    depth: int
    role: str  # system | user | assistant
    priority: int


class ContextOverflow(ValueError):
    """Even the persona and a truncated new message cannot fit the context window."""


@dataclass
class Context:
    messages: list[dict[str, str]]
    tokens: int
    budget: dict[str, Any]
    memory: dict[str, Any]
    warnings: list[str] = field(default_factory=list)


@dataclass
class _Parts:
    """One candidate context; the fitting loop shrinks it until it fits."""

    system: str | None
    examples: list[list[dict[str, str]]]
    summary: str | None
    retrieved: list[list[Message]]
    recent: list[list[Message]]
    blocks: dict[str, str]
    facts: str | None
    new_text: str
    post_history: str | None
    post_history_mode: str
    lore: list[Any] = field(default_factory=list)  # LoreItem, prompt order

    def _lore_text(self, position: str) -> str | None:
        return "\n".join(e.content for e in self.lore if e.position == position) or None

    def pinned(self, with_memory: bool, with_lore: bool = False) -> list[dict[str, str]]:
        block = memory_block(self.summary, self.retrieved, self.blocks, self.facts) if with_memory else None
        before = self._lore_text("before_char") if with_lore else None
        after = self._lore_text("after_char") if with_lore else None
        system = "\n\n".join(t for t in (before, self.system, after, block) if t)
        head = [{"role": "system", "content": system}] if system else []
        return head + [m for ex in self.examples for m in ex]

    def messages(self, with_lore: bool = True) -> list[dict[str, str]]:
        out = self.pinned(with_memory=True, with_lore=with_lore)
        chat = conversation([m for group in self.recent for m in group])
        text = self.new_text
        if self.post_history and self.post_history_mode == "user_suffix":
            text = f"{text}\n\n[System note: {self.post_history}]"
        chat.append({"role": "user", "content": text})
        if with_lore:
            for e in self.lore:
                if e.position == "at_depth":
                    chat.insert(max(0, len(chat) - e.depth), _lore_message(e))
        out += chat
        if self.post_history and self.post_history_mode == "system":
            out.append({"role": "system", "content": self.post_history})
        return merge_same_roles(out)


def build_context(
    pinned: list[dict[str, str]],
    post_history: str | None,
    view: MemoryView,
    new_message: str,
    counter: TokenCounter,
    context_window: int,
    reserved_for_reply: int,
    strategy: str,
    *,
    post_history_mode: str = "user_suffix",
    lore: Sequence[LoreItem] = (),
    lore_budget: int | None = None,
) -> Context:
    if post_history_mode not in POST_HISTORY_MODES:
        raise ValueError(f"post_history_mode must be one of {POST_HISTORY_MODES}, got {post_history_mode!r}")
    limit = context_window - reserved_for_reply
    has_system = bool(pinned) and pinned[0]["role"] == "system"
    parts = _Parts(
        system=pinned[0]["content"] if has_system else None,
        examples=_pairs(pinned[1:] if has_system else pinned),
        summary=view.summary or None,
        retrieved=list(view.retrieved),
        recent=group_exchanges(view.recent),
        blocks={k: v for k, v in view.blocks.items() if v},
        facts=view.facts or None,
        new_text=new_message,
        post_history=post_history,
        post_history_mode=post_history_mode,
        lore=[e for e in lore if e.content],
    )
    warnings = list(view.warnings)
    if parts.lore and lore_budget is not None:
        _fit_lore(parts, counter, lore_budget)

    def fits() -> bool:
        return counter.count_messages(parts.messages()) <= limit

    if not fits():
        _shrink(parts, fits, warnings, limit, reserved_for_reply, context_window)
    messages = parts.messages()
    used = counter.count_messages(messages)
    persona = counter.count_messages(merge_same_roles(parts.pinned(False))) if parts.pinned(False) else 0
    with_memory = counter.count_messages(merge_same_roles(parts.pinned(True))) if parts.pinned(True) else 0
    memory_tokens = with_memory - persona if (parts.summary or parts.retrieved or parts.blocks or parts.facts) else 0
    lore_tokens = used - counter.count_messages(parts.messages(with_lore=False)) if parts.lore else 0
    budget = {
        "context_window": context_window,
        "reserved_for_reply": reserved_for_reply,
        "used": used,
        "parts": {
            "persona": persona,
            "memory": memory_tokens,
            "lore": lore_tokens,
            "recent": used - persona - memory_tokens - lore_tokens,
        },
    }
    memory: dict[str, Any] = {"strategy": strategy}
    if parts.summary:
        memory["summary"] = parts.summary
    if parts.retrieved:
        memory["retrieved"] = [[_message_json(m) for m in ex] for ex in parts.retrieved]
    if parts.blocks:
        memory["blocks"] = dict(parts.blocks)
    if parts.facts:
        memory["facts"] = parts.facts
    if parts.lore:
        memory["lore"] = _lore_costs(parts, counter, used)
    return Context(messages, used, budget, memory, warnings)


def _lore_message(e: Any) -> dict[str, str]:
    if e.role in ("user", "assistant"):
        return {"role": e.role, "content": e.content}
    return {"role": "user", "content": f"[System note: {e.content}]"}  # strict templates: system first only


def _drop_order(lore: list[Any]) -> list[Any]:
    """Lore in the order it is given up: lowest priority first, later entries before earlier ones."""
    ranked = sorted(enumerate(lore), key=lambda p: (p[1].priority, -p[0]))
    return [e for _, e in ranked]


def _fit_lore(parts: _Parts, counter: TokenCounter, budget: int) -> None:
    """Drop entries until the lore costs at most `budget` tokens (the lorebook's token_budget)."""
    without = counter.count_messages(parts.messages(with_lore=False))
    for e in _drop_order(parts.lore):
        if counter.count_messages(parts.messages()) - without <= budget:
            return
        parts.lore = [x for x in parts.lore if x is not e]


def _lore_costs(parts: _Parts, counter: TokenCounter, used: int) -> list[dict[str, Any]]:
    """Each inserted entry and what it adds to the context, in the model's tokens."""
    out = []
    everything = parts.lore
    try:
        for e in everything:
            parts.lore = [x for x in everything if x is not e]
            tokens = used - counter.count_messages(parts.messages())
            where = f"at_depth {e.depth} as {e.role}" if e.position == "at_depth" else e.position
            out.append({"name": e.name, "position": where, "tokens": tokens})
    finally:
        parts.lore = everything
    return out


def _shrink(
    parts: _Parts,
    fits: Callable[[], bool],
    warnings: list[str],
    limit: int,
    reserved: int,
    window: int,
) -> None:
    """Drop (in the documented order) until `fits()`; truncate the new message as a last resort."""
    recent = parts.recent
    keep = most_that_fit(len(recent), lambda k: _with(parts, "recent", recent[len(recent) - k :], fits))
    parts.recent = recent[len(recent) - max(keep, 0) :]
    if keep >= 0:  # most_that_fit checked fits() for exactly this choice
        return
    while parts.retrieved and not fits():
        parts.retrieved = parts.retrieved[:-1]
    for e in _drop_order(parts.lore):
        if fits():
            break
        parts.lore = [x for x in parts.lore if x is not e]
    if parts.facts and not fits():
        parts.facts = None
    if parts.summary and not fits():
        parts.summary = None
    if parts.blocks and not fits():
        parts.blocks = {}
    while parts.examples and not fits():
        parts.examples = parts.examples[:-1]
    if fits():
        return
    original = parts.new_text
    keep = _last_true(len(original), lambda n: _with(parts, "new_text", original[:n] + TRUNCATION_MARKER, fits))
    if keep < 0:
        parts.new_text = original
        raise ContextOverflow(
            f"the persona prompt and post-history note alone do not fit: context_window={window} minus "
            f"reserved_for_reply={reserved} leaves {limit} tokens; shorten the persona or lower max_tokens"
        )
    parts.new_text = original[:keep] + TRUNCATION_MARKER
    warnings.append(
        f"the new message was truncated from {len(original)} to {keep} characters to fit the context window"
    )


def _with(parts: _Parts, attr: str, value: Any, fits: Callable[[], bool]) -> bool:
    """fits() with one attribute temporarily replaced."""
    old = getattr(parts, attr)
    setattr(parts, attr, value)
    try:
        return fits()
    finally:
        setattr(parts, attr, old)


def _last_true(hi: int, pred: Callable[[int], bool]) -> int:
    """Largest i in [0, hi] with pred(i) (pred shrinks monotonically); -1 if none."""
    lo, end = -1, hi
    while lo < end:
        mid = (lo + end + 1) // 2
        if pred(mid):
            lo = mid
        else:
            end = mid - 1
    return lo


def memory_block(
    summary: str | None,
    retrieved: Sequence[list[Message]],
    blocks: dict[str, str] | None = None,
    facts: str | None = None,
) -> str | None:
    """The labelled memory text appended to the system prompt (core blocks and facts first: they are
    what is true now; retrieved exchanges are what was said, possibly long ago)."""
    sections = [f"[Core memory: {label}]\n{text}" for label, text in (blocks or {}).items() if text]
    if facts:
        sections.append(facts)
    if summary:
        sections.append(f"[Memory: summary of the earlier conversation]\n{summary}")
    if retrieved:
        lines = ["[Memory: relevant earlier exchanges, most relevant first]"]
        for ex in retrieved:
            lines += [f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in ex]
            lines.append("")
        sections.append("\n".join(lines).rstrip())
    return "\n\n".join(sections) if sections else None


def conversation(recent: list[Message]) -> list[dict[str, str]]:
    """Recent turns as chat messages that strict templates accept.

    A system message stored in the transcript becomes a marked note on the user side, and a
    conversation that opens with the assistant (a persona greeting) gets a marked user opener,
    so the turns alternate user/assistant from the first one.
    """
    out = [
        {"role": "user", "content": f"[System note: {m.content}]"} if m.role == "system" else m.to_chat()
        for m in recent
    ]
    if out and out[0]["role"] != "user":
        out.insert(0, {"role": "user", "content": CONVERSATION_START})
    return out


def merge_same_roles(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for m in messages:
        if out and out[-1]["role"] == m["role"]:
            out[-1] = {"role": m["role"], "content": f"{out[-1]['content']}\n\n{m['content']}"}
        else:
            out.append(dict(m))
    return out


def _pairs(examples: list[dict[str, str]]) -> list[list[dict[str, str]]]:
    """Example dialogue messages grouped into user-led exchanges (dropped whole)."""
    groups: list[list[dict[str, str]]] = []
    for m in examples:
        if m["role"] == "user" or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return groups


def _message_json(m: Message) -> dict[str, Any]:
    return {"id": m.id, "session_id": m.session_id, "role": m.role, "content": m.content}
