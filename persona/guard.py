"""Keeping a persona in register: a logits processor while generating, a post-check before storing.

    guard = RegisterGuard(lm.tokenizer, register="banmal")
    engine.generate(prompt_ids, params, logits_processors=[guard])     # polite endings can't close
    result = repair_reply(generate_fn, reply_text, "banmal")            # nothing drifted is stored
    store.append_message(sid, "assistant", result.text, metadata=result.metadata)

The guard works on text, not on token ids, so it fits any tokenizer: for a 반말 persona it
down-weights (1) tokens that would make the current word end in a polite ending (-요, -ㅂ니다,
-ㅂ니까, -ㅂ시다, -시오, -죠), and (2) any token that would close a word (space, punctuation,
newline, EOS, ...) right after such an ending slipped through, so a polite sentence cannot end
and the model has to continue the word instead (필 + 요 -> 필요 is a noun, not an ending).
Words such as 요리/요즘 (요 first) or 필요/중요 (listed nouns) are never touched.

Per-vocabulary tables are built once per tokenizer; per step the guard decodes the last few ids
and looks up a handful of candidate tokens, so the cost per token is small and constant.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from persona.korean import ReplyLabel, classify_reply, classify_sentences, to_banmal

# nouns that end in 요 but are not endings (필요 need, 중요 important, 월요일 Monday, ...)
NOUN_YO = tuple("필요 중요 주요 수요 소요 강요 요요 동요 개요 월요 화요 목요 금요 토요 일요".split())
# syllables a 반말 sentence ends on (used only for the mirror guard of polite personas)
BANMAL_FINAL = frozenset("어아야지자냐니래대네해워와봐줘셔게까다라마렴군나")
TAIL_TOKENS = 8  # decode this many recent ids to see the current word


def is_syllable(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3"


def has_final_b(ch: str) -> bool:
    """True if the syllable has ㅂ as its final consonant (합, 습, 갑): -ㅂ니다 vs -니다."""
    return is_syllable(ch) and (ord(ch) - 0xAC00) % 28 == 17


def polite_word(word: str) -> bool:
    """Does this run of Hangul syllables end in a polite sentence ending?"""
    if len(word) < 2:
        return False
    if word.endswith("요"):
        return not word.endswith(NOUN_YO)
    if word.endswith(("니다", "니까", "시다")):
        return len(word) >= 3 and has_final_b(word[-3])
    return word.endswith(("시오", "죠"))


def banmal_word(word: str) -> bool:
    """Does this word end like a 반말 sentence (mirror guard)? Coarse: nouns such as 바다 match too."""
    return len(word) >= 2 and word[-1] in BANMAL_FINAL and not polite_word(word)


def trailing_word(text: str) -> str:
    """The run of Hangul syllables at the end of `text` ("" if it ends in anything else)."""
    i = len(text)
    while i > 0 and is_syllable(text[i - 1]):
        i -= 1
    return text[i:]


def leading_word(text: str) -> str:
    i = 0
    while i < len(text) and is_syllable(text[i]):
        i += 1
    return text[:i]


# ---------------------------------------------------------------- per-vocabulary tables


@dataclass
class VocabTables:
    """What the guard needs to know about each token's text, built once per tokenizer and register."""

    always: torch.Tensor  # ids whose own text holds a forbidden ending (closed, or open at its end)
    boundary: torch.Tensor  # ids that start with a non-syllable: they close the current word (and EOS)
    # lead (the 1-2 syllables a token starts with) -> (ids closing the word after it, ids ending there)
    short_leads: dict[str, tuple[torch.Tensor, torch.Tensor]]


def vocab_texts(tokenizer) -> list[str]:
    """Text of every single token: `tokenizer.vocab_texts()` or, failing that, decoding one id at a time."""
    if hasattr(tokenizer, "vocab_texts"):
        return list(tokenizer.vocab_texts())
    return [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]


