"""Summarizers for the `summary` and `summary_buffer` strategies.

A summarizer is `(previous summary, newly overflowed messages) -> updated summary`.

- `ModelSummarizer(engine, tokenizer)`: the model (local or the remote engine) rewrites the running summary with a short
  prompt through the chat template, decoded greedily (temperature 0; a mild repetition penalty
  keeps small models from looping). New messages too long for one prompt are folded in chunks,
  still within one summarizer call.
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


_HANGUL = re.compile(r"[\uac00-\ud7a3]")
_LETTER = re.compile(r"[^\W\d_]")
# a language the model is told to keep, by script; anything else: "the language of the conversation"
_LANGUAGES = {"ko": ("Korean", "요약은 한국어로 써."), "en": ("English", "")}


def conversation_language(texts: list[str]) -> str:
    """"ko" when at least a third of the letters are Hangul, else "en" (other scripts: treated as en)."""
    joined = " ".join(texts)
    letters = len(_LETTER.findall(joined))
    return "ko" if letters and len(_HANGUL.findall(joined)) * 3 >= letters else "en"


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
    ) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.context_window = context_window or int(engine.context_window)
        self.repetition_penalty = repetition_penalty
        self._fallback = ExtractiveSummarizer()

    def __call__(self, previous: str, messages: list[Message]) -> str:
        summary = previous
        for chunk in self._chunks(previous, _lines(messages)):
            summary = self._fold(summary, chunk)
        return summary

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
