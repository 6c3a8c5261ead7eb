"""Is a finished reply fit to show and store? Pure checks on text: leaked instructions, degeneration.

    leak = find_leak(reply, instructions)        # Leak(start, what) or None: where the reply began to
    reply[: leak.start]                          #   echo the prompt's notes / markers: cut it there
    problems = degeneration(reply, earlier, "ko", names={"지우", "아빠"})
    # [] or some of: "repeated_phrase" (a loop, a looping tail included), "few_distinct_pairs",
    # "copied_reply", "foreign_script"

Small base models (gemma-3-270m) copy what sits right before their turn, the "[System note: ...]"
after the user's line included, and loop on a phrase or on an earlier reply of theirs; nothing in
the sampler can promise they won't, so every reply passes these checks before it is stored
(service/reply_check.py, persona/measure_quality.py). Words are runs of letters (any script) or
digits; a word pair is two adjacent words.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

# What the prompt wraps its notes in (memory/context.py, persona/prompt.py) and the chat templates'
# turn markers: a reply that writes one of these is writing the prompt, not answering.
CARRIER_MARKERS = (
    "[System note", "System note:", "[Memory", "[Core memory", "[The conversation starts",
    "(기억해:", "(기억하세요:", "<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>",
    "<|start_header_id|>", "<|eot_id|>",
)
# an instruction's run of this many words in a reply is an echo, not a coincidence; Korean words carry
# their particles ("반말로 다정하게"), so two of them already are the instruction's own phrase
LEAK_WORDS = {"ko": 2}
LEAK_WORDS_DEFAULT = 3
# English words that make up phrases of any text: "in a few" (minutes) is no echo of "in a few plain sentences"
FUNCTION_WORDS = frozenset("a an the in on at to of for with and or but is are be it i you me my your we "
                           "our this that as by from so do not can will few some any all more very just if "
                           "what how when there here up out about have has was".split())
REPEAT_TIMES = 4  # a phrase this many times is a loop
MIN_PAIRS = 6  # fewer word pairs than this: too short to judge distinctness or copying
_WORD_RE = re.compile(r"[^\W_]+", re.UNICODE)


@dataclass(frozen=True)
class Leak:
    start: int  # character offset in the reply where the echo begins
    what: str  # the marker, or the instruction words that were echoed


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def _word_spans(text: str) -> list[tuple[int, str]]:
    return [(m.start(), m.group().lower()) for m in _WORD_RE.finditer(text)]


def find_leak(reply: str, instructions: Iterable[str] = (), markers: Iterable[str] = (),
              language: str = "en") -> Leak | None:
    """The earliest point where `reply` writes a carrier marker (CARRIER_MARKERS + `markers`, e.g.
    "\n아빠:" — the user's next line) or LEAK_WORDS consecutive words of one of `instructions` (an
    instruction shorter than that: all of its words; the echo is cut from its bracket or line start)."""
    found = [Leak(_line_start(reply, i), m) for m in (*CARRIER_MARKERS, *markers) if m and (i := reply.find(m)) >= 0]
    spans = _word_spans(reply)
    reply_words = [w for _, w in spans]
    for text in instructions:
        inst = words(text)
        n = min(LEAK_WORDS.get(language.split("-")[0], LEAK_WORDS_DEFAULT), len(inst))
        if n < 2:  # one word is no evidence of copying
            continue
        grams = {g for i in range(len(inst) - n + 1) if not set(g := tuple(inst[i : i + n])) <= FUNCTION_WORDS}
        for i in range(len(reply_words) - n + 1):
            if tuple(reply_words[i : i + n]) in grams:
                found.append(Leak(_line_start(reply, spans[i][0]), " ".join(reply_words[i : i + n])))
                break
    return min(found, key=lambda leak: leak.start) if found else None


def _line_start(text: str, pos: int) -> int:
    """Back up to where the echo's sentence, bracket or line starts ("좋아! 지우는 아빠에게 ..." and
    "좋아! [지시: 지우는 ..." are both cut after "좋아!"): a half-sentence of the note is no reply."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, pos)]
    openers = [text.rfind(o, 0, pos) for o in ("[", "(", "\n")]
    return max([0, *ends, *openers])


_SENTENCE_END = re.compile(r"[.!?。~]+\s*")


def cut_leak(reply: str, leak: Leak | None) -> str:
    """The reply before the echo, without trailing separators ("응, 알겠어!\n\n[System" -> "응, 알겠어!")."""
    if leak is None:
        return reply
    return reply[: leak.start].rstrip(" \t\n-*:[(")