def build_tables(
    texts: Sequence[str],
    eos_ids: Iterable[int],
    forbidden: Callable[[str], bool],
    final_chars: Callable[[str], bool],
) -> VocabTables:
    """Sort the vocabulary once. `forbidden(word)`: the ending to block; `final_chars(ch)`: can a word
    ending on ch be forbidden (limits the per-step candidates)."""
    always, boundary, leads = [], set(eos_ids), {}
    for i, t in enumerate(texts):
        lead = leading_word(t)
        if not lead:
            boundary.add(i)  # starts with a space, punctuation, newline, emoji, byte piece or is special
        inner = _words(t)[1:] if lead else _words(t)  # words that start inside this token
        if any(forbidden(w) for w in inner) or (len(lead) >= 3 and forbidden(lead)):
            always.append(i)  # judged from the token alone (3+ syllables decide every ending we block)
        elif lead and len(lead) < 3 and final_chars(lead[-1]):
            closing, open_ = leads.setdefault(lead, ([], []))
            (closing if len(lead) < len(t) else open_).append(i)
    as_t = lambda ids: torch.tensor(sorted(ids), dtype=torch.long)  # noqa: E731
    return VocabTables(as_t(always), as_t(boundary), {k: (as_t(c), as_t(o)) for k, (c, o) in leads.items()})


def _words(text: str) -> list[str]:
    out, cur = [], ""
    for ch in text:
        if is_syllable(ch):
            cur += ch
        elif cur:
            out.append(cur)
            cur = ""
    return out + ([cur] if cur else [])


def incomplete_utf8_suffix(raw: bytes) -> int:
    """How many bytes at the end of `raw` are an unfinished UTF-8 character (0 if none)."""
    for back in range(1, min(4, len(raw)) + 1):
        b = raw[-back]
        if b & 0xC0 == 0x80:
            continue  # continuation byte: keep looking for the lead byte
        need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
        return back if back < need else 0
    return 0


def continuation_pieces(tokenizer) -> list[tuple[int, bytes]]:
    """(id, bytes) of tokens starting with a UTF-8 continuation byte (needs `tokenizer.token_bytes`)."""
    if not hasattr(tokenizer, "token_bytes"):
        return []
    key = (id(tokenizer), "pieces")
    with _TABLES_LOCK:
        if key not in _TABLES:
            pieces = []
            for i in range(tokenizer.vocab_size):
                b = tokenizer.token_bytes(i)
                if b and b[0] & 0xC0 == 0x80:
                    pieces.append((i, b))
            _TABLES[key] = (tokenizer, pieces)
        return _TABLES[key][1]


_TABLES: dict[tuple[int, str], tuple[object, Any]] = {}  # (tokenizer kept alive, tables)
_TABLES_LOCK = threading.Lock()


def tables_for(tokenizer, register: str) -> VocabTables:
    """Cached per (tokenizer object, register); the tokenizer is kept alive so its id stays unique."""
    key = (id(tokenizer), register)
    with _TABLES_LOCK:
        if key not in _TABLES:
            eos = getattr(tokenizer, "eos_ids", None) or []
            if register == "banmal":
                tables = build_tables(vocab_texts(tokenizer), eos, polite_word, lambda ch: ch in "요다까죠오")
            else:
                tables = build_tables(vocab_texts(tokenizer), eos, banmal_word, lambda ch: ch in BANMAL_FINAL)
            _TABLES[key] = (tokenizer, tables)
        return _TABLES[key][1]


