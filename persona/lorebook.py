"""Lorebooks (world info): entries whose text enters the prompt when their keys appear in the chat.

    book = Lorebook.model_validate({...})                 # a persona file's `lorebook:` field
    book = book_from_card(card["data"]["character_book"])  # V2 / V3 card (`@@depth`, `@@role` decorators)
    book = parse_world_info(text)                          # a SillyTavern world-info .json file
    hits = activate(book, recent=["...", "..."], new_message="...")   # [Activated], prompt order

Fields (Character Card V2 `character_book`, names kept): `keys`, `secondary_keys` with `selective`
(and SillyTavern's `selective_logic`: and_any | and_all | not_any | not_all), `case_sensitive`,
`enabled`, `constant`, `insertion_order` (lower = earlier in the prompt), `priority` (under the
token budget, lower priority is dropped first), `position` (`before_char` / `after_char` the
character definition, or `at_depth` with `depth` N messages from the end and a `role`); the
book's `scan_depth` (how many recent messages are searched, plus the new one), `token_budget`
(lore tokens at most, counted in the model's tokens by memory/context.py) and
`recursive_scanning` (an activated entry's content can activate others).

Matching a key against the chat (`key_matches`):
- `/pattern/flags` keys (or `use_regex`) are regular expressions.
- A key written in Hangul matches as a substring: Korean attaches particles and endings to the
  word (동백이, 동백을, 동백꽃 a compound), so a whole-word rule would miss nearly every mention.
  One-syllable Hangul keys are the exception: as substrings they fire everywhere (배 in 배고파,
  배우), so they must be a whole noun morpheme of the text (Kiwi), as 배 is in 배가 아파.
- Other keys match as whole words (so `cat` does not fire on "concatenate"), unless the entry sets
  `match_whole_words: false`; case-insensitive unless `case_sensitive`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from persona.errors import PersonaError

Position = Literal["before_char", "after_char", "at_depth"]
Role = Literal["system", "user", "assistant"]
SelectiveLogic = Literal["and_any", "and_all", "not_any", "not_all"]
MAX_RECURSION = 5  # passes of recursive scanning (SillyTavern also bounds it)
MAX_ENTRIES = 1000
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_REGEX_KEY = re.compile(r"^/(.+)/([imsux]*)$", re.S)


class LoreEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[str] = Field(default_factory=list)
    content: str = Field(max_length=32_000)
    name: str = Field("", max_length=200, description="shown in the context inspector")
    comment: str = ""
    id: int | str | None = None
    enabled: bool = True
    constant: bool = False
    selective: bool = False
    secondary_keys: list[str] = Field(default_factory=list)
    selective_logic: SelectiveLogic = "and_any"
    case_sensitive: bool = False
    match_whole_words: bool | None = None  # None: the rule in the module doc
    use_regex: bool = False
    insertion_order: int = 100
    priority: int = 10
    position: Position = "before_char"
    depth: int = Field(4, ge=0, le=10_000)
    role: Role = "system"
    exclude_recursion: bool = False  # not activated by another entry's content
    prevent_recursion: bool = False  # its content activates nothing
    extensions: dict[str, Any] = Field(default_factory=dict)

    @field_validator("keys", "secondary_keys", mode="before")
    @classmethod
    def _keys(cls, v: Any) -> Any:
        if isinstance(v, str):  # a comma-separated string, as some editors write them
            return [k.strip() for k in v.split(",") if k.strip()]
        return [k for k in v if isinstance(k, str) and k.strip()] if isinstance(v, list) else v

    @property
    def label(self) -> str:
        return self.name or self.comment or (self.keys[0] if self.keys else f"entry {self.id}")


class Lorebook(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    description: str = ""
    scan_depth: int = Field(2, ge=0, le=1000, description="recent messages searched, plus the new one")
    token_budget: int = Field(512, ge=0, le=1_000_000, description="lore tokens at most")
    recursive_scanning: bool = False
    entries: list[LoreEntry] = Field(default_factory=list, max_length=MAX_ENTRIES)
    extensions: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Activated:
    """An entry chosen for this turn, ready for memory/context.py (macros already rendered)."""

    name: str
    content: str
    position: str
    depth: int
    role: str
    priority: int
    insertion_order: int


# ---------------------------------------------------------------- matching


@lru_cache(maxsize=4096)
def _compiled(key: str, case_sensitive: bool, whole_words: bool | None, use_regex: bool) -> re.Pattern[str] | None:
    flags = 0 if case_sensitive else re.IGNORECASE
    m = _REGEX_KEY.match(key)
    if m or use_regex:
        pattern, extra = (m.group(1), m.group(2)) if m else (key, "")
        for ch in extra:
            flags |= {"i": re.I, "m": re.M, "s": re.S, "u": 0, "x": re.X}[ch]
        try:
            return re.compile(pattern, flags)
        except re.error:
            return None  # a broken pattern matches nothing (validated at load, see check_book)
    hangul = bool(_HANGUL.search(key))
    if whole_words is None:
        whole_words = not hangul
    if whole_words:
        return re.compile(rf"(?<!\w){re.escape(key)}(?!\w)", flags)
    return re.compile(re.escape(key), flags)


def _one_syllable_hangul(key: str) -> bool:
    return len(key) == 1 and bool(_HANGUL.match(key))


def _noun_morphemes(text: str) -> set[str]:
    from persona.korean import get_kiwi

    return {t.form for t in get_kiwi().tokenize(text) if t.tag.startswith("N")}


def key_matches(key: str, text: str, entry: LoreEntry, nouns: dict[str, set[str]] | None = None) -> bool:
    """Does `key` occur in `text` under the entry's rules (module doc)?"""
    key = key.strip()
    if not key:
        return False
    if _one_syllable_hangul(key) and not entry.use_regex and entry.match_whole_words is not False:
        cache = nouns if nouns is not None else {}
        if text not in cache:
            cache[text] = _noun_morphemes(text)
        return key in cache[text]
    pattern = _compiled(key, entry.case_sensitive, entry.match_whole_words, entry.use_regex)
    return bool(pattern and pattern.search(text))