# ---------------------------------------------------------------- degeneration


def pairs(ws: Sequence[str]) -> list[tuple[str, str]]:
    return list(zip(ws, ws[1:], strict=False))


# a syllable or short run stuck inside one word ("겪맬맬맬맬맬맬맬"); six times, so 하하하하 is still a
# laugh, and never jamo (ㅋㅋㅋㅋㅋㅋ, ㅠㅠㅠㅠㅠㅠ are how Korean chats laugh and cry)
_STUTTER_RE = re.compile(r"([^\W\d_\u3131-\u318e]{1,4}?)\1{5,}")


COMPACT_PHRASE = 5  # letters: a phrase written without spaces ("먹고싶어요먹고 싶어요") is found this way

# a reply whose last TAIL_WORDS words are at most TAIL_DISTINCT different ones has stopped saying
# anything: gemma-3-270m ends "...먹고.겪는데.겪는데.겪어.겪어.겪는다.겪는다.겪다.겪다.겪는다.겪는다.겪는다.",
# a loop over forms of one verb that no phrase count sees (no run of one word reaches REPEAT_TIMES).
# Ordinary chat seldom has 8 words in a row drawn from 3; a laugh written in jamo (ㅋㅋ ㅋㅋㅋ) is not a loop
TAIL_WORDS, TAIL_DISTINCT = 8, 3
_JAMO_RE = re.compile(r"[\u3131-\u318e]+")


def repeated_phrase(ws: Sequence[str], times: int = REPEAT_TIMES) -> str | None:
    """A phrase of 2-4 words that occurs `times` or more, one word `times` in a row ("아빠, 아빠, ..."),
    a piece of a word repeated six times inside it, COMPACT_PHRASE letters `times` times once the
    spaces are gone (small models drop the spaces of Korean as they loop), or a looping tail."""
    stutter = next((m.group(1) for w in ws if (m := _STUTTER_RE.search(w))), None)
    tail = looping_tail(ws)
    return (stutter or _repeated_words(ws, times) or _repeated_letters("".join(ws), times)
            or (" ".join(ws[tail:]) if tail is not None else None))


def looping_tail(ws: Sequence[str]) -> int | None:
    """Where the reply's closing loop starts (an index into `ws`), or None: its last TAIL_WORDS words
    hold at most TAIL_DISTINCT different ones; the loop reaches back over the words before them that
    are one of those or begin with the same letter as one (겪는데 before 겪어, 겪는다, 겪다)."""
    tail = ws[-TAIL_WORDS:]
    if len(tail) < TAIL_WORDS or len(set(tail)) > TAIL_DISTINCT or all(_JAMO_RE.fullmatch(w) for w in tail):
        return None
    start, heads = len(ws) - TAIL_WORDS, {w[0] for w in tail}
    while start > 0 and ws[start - 1][0] in heads:
        start -= 1
    return start


def _repeated_words(ws: Sequence[str], times: int) -> str | None:
    for n in (4, 3, 2):
        grams = Counter(tuple(ws[i : i + n]) for i in range(len(ws) - n + 1))
        phrase, count = grams.most_common(1)[0] if grams else ((), 0)
        if count >= times and len(set(phrase)) > 1:  # "아빠 아빠" is the one-word run below
            return " ".join(phrase)
    run = 1
    for a, b in zip(ws, ws[1:], strict=False):
        run = run + 1 if a == b else 1
        if run >= times:
            return a
    return None


def _repeated_letters(compact: str, times: int) -> str | None:
    grams = Counter(compact[i : i + COMPACT_PHRASE] for i in range(len(compact) - COMPACT_PHRASE + 1))
    return next((g for g, _ in grams.most_common(3) if compact.count(g) >= times), None)


def distinct_pair_share(ws: Sequence[str]) -> float:
    ps = pairs(ws)
    return len(set(ps)) / len(ps) if ps else 1.0


def copied_share(ws: Sequence[str], earlier: Iterable[str]) -> float:
    """The largest share of this reply's word pairs found in any one earlier reply."""
    ps = pairs(ws)
    if not ps:
        return 0.0
    best = 0.0
    for text in earlier:
        theirs = set(pairs(words(text)))
        best = max(best, sum(p in theirs for p in ps) / len(ps))
    return best