class RegisterGuard:
    """Logits processor: `guard(generated_ids, logits) -> logits` (see module docstring).

    register "banmal" blocks polite endings; "polite" is the mirror (blocks 반말 sentence ends; coarser,
    so its default penalty is milder). `penalty` is subtracted from each blocked token's logit.
    """

    def __init__(self, tokenizer, register: str = "banmal", penalty: float | None = None) -> None:
        if register not in ("banmal", "polite"):
            raise ValueError(f"RegisterGuard register={register!r}: must be 'banmal' or 'polite'")
        self.tokenizer = tokenizer
        self.register = register
        self.penalty = float(penalty if penalty is not None else (30.0 if register == "banmal" else 8.0))
        self.forbidden = polite_word if register == "banmal" else banmal_word
        self.tables = tables_for(tokenizer, register)
        self._byte_pieces = continuation_pieces(tokenizer)
        self._bytes: dict[int, bytes] = {}  # token id -> its bytes (see _tail)

    def blocked_ids(self, generated_ids: Sequence[int]) -> torch.Tensor:
        """Token ids to down-weight after `generated_ids` (CPU long tensor, may repeat ids)."""
        tail = self._tail(generated_ids)
        if tail.endswith("\ufffd"):  # mid-character: only byte pieces can follow, judge what they complete
            return torch.cat([self.tables.always, self._completing_ids(generated_ids)])
        word = trailing_word(tail)
        parts = [self.tables.always]
        if self.forbidden(word):
            parts.append(self.tables.boundary)  # an ending slipped: the sentence must not close here
        for lead, (closing, open_) in self.tables.short_leads.items():
            if self.forbidden(word + lead):
                parts += [closing, open_]
        return torch.cat(parts)

    def _tail(self, generated_ids: Sequence[int]) -> str:
        """The text of the last TAIL_TOKENS ids, from per-token bytes cached once per id: a batched
        step calls every row's guard, so no row pays a tokenizer decode per token."""
        pieces = []
        for t in generated_ids[-TAIL_TOKENS:]:
            piece = self._bytes.get(t)
            if piece is None:
                piece = self._bytes[t] = self._token_bytes(t)
            pieces.append(piece)
        return b"".join(pieces).decode("utf-8", "replace")

    def _token_bytes(self, t: int) -> bytes:
        if hasattr(self.tokenizer, "token_bytes"):
            return self.tokenizer.token_bytes(t)
        return self.tokenizer.decode([t]).encode("utf-8")  # whole-character vocabularies (tests)

    def _completing_ids(self, generated_ids: Sequence[int]) -> torch.Tensor:
        """Byte-level vocabularies (SmolLM2 spells 요 as 3 byte tokens): block the piece that would
        complete a forbidden ending, given the pending bytes of the unfinished character."""
        if not self._byte_pieces:
            return torch.empty(0, dtype=torch.long)
        raw = b"".join(self.tokenizer.token_bytes(i) for i in generated_ids[-TAIL_TOKENS:])
        k = incomplete_utf8_suffix(raw)
        if k == 0:
            return torch.empty(0, dtype=torch.long)
        word = trailing_word(raw[:-k].decode("utf-8", "replace"))
        pending = raw[-k:]
        blocked = []
        for tid, piece in self._byte_pieces:
            text = (pending + piece).decode("utf-8", "replace")
            if text.startswith("\ufffd"):
                continue  # does not complete the character
            lead = leading_word(text)
            inner = _words(text)[1:] if lead else _words(text)
            if (lead and self.forbidden(word + lead)) or any(self.forbidden(w) for w in inner):
                blocked.append(tid)
        return torch.tensor(blocked, dtype=torch.long)

    def __call__(self, generated_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        ids = self.blocked_ids(generated_ids)
        if ids.numel() == 0:
            return logits
        ids = ids.to(logits.device)
        logits = logits.clone()
        logits[ids] -= self.penalty  # repeated ids are penalised once (indexing assignment)
        return logits


# ---------------------------------------------------------------- post-check and repair


def forbidden_label(register: str) -> str | None:
    return {"banmal": "polite", "polite": "banmal"}.get(register)


def check_reply(text: str, register: str) -> list[str]:
    """Sentences of `text` in the wrong register for `register` (empty for "any" or a clean reply)."""
    bad = forbidden_label(register)
    return [s.text for s in classify_sentences(text) if s.label == bad] if bad else []


@dataclass
class RepairResult:
    text: str
    label: ReplyLabel  # classify_reply of the final text
    repairs: int  # regenerations tried
    rewrites: int = 0  # sentences rewritten by rule after regeneration failed

    @property
    def metadata(self) -> dict:
        meta: dict = {"register": self.label, "register_repairs": self.repairs}
        if self.rewrites:
            meta["register_rewrites"] = self.rewrites
        return meta


def repair_reply(
    generate_fn: Callable[[str], str], text: str, register: str, max_retries: int = 2
) -> RepairResult:
    """Replace each wrong-register sentence of `text`; the result is safe to store.

    `generate_fn(prefix_text)` must return one new sentence continuing `prefix_text` (the reply so
    far, up to the bad sentence), e.g. the engine with the guard on and a sentence-end stop. Up to
    `max_retries` tries per sentence; if none comes back in register, a 반말 persona's sentence is
    rewritten by rule (`to_banmal`). The caller stores `result.text` with `result.metadata`.
    """
    bad = forbidden_label(register)
    if bad is None:
        return RepairResult(text, classify_reply(text), 0)
    out, pos, repairs, rewrites = [], 0, 0, 0
    for sent in classify_sentences(text):
        start = text.find(sent.text, pos)
        if start < 0 or sent.label != bad:
            continue
        out.append(text[pos:start])
        prefix = "".join(out).rstrip()
        fixed = None
        for _ in range(max_retries):
            repairs += 1
            cand = generate_fn(prefix).strip()
            if cand and classify_reply(cand) not in (bad, "mixed"):
                fixed = cand
                break
        if fixed is None:
            fixed = to_banmal(sent.text) if register == "banmal" else sent.text
            rewrites += 1
        out.append(fixed)
        pos = start + len(sent.text)
    final = "".join(out) + text[pos:]
    return RepairResult(final, classify_reply(final), repairs, rewrites)


_SENTENCE_END_RE = re.compile(r"[.!?…~]+(?=\s|$)|\n")


def engine_sentence_fn(
    engine, prompt_ids: Sequence[int], tokenizer, params, processors: Sequence = (), max_tokens: int = 64
) -> Callable[[str], str]:
    """A `generate_fn` for `repair_reply` built on `model.Engine`: continues the assistant turn
    `prompt_ids` (ending in the generation prompt) after `prefix_text` and returns one sentence.

    `params` is the turn's SamplingParams (a copy with at most `max_tokens` is used); pass the
    RegisterGuard in `processors` so the retry is guarded too.
    """
    import dataclasses

    def generate(prefix_text: str) -> str:
        ids = list(prompt_ids) + (tokenizer.encode(prefix_text + " ") if prefix_text else [])
        p = dataclasses.replace(params, max_tokens=min(params.max_tokens, max_tokens))
        text = ""
        events = engine.generate(ids, p, logits_processors=list(processors))
        try:
            for ev in events:
                text += ev.text
                m = _SENTENCE_END_RE.search(text.strip())
                if m and m.start() > 0:
                    return text.strip()[: m.end()].strip()
        finally:
            events.close()  # releases the engine
        return text.strip()

    return generate


def needs_reminder(recent_labels: Sequence[str], register: str, window: int = 2) -> bool:
    """For register_mode "remind": True when one of the last `window` reply labels drifted."""
    bad = forbidden_label(register)
    return bad is not None and any(lab in (bad, "mixed") for lab in list(recent_labels)[-window:])


def consistency_rate(labels: Iterable[str], register: str = "banmal") -> float:
    """Share of labelled items (sentence or reply labels) in `register`; neutral/none are skipped.

    "mixed" replies count as inconsistent. 1.0 when nothing was labelled.
    """
    counted = [lab for lab in labels if lab not in ("neutral", "none")]
    return 1.0 if not counted else sum(lab == register for lab in counted) / len(counted)

# What a persona's register_mode asks for (guard, reminder, repair) is persona/register_policy.py.
