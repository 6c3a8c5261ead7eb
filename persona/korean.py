"""Korean speech-register detection: is a reply 반말 (해체/해라체) or 존댓말 (해요체/합쇼체)?

    classify_sentences("밥 먹었어? 나는 먹었어요.")  # [SentenceLabel(..., "banmal"), SentenceLabel(..., "polite")]
    classify_reply("아빠 어디 가셔?")               # "banmal"  (-시- alone is respect, not 존댓말)

Method: Kiwi (kiwipiepy) splits sentences and tags morphemes. A sentence's register is that of
its sentence-final ending: an EF morpheme, the particle 요 (JX), or a connective ending (EC) that
closes a clause before punctuation, ㅋㅋ, emoji or the end. Polite endings end in 요 or are
-ㅂ니다/-습니다/-ㅂ니까/-ㅂ시다/-ㅂ시오/-죠; every other final ending is 반말. Text inside quotation
marks is ignored (the outer sentence's ending counts); a sentence with no verbal ending ("응!",
"아빠 최고!") is neutral. Trailing vocatives, emoji and ㅋㅋ/ㅎㅎ attach to the sentence before.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Label = Literal["banmal", "polite", "neutral"]
ReplyLabel = Literal["banmal", "polite", "mixed", "none"]

POLITE_FORMS = frozenset(
    {"ᆸ니다", "습니다", "ᆸ니까", "습니까", "ᆸ시다", "읍시다", "ᆸ시오", "십시오", "으십시오", "죠"}
)
# Kiwi sometimes reads a whole polite word as a noun ("사랑해요" -> NNP): catch these surface endings
POLITE_SURFACE = (
    "어요",
    "아요",
    "해요",
    "예요",
    "에요",
    "세요",
    "니다",
    "니까",
    "네요",
    "래요",
    "대요",
    "게요",
    "까요",
    "데요",
    "지요",
)
# connective-looking endings that close a 반말 sentence when a comma follows ("괜찮아, 걱정 마")
FINAL_EC = frozenset(
    {
        "어",
        "아",
        "여",
        "지",
        "냐",
        "니",
        "야",
        "자",
        "네",
        "거든",
        "잖아",
        "대",
        "래",
        "ᆯ게",
        "을게",
        "ᆯ래",
        "을래",
        "다",
    }
)
# 반말 answers the tagger reads as interjections ("그렇지?" -> IC)
BANMAL_IC = frozenset({"그렇지", "그치", "그래", "맞아", "고마워", "미안해", "알았어"})
BREAK_TAGS = frozenset({"SF", "SW", "SO", "SE", "W_EMOJI"})  # what closes a clause after a connective ending

_kiwi = None
_kiwi_lock = threading.Lock()


def get_kiwi():
    """The process-wide Kiwi analyser (its start-up takes ~1-2 s, so it is built once, lazily)."""
    global _kiwi
    if _kiwi is None:
        with _kiwi_lock:
            if _kiwi is None:
                from kiwipiepy import Kiwi

                _kiwi = Kiwi()
    return _kiwi


@dataclass(frozen=True)
class SentenceLabel:
    text: str
    label: Label


def is_polite_form(form: str, tag: str) -> bool:
    """Whether an ending morpheme (or 요 particle) is 존댓말."""
    if tag == "JX":
        return form == "요"
    return form.endswith("요") or form in POLITE_FORMS


def _quoted(tokens: Sequence) -> set[int]:
    """Indices of tokens inside matched quotation marks (or brackets); unmatched openers quote nothing."""
    inside: set[int] = set()
    stack: list[tuple[int, str]] = []
    for i, t in enumerate(tokens):
        if t.tag == "SSO" or (t.form in "\"'" and not (stack and stack[-1][1] == t.form)):
            stack.append((i, t.form))
        elif t.tag == "SSC" or t.form in "\"'":
            if stack:
                start, _ = stack.pop()
                inside.update(range(start, i + 1))
    return inside


def _ending_label(tokens: Sequence, i: int, skip: set[int]) -> Label | None:
    """The register if token i closes a clause, else None."""
    t = tokens[i]
    if t.tag == "EF" or (t.tag == "JX" and t.form == "요"):
        return "polite" if is_polite_form(t.form, t.tag) else "banmal"
    if t.tag == "EC":
        if is_polite_form(t.form, t.tag):
            return "polite"
        rest = [tokens[j] for j in range(i + 1, len(tokens)) if j not in skip]
        if not rest or rest[0].tag in BREAK_TAGS:
            return "banmal"
        if rest[0].tag == "SP" and (t.form in FINAL_EC or not any(r.tag[0] in "VE" for r in rest)):
            return "banmal"  # "사랑해, 아빠!": the tagger reads a final -어 before a comma as connective
        return None
    if t.tag.startswith(("NN", "IC")) and t.form.endswith(POLITE_SURFACE):
        return "polite"  # a polite word the tagger took for a noun or an interjection
    if t.tag == "IC" and t.form in BANMAL_IC:
        return "banmal"
    return None


def _label_tokens(text: str, tokens: Sequence, offset: int) -> list[SentenceLabel]:
    """Split one Kiwi sentence into clauses at final endings; label each."""
    skip = _quoted(tokens)
    if len(skip) == len(tokens):
        skip = set()  # the whole sentence is a quote: judge it as it is
    spans: list[list] = []  # [start, end, label]; characters relative to `text`
    start = 0
    for i, t in enumerate(tokens):
        if i in skip or (spans and t.start - offset < spans[-1][1]):
            continue
        label = _ending_label(tokens, i, skip)
        if label is None:
            continue
        j = i + 1  # punctuation, ㅋㅋ, emoji right after the ending belong to this clause
        while j < len(tokens) and tokens[j].tag in BREAK_TAGS | {"SP"}:
            j += 1
        end = tokens[j - 1].start - offset + tokens[j - 1].len
        spans.append([start, end, label])
        start = end
    if spans:  # vocatives or a verbless tail ("먹었어, 아빠!") join the clause before
        spans[-1][1] = len(text)
    elif text.strip():
        spans.append([0, len(text), "neutral"])
    return [SentenceLabel(text[a:b].strip(), lab) for a, b, lab in spans if text[a:b].strip()]


def classify_sentences(text: str) -> list[SentenceLabel]:
    """Every sentence (clause closed by a final ending) of `text` with banmal/polite/neutral."""
    kiwi = get_kiwi()
    out: list[SentenceLabel] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        for sent in kiwi.split_into_sents(line, return_tokens=True):
            for lab in _label_tokens(sent.text, sent.tokens, sent.start):
                if out and lab.label == "neutral" and not _has_words(lab.text):
                    out[-1] = SentenceLabel(f"{out[-1].text} {lab.text}", out[-1].label)  # a lone emoji/ㅋㅋ
                else:
                    out.append(lab)
    return out


def _has_words(text: str) -> bool:
    return any(
        c.isalnum() and not ("\u3131" <= c <= "\u318e") for c in text
    )  # jamo (ㅋㅋ, ㅠㅠ) are not words


def reply_label(labels: Sequence[str]) -> ReplyLabel:
    """Combine sentence labels: neutral ones do not count."""
    kinds = {lab for lab in labels if lab in ("banmal", "polite")}
    if not kinds:
        return "none"
    return "mixed" if len(kinds) == 2 else kinds.pop()  # type: ignore[return-value]


def classify_reply(text: str) -> ReplyLabel:
    """ "banmal" or "polite" if all sentences with an ending agree, "mixed" if not, "none" if none has one."""
    return reply_label([s.label for s in classify_sentences(text)])


# ---------------------------------------------------------------- rewriting (the guard's last resort)

_TO_BANMAL = {
    "어요": "어",
    "아요": "아",
    "에요": "야",
    "예요": "야",
    "죠": "지",
    "세요": "어",
    "ᆸ니다": "어",
    "습니다": "어",
    "ᆸ니까": "니",
    "습니까": "니",
    "ᆸ시다": "자",
    "읍시다": "자",
    "ᆸ시오": "어",
    "십시오": "어",
    "으십시오": "어",
}


def _banmal_form(tokens: Sequence, i: int) -> tuple[str, str] | None:
    """The 반말 replacement (form, tag) for polite final token i, or None to drop it."""
    t = tokens[i]
    if t.tag == "JX":
        return None  # 아빠요? -> 아빠?
    if t.tag.startswith(("NN", "IC")):
        return (t.form[:-1] or t.form, t.tag)  # "사랑해요" read as a noun
    if t.form == "세요" and i and tokens[i - 1].tag == "VCP":
        return ("야", t.tag)  # 어디세요 -> 어디야
    return (_TO_BANMAL.get(t.form, t.form[:-1] if t.form.endswith("요") else t.form), t.tag)


def to_banmal(sentence: str) -> str:
    """Rewrite the polite final endings of `sentence` into 해체 (먹었어요 -> 먹었어, 합니다 -> 해).

    Morpheme-level and deterministic; only the words holding a polite ending are rebuilt, the rest
    of the text is kept as written. Used when regenerating a drifted sentence failed.
    """
    kiwi = get_kiwi()
    tokens = kiwi.tokenize(sentence)
    skip = _quoted(tokens)
    polite = {i for i in range(len(tokens)) if i not in skip and _ending_label(tokens, i, skip) == "polite"}
    out, pos = [], 0
    for a, b in _word_spans(sentence):
        ids = [i for i, t in enumerate(tokens) if a <= t.start < b]
        if not polite.intersection(ids):
            continue
        morphs = []
        for i in ids:
            new = _banmal_form(tokens, i) if i in polite else (tokens[i].form, tokens[i].tag)
            if new is not None:
                morphs.append(new)
        out.append(sentence[pos:a] + kiwi.join(morphs))
        pos = b
    return "".join(out) + sentence[pos:]


def _word_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of each whitespace-separated word."""
    return [m.span() for m in re.finditer(r"\S+", text)]