def entry_triggered(entry: LoreEntry, text: str, nouns: dict[str, set[str]] | None = None) -> bool:
    if not entry.enabled:
        return False
    if entry.constant:
        return True
    if not any(key_matches(k, text, entry, nouns) for k in entry.keys):
        return False
    if not (entry.selective and entry.secondary_keys):
        return True
    hits = [key_matches(k, text, entry, nouns) for k in entry.secondary_keys]
    return {
        "and_any": any(hits),
        "and_all": all(hits),
        "not_any": not any(hits),
        "not_all": not all(hits),
    }[entry.selective_logic]


def activate(
    book: Lorebook | None,
    recent: list[str],
    new_message: str,
    *,
    char: str = "",
    user: str = "",
) -> list[Activated]:
    """Entries activated by the last `scan_depth` messages of `recent` (oldest first) and the new
    message; with `recursive_scanning`, also by activated entries' content. Prompt order:
    `insertion_order`, then the book's order. The token budget is applied by the context manager."""
    from persona.prompt import render_macros

    if book is None or not book.entries:
        return []
    window = recent[-book.scan_depth :] if book.scan_depth else []
    text = "\n".join([*window, new_message])
    nouns: dict[str, set[str]] = {}
    chosen: dict[int, LoreEntry] = {}
    scan = text
    for _ in range(MAX_RECURSION if book.recursive_scanning else 1):
        found = {
            i: e
            for i, e in enumerate(book.entries)
            if i not in chosen and (scan is text or not e.exclude_recursion) and entry_triggered(e, scan, nouns)
        }
        if not found:
            break
        chosen.update(found)
        scan = "\n".join(e.content for e in found.values() if not e.prevent_recursion)
        if not scan:
            break
    order = sorted(chosen, key=lambda i: (chosen[i].insertion_order, i))
    return [
        Activated(
            name=chosen[i].label,
            content=render_macros(chosen[i].content.strip(), char, user),
            position=chosen[i].position,
            depth=chosen[i].depth,
            role=chosen[i].role,
            priority=chosen[i].priority,
            insertion_order=chosen[i].insertion_order,
        )
        for i in order
        if chosen[i].content.strip()
    ]


def check_book(book: Lorebook, field: str = "lorebook") -> None:
    """Refuse regex keys that do not compile, naming the entry and key."""
    for i, e in enumerate(book.entries):
        for j, key in enumerate([*e.keys, *e.secondary_keys]):
            if (_REGEX_KEY.match(key) or e.use_regex) and _compiled(key, e.case_sensitive, None, e.use_regex) is None:
                raise ValueError(f"at {field}.entries.{i}.keys.{j}: {key!r} is not a valid regular expression")


# ---------------------------------------------------------------- cards and world-info files

_ST_POSITIONS = {0: "before_char", 1: "after_char", 4: "at_depth"}  # 2/3 author's note, 5/6 examples
_ST_ROLES = {0: "system", 1: "user", 2: "assistant"}
_ST_LOGIC = {0: "and_any", 1: "not_all", 2: "not_any", 3: "and_all"}
_ST_FIELDS = ("position", "depth", "role", "selectiveLogic", "match_whole_words", "exclude_recursion", "prevent_recursion")
_DECORATOR = re.compile(r"^@@(\w+)(?:[ \t]+(.*))?$")


