"""`long_term`: core blocks + current facts + hybrid retrieval + the last `turns` exchanges.

What the model sees, in the memory block: the core memory blocks (`user`, `relationship`, pinned),
the facts the user stated (current ones first, relevant to the new message first; superseded ones
labelled as past), then the `k` most relevant earlier exchanges by hybrid retrieval (dense hits from
vector memory's `views` collection, where the user's message and each of its sentences are
embedded as well as the exchange, + BM25 over Kiwi morphemes / words, fused by reciprocal rank,
newer first among equals, near-copies collapsed). A retrieved exchange whose statement was
superseded is labelled as past.

`after_turn` (off the reply's path): index the new exchange for dense retrieval, extract facts
(superseding old ones), and update the core blocks from the new facts and from the model's
proposed edits (grammar-constrained JSON, applied only when they validate).

Without vector memory (not configured or down) retrieval is BM25 + recency only, with a warning.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from memory.blocks import CoreMemory, fact_edits
from memory.facts import FactBook, render
from memory.hybrid import DEFAULT_WEIGHTS, Candidate, hybrid_rank, terms
from memory.strategies.base import (
    MemoryView,
    StrategyDeps,
    group_exchanges,
    history_before,
    is_complete_exchange,
    last_exchanges,
)
from memory.strategies.vector import VectorStrategy
from memory.types import Message, Session

PAST_LABEL = "[past: the user said this before it changed] "
# exchanges asked of vector memory: deeper than k because near-copies are collapsed out of the list
# (paraphrase track: 20 and 64 gave the same recall; each doubling costs ~5 ms of Chroma query on this CPU)
DENSE_DEPTH, DENSE_DEPTH_PER_K, DENSE_DEPTH_MAX = 32, 8, 256


class LongTermStrategy:
    name = "long_term"

    def __init__(
        self, deps: StrategyDeps, k: int, turns: int, scope: str, max_facts: int,
        weights: dict[str, float] | None = None,
    ) -> None:
        self.deps = deps
        self.k, self.turns, self.scope, self.max_facts = k, turns, scope, max_facts
        self.weights = dict(weights or DEFAULT_WEIGHTS)  # memory.bench turns parts off to measure them
        self.near_duplicates = True  # and this one (near-copies collapsed in each ranking)
        self.fact_proposer = True  # and the facts' block edits (to see what the model's editor does alone)
        self.facts = FactBook(deps.store)
        self.core = CoreMemory(deps.store, deps.counter)
        # dense candidates: a much deeper list than k, fused with BM25 below; deep because a line the
        # user says often has many near-copies above the one statement that answers (collapsed there)
        depth = min(max(DENSE_DEPTH_PER_K * k, DENSE_DEPTH), DENSE_DEPTH_MAX)
        self.dense = VectorStrategy(deps, depth, turns, scope, views=True)

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView:
        history = history_before(messages, new_message)
        recent = last_exchanges(history, self.turns)
        facts = self.facts.list_facts(session.owner, session.id if self.scope == "session" else None)
        blocks = self.core.texts(session.id)
        pinned = {line for text in blocks.values() for line in text.splitlines()}  # not shown twice
        view = MemoryView(
            recent=recent, blocks=blocks, facts=render(facts, set(terms(new_message)), self.max_facts, pinned)
        )
        dense_view = self.dense.view(session, messages, new_message) if self.weights.get("dense", 0) > 0 else None
        dense = dense_view.retrieved if dense_view is not None else []
        if dense_view is not None:
            view.warnings += dense_view.warnings
        pool = self._candidates(session, history[: len(history) - len(recent)], dense)
        keys = hybrid_rank(new_message, list(pool.values()), [ex[0].id for ex in dense], self.k, self.weights,
                           near_duplicates=self.near_duplicates)
        past_ids = {f.message_id for f in facts if not f.current}
        view.retrieved = [_label_past(pool[key].payload, past_ids) for key in keys]
        return view

    def after_turn(self, session: Session, messages: list[Message]) -> None:
        self.dense.after_turn(session, messages)
        before = {f.id for f in self.facts.session_facts(session.id)}
        self.facts.update(session, messages)
        all_facts = self.facts.session_facts(session.id)
        added = [f for f in all_facts if f.id not in before and f.origin == "extracted"]
        last_id = messages[-1].id if messages else None
        if added and self.fact_proposer:
            edits = fact_edits(self.core.texts(session.id), added, all_facts)
            self.core.apply(session.id, edits, message_id=added[-1].message_id, source="facts")
        self._model_edits(session, messages, last_id)

    def _model_edits(self, session: Session, messages: list[Message], last_id: str | None) -> None:
        """The model's proposals for the newest complete exchange (once per exchange: a watermark)."""
        editor = self.deps.block_editor
        groups = group_exchanges(messages)
        if editor is None or not groups or not is_complete_exchange(groups[-1]) or last_id is None:
            return
        state = self.deps.store.get_state(session.id, "blocks") or {}
        if state.get("last_id") == last_id:
            return
        proposed = editor(self.core.texts(session.id), groups[-1])
        user_msg = groups[-1][0].id
        said = "\n".join(m.content for m in groups[-1] if m.role == "user")  # the user's words, not the reply's
        self.core.apply(session.id, proposed, message_id=user_msg, source="model", watermark=(len(messages), last_id),
                        evidence=said)

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None:
        """Facts from the transcript again (user corrections are kept); vectors re-indexed."""
        messages = self.deps.store.list_messages(session.id) if messages is None else messages
        self.facts.reset(session.id)
        self.facts.update(session, messages)
        if self.deps.vector is not None:
            self.dense.rebuild(session, messages)

    # ------------------------------------------------------------------ candidates

    def _candidates(self, session: Session, older: list[Message], dense: list[list[Message]]) -> dict[str, Any]:
        """Every complete exchange retrieval may return: this session's older ones (user scope: also
        the owner's other sessions), and the dense hits (already filtered by owner and scope)."""
        exchanges = [g for g in group_exchanges(older) if is_complete_exchange(g)]
        if self.scope == "user":
            for other in self.deps.store.list_sessions(session.owner):
                if other.id != session.id:
                    msgs = self.deps.store.list_messages(other.id)
                    exchanges += [g for g in group_exchanges(msgs) if is_complete_exchange(g)]
        exchanges += dense
        pool: dict[str, Candidate] = {}
        for i, ex in enumerate(exchanges):  # ISO-8601 UTC times sort as strings; i breaks ties in a session
            if ex[0].id in pool:
                continue
            text = "\n".join(m.content for m in ex)
            pool[ex[0].id] = Candidate(ex[0].id, text, ex[0].content, (ex[0].created_at, i), ex)
        return pool


def _label_past(exchange: list[Message], past_ids: set[str]) -> list[Message]:
    return [replace(m, content=PAST_LABEL + m.content) if m.id in past_ids else m for m in exchange]
