"""`vector`: the top-`k` past exchanges most relevant to the new message + the last `turns` exchanges.

Retrieval skips exchanges already in the recent window. `scope="session"` searches this session
(metadata filter); `scope="user"` searches all sessions of the session's owner (the owner's own
collection, so never another owner's).

Index watermark: state `vector:<embedding model>` = `{"count", "last_id"}` says
`messages[:count]` are indexed. `after_turn` indexes the new exchanges; `view` first indexes
any older exchanges still missing (after a strategy switch, or while Chroma was down) so
nothing is lost. When Chroma is unavailable, `view` returns the recent turns with a warning
and the watermark stays put, so those exchanges are indexed when it is back.
"""

from __future__ import annotations

import memory.vector_store as vs
from memory.strategies.base import (
    MemoryView,
    StrategyDeps,
    group_exchanges,
    history_before,
    is_complete_exchange,
    last_exchanges,
    parse_state_range,
)
from memory.types import Message, Session


class VectorStrategy:
    name = "vector"

    def __init__(self, deps: StrategyDeps, k: int, turns: int, scope: str, views: bool = False) -> None:
        self.deps = deps
        self.k = k
        self.turns = turns
        self.scope = scope
        self.views = views  # long_term's dense list: the views collection (memory/vector_store.py)
        self.kind = vs.VIEWS if views else vs.EXCHANGES

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        history = history_before(messages, new_message)
        recent = last_exchanges(history, self.turns)
        view = MemoryView(recent=recent)
        vector = self.deps.vector
        if vector is None:
            view.warnings.append("vector memory is not configured: using only the recent turns")
            return view
        try:
            self._index_upto(session, history, len(history) - len(recent))
            hits = vector.query(
                session.owner,
                new_message,
                self.k,
                session_id=session.id if self.scope == "session" else None,
                exclude_first_ids=[g[0].id for g in group_exchanges(recent)],
                kind=self.kind,
            )
        except vs.VectorUnavailable as e:
            view.warnings.append(
                f"vector memory unavailable ({e}): using only the last {self.turns} turns; "
                "new exchanges will be indexed when it is back"
            )
            return view
        view.retrieved = [h.exchange for h in self._live(session, hits)]
        return view

    def _live(self, session: Session, hits: list) -> list:
        """Drop hits of deleted sessions: their vectors may outlive them (Chroma down at delete time,
        or another process holding the index), and a deleted chat must never come back."""
        alive = {session.id: True}
        for hit in hits:
            if hit.session_id not in alive:
                alive[hit.session_id] = self.deps.store.get_session(hit.session_id, owner=session.owner) is not None
        return [h for h in hits if alive[h.session_id]]

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        if self.deps.vector is None:
            return
        try:
            self._index_upto(session, messages, len(messages))
        except vs.VectorUnavailable:
            pass  # the watermark did not move: the next view or after_turn retries

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        """Re-index this session from the transcript (`memento memory reindex`)."""
        if self.deps.vector is None:
            raise ValueError("vector memory is not configured: nothing to re-index")
        messages = self.deps.store.list_messages(session.id) if messages is None else messages
        self.deps.vector.reindex(session.owner, session.id, messages, self.kind)
        self._save_watermark(session, messages, _complete_prefix(messages, len(messages)))

    # ------------------------------------------------------------------ watermark

    @property
    def _state_key(self) -> str:
        assert self.deps.vector is not None
        name = f"vector:{self.deps.vector.embedder.name}"
        return f"{name}:views" if self.views else name

    def _index_upto(self, session: Session, messages: list[Message], upto: int) -> None:
        """Index the complete exchanges in `messages[watermark:upto]` and move the watermark."""
        assert self.deps.vector is not None
        done = parse_state_range(self.deps.store.get_state(session.id, self._state_key), messages)
        upto = _complete_prefix(messages, upto)
        if upto <= done:
            return
        first_turn = len(group_exchanges(messages[:done]))
        items = vs.indexable_exchanges(messages[done:upto], first_turn=first_turn)
        self.deps.vector.index_exchanges(session.owner, session.id, items, self.kind)
        self._save_watermark(session, messages, upto)

    def _save_watermark(self, session: Session, messages: list[Message], upto: int) -> None:
        state = {"count": upto, "last_id": messages[upto - 1].id if upto else None}
        self.deps.store.put_state(session.id, self._state_key, state)


def _complete_prefix(messages: list[Message], upto: int) -> int:
    """`upto`, or the start of the last exchange before it if that one still awaits its reply.

    Earlier incomplete exchanges (a reply that failed) are passed over, so they never block the index.
    """
    groups = group_exchanges(messages[:upto])
    if groups and groups[-1][0].role == "user" and not is_complete_exchange(groups[-1]):
        return upto - len(groups[-1])
    return upto