def _decorated(content: str, entry: dict[str, Any]) -> str:
    """V3 decorators: leading `@@name value` lines set fields (`@@depth 3`, `@@role user`,
    `@@activate`, `@@dont_activate`, `@@position after_desc`); returns the content without them."""
    lines = content.split("\n")
    while lines and (m := _DECORATOR.match(lines[0].strip())):
        name, value = m.group(1), (m.group(2) or "").strip()
        if name == "depth" and value.isdigit():
            entry["position"], entry["depth"] = "at_depth", int(value)
        elif name == "role" and value in ("system", "user", "assistant"):
            entry["role"] = value
        elif name == "activate":
            entry["constant"] = True
        elif name == "dont_activate":
            entry["enabled"] = False
        elif name == "position" and value in ("before_desc", "after_desc"):
            entry["position"] = "before_char" if value == "before_desc" else "after_char"
        lines.pop(0)  # unknown decorators are dropped: they are instructions, never prompt text
    return "\n".join(lines)


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _int(v: Any, default: int) -> int:
    """An integer field from a card written by any tool: numbers and digit strings, else `default`."""
    if isinstance(v, bool):
        return default
    if isinstance(v, (int, float)) and abs(v) < 2**53:
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return default


def _entry_from_card(raw: dict[str, Any]) -> dict[str, Any]:
    ext = _dict(raw.get("extensions"))
    entry: dict[str, Any] = {
        "keys": raw.get("keys") or [],
        "secondary_keys": raw.get("secondary_keys") or [],
        "name": str(raw.get("name") or "")[:200],
        "comment": str(raw.get("comment") or ""),
        "id": raw.get("id"),
        "enabled": raw.get("enabled", True) is not False,
        "constant": bool(raw.get("constant")),
        "selective": bool(raw.get("selective")),
        "case_sensitive": bool(raw.get("case_sensitive")),
        "use_regex": bool(raw.get("use_regex")),
        "insertion_order": _int(raw.get("insertion_order"), 0),
        "priority": _int(raw.get("priority"), 10),
        "position": "after_char" if raw.get("position") == "after_char" else "before_char",
        "extensions": ext,
    }
    # SillyTavern keeps its richer fields in the entry's extensions
    # (unhashable junk such as a list must not reach the dict lookups: _int turns it into -1)
    if _int(ext.get("position"), -1) in _ST_POSITIONS:
        entry["position"] = _ST_POSITIONS[_int(ext.get("position"), -1)]
    if "depth" in ext:
        entry["depth"] = min(max(_int(ext.get("depth"), 4), 0), 10_000)
    if _int(ext.get("role"), -1) in _ST_ROLES:
        entry["role"] = _ST_ROLES[_int(ext.get("role"), -1)]
    if _int(ext.get("selectiveLogic"), -1) in _ST_LOGIC:
        entry["selective_logic"] = _ST_LOGIC[_int(ext.get("selectiveLogic"), -1)]
    if isinstance(ext.get("match_whole_words"), bool):
        entry["match_whole_words"] = ext["match_whole_words"]
    entry["exclude_recursion"] = bool(ext.get("exclude_recursion"))
    entry["prevent_recursion"] = bool(ext.get("prevent_recursion"))
    content = raw.get("content", "")
    entry["content"] = _decorated(content, entry) if isinstance(content, str) else content  # else: 422 names it
    # what became a field is not kept twice (book_to_card writes it back)
    entry["extensions"] = {k: v for k, v in ext.items() if k not in _ST_FIELDS}
    return entry


def book_from_card(raw: Any, source: str = "<card>") -> Lorebook | None:
    """A card's `character_book` (V2 or V3) as a Lorebook; None when the card has none."""
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("entries", []), list):
        raise PersonaError("must be an object with a list of entries", file=source, field="data.character_book")
    data: dict[str, Any] = {
        "name": str(raw.get("name") or ""),
        "description": str(raw.get("description") or ""),
        "recursive_scanning": bool(raw.get("recursive_scanning")),
        "extensions": raw.get("extensions") if isinstance(raw.get("extensions"), dict) else {},
        "entries": [],
    }
    for key in ("scan_depth", "token_budget"):
        if isinstance(raw.get(key), int):
            data[key] = raw[key]
    for i, e in enumerate(raw.get("entries") or []):
        if not isinstance(e, dict):
            raise PersonaError("must be an object", file=source, field=f"data.character_book.entries.{i}")
        data["entries"].append(_entry_from_card(e))
    return _validated(data, source, "data.character_book")