def script_of(ch: str) -> str | None:
    """hangul | kana | han | latin | cyrillic | other letter | None (not a letter)."""
    if not ch.isalpha():
        return None
    code = ord(ch)
    if 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
        return "hangul"
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF66 <= code <= 0xFF9D:
        return "kana"
    if 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF:
        return "han"
    name = unicodedata.name(ch, "")
    for script in ("LATIN", "CYRILLIC", "GREEK", "ARABIC", "HEBREW", "THAI", "DEVANAGARI"):
        if name.startswith(script):
            return script.lower()
    return "other"


ALLOWED_SCRIPTS = {"ko": {"hangul"}, "ja": {"kana", "han"}, "zh": {"han"}, "ru": {"cyrillic"}}


def foreign_words(text: str, language: str, names: Iterable[str] = ()) -> list[str]:
    """Words in a script the persona's `language` does not write. Korean: Hangul only (no kana, no
    hanja), Latin only for `names` (the persona's, the user's, words its own file spells in Latin);
    other languages: Latin (plus their own script for the few listed in ALLOWED_SCRIPTS)."""
    allowed = ALLOWED_SCRIPTS.get(language.split("-")[0], set()) | ({"latin"} if language != "ko" else set())
    ok_names = {n.lower() for n in names}
    out = []
    for w in words(text):
        scripts = {s for s in map(script_of, w) if s}
        if scripts - allowed and not (w in ok_names and scripts <= {"latin", "hangul"}):
            out.append(w)
    return out


def degeneration(reply: str, earlier: Sequence[str] = (), language: str = "en",
                 names: Iterable[str] = ()) -> list[str]:
    """Why `reply` is degenerate ([] if it is not): a phrase repeated REPEAT_TIMES+ times, fewer than
    half of its word pairs distinct, most of its word pairs copied from one earlier reply, or words
    in another script than the persona's language."""
    ws = words(reply)
    problems = []
    if repeated_phrase(ws):
        problems.append("repeated_phrase")
    if len(ws) > MIN_PAIRS and distinct_pair_share(ws) < 0.5:
        problems.append("few_distinct_pairs")
    if len(ws) > MIN_PAIRS // 2 and copied_share(ws, earlier) > 0.5:
        problems.append("copied_reply")
    if foreign_words(reply, language, names):
        problems.append("foreign_script")
    return problems


def cut_repetition(reply: str) -> str:
    """The reply up to where its repeated phrase comes back the second time, or up to its closing
    loop: the last resort when no regeneration came back clean ("응, 어미 짱아, 어미 짱아, 어미 짱아!"
    -> "응, 어미 짱아")."""
    stutter = _STUTTER_RE.search(reply)
    if stutter:
        return reply[: stutter.start()].rstrip(" ,;·-")
    spans = _word_spans(reply)
    ws = [w for _, w in spans]
    phrase = _repeated_words(ws, REPEAT_TIMES)
    if phrase is not None:
        n = len(phrase.split())
        hits = [i for i in range(len(ws) - n + 1) if " ".join(ws[i : i + n]) == phrase]
        return reply[: spans[hits[1]][0]].rstrip(" ,;·-") if len(hits) > 1 else reply
    letters = _repeated_letters("".join(ws), REPEAT_TIMES)
    if letters is not None:
        # the same letters with anything but letters between them: where the phrase comes back
        again = [m.start() for m in re.finditer(r"[\W_]*".join(map(re.escape, letters)), reply.lower())]
        return reply[: again[1]].rstrip(" ,;·-") if len(again) > 1 else reply
    tail = looping_tail(ws)
    if tail is None:
        return reply
    # the words before the loop; a reply that is all loop keeps it up to its first repeated word
    cut = tail or next(i for i, w in enumerate(ws) if w in ws[:i])
    return reply[: spans[cut][0]].rstrip(" ,;·-")


def cut_foreign_tail(reply: str, language: str, names: Iterable[str] = ()) -> str:
    """The reply before its first word in a foreign script, back to the last sentence end before it
    (gemma-3-270m ends a fine Korean sentence and then writes "길죄setInputsetInput" instead of its
    end-of-turn marker: the sentence is the reply)."""
    bad = set(foreign_words(reply, language, names))
    first = next((start for start, w in _word_spans(reply) if w in bad), None)
    if first is None:
        return reply
    head = reply[:first]
    ends = [m.end() for m in _SENTENCE_END.finditer(head)]
    return (head[: ends[-1]] if ends else head).rstrip(" ,;·-/")


# ---------------------------------------------------------------- the policy around a reply


