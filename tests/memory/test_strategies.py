"""Memory strategies on real transcripts in real stores (SQLite and Redis via the `store` fixture)."""

from __future__ import annotations

import pytest

from memory.strategies import (
    MemoryConfigError,
    StrategyDeps,
    build_strategy,
    group_exchanges,
    validate_memory_config,
)
from memory.strategies.base import to_chat
from memory.summarizer import ExtractiveSummarizer
from memory.types import Message
from tests.memory.strategy_helpers import WordCounter, fill, make_session, smollm2_counter


class CountingSummarizer:
    """A real (extractive) summarizer that records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[Message]]] = []
        self.inner = ExtractiveSummarizer(max_chars=100_000)

    def __call__(self, previous: str, messages: list[Message]) -> str:
        self.calls.append((previous, list(messages)))
        return self.inner(previous, messages)


def deps_for(store, counter=None, summarizer=None) -> StrategyDeps:
    return StrategyDeps(store=store, counter=counter or WordCounter(), summarizer=summarizer)


# ---------------------------------------------------------------- config


def test_validate_fills_defaults_and_accepts_names_and_json():
    assert validate_memory_config({"strategy": "window"}) == {"strategy": "window", "turns": 8}
    assert validate_memory_config("summary_buffer") == {"strategy": "summary_buffer", "max_tokens": 1024}
    assert validate_memory_config('{"strategy":"vector","k":2,"scope":"user"}') == {
        "strategy": "vector", "k": 2, "turns": 4, "scope": "user"}
    assert validate_memory_config(None)["strategy"] == "summary_buffer"


@pytest.mark.parametrize(
    "config, param, text",
    [
        ({"strategy": "window", "turns": 0}, "memory.turns", r"memory.turns: Input should be greater than or equal to 1"),
        ({"strategy": "window", "turns": 257}, "memory.turns", r"less than or equal to 256 \(got 257\)"),
        ({"strategy": "window", "turns": "8"}, "memory.turns", "memory.turns: Input should be a valid integer"),
        ({"strategy": "window", "turns": True}, "memory.turns", "memory.turns: Input should be a valid integer"),
        ({"strategy": "token_buffer", "max_tokens": -5}, "memory.max_tokens", "greater than or equal to 1"),
        ({"strategy": "summary_buffer", "max_tokens": 10**9}, "memory.max_tokens", "less than or equal to 131072"),
        ({"strategy": "vector", "k": 65}, "memory.k", "less than or equal to 64"),
        ({"strategy": "vector", "scope": "world"}, "memory.scope", "'session' or 'user'"),
        ({"strategy": "long_term", "max_facts": 100}, "memory.max_facts", "less than or equal to 64"),
        ({"strategy": "window", "max_tokens": 10}, "memory.max_tokens", "not a parameter of strategy 'window'"),
        ({"strategy": "forgetful"}, "memory.strategy", "must be one of buffer, window"),
        ({"turns": 3}, "memory.strategy", "must be one of"),
        ("{not json", "memory", "not valid JSON"),
        (["window"], "memory", "must be an object"),
    ],
)
def test_validate_errors_name_the_parameter(config, param, text):
    with pytest.raises(MemoryConfigError, match=text) as err:
        validate_memory_config(config)
    assert err.value.param == param


def test_summary_strategies_need_a_summarizer(tmp_path):
    from memory.sqlite_store import SQLiteStore

    with pytest.raises(ValueError, match="needs a summarizer"):
        build_strategy({"strategy": "summary"}, deps_for(SQLiteStore(tmp_path / "t.db")))


# ---------------------------------------------------------------- verbatim strategies


def test_group_exchanges_keeps_every_message():
    from tests.memory.strategy_helpers import msg

    msgs = [msg(0, "assistant", "hi!"), msg(1, "user", "a"), msg(2, "assistant", "b"), msg(3, "user", "c")]
    groups = group_exchanges(msgs)
    assert [[m.id for m in g] for g in groups] == [["m00000"], ["m00001", "m00002"], ["m00003"]]


def test_buffer_is_whole_transcript_and_ignores_an_already_stored_new_message(store):
    session = make_session(store)
    messages = fill(store, session, 5)
    strat = build_strategy("buffer", deps_for(store))
    assert strat.view(session, messages, "next?").recent == messages
    stored = store.append_message(session.id, "user", "next?")
    assert stored not in strat.view(session, store.list_messages(session.id), "next?").recent


@pytest.mark.parametrize("turns", [1, 3, 8])
def test_window_keeps_exactly_the_last_n_exchanges(store, turns):
    session = make_session(store)
    messages = fill(store, session, 12)
    view = build_strategy({"strategy": "window", "turns": turns}, deps_for(store)).view(session, messages, "q")
    assert view.recent == messages[-2 * turns :]
    assert view.summary is None and view.retrieved == []


def test_token_buffer_never_exceeds_budget_in_real_tokens(store):
    counter = smollm2_counter()
    session = make_session(store)
    messages = fill(store, session, 30, plant={7: "가나다라 " * 40, 20: "a much longer message " * 30})
    for budget in (1, 20, 57, 100, 333, 1000, 100_000):
        strat = build_strategy({"strategy": "token_buffer", "max_tokens": budget}, deps_for(store, counter))
        recent = strat.view(session, messages, "q").recent
        assert recent == messages[len(messages) - len(recent) :]  # a suffix of the transcript
        if recent:
            assert counter.count_messages(to_chat(recent)) <= budget
            assert recent[0].role == "user"  # never opens with an assistant turn
        # maximal: one more exchange would not fit
        start = len(messages) - len(recent)
        if start >= 2:
            assert counter.count_messages(to_chat(messages[start - 2 :])) > budget


# ---------------------------------------------------------------- summaries


def run_turns(store, session, strat, turns: int, start: int = 0) -> list[Message]:
    messages = store.list_messages(session.id)
    for i in range(start, start + turns):
        view = strat.view(session, messages, f"turn {i}")
        assert view is not None
        messages = fill(store, session, 1, start=i)
        strat.after_turn(session, messages)
    return messages


def test_summary_buffer_folds_only_new_overflow_once_per_overflow(store):
    summarizer = CountingSummarizer()
    session = make_session(store)
    deps = deps_for(store, summarizer=summarizer)
    strat = build_strategy({"strategy": "summary_buffer", "max_tokens": 60}, deps)
    messages = run_turns(store, session, strat, 20)

    covered: list[str] = []
    for previous, new in summarizer.calls:
        assert new, "the summarizer is never called with nothing to fold"
        assert previous == (summarizer.inner("", [m for m in messages if m.id in covered]) if covered else "")
        assert [m.id for m in new] == [m.id for m in messages[len(covered) : len(covered) + len(new)]]
        covered += [m.id for m in new]  # each call gets only messages not folded before, in order
    # once the buffer is full, each turn overflows one exchange: one call per turn
    assert 10 <= len(summarizer.calls) <= 19

    view = strat.view(session, messages, "what now?")
    assert [m.id for m in view.recent] == [m.id for m in messages[len(covered) :]]
    assert WordCounter().count_messages(to_chat(view.recent)) <= 60
    assert view.summary and "(0)" in view.summary

    # "restart": a new strategy object reads the persisted state and recomputes nothing
    calls = len(summarizer.calls)
    fresh = build_strategy({"strategy": "summary_buffer", "max_tokens": 60}, deps)
    again = fresh.view(session, store.list_messages(session.id), "what now?")
    assert (again.summary, again.recent) == (view.summary, view.recent)
    fresh.after_turn(session, store.list_messages(session.id))
    assert len(summarizer.calls) == calls
    state = store.get_state(session.id, "summary_buffer")
    assert state["count"] == len(covered) and state["first_id"] == messages[0].id
    assert state["last_id"] == covered[-1]

    # rebuild recomputes from the originals in one call
    fresh.rebuild(session)
    assert len(summarizer.calls) == calls + 1
    assert summarizer.calls[-1][0] == "" and [m.id for m in summarizer.calls[-1][1]] == covered


def test_summary_buffer_view_with_stale_summary_keeps_overflow_verbatim(store):
    summarizer = CountingSummarizer()
    session = make_session(store)
    strat = build_strategy({"strategy": "summary_buffer", "max_tokens": 30}, deps_for(store, summarizer=summarizer))
    messages = fill(store, session, 6)  # after_turn never ran: nothing summarised yet
    view = strat.view(session, messages, "q")
    assert view.recent == messages and view.summary is None
    strat.after_turn(session, messages)
    assert len(summarizer.calls) == 1
    view = strat.view(session, messages, "q")
    assert view.summary and len(view.recent) < len(messages)


def test_summary_has_no_verbatim_turns_after_folding(store):
    summarizer = CountingSummarizer()
    session = make_session(store)
    strat = build_strategy("summary", deps_for(store, summarizer=summarizer))
    messages = run_turns(store, session, strat, 5)
    assert len(summarizer.calls) == 5  # one fold per turn, each with that turn only
    assert all(len(new) == 2 for _, new in summarizer.calls)
    view = strat.view(session, messages, "q")
    assert view.recent == [] and "(4)" in view.summary


def test_concurrent_folds_of_one_session_summarise_once(store):
    """Two folders (two API processes in production) on one store: the lease lets one summarise;
    the other skips. A fold whose state changed under it (lease lost) is discarded by cas_state."""
    import threading

    started, release = threading.Event(), threading.Event()
    summarizer = CountingSummarizer()

    def slow(previous: str, messages: list[Message]) -> str:
        started.set()
        release.wait(10)
        return summarizer(previous, messages)

    session = make_session(store)
    messages = fill(store, session, 4)
    folders = [build_strategy("summary", deps_for(store, summarizer=slow)) for _ in range(2)]
    first = threading.Thread(target=folders[0].after_turn, args=(session, messages))
    first.start()
    assert started.wait(10)
    folders[1].after_turn(session, messages)  # the lease is held: skipped, not a second summary
    release.set()
    first.join(10)
    assert len(summarizer.calls) == 1 and store.get_state(session.id, "summary")["count"] == len(messages)

    stale = store.get_state(session.id, "summary")
    store.put_state(session.id, "summary", {**stale, "text": "someone else folded"})
    folders[1].running._save(session.id, messages, "late fold", len(messages), expected=stale)
    assert store.get_state(session.id, "summary")["text"] == "someone else folded"


@pytest.mark.parametrize("target", ["buffer", "window", "token_buffer", "summary", "summary_buffer"])
def test_switching_strategy_mid_session_loses_nothing(store, target):
    summarizer = CountingSummarizer()
    deps = deps_for(store, summarizer=summarizer)
    session = make_session(store, memory={"strategy": "window", "turns": 2})
    run_turns(store, session, build_strategy(session.memory, deps), 10)
    session = store.update_session(session.id, memory=validate_memory_config({"strategy": target}))
    strat = build_strategy(session.memory, deps)
    messages = store.list_messages(session.id)
    assert len(messages) == 20  # the transcript itself is never trimmed
    strat.after_turn(session, messages)  # derived state is built lazily from the transcript
    view = strat.view(session, messages, "q")
    seen = {m.id for m in view.recent}
    if view.summary:
        state = store.get_state(session.id, target)
        seen |= {m.id for m in messages[: state["count"]]}
    if target == "window":
        assert len(view.recent) == 16  # default 8 turns: the window is not stuck at the old 2
    elif target != "token_buffer":
        assert seen == {m.id for m in messages}