def _entry_from_st(raw: dict[str, Any]) -> dict[str, Any]:
    """A SillyTavern world-info entry (`key`, `keysecondary`, `order`, `disable`, ...) in card form."""
    ext = {
        "position": raw.get("position", 0),
        "depth": raw.get("depth", 4),
        "role": raw.get("role", 0),
        "selectiveLogic": raw.get("selectiveLogic", 0),
        "exclude_recursion": raw.get("excludeRecursion", False),
        "prevent_recursion": raw.get("preventRecursion", False),
    }
    if isinstance(raw.get("matchWholeWords"), bool):
        ext["match_whole_words"] = raw["matchWholeWords"]
    return {
        "keys": raw.get("key") or [],
        "secondary_keys": raw.get("keysecondary") or [],
        "comment": raw.get("comment") or "",
        "id": raw.get("uid"),
        "content": raw.get("content") or "",
        "enabled": not raw.get("disable", False),
        "constant": bool(raw.get("constant")),
        "selective": bool(raw.get("selective", True)),
        "case_sensitive": bool(raw.get("caseSensitive")),
        "insertion_order": raw.get("order", 100),
        "priority": raw.get("priority", 10),
        "extensions": ext,
    }


def parse_world_info(text: str | bytes, source: str = "<world info>") -> Lorebook:
    """A standalone world-info file: SillyTavern's (`entries` keyed by uid) or a V2 `character_book`."""
    try:
        raw = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PersonaError(f"world info is not valid JSON: {e}", file=source) from None
    if isinstance(raw, dict) and raw.get("spec") in ("chara_card_v2", "chara_card_v3"):
        raw = (raw.get("data") or {}).get("character_book")  # a whole card: take its book
    if not isinstance(raw, dict) or "entries" not in raw:
        raise PersonaError("world info must be an object with 'entries'", file=source, field="entries")
    entries = raw["entries"]
    if isinstance(entries, dict):  # SillyTavern: {"0": {...}, "1": {...}}
        converted = [_entry_from_st(e) for e in entries.values() if isinstance(e, dict)]
        book = {"name": raw.get("name") or "", "entries": converted}
        for key, st_key in (("scan_depth", "scan_depth"), ("token_budget", "token_budget")):
            if isinstance(raw.get(st_key), int):
                book[key] = raw[st_key]
        book["recursive_scanning"] = bool(raw.get("recursive_scanning"))
        return book_from_card(book, source) or Lorebook.model_validate({})
    return book_from_card(raw, source) or Lorebook.model_validate({})


def _validated(data: dict[str, Any], source: str, field: str) -> Lorebook:
    try:
        book = Lorebook.model_validate(data)
        check_book(book, field)
        return book
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PersonaError(err["msg"], file=source, field=f"{field}.{where}") from None
    except ValueError as e:
        raise PersonaError(str(e), file=source, field=field) from None


def book_to_card(book: Lorebook) -> dict[str, Any]:
    """The Lorebook as a V2 `character_book`; what V2 has no field for rides in SillyTavern's
    entry extensions (`position` 4 = at depth, `depth`, `role`), so SillyTavern reads it back."""
    roles = {v: k for k, v in _ST_ROLES.items()}
    logic = {v: k for k, v in _ST_LOGIC.items()}
    entries = []
    for e in book.entries:
        ext = dict(e.extensions)
        ext.update({
            "position": {"before_char": 0, "after_char": 1, "at_depth": 4}[e.position],
            "depth": e.depth,
            "role": roles[e.role],
            "selectiveLogic": logic[e.selective_logic],
            "exclude_recursion": e.exclude_recursion,
            "prevent_recursion": e.prevent_recursion,
        })
        if e.match_whole_words is not None:
            ext["match_whole_words"] = e.match_whole_words
        entries.append({
            "keys": list(e.keys),
            "content": e.content,
            "extensions": ext,
            "enabled": e.enabled,
            "insertion_order": e.insertion_order,
            "case_sensitive": e.case_sensitive,
            "use_regex": e.use_regex,
            "name": e.name,
            "priority": e.priority,
            **({"id": e.id} if e.id is not None else {}),
            "comment": e.comment,
            "selective": e.selective,
            "secondary_keys": list(e.secondary_keys),
            "constant": e.constant,
            "position": "after_char" if e.position == "after_char" else "before_char",
        })
    return {
        "name": book.name,
        "description": book.description,
        "scan_depth": book.scan_depth,
        "token_budget": book.token_budget,
        "recursive_scanning": book.recursive_scanning,
        "extensions": dict(book.extensions),
        "entries": entries,
    }
