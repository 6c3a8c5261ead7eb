"""Core memory blocks: small labelled texts pinned in every prompt, edited only by validated edits.

    core = CoreMemory(store, counter)
    core.blocks(session_id)              # {"user": Block, "relationship": Block}
    core.put(session_id, "user", "Name: Ada", source="user")      # the user's own edit (PUT route)
    core.apply(session_id, edits, message_id="msg_...", source="model")  # -> (applied, rejected)
    core.history(session_id)             # every applied edit, with the message id that caused it

An edit is `{"label", "op": "append" | "replace", "text", "old"?}`: `append` adds a line, `replace`
swaps an existing line `old` for `text`. It is applied only if it validates: a known label,
non-empty text without control characters, a `replace` whose `old` line exists, no duplicate line,
and the block still within its limit in the model's tokens; a model's edit must also be grounded
in the exchange (60% of its content terms said there). Edits come from two proposers, both
run after the reply (off its path): the facts just extracted (a changed fact replaces its old line)
and the model itself, which writes the edit list as grammar-constrained JSON (`memory.grammar`),
so its output always parses; whether it makes sense is what validation decides.

State: per session, key `blocks` = `{"blocks": {label: {value, limit_tokens, updated_at}},
"history": [...], "stats", "rejected", "count", "last_id"}` (`count`/`last_id`: the model-edit
watermark; `stats`: edits proposed/applied/rejected per source; `rejected`: the last 20 reasons).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

from memory.types import Message

STATE_KEY = "blocks"
DEFAULT_BLOCKS = {"user": 256, "relationship": 256}  # label -> limit in the model's tokens
MAX_BLOCK_TOKENS = 2048
MAX_BLOCKS = 8
HISTORY_LIMIT = 500  # newest edits kept per session (the transcript stays the source of truth)
LABEL = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SENTENCE = re.compile(r"(?<=[.!?。])\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\ud800-\udfff]")  # and lone surrogates: not text
EDIT_SCHEMA: dict[str, Any] = {  # what the model may write (the grammar); validation checks the rest
    "type": "object",
    "properties": {
        "edits": {
            "type": "array",
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "label": {"enum": list(DEFAULT_BLOCKS)},
                    "op": {"enum": ["append", "replace"]},
                    "old": {"type": "string", "maxLength": 200},
                    "text": {"type": "string", "minLength": 1, "maxLength": 200},
                },
                "required": ["label", "op", "text"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["edits"],
    "additionalProperties": False,
}


class BlockError(ValueError):
    """A rejected block write; `param` names the field."""

    def __init__(self, message: str, param: str = "value") -> None:
        super().__init__(message)
        self.param = param


@dataclass
class Block:
    label: str
    value: str
    limit_tokens: int
    updated_at: str | None = None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CoreMemory:
    def __init__(self, store: Any, counter: Any) -> None:
        self.store = store
        self.counter = counter

    # ------------------------------------------------------------------ reading

    def _state(self, session_id: str) -> dict[str, Any]:
        state = self.store.get_state(session_id, STATE_KEY) or {}
        blocks = state.get("blocks") or {}
        for label, limit in DEFAULT_BLOCKS.items():
            blocks.setdefault(label, {"value": "", "limit_tokens": limit, "updated_at": None})
        state["blocks"] = blocks
        state.setdefault("history", [])
        return state

    def blocks(self, session_id: str) -> dict[str, Block]:
        return {label: Block(label, **b) for label, b in self._state(session_id)["blocks"].items()}

    def get(self, session_id: str, label: str) -> Block | None:
        return self.blocks(session_id).get(label)

    def texts(self, session_id: str) -> dict[str, str]:
        return {label: b.value for label, b in self.blocks(session_id).items() if b.value}

    def stats(self, session_id: str) -> dict[str, Any]:
        """Edits proposed / applied / rejected per source ("facts", "model"), and the last rejections."""
        state = self._state(session_id)
        return {"by_source": state.get("stats", {}), "recent_rejections": state.get("rejected", [])}

    def history(self, session_id: str, label: str | None = None) -> list[dict[str, Any]]:
        return [h for h in self._state(session_id)["history"] if label is None or h["label"] == label]

    # ------------------------------------------------------------------ writing

    def put(
        self, session_id: str, label: str, value: str, *, limit_tokens: int | None = None,
        message_id: str | None = None, source: str = "user",
    ) -> Block:
        """Set a block's whole text (the user's edit); creates a new label up to MAX_BLOCKS."""
        if not LABEL.match(label):
            raise BlockError("label must be 1-32 lower-case letters, digits or _, starting with a letter", "label")
        state = self._state(session_id)
        old = state["blocks"].get(label)
        if old is None and len(state["blocks"]) >= MAX_BLOCKS:
            raise BlockError(f"a session has at most {MAX_BLOCKS} blocks; delete text from one instead", "label")
        limit = limit_tokens or (old["limit_tokens"] if old else DEFAULT_BLOCKS.get(label, 256))
        if not 1 <= limit <= MAX_BLOCK_TOKENS:
            raise BlockError(f"limit_tokens must be between 1 and {MAX_BLOCK_TOKENS} (got {limit})", "limit_tokens")
        try:
            self._check_text(value, allow_empty=True)
        except BlockError as e:
            raise BlockError(str(e), "value") from e
        tokens = self.counter.count(value) if value else 0
        if tokens > limit:
            raise BlockError(
                f"value is {tokens} tokens, over the block's limit_tokens={limit}; shorten it or raise the limit"
            )
        self._record(state, label, old["value"] if old else "", value, {"op": "set"}, message_id, source)
        state["blocks"][label] = {"value": value, "limit_tokens": limit, "updated_at": _now()}
        self.store.put_state(session_id, STATE_KEY, state)
        return Block(label, **state["blocks"][label])

    def apply(
        self, session_id: str, edits: list[dict[str, Any]], *, message_id: str | None, source: str,
        watermark: tuple[int, str] | None = None, evidence: str | None = None,
    ) -> tuple[list[dict[str, Any]], list[str]]:
        """Apply each edit that validates (in order); returns (applied edits, reasons for rejections).

        With `evidence` (what was said), an edit must also be grounded in it: most of its content
        terms must occur there, so a model cannot write into a block what nobody said."""
        state = self._state(session_id)
        applied, rejected = [], []
        for edit in edits:
            try:
                label, new = self._validated(state["blocks"], edit)
                if evidence is not None:
                    _check_grounded(str(edit.get("text", "")), evidence)
            except BlockError as e:
                rejected.append(f"{edit!r}: {e}")
                continue
            block = state["blocks"][label]
            self._record(state, label, block["value"], new, edit, message_id, source)
            block.update(value=new, updated_at=_now())
            applied.append(edit)
        stats = state.setdefault("stats", {}).setdefault(source, {"proposed": 0, "applied": 0, "rejected": 0})
        stats["proposed"] += len(edits)
        stats["applied"] += len(applied)
        stats["rejected"] += len(rejected)
        state["rejected"] = (state.get("rejected", []) + [{"reason": r, "message_id": message_id} for r in rejected])[-20:]
        if watermark is not None:
            state["count"], state["last_id"] = watermark
        if edits or watermark is not None:
            self.store.put_state(session_id, STATE_KEY, state)
        return applied, rejected

    def _validated(self, blocks: dict[str, Any], edit: dict[str, Any]) -> tuple[str, str]:
        """(label, the block's new text) for a valid edit; raises BlockError saying why not."""
        label, op, text = edit.get("label"), edit.get("op"), edit.get("text")
        if label not in blocks:
            raise BlockError(f"unknown block {label!r}", "label")
        if op not in ("append", "replace") or not isinstance(text, str):
            raise BlockError("op must be append or replace, with a text", "op")
        text = self._check_text(text.strip(), allow_empty=False)
        sentences = [x.strip().lower() for x in _SENTENCE.split(text) if x.strip()]
        if len(sentences) != len(set(sentences)):  # small models loop; a block line never needs to
            raise BlockError("the text repeats itself", "text")
        lines = [ln for ln in blocks[label]["value"].splitlines() if ln.strip()]
        if text in lines:
            raise BlockError("the block already says that", "text")
        if op == "replace":
            old = (edit.get("old") or "").strip()
            if old not in lines:
                raise BlockError(f"replace: no line {old!r} in block {label!r}", "old")
            lines[lines.index(old)] = text
        else:
            lines.append(text)
        new = "\n".join(lines)
        limit = blocks[label]["limit_tokens"]
        if self.counter.count(new) > limit:
            raise BlockError(f"block {label!r} would exceed its limit of {limit} tokens", "text")
        return label, new

    @staticmethod
    def _check_text(text: str, allow_empty: bool) -> str:
        if not isinstance(text, str) or (not text.strip() and not allow_empty):
            raise BlockError("text must be a non-empty string", "text")
        if _CONTROL.search(text):
            raise BlockError("text must not contain control characters or lone surrogates", "text")
        return text

    @staticmethod
    def _record(state: dict[str, Any], label: str, old: str, new: str, edit: dict[str, Any],
                message_id: str | None, source: str) -> None:
        state["history"].append({
            "label": label, "op": edit.get("op"), "edit": edit, "old_value": old, "new_value": new,
            "message_id": message_id, "source": source, "at": _now(),
        })
        del state["history"][:-HISTORY_LIMIT]


GROUNDED_SHARE = 0.6  # of an edit's content terms that must occur in what was said


def _check_grounded(text: str, evidence: str) -> None:
    from memory.hybrid import terms

    said = set(terms(evidence))
    wanted = set(terms(text))
    if not wanted or len(wanted & said) < GROUNDED_SHARE * len(wanted):
        missing = sorted(wanted - said)[:5]
        raise BlockError(f"not grounded in the exchange (never said: {', '.join(missing) or 'anything'})", "text")


def fact_edits(blocks: dict[str, str], added: list[Any], all_facts: list[Any]) -> list[dict[str, Any]]:
    """Edits of the `user` block for newly extracted facts: a changed fact replaces its old line."""
    lines = set(blocks.get("user", "").splitlines())
    edits = []
    for fact in added:
        old = next((f for f in all_facts if f.superseded_by == fact.id and f.text in lines), None)
        if old is not None:
            edits.append({"label": "user", "op": "replace", "old": old.text, "text": fact.text})
            lines.discard(old.text)
        else:
            edits.append({"label": "user", "op": "append", "text": fact.text})
        lines.add(fact.text)
    return edits


class ModelBlockEditor:
    """The model proposes block edits for the exchange just finished, as grammar-constrained JSON."""

    SYSTEM = (
        "You maintain two short memory blocks about a conversation. 'user' holds facts about the user "
        "(name, family, home city, work, likes). 'relationship' holds what the assistant and the user share. "
        "Given the blocks and the latest exchange, answer with JSON: {\"edits\": [...]}. Each edit is "
        "{\"label\": \"user\" or \"relationship\", \"op\": \"append\" or \"replace\", \"old\": the line to "
        "replace, \"text\": a short line in the user's language}. Answer {\"edits\": []} when nothing new was said."
    )

    def __init__(self, engine: Any, tokenizer: Any, max_tokens: int = 160) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.calls = 0
        self.unparsed = 0  # outputs cut by max_tokens before the JSON closed (never malformed otherwise)

    def prompt(self, blocks: dict[str, str], exchange: list[Message]) -> list[dict[str, str]]:
        shown = "\n".join(f"[{label}]\n{blocks.get(label) or '(empty)'}" for label in DEFAULT_BLOCKS)
        said = "\n".join(f"{'User' if m.role == 'user' else 'Assistant'}: {m.content[:600]}" for m in exchange)
        return [{"role": "system", "content": self.SYSTEM},
                {"role": "user", "content": f"Blocks:\n{shown}\n\nLatest exchange:\n{said}\n\nJSON:"}]

    def __call__(self, blocks: dict[str, str], exchange: list[Message]) -> list[dict[str, Any]]:
        from memory.generate import chat_complete
        from memory.grammar import JsonConstraint

        constraint = JsonConstraint(self.tokenizer, EDIT_SCHEMA)
        text = chat_complete(self.engine, self.tokenizer, self.prompt(blocks, exchange), max_tokens=self.max_tokens,
                             repetition_penalty=1.1, processors=[constraint])
        self.calls += 1
        try:
            value = constraint.parse(text)
        except ValueError:  # cut by max_tokens before the JSON closed: propose nothing
            self.unparsed += 1
            return []
        edits = value.get("edits", []) if isinstance(value, dict) else []
        return [e for e in edits if isinstance(e, dict)]


def block_summary(blocks: dict[str, Block]) -> dict[str, Any]:
    return {label: asdict(b) for label, b in blocks.items()}
