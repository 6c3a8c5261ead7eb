"""Offline memory maintenance behind `memento memory rebuild|reindex` (no server needed).

`lm` (a loaded model) may be passed in; otherwise the configured model is loaded.

The transcript is the source of truth; these recompute what strategies derive from it.
Run them while the server is stopped, or accept that a concurrent turn may redo a fold.
"""

from __future__ import annotations

from typing import Any

from service.settings import LOCAL_USER, Settings


def _open_store(settings: Settings) -> Any:
    from memory.store import open_store

    return open_store(settings.store_url)


def _load_model(settings: Settings) -> Any:
    from model import load_model

    return load_model(settings.model, device=settings.device, dtype=settings.dtype, data_dir=str(settings.data_dir))


def _deps(settings: Settings, store: Any, strategy: str, lm: Any) -> Any:
    from memory.strategies import StrategyDeps
    from memory.summarizer import ModelSummarizer
    from model import Engine
    from service.runtime import open_vector_memory

    summarizer = ModelSummarizer(Engine(lm), lm.tokenizer) if strategy in ("summary", "summary_buffer") else None
    vector = open_vector_memory(settings) if strategy == "vector" else None
    return StrategyDeps(store, lm.tokenizer, summarizer=summarizer, vector=vector)


def rebuild_session(settings: Settings, session_id: str, lm: Any = None) -> str:
    """Recompute the session's strategy state from its transcript; returns the strategy name."""
    from memory.strategies import build_strategy

    store = _open_store(settings)
    try:
        session = store.get_session(session_id)
        if session is None:
            raise LookupError(f"no session {session_id!r} in {settings.store_url}")
        name = session.memory.get("strategy", "")
        lm = lm or _load_model(settings)
        build_strategy(session.memory, _deps(settings, store, name, lm)).rebuild(session)
        return name
    finally:
        store.close()


def reindex_sessions(
    settings: Settings, session_id: str | None = None, owner: str = LOCAL_USER, lm: Any = None
) -> int:
    """Re-embed one session, or every session of `owner`, into vector memory; returns exchanges indexed."""
    from memory.strategies import build_strategy
    from memory.strategies.base import group_exchanges, is_complete_exchange

    store = _open_store(settings)
    try:
        if session_id is not None:
            session = store.get_session(session_id)
            if session is None:
                raise LookupError(f"no session {session_id!r} in {settings.store_url}")
            sessions = [session]
        else:
            sessions = store.list_sessions(owner)
        lm = lm or _load_model(settings)
        deps = _deps(settings, store, "vector", lm)
        count = 0
        for s in sessions:
            messages = store.list_messages(s.id)
            build_strategy({"strategy": "vector"}, deps).rebuild(s, messages)
            if s.memory.get("strategy") == "long_term":  # its dense list: the views collection too
                build_strategy(s.memory, deps).dense.rebuild(s, messages)
            count += sum(1 for g in group_exchanges(messages) if is_complete_exchange(g))
        return count
    finally:
        store.close()
