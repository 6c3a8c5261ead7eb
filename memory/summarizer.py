"""Summarizers for the `summary` and `summary_buffer` strategies.

A summarizer is `(previous summary, newly overflowed messages) -> updated summary`.

- `ModelSummarizer(engine, tokenizer)`: the model (local or the remote engine) writes the summary,
  greedily (temperature 0), in one of two styles:
  - `facts` (the default): a list of the user's own sentences worth keeping. For each new user
    sentence the model answers "yes" or "no" under a grammar (llguidance, `memory.grammar`) that
    allows nothing else, and a "yes" keeps the sentence verbatim: a 135M model cannot invent,
    ramble or switch language, it only ever judges. (Asked instead to copy the worthwhile lines
    out of a list, SmolLM2-135M answered `[]` or picked the second line, whatever it said.)
    Incremental: earlier facts are kept verbatim, new ones appended, the oldest dropped when the
    summary passes `max_tokens`. One short generation per sentence (~0.3 s on a CPU for SmolLM2).
  - `prose`: the model rewrites the running summary with a short prompt (a mild repetition penalty
    keeps small models from looping); new messages too long for one prompt are folded in chunks,
    still within one summarizer call. At 135M this loses most facts (memory.bench summaries track).
- `ExtractiveSummarizer`: no model; keeps the users' own lines, newest last, within a character
  cap. Cheap and deterministic (used by `memory.bench` and as a fallback for empty model output).
"""

from __future__ import annotations

import re
from typing import Any

from memory.types import Message

SYSTEM_PROMPT = (
    "You keep a short running summary of a conversation between a user and an assistant. "
    "Keep names, facts about the user, preferences, plans and decisions. "
    "Write in the language of the conversation. Answer with the updated summary only."
)


FACTS_PROMPT = (
    "You decide whether a line a user said is worth remembering about them: a lasting fact such as their name, "
    "family, pets, home, work, health, likes and dislikes, or plans. Small talk, questions, requests and passing "
    "remarks are not."
)
FACTS_EXAMPLES = [  # alternating, ending on "yes": a 135M model copies the last answer's label otherwise
    ("Can you help me write an email?", "no"), ("My brother is a nurse.", "yes"), ("It rained all day.", "no"),
    ("우리 딸 이름은 하나야.", "yes"), ("What should I cook tonight?", "no"), ("I'm vegetarian.", "yes"),
    ("오늘 좀 피곤하네.", "no"), ("나는 채식주의자야.", "yes"), ("Tell me a joke.", "no"), ("We got married in 2019.", "yes"),
]
_MAX_SENTENCE_CHARS = 300

_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_LETTER = re.compile(r"[^\W\d_]")
# a language the model is told to keep, by script; anything else: "the language of the conversation"
_LANGUAGES = {"ko": ("Korean", "요약은 한국어로 써."), "en": ("English", "")}


def conversation_language(texts: list[str]) -> str:
    """"ko" when at least a third of the letters are Hangul, else "en" (other scripts: treated as en)."""
    joined = " ".join(texts)
    letters = len(_LETTER.findall(joined))
    return "ko" if letters and len(_HANGUL.findall(joined)) * 3 >= letters else "en"


def user_sentences(messages: list[Message]) -> list[str]:
    """The users' sentences (`memory.hybrid.sentences`), in order, each once, each cut to 300 characters."""
    from memory.hybrid import sentences

    out = [x[:_MAX_SENTENCE_CHARS] for m in messages if m.role == "user" for x in sentences(m.content)]
    return list(dict.fromkeys(out))


def _lines(messages: list[Message]) -> list[str]:
    return [f"{'User' if m.role == 'user' else 'Assistant'}: {m.content}" for m in messages]


class ExtractiveSummarizer:
    name = "extractive"

    def __init__(self, max_chars: int = 2000, line_chars: int = 300) -> None:
        self.max_chars = max_chars
        self.line_chars = line_chars

    def __call__(self, previous: str, messages: list[Message]) -> str:
        lines = previous.splitlines() if previous else []
        lines += [f"User said: {m.content[: self.line_chars]}" for m in messages if m.role == "user"]
        while lines and sum(len(x) + 1 for x in lines) > self.max_chars:
            lines.pop(0)  # the oldest facts go first
        return "\n".join(lines)