@dataclass
class ReplyRules:
    """What a reply is checked against: the instructions it must not echo, the turn markers it must
    not write, the replies it must not copy, the persona's language and the names it may spell."""

    instructions: Sequence[str] = ()
    markers: Sequence[str] = ()
    earlier: Sequence[str] = ()
    language: str = "en"
    names: Sequence[str] = ()

    def problems(self, reply: str) -> tuple[str, list[str]]:
        """(the reply with any leak cut off, what is still wrong with it: "leak_only" when nothing
        but the echo was there, then the degeneration reasons)."""
        leak = find_leak(reply, self.instructions, self.markers, self.language)
        text = cut_leak(reply, leak)
        if leak is not None and not words(text):
            return text, ["leak_only"]
        return text, degeneration(text, self.earlier, self.language, self.names)


@dataclass
class Settled:
    text: str  # what to show and store: never an echo of the instructions
    metadata: dict


def settle(reply: str, rules: ReplyRules, regenerate=None, max_retries: int = 2) -> Settled:
    """Cut any leaked instruction; a reply drifting into another script is cut before it, and if
    that leaves nothing clean, it is regenerated (`regenerate(attempt)` returns a fresh whole reply, or "" when it may
    not run) up to `max_retries` times. The first clean candidate wins, else the least bad (fewest
    problems). The metadata says what happened; what is returned never echoes the instructions."""
    meta: dict = {}
    best, best_problems, tries = "", ["empty"], 0
    candidate = reply
    while True:
        text, problems = _settle_one(candidate, rules, meta)
        if not words(text) and not problems:
            problems = ["empty"]  # the model ended its turn at once: worth another try too
        if tries == 0 or (not words(text), len(problems)) < (not words(best), len(best_problems)):
            best, best_problems = text, problems  # the fewest problems, and any words beat none
        if not problems or regenerate is None or tries >= max_retries:
            break
        tries += 1
        candidate = regenerate(tries)
    if tries:
        meta["quality_regenerations"] = tries
    if "repeated_phrase" in best_problems:  # the last resort: no regeneration came back clean
        best = cut_repetition(best)
        meta["repetition_cut"] = True
    if best_problems:
        meta["quality"] = best_problems
    return Settled(best, meta)


def _settle_one(reply: str, rules: ReplyRules, meta: dict) -> tuple[str, list[str]]:
    """One candidate: its leak cut, then its foreign tail (the sentences before it are the reply)."""
    text, problems = rules.problems(reply)
    if text != reply.strip() and problems != ["leak_only"]:
        meta["leak_cut"] = True
    if "foreign_script" in problems:
        kept = cut_foreign_tail(text, rules.language, rules.names)
        kept_problems = degeneration(kept, rules.earlier, rules.language, rules.names) if words(kept) else ["empty"]
        if len(kept_problems) < len(problems):
            meta["degenerate_cut"] = problems
            return kept, kept_problems
    if problems == ["leak_only"]:
        meta["leak_cut"] = True
    return text, problems


def carrier_stops(persona: Any) -> list[str]:
    """Stop strings for a persona's turn: the carriers' openings and the user's next line, so an echo
    ends the generation before it is streamed (the post-check still cuts what slips past)."""
    from persona.prompt import user_name_for

    return ["[System note", "[Memory", "[Core memory", "(기억해", "(기억하세요", f"\n{user_name_for(persona)}:"]


# A Korean persona with a register is told about 반말/존댓말; the words of that instruction are no chat
# vocabulary, so a reply that uses them ("지우는 아빠에게 반말로 말한다") is narrating its instructions.
REGISTER_TERMS = ("반말", "존댓말", "해요체", "해체)")


def rules_for(persona: Any, post_history: str | None, earlier: Sequence[str] = ()) -> ReplyRules:
    """The ReplyRules of one turn: the note the prompt carried after the history (with any register
    reminder), the persona's register rule and reminder texts, its earlier replies and names."""
    from persona.prompt import REGISTER_INSTRUCTION, REGISTER_REMINDER, render_macros, user_name_for

    user, char = user_name_for(persona), persona.char
    texts = [post_history or ""]
    texts += [t[persona.register] for t in (REGISTER_INSTRUCTION, REGISTER_REMINDER) if persona.register in t]
    instructions = [render_macros(t, char, user) for t in texts if t]
    own = " ".join([persona.description, persona.scenario, persona.personality, persona.greeting]
                   + [t.content for d in persona.examples for t in d])
    names = {char, user, persona.name, *(w for w in words(own) if script_of(w[0]) == "latin")}
    markers = [f"\n{user}:", *(REGISTER_TERMS if persona.register in REGISTER_INSTRUCTION else ())]
    return ReplyRules(instructions, markers, list(earlier), persona.language, sorted(names))
