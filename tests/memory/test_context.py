"""Context-window assembly: the exact window invariant, drop order, truncation, attribution."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memory.context import CONVERSATION_START, TRUNCATION_MARKER, ContextOverflow, build_context
from memory.strategies import MemoryView
from tests.memory.strategy_helpers import GemmaTemplateCounter, WordCounter, msg, smollm2_counter, transcript

PERSONA = {"role": "system", "content": "You are Memo, a kind assistant."}
EXAMPLES = [{"role": "user", "content": "ex question"}, {"role": "assistant", "content": "ex answer"}]


def build(view, new="hello there", window=200, reserve=20, counter=None, pinned=None, post=None, **kw):
    return build_context(
        pinned if pinned is not None else [PERSONA, *EXAMPLES], post, view, new,
        counter or WordCounter(), window, reserve, "test", **kw,
    )


def test_order_memory_in_first_system_message_and_parts_add_up():
    view = MemoryView(summary="User likes tea.", retrieved=[transcript(1, session_id="old")], recent=transcript(2))
    ctx = build(view, post="Stay in character.")
    roles = [m["role"] for m in ctx.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user", "assistant", "user"]
    system = ctx.messages[0]["content"]
    assert system.startswith(PERSONA["content"])  # stable prefix: KV reuse up to the memory block
    assert "[Memory: summary of the earlier conversation]\nUser likes tea." in system
    assert "[Memory: relevant earlier exchanges" in system and "u0w0" in system
    assert ctx.messages[-1]["content"] == "hello there\n\n[System note: Stay in character.]"
    assert ctx.tokens == WordCounter().count_messages(ctx.messages) == ctx.budget["used"]
    parts = ctx.budget["parts"]
    assert parts["persona"] + parts["memory"] + parts["recent"] == ctx.budget["used"]
    assert parts["persona"] == WordCounter().count_messages([PERSONA, *EXAMPLES])
    assert ctx.memory["summary"] == "User likes tea." and ctx.memory["retrieved"][0][0]["content"].startswith("u0")


def test_post_history_as_final_system_message_when_asked():
    ctx = build(MemoryView(), post="Be brief.", post_history_mode="system")
    assert ctx.messages[-2:] == [{"role": "user", "content": "hello there"}, {"role": "system", "content": "Be brief."}]
    with pytest.raises(ValueError, match="post_history_mode"):
        build(MemoryView(), post_history_mode="middle")


def test_drop_order_recent_then_memory_then_examples():
    counter = WordCounter()
    view = MemoryView(summary="s " * 10, retrieved=[transcript(1, words=10, session_id="x")], recent=transcript(6, words=10))
    full = build(view, window=10_000).tokens
    # just too small for everything: only the oldest exchange goes
    ctx = build(view, window=full - 1 + 20)
    assert [m["content"] for m in ctx.messages[3:-1]] == [m.content for m in view.recent[2:]]
    # no room for recent turns: memory stays until it must go too
    no_recent = build(MemoryView(summary=view.summary, retrieved=view.retrieved), window=10_000).tokens
    ctx = build(view, window=no_recent + 20)
    assert len(ctx.messages) == 4 and "summary" in ctx.memory and "retrieved" in ctx.memory
    ctx = build(view, window=no_recent - 1 + 20)
    assert "retrieved" not in ctx.memory and "summary" in ctx.memory  # retrieved before the summary
    bare = counter.count_messages([PERSONA, *EXAMPLES, {"role": "user", "content": "hello there"}])
    ctx = build(view, window=bare + 20)
    assert ctx.messages == [PERSONA, *EXAMPLES, {"role": "user", "content": "hello there"}]
    ctx = build(view, window=bare - 1 + 20)
    assert ctx.messages == [PERSONA, {"role": "user", "content": "hello there"}]  # examples last


def test_huge_new_message_is_truncated_with_marker_and_warning():
    new = " ".join(f"w{i}" for i in range(500))
    ctx = build(MemoryView(recent=transcript(3)), new=new, window=100, reserve=10)
    assert ctx.tokens + 10 <= 100
    last = ctx.messages[-1]["content"]
    assert last.endswith(TRUNCATION_MARKER) and new.startswith(last[: -len(TRUNCATION_MARKER)])
    assert ctx.messages[0] == PERSONA and any("truncated" in w for w in ctx.warnings)


def test_overflow_error_when_persona_cannot_fit():
    with pytest.raises(ContextOverflow, match="shorten the persona or lower max_tokens"):
        build(MemoryView(), pinned=[{"role": "system", "content": "long " * 300}], window=200, reserve=20)


def test_greeting_first_and_transcript_system_messages_render_with_gemma_template():
    recent = [msg(0, "assistant", "Hi, I'm Memo!"), msg(1, "user", "hey"), msg(2, "system", "user renamed"),
              msg(3, "assistant", "ok"), msg(4, "user", "dangling, the reply failed")]
    ctx = build(MemoryView(summary="older stuff", recent=recent), counter=GemmaTemplateCounter(), post="note")
    assert ctx.messages[3]["content"] == CONVERSATION_START
    assert ctx.tokens == GemmaTemplateCounter().count_messages(ctx.messages)


# ---------------------------------------------------------------- property: the window invariant

lengths = st.integers(min_value=0, max_value=60)


@st.composite
def scenarios(draw):
    tags = iter(range(10**6))

    class _Texts:  # every drawn text starts with a unique tag, so tests can find it again
        def __call__(self) -> str:
            return " ".join([f"k{next(tags)}"] + [f"t{i}" for i in range(draw(lengths))])

    text = _Texts()
    n = draw(st.integers(0, 12))
    recent = []
    for i in range(n):
        recent.append(msg(2 * i, "user", text()))
        if draw(st.booleans()) or i < n - 1:
            recent.append(msg(2 * i + 1, "assistant", text()))
    strategy = draw(st.sampled_from(["buffer", "window", "summary", "summary_buffer", "vector"]))
    view = MemoryView(
        summary=text() if strategy.startswith("summary") else None,
        retrieved=[[msg(900 + j, "user", text()), msg(950 + j, "assistant", text())]
                   for j in range(draw(st.integers(0, 4)))] if strategy == "vector" else [],
        recent=[] if strategy == "summary" else recent,
    )
    n_examples = draw(st.integers(0, 2))
    pinned = [{"role": "system", "content": text()}]
    pinned += [{"role": r, "content": text()} for _ in range(n_examples) for r in ("user", "assistant")]
    return dict(view=view, pinned=pinned, new=text(), post=text() if draw(st.booleans()) else None,
                window=draw(st.integers(20, 600)), reserve=draw(st.integers(0, 100)))


def check_invariant(s, counter):
    try:
        ctx = build(s["view"], new=s["new"], window=s["window"], reserve=s["reserve"], counter=counter,
                    pinned=s["pinned"], post=s["post"])
    except ContextOverflow:
        # only when persona + post-history + a bare truncated message cannot fit
        floor = build(MemoryView(), new="", window=10**9, reserve=0, counter=counter,
                      pinned=s["pinned"][:1], post=s["post"]).tokens
        assert floor + s["reserve"] > s["window"] - 5
        return
    assert ctx.tokens == counter.count_messages(ctx.messages)
    assert ctx.tokens + s["reserve"] <= s["window"]
    assert ctx.messages[0]["content"].startswith(s["pinned"][0]["content"])  # persona kept, first
    segments = ctx.messages[-1]["content"].split("\n\n")  # a dangling user turn merges in front
    last = segments[-2] if s["post"] else segments[-1]
    assert ctx.messages[-1]["content"].endswith(f"[System note: {s['post']}]" if s["post"] else last)
    head = last.split(TRUNCATION_MARKER)[0]
    assert s["new"].startswith(head) and (head == s["new"] or last.endswith(TRUNCATION_MARKER))
    parts = ctx.budget["parts"]
    assert sum(parts.values()) == ctx.tokens
    recent_ids = [m.content for m in s["view"].recent]
    rendered = {w for m in ctx.messages[1:] for w in m["content"].split()}
    kept = [c for c in recent_ids if c.split()[0] in rendered]  # by unique tag
    assert kept == recent_ids[len(recent_ids) - len(kept):]  # only the oldest are dropped


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_window_invariant_exact_counter(s):
    check_invariant(s, WordCounter())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_window_invariant_gemma_template_structure(s):
    check_invariant(s, GemmaTemplateCounter())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_window_invariant_real_smollm2_tokenizer(s):
    check_invariant(s, smollm2_counter())