class ModelSummarizer:
    name = "model"

    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        max_tokens: int = 256,
        context_window: int | None = None,
        repetition_penalty: float = 1.1,
        style: str = "facts",
    ) -> None:
        if style not in ("facts", "prose"):
            raise ValueError(f"summary style {style!r}: use 'facts' or 'prose'")
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.context_window = context_window or int(engine.context_window)
        self.repetition_penalty = repetition_penalty
        self.style = style
        self.decisions = 0  # yes/no generations made (style "facts")
        self._fallback = ExtractiveSummarizer()

    def __call__(self, previous: str, messages: list[Message]) -> str:
        if self.style == "facts":
            return self._keep_facts(previous, messages)
        summary = previous
        for chunk in self._chunks(previous, _lines(messages)):
            summary = self._fold(summary, chunk)
        return summary

    # ------------------------------------------------------------------ style "facts"

    def facts_prompt(self, sentence: str) -> list[dict[str, str]]:
        """Few-shot: small models follow examples better than instructions (the examples are fixed here,
        none from the benchmarks)."""
        messages = [{"role": "system", "content": FACTS_PROMPT}]
        for line, answer in FACTS_EXAMPLES:
            messages += [{"role": "user", "content": f"Line: {line}\nWorth remembering?"},
                         {"role": "assistant", "content": f'"{answer}"'}]
        return messages + [{"role": "user", "content": f"Line: {sentence}\nWorth remembering?"}]

    def _keep_facts(self, previous: str, messages: list[Message]) -> str:
        """Previous facts + the new user sentences the model keeps, within max_tokens (oldest out first)."""
        kept = [line[2:] for line in previous.splitlines() if line.startswith("- ")] if previous else []
        kept += [x for x in user_sentences(messages) if x not in kept and self.worth_keeping(x)]
        while len(kept) > 1 and self.tokenizer.count("\n".join(f"- {x}" for x in kept)) > self.max_tokens:
            kept.pop(0)
        return "\n".join(f"- {x}" for x in kept)

    def worth_keeping(self, sentence: str) -> bool:
        """The model's yes/no for one sentence, under a grammar that allows only "yes" or "no"."""
        from memory.generate import chat_complete
        from memory.grammar import JsonConstraint

        constraint = JsonConstraint(self.tokenizer, {"enum": ["yes", "no"]})
        text = chat_complete(self.engine, self.tokenizer, self.facts_prompt(sentence), max_tokens=4,
                             processors=[constraint])
        self.decisions += 1
        # a remote engine runs no grammar (service/conversation.WorkerEngine): read a free answer too
        return text.strip().strip('"').lower().startswith("yes")

    # ------------------------------------------------------------------ style "prose"

    def prompt(self, previous: str, lines: list[str]) -> list[dict[str, str]]:
        # small models drift into English unless told the language, so it is named in both messages
        name, native = _LANGUAGES[conversation_language(lines or [previous])]
        body = (
            f"Current summary:\n{previous or '(empty)'}\n\n"
            "New lines of the conversation:\n" + "\n".join(lines) + f"\n\nUpdated summary, in {name}:"
            + (f" {native}" if native else "")
        )
        system = f"{SYSTEM_PROMPT} The conversation is in {name}: write the summary in {name}."
        return [{"role": "system", "content": system}, {"role": "user", "content": body}]

    def _fold(self, previous: str, lines: list[str]) -> str:
        from memory.generate import chat_complete

        text = chat_complete(self.engine, self.tokenizer, self.prompt(previous, lines), max_tokens=self.max_tokens,
                             repetition_penalty=self.repetition_penalty).strip()
        if not text:  # never lose the new lines because the model said nothing
            return self._fallback(previous, [_as_user(line) for line in lines])
        return text

    def _chunks(self, previous: str, lines: list[str]) -> list[list[str]]:
        """Pack lines so each prompt (previous summary of <= max_tokens included) fits the window."""
        # the prompt around the lines (either language's wording) + a previous summary of up to a reply's length
        frame = max(self.tokenizer.count_messages(self.prompt("", [line])) for line in ("a", "가"))
        overhead = frame + max(self.tokenizer.count(previous) if previous else 0, self.max_tokens)
        budget = max(64, self.context_window - self.max_tokens - overhead - 16)
        chunks: list[list[str]] = [[]]
        used = 0
        for line in lines:
            n = self.tokenizer.count(line) + 1
            if n > budget:  # one huge message: keep its head
                line = line[: max(1, len(line) * budget // n)] + "…[truncated]"
                n = budget
            if used + n > budget and chunks[-1]:
                chunks.append([])
                used = 0
            chunks[-1].append(line)
            used += n
        return [c for c in chunks if c]


def _as_user(line: str) -> Message:
    return Message(id="", session_id="", role="user", content=line, created_at="")
