"""Hybrid retrieval: dense hits + BM25 over content terms, fused by reciprocal rank, recency-aware.

    terms("우리 가족은 대전으로 이사했어")  -> ["우리", "가족", "대전", "이사"]   (Kiwi morphemes)
    terms("We moved to Daejeon last May") -> ["move", "daejeon", "last", "may"]   (words)
    ranked = fuse({"dense": dense_ids, "bm25": bm25.rank(query, n)}, recency=ages, weights=...)

- Lexical terms: Korean text (any Hangul) is split into Kiwi morphemes and only content
  morphemes are kept (nouns, verb/adjective stems, roots, foreign words, numbers), so "이사했어"
  and "이사를 갔어요" share "이사"; other text is lower-cased words minus a short stop list, with
  a light suffix strip so "moved" matches "move".
- BM25 (Okapi, k1=1.2, b=0.75) over the exchanges of the transcript, built per query from
  cached term lists (a bounded per-process cache keyed by message id: messages never change).
- Reciprocal rank fusion (Cormack et al. 2009, k=60): score = sum_r w_r / (60 + rank_r).
  Recency adds one more ranking (newest first) with a small weight, so of two equally good
  hits the newer wins, without letting recency outvote relevance.
- De-duplication: exchanges whose user text normalises to the same string, or nearly (character
  trigram Jaccard >= 0.65: "I went for a run (5)" and "I went for a run (17)"; "My dog is called
  Biscuit" / "... Rex" are 0.6 apart), keep only the best ranked. It runs on each ranking before the
  fusion as well as after it: a line the user says every day would otherwise fill a ranking's top
  places and push the one statement that answers the question out of the fused top-n.
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

RRF_K = 60
# recency is a tie-breaker: at 0.1 it moves a hit by a few places in a 60-deep RRF, never from nowhere
DEFAULT_WEIGHTS = {"dense": 1.0, "bm25": 1.0, "recency": 0.1}
_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_LETTER = re.compile(r"[^\W\d_]")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？…])\s+|\n+")
_CONTENT_TAGS = ("NNG", "NNP", "NR", "VV", "VA", "XR", "SL", "SN", "SH")  # not pronouns (NP), bound nouns (NNB)
_KO_STOP = frozenset("하 되 있 없 같 대하 위하 통하 보 주 오 가 말하 그렇 이렇 어떻 뭐 무엇 누구 어디 언제 거 것".split())
_STOP = frozenset(
    "a an the and or but if so to of in on at for with from by as is are was were be been being am "
    "i me my mine you your yours we our us it its this that these those he she his her they them their "
    "do does did done have has had not no yes what which who whom where when why how there here "
    "can could would should will shall may might must just about into than then too very also "
    "please tell say said know think".split()
)
_CACHE_LIMIT = 50_000
NEAR_DUPLICATE = 0.65  # trigram Jaccard: copies differing by a number >= 0.67 in the bench, different lines <= 0.32


def _kiwi() -> Any:
    global _KIWI
    with _KIWI_LOCK:
        if _KIWI is None:
            from kiwipiepy import Kiwi

            _KIWI = Kiwi(num_workers=-1)  # no thread pool: per-sentence calls are 20x faster without it
        return _KIWI


_KIWI: Any = None
_KIWI_LOCK = threading.Lock()


def sentences(text: str) -> list[str]:
    """The sentences of `text`; a short tail ("(turn 7)", "ㅋㅋ", "Ok.") stays with the sentence before it."""
    parts: list[str] = []
    for piece in (x.strip() for x in _SENTENCE_END.split(text)):
        if piece and parts and (piece.startswith("(") or len(_LETTER.findall(piece)) < 4):
            parts[-1] += " " + piece
        elif piece:
            parts.append(piece)
    return parts


def _stem(word: str) -> str:
    """A light English suffix strip (moved/moving/moves -> move); enough for matching, not linguistics."""
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if len(word) > len(suffix) + 2 and word.endswith(suffix):
            word = word[: -len(suffix)] + repl
            break
    return word[:-1] if len(word) > 3 and word.endswith("e") else word


def terms(text: str) -> list[str]:
    """Content terms of `text`: Kiwi morphemes for Korean, stemmed words otherwise."""
    if _HANGUL.search(text):
        out = []
        for tok in _kiwi().tokenize(text):
            if tok.tag.startswith(_CONTENT_TAGS) and tok.form not in _KO_STOP:
                form = tok.form.lower()
                out.append(_stem(form) if tok.tag == "SL" else form)
        return out
    return [_stem(w) for w in (m.lower() for m in _WORD.findall(text)) if len(w) > 1 and w not in _STOP]


class TermCache:
    """Term lists by key (a message id), bounded LRU: a message's text never changes."""

    def __init__(self, limit: int = _CACHE_LIMIT) -> None:
        self.limit = limit
        self._items: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, text: str) -> list[str]:
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        value = terms(text)
        with self._lock:
            self._items[key] = value
            while len(self._items) > self.limit:
                self._items.popitem(last=False)
        return value


TERM_CACHE = TermCache()


