"""Facts with time: what the user said about themselves, which of it is true now, and what used to be.

    facts = FactBook(store)
    facts.update(session, messages)           # after the turn: extract from new user messages
    facts.list_facts(session.owner)              # every fact of the owner (user scope), newest first
    facts.correct(owner, fact_id, "I live in Daejeon.")   # a user correction supersedes the fact
    facts.delete(owner, fact_id)                # an explicit delete removes it

A fact is `{id, subject, text, lang, session_id, message_id, valid_from, valid_to, superseded_by,
origin}`. `text` is the user's own sentence, so a fact is kept in the language it was said in
(never translated). A new fact with the same `subject` (e.g. "home", "dog name", "강아지 이름")
supersedes the current one: the old one gets `valid_to` (the new message's time) and
`superseded_by`, and is kept as past, never deleted silently. Across sessions of one owner the
newest `valid_from` per subject is current (computed on read, so sessions never write each other).

Extraction is by patterns over the sentence (English and Korean first-person statements:
"my X is Y", "I live in / moved to", "I work at", "X에 살아", "X로 이사했어", "내 X는 Y야"): cheap,
deterministic and off the reply's path. What the patterns do not catch is still reachable by
hybrid retrieval over the transcript.

State: per session, key `facts` = `{"count", "last_id", "facts": [...]}` (`count`/`last_id` are
the extraction watermark, as for every derived state).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from memory.types import Message, Session

STATE_KEY = "facts"
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_SENTENCES = re.compile(r"(?<=[.!?。])\s+|\n+")
_KO_END = r"(?:이야|야|예요|이에요|입니다|이다|다|요)?[.!?~]*$"

# (compiled pattern, subject template): `{s}` is the captured subject words
_EN: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bmy name is\b|\bcall me\b", re.I), "name"),
    (re.compile(r"\bi(?:'m| am) (?:\d+|[a-z]+-?[a-z]*) years? old\b", re.I), "age"),
    (re.compile(r"\b(?:i|we) (?:now )?(?:live|am living|'m living|are living|'re living) in\b", re.I), "home"),
    (re.compile(r"\b(?:i|we)(?:'ve| have)? (?:just |recently )?(?:moved|relocated) (?:to|into)\b", re.I), "home"),
    (re.compile(r"\bi (?:now )?work (?:at|for|as)\b|\bi(?:'ve| have)? (?:started|got) a (?:new )?job\b", re.I), "work"),
    (re.compile(r"\bi was born in\b", re.I), "birthplace"),
    (re.compile(r"\bmy (?P<s>[a-z]+(?: [a-z]+)?) (?:now )?(?:lives|moved|is living) (?:in|to)\b", re.I), "{s} home"),
    (re.compile(r"\bmy (?P<s>[a-z]+(?: [a-z]+)?)(?:'s name)? (?:is|are|was) (?!\w+ing\b)(?:called |named |now )?", re.I),
     "{s}"),
    (re.compile(r"\bmy (?P<s>[a-z]+) (?:is |are )?called\b", re.I), "{s}"),
]
_KO: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"(?:^|\s)(?:내|제) 이름은 "), "이름"),
    (re.compile(r"\S+(?:에|에서) (?:살아|살고 있|살아요|삽니다|살지)"), "{topic} home"),
    (re.compile(r"\S+(?:으로|로) 이사(?:했|왔|갔|를 했|를 왔|를 갔)"), "{topic} home"),
    (re.compile(r"\S+에서 일(?:해|하고|합니다|했)|\S+에 다녀|\S+에 다니"), "work"),
    (re.compile(r"(?:^|\s)(?:내|제|우리|나의) (?P<s>\S+?(?: \S+?)?)(?:은|는|이|가) (?:\S+ ){0,3}\S+" + _KO_END), "{s}"),
]
_PARTICLE = re.compile(r"(?:은|는|이|가|의)$")
_KO_TOPIC = re.compile(r"(\S+?)(?:은|는|이|가) ")
# topics that mean the speaker ("I", "we", "my family") or a time ("these days"), not someone else
_KO_SELF = frozenset("나 저 내 제 우리 가족 우리가족 저희 요즘 지금 이제 올해 작년 최근 얼마 전에".split())


@dataclass
class Fact:
    id: str
    subject: str
    text: str  # the sentence as the user said it
    lang: str  # "ko" or "en" (any non-Korean text)
    session_id: str
    message_id: str  # valid_from: the message that said it
    valid_from: str  # its time (ISO-8601)
    valid_to: str | None = None  # when it stopped being true (the superseding message's time)
    superseded_by: str | None = None  # the fact id that replaced it
    origin: str = "extracted"  # or "user" (a correction through /v1/memories)

    @property
    def current(self) -> bool:
        return self.valid_to is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"current": self.current}


def covered(state: dict[str, Any], messages: list[Message]) -> int:
    """How many leading messages the watermark covers; 0 if it no longer matches the transcript
    (the same rule as strategies' `parse_state_range`; not imported: strategies import this module)."""
    count = state.get("count", 0)
    if not isinstance(count, int) or not 0 < count <= len(messages):
        return 0
    return count if messages[count - 1].id == state.get("last_id") else 0


def language(text: str) -> str:
    return "ko" if _HANGUL.search(text) else "en"


def subject_of(sentence: str) -> str | None:
    """The fact's subject key when `sentence` is a first-person statement we recognise."""
    if sentence.rstrip().endswith("?"):
        return None  # a question states nothing
    for pattern, template in _KO if language(sentence) == "ko" else _EN:
        m = pattern.search(sentence)
        if m:
            words = (m.groupdict().get("s") or "").strip().lower()
            words = _PARTICLE.sub("", words)
            return template.format(s=words, topic=_ko_topic(sentence[: m.start()])).strip() or None
    return None


def _ko_topic(before: str) -> str:
    """"우리 언니는 리스본에 살아" -> "언니" (her home, not mine); "" when the speaker is the topic."""
    topics = [t for t in _KO_TOPIC.findall(before + " ") if t not in _KO_SELF]
    return topics[-1] if topics else ""


def extract(message: Message) -> list[Fact]:
    """Facts stated in one user message (one per recognised sentence; the last per subject wins)."""
    if message.role != "user":
        return []
    found: dict[str, Fact] = {}
    for sentence in (s.strip() for s in _SENTENCES.split(message.content)):
        subject = subject_of(sentence) if 0 < len(sentence) <= 300 else None
        if subject:
            found[subject] = Fact(
                id=f"fact_{uuid.uuid4().hex[:16]}", subject=subject, text=sentence, lang=language(sentence),
                session_id=message.session_id, message_id=message.id, valid_from=message.created_at,
            )
    return list(found.values())


def supersede(facts: list[Fact], new: Fact) -> None:
    """Add `new`; the current fact(s) of the same subject become past (kept, with valid_to)."""
    for old in facts:
        if old.subject == new.subject and old.current:
            old.valid_to, old.superseded_by = new.valid_from, new.id
    facts.append(new)


class FactNotFound(KeyError):
    pass


class FactBook:
    """Facts per session in the store's state; an owner's facts are the union of their sessions'."""

    def __init__(self, store: Any) -> None:
        self.store = store

    def _load(self, session_id: str) -> dict[str, Any]:
        return self.store.get_state(session_id, STATE_KEY) or {"count": 0, "last_id": None, "facts": []}

    def session_facts(self, session_id: str) -> list[Fact]:
        return [Fact(**f) for f in self._load(session_id).get("facts", [])]

    def _save(self, session_id: str, state: dict[str, Any], facts: list[Fact]) -> None:
        state["facts"] = [asdict(f) for f in facts]
        self.store.put_state(session_id, STATE_KEY, state)

    def update(self, session: Session, messages: list[Message]) -> int:
        """Extract from the user messages past the watermark; returns how many facts were added."""
        state = self._load(session.id)
        done = covered(state, messages)
        if done == 0 and state.get("count"):  # the transcript was rewritten: start over
            state = {"facts": [f for f in state.get("facts", []) if f.get("origin") == "user"]}
            done = 0
        facts = [Fact(**f) for f in state.get("facts", [])]
        added = 0
        for msg in messages[done:]:
            for fact in extract(msg):
                supersede(facts, fact)
                added += 1
        if messages and (added or done != len(messages)):
            state.update(count=len(messages), last_id=messages[-1].id)
            self._save(session.id, state, facts)
        return added

    def reset(self, session_id: str) -> None:
        """Forget extracted facts (the next update re-reads the transcript); user corrections stay."""
        facts = [f for f in self.session_facts(session_id) if f.origin == "user"]
        self._save(session_id, {"count": 0, "last_id": None}, facts)

    def list_facts(self, owner: str, session_id: str | None = None) -> list[Fact]:
        """The owner's facts (one session's when given), current state computed across sessions."""
        if session_id is not None:
            facts = self.session_facts(session_id)
        else:
            facts = [f for s in self.store.list_sessions(owner) for f in self.session_facts(s.id)]
        return resolve(facts)

    def _find(self, owner: str, fact_id: str) -> tuple[str, list[Fact], Fact]:
        for s in self.store.list_sessions(owner):
            facts = self.session_facts(s.id)
            for f in facts:
                if f.id == fact_id:
                    return s.id, facts, f
        raise FactNotFound(fact_id)

    def correct(self, owner: str, fact_id: str, text: str, at: str) -> Fact:
        """The user's corrected wording replaces the fact from `at` on (the old one is kept as past)."""
        session_id, facts, old = self._find(owner, fact_id)
        new = Fact(
            id=f"fact_{uuid.uuid4().hex[:16]}", subject=old.subject, text=text.strip(), lang=language(text),
            session_id=session_id, message_id=old.message_id, valid_from=at, origin="user",
        )
        for f in facts:  # the corrected one and anything still current for the subject
            if f.subject == old.subject and (f.current or f.id == old.id):
                f.valid_to, f.superseded_by = f.valid_to or at, new.id
        facts.append(new)
        self._save(session_id, self._load(session_id), facts)
        return new

    def delete(self, owner: str, fact_id: str) -> Fact:
        """Remove a fact at the user's request (the only way a fact is ever removed)."""
        session_id, facts, fact = self._find(owner, fact_id)
        self._save(session_id, self._load(session_id), [f for f in facts if f.id != fact_id])
        return fact


def resolve(facts: list[Fact]) -> list[Fact]:
    """Newest first; per subject only the newest still-open fact is current (across sessions)."""
    facts = sorted(facts, key=lambda f: f.valid_from, reverse=True)
    seen: set[str] = set()
    out = []
    for f in facts:
        if f.current and f.subject in seen:  # an older session's fact, overtaken by a newer one
            f = Fact(**(asdict(f) | {"valid_to": _newest_from(facts, f.subject)}))
        if f.current:
            seen.add(f.subject)
        out.append(f)
    return out


def _newest_from(facts: list[Fact], subject: str) -> str:
    return max(f.valid_from for f in facts if f.subject == subject)


def render(facts: list[Fact], query_terms: set[str] | None, max_facts: int,
           pinned: set[str] | frozenset[str] = frozenset()) -> str | None:
    """The facts section of the memory block: current facts (relevant first), then the past ones of
    the same subjects, labelled as no longer true. Current facts already `pinned` (a core-block line)
    are not repeated; their past versions still are, so the model sees what changed."""
    from memory.hybrid import terms

    current = [f for f in facts if f.current]
    if not current or max_facts <= 0:
        return None
    q = query_terms or set()
    current.sort(key=lambda f: -len(q & set(terms(f.text + " " + f.subject))))  # stable: newest first among ties
    shown = current[:max_facts]
    subjects = {f.subject for f in shown}
    past = [f for f in facts if not f.current and f.subject in subjects][: max_facts]
    shown = [f for f in shown if f.text not in pinned]
    if not shown and not past:
        return None
    lines = ["[Memory: what the user said that is true now, most relevant first]"] if shown else []
    lines += [f"- {f.text} (since {f.valid_from[:10]})" for f in shown]
    if past:
        lines.append("[Memory: no longer true (superseded by the lines above); the user used to say]")
        lines += [f"- PAST, until {f.valid_to[:10] if f.valid_to else '?'}: {f.text}" for f in past]
    return "\n".join(lines)
