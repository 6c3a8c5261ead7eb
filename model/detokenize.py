"""Incremental, UTF-8-safe detokenization for streaming.

One Korean syllable is three UTF-8 bytes; byte-level BPE (SmolLM2) may split them across tokens
and SentencePiece byte fallback (Gemma: `<0xEA><0xB0><0x80>`) emits them one token per byte.
Decoding token by token would print U+FFFD halves, so we decode a short window of recent tokens
and release text only once it no longer ends in an incomplete character (the offsets scheme of
Hugging Face's TextStreamer / vLLM's incremental detokenizer):

    dec = tokenizer.stream_decoder()
    for tid in ids: print(dec.push(tid), end="")
    print(dec.flush())            # "".join(pushes) + flush == tokenizer.decode(ids)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class StreamDecoder:
    """Feed token ids one by one; get back only newly completed text."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode  # ids -> text, e.g. Tokenizer.decode
        self._ids: list[int] = []
        self._prefix = 0  # window start: a clean boundary, already emitted up to _read
        self._read = 0  # tokens before this index have been emitted

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is still partial)."""
        self._ids.append(int(token_id))
        # Decoding from an earlier token keeps context a decoder may use (e.g. SentencePiece's
        # leading-space rule), and the emitted part is what the newest tokens add to it.
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        if len(text) <= len(done) or text.endswith(REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Release whatever is held back (an incomplete trailing character becomes U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return text[len(done):] if text.startswith(done) else text

    @property
    def pending(self) -> int:
        """How many pushed tokens are held back, not yet turned into text."""
        return len(self._ids) - self._read
