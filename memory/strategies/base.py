"""What every memory strategy shares: the Protocol, its inputs (StrategyDeps) and output (MemoryView).

A strategy is a *view* over the transcript, never an editor of it. Conventions for all strategies:

- `view(session, messages, new_message)`: `messages` is the transcript *before* the new user turn.
  If the service already stored the new turn, the trailing user message equal to `new_message`
  is ignored (see `history_before`), so both call orders give the same view.
- `after_turn(session, messages)`: `messages` is the full transcript including the reply just
  stored. Slow work (summarising, indexing) happens here, off the reply's critical path.
- Derived state (summaries, index watermarks) lives in `store.put_state(session_id, key, ...)`,
  so a restart or a strategy switch recomputes only what is missing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from memory.types import Message, Session

if TYPE_CHECKING:  # only for type hints: keeps chromadb out of strategy imports
    from memory.store import Store
    from memory.vector_store import VectorMemory


class TokenCounter(Protocol):
    """Counts in the model's own tokens (`model.tokenizer.Tokenizer` fits)."""

    def count(self, text: str) -> int: ...

    def count_messages(self, messages: list[dict[str, str]]) -> int: ...


# (previous summary, newly overflowed messages) -> updated summary
Summarizer = Callable[[str, list[Message]], str]
# (current blocks {label: text}, the exchange just finished) -> proposed edits (dicts, validated later)
BlockEditor = Callable[[dict[str, str], list[Message]], list[dict[str, Any]]]


@dataclass
class StrategyDeps:
    store: Store
    counter: TokenCounter
    summarizer: Summarizer | None = None
    vector: VectorMemory | None = None
    block_editor: BlockEditor | None = None  # long_term: the model's proposed core-block edits


@dataclass
class MemoryView:
    summary: str | None = None
    retrieved: list[list[Message]] = field(default_factory=list)  # exchanges, most relevant first
    recent: list[Message] = field(default_factory=list)  # verbatim, oldest first
    warnings: list[str] = field(default_factory=list)
    blocks: dict[str, str] = field(default_factory=dict)  # core memory blocks, label -> text (pinned)
    facts: str | None = None  # the rendered facts section: current first, past ones labelled


@runtime_checkable
class MemoryStrategy(Protocol):
    name: str

    def view(self, session: Session, messages: list[Message], new_message: str) -> MemoryView: ...

    def after_turn(self, session: Session, messages: list[Message]) -> None: ...

    def rebuild(self, session: Session, messages: list[Message] | None = None) -> None: ...


# ---------------------------------------------------------------- helpers shared by strategies


def history_before(messages: list[Message], new_message: str) -> list[Message]:
    """The transcript without the new user turn, whether or not the service stored it already."""
    if messages and messages[-1].role == "user" and messages[-1].content == new_message:
        return messages[:-1]
    return messages


def group_exchanges(messages: Sequence[Message]) -> list[list[Message]]:
    """Split a transcript into exchanges: a user message and everything up to the next user message.

    Messages before the first user message (an assistant greeting) form their own group, so
    nothing is ever lost by grouping: `sum(groups, []) == messages`.
    """
    groups: list[list[Message]] = []
    for msg in messages:
        if msg.role == "user" or not groups:
            groups.append([msg])
        else:
            groups[-1].append(msg)
    return groups


def is_complete_exchange(group: list[Message]) -> bool:
    return group[0].role == "user" and any(m.role == "assistant" for m in group[1:])


def flatten(groups: Sequence[list[Message]]) -> list[Message]:
    return [m for g in groups for m in g]


def to_chat(messages: Sequence[Message]) -> list[dict[str, str]]:
    return [m.to_chat() for m in messages]


def last_exchanges(messages: list[Message], turns: int) -> list[Message]:
    """The last `turns` exchanges, flattened."""
    groups = group_exchanges(messages)
    return flatten(groups[-turns:]) if turns > 0 else []


def most_that_fit(n: int, fits: Callable[[int], bool]) -> int:
    """Largest `keep` in [0, n] with `fits(keep)`, where fits holds up to some point and then stops.

    Galloping from the small end (1, 2, 4, ... then bisect) costs O(log keep) calls whose inputs
    stay near the answer's size, so a long transcript is never rendered whole just to be cut.
    Returns -1 when even `fits(0)` is false.
    """
    if not fits(0):
        return -1
    good, step = 0, 1
    while good < n:
        probe = min(n, good + step)
        if not fits(probe):
            bad = probe
            break
        good, step = probe, step * 2
    else:
        return n
    while bad - good > 1:  # invariant: fits(good), not fits(bad)
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def fit_tail(messages: list[Message], counter: TokenCounter, max_tokens: int, *, whole_exchanges: bool) -> int:
    """Index `i` of the longest suffix `messages[i:]` whose `count_messages` is <= max_tokens.

    Cuts only at exchange starts when `whole_exchanges`, else at any message but never leaving an
    assistant message first (templates like Gemma's require user/assistant alternation).
    """
    if whole_exchanges:
        cuts = [0] + [i for i in range(1, len(messages)) if messages[i].role == "user"]
    else:
        cuts = list(range(len(messages)))
    cuts.reverse()  # cuts[j-1] keeps the last j candidate starts

    def fits(keep: int) -> bool:
        return keep == 0 or counter.count_messages(to_chat(messages[cuts[keep - 1] :])) <= max_tokens

    keep = most_that_fit(len(cuts), fits)
    start = cuts[keep - 1] if keep > 0 else len(messages)
    while start < len(messages) and messages[start].role != "user" and not whole_exchanges:
        start += 1
    return start


def parse_state_range(state: dict[str, Any] | None, messages: list[Message]) -> int:
    """How many leading messages a persisted state covers; 0 when absent or not matching the transcript.

    A state records `count` and `last_id`; both must agree with the transcript, else it is stale
    (e.g. a rewritten store) and the caller rebuilds it.
    """
    if not state:
        return 0
    count = state.get("count", 0)
    if not isinstance(count, int) or count <= 0 or count > len(messages):
        return 0
    if messages[count - 1].id != state.get("last_id"):
        return 0
    return count