class BM25:
    """Okapi BM25 over a list of term lists (document i = position i)."""

    def __init__(self, docs: Sequence[Sequence[str]], k1: float = 1.2, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self.tfs = [Counter(d) for d in docs]
        self.lens = [len(d) for d in docs]
        self.avg = (sum(self.lens) / len(docs)) if docs else 0.0
        df: Counter[str] = Counter()
        for tf in self.tfs:
            df.update(tf.keys())
        n = len(docs)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}

    def scores(self, query: Iterable[str]) -> list[float]:
        q = [t for t in set(query) if t in self.idf]
        out = []
        for tf, length in zip(self.tfs, self.lens, strict=True):
            s = 0.0
            norm = self.k1 * (1 - self.b + self.b * length / self.avg) if self.avg else self.k1
            for t in q:
                f = tf.get(t, 0)
                if f:
                    s += self.idf[t] * f * (self.k1 + 1) / (f + norm)
            out.append(s)
        return out

    def rank(self, query: Iterable[str], n: int) -> list[int]:
        """Indices of the top-n documents with a positive score, best first."""
        scores = self.scores(query)
        best = sorted((i for i, s in enumerate(scores) if s > 0), key=lambda i: (-scores[i], -i))
        return best[:n]


def fuse(rankings: dict[str, Sequence[str]], weights: dict[str, float] | None = None) -> list[str]:
    """Reciprocal rank fusion of ranked id lists; ties go to the id ranked first by any list."""
    weights = weights or DEFAULT_WEIGHTS
    score: dict[str, float] = {}
    for name, ids in rankings.items():
        w = weights.get(name, 1.0)
        if w <= 0:
            continue
        for rank, key in enumerate(ids):
            score[key] = score.get(key, 0.0) + w / (RRF_K + rank + 1)
    return sorted(score, key=lambda key: -score[key])


def normalise(text: str) -> str:
    return " ".join(_WORD.findall(text.lower()))


def trigrams(text: str) -> frozenset[str]:
    """Character trigrams of the normalised text (whole text when shorter): script-agnostic, no Kiwi."""
    norm = normalise(text)
    return frozenset(norm[i : i + 3] for i in range(max(1, len(norm) - 2))) if norm else frozenset()


def near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    return bool(a) and len(a & b) >= NEAR_DUPLICATE * len(a | b)


@dataclass
class Candidate:
    """One retrievable exchange: its key (first message id), its text and when it was said."""

    key: str
    text: str
    user_text: str
    order: Any  # sorts by time, larger = newer (e.g. (created_at, position))
    payload: Any = None  # what the caller wants back (the exchange)
    _grams: frozenset[str] | None = field(default=None, repr=False, compare=False)

    @property
    def grams(self) -> frozenset[str]:
        if self._grams is None:
            self._grams = trigrams(self.user_text)
        return self._grams


def dedupe(keys: Sequence[str], candidates: dict[str, Candidate], limit: int | None = None,
           near: bool = True) -> list[str]:
    """Drop exchanges whose user text repeats (near: or nearly repeats) a better-ranked one's;
    stops once `limit` are kept."""
    kept: list[str] = []
    seen: set[str] = set()
    for key in keys:
        cand = candidates[key]
        norm = normalise(cand.user_text)
        if norm and (norm in seen or near and any(near_duplicate(cand.grams, candidates[k].grams) for k in kept)):
            continue
        seen.add(norm)
        kept.append(key)
        if limit is not None and len(kept) >= limit:
            break
    return kept


def hybrid_rank(
    query: str,
    candidates: Sequence[Candidate],
    dense_keys: Sequence[str],
    n: int,
    weights: dict[str, float] | None = None,
    cache: TermCache = TERM_CACHE,
    near_duplicates: bool = True,
) -> list[str]:
    """The top-n candidate keys for `query`: RRF of dense, BM25 and recency, de-duplicated.

    near_duplicates=False (memory.bench's ablation): only exact repeats are dropped, after the fusion.
    """
    if not candidates or n <= 0:
        return []
    weights = weights or DEFAULT_WEIGHTS
    by_key = {c.key: c for c in candidates}
    depth = max(4 * n, 20)  # how far down each (de-duplicated) list the fusion looks

    def top(keys: Sequence[str]) -> list[str]:
        return dedupe(keys, by_key, depth) if near_duplicates else list(keys[:depth])

    rankings: dict[str, Sequence[str]] = {}
    if weights.get("dense", 0) > 0:
        rankings["dense"] = top([k for k in dense_keys if k in by_key])
    if weights.get("bm25", 0) > 0:
        bm25 = BM25([cache.get(c.key, c.text) for c in candidates])
        rankings["bm25"] = top([candidates[i].key for i in bm25.rank(terms(query), len(candidates))])
    relevant = {k for ids in rankings.values() for k in ids}
    if weights.get("recency", 0) > 0:  # only among hits: recency orders, it never retrieves by itself
        rankings["recency"] = sorted(relevant, key=lambda k: by_key[k].order, reverse=True)
    return dedupe(fuse(rankings, weights), by_key, n, near=near_duplicates)
