"""Grammar-constrained JSON for our own decoder: a logit processor built on llguidance.

    proc = JsonConstraint(tokenizer, schema)          # one per generation (it keeps parser state)
    engine.complete(prompt_ids, params, logits_processors=[proc])
    value = proc.parse(text)                          # the JSON value (always parses when finished)

llguidance compiles the JSON Schema to a grammar and, at each step, gives the set of tokens that
keep the output a valid prefix; every other token's logit becomes -inf. The engine's processor
contract is `(generated ids so far, logits (vocab,) float32) -> logits`, so the processor first
feeds llguidance the tokens generated since its last call, then masks. When the grammar is
complete only end-of-sequence tokens stay allowed, so a finished reply is always well-formed.
"""

from __future__ import annotations

import json
import threading
from functools import lru_cache
from typing import Any

import numpy as np
import torch


class _Wrapped:
    """Our Tokenizer in the shape llguidance's TokenizerWrapper expects (token bytes + encode)."""

    def __init__(self, tok: Any) -> None:
        self.eos_token_id = min(tok.eos_ids) if tok.eos_ids else 0
        self.bos_token_id = tok.bos_id
        specials = set(getattr(tok, "special_ids", ()) or ())
        self.tokens = []
        for i in range(tok.vocab_size):
            raw = tok.token_bytes(i)
            if not raw:  # control tokens: llguidance marks specials with a 0xFF prefix
                specials.add(i)
                raw = b"\xff" + (tok.id_to_token(i) or f"<ctrl{i}>").encode()
            self.tokens.append(raw)
        self.special_token_ids = sorted(specials)
        self._tok = tok

    def __call__(self, s: str | bytes) -> list[int]:
        return self._tok.encode(s.decode("utf-8", errors="replace") if isinstance(s, bytes) else s)


_LOCK = threading.Lock()


@lru_cache(maxsize=4)
def _ll_tokenizer(tok: Any) -> Any:
    """One LLTokenizer per tokenizer (building its token trie takes ~100 ms)."""
    import llguidance

    wrapped = llguidance.TokenizerWrapper(_Wrapped(tok))
    return llguidance.LLTokenizer(wrapped, n_vocab=tok.vocab_size, eos_token=sorted(tok.eos_ids) or None)


class JsonConstraint:
    """Masks logits so the generated text is JSON valid against `schema` (llguidance)."""

    def __init__(self, tokenizer: Any, schema: dict[str, Any]) -> None:
        import llguidance

        with _LOCK:
            self.ll = _ll_tokenizer(tokenizer)
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "coerce_one_of": True}
        )
        self.matcher = llguidance.LLMatcher(self.ll, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"invalid JSON schema for constrained decoding: {self.matcher.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self.eos_ids = sorted(tokenizer.eos_ids)
        self._consumed = 0

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        for token in generated[self._consumed :]:
            self.matcher.consume_token(token)
        self._consumed = len(generated)
        allowed = self._allowed(logits.shape[-1])
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def _allowed(self, n: int) -> torch.Tensor:
        if self.matcher.is_error() or self.matcher.is_stopped():
            mask = np.zeros(n, dtype=bool)
            mask[[i for i in self.eos_ids if i < n]] = True
            return torch.from_numpy(mask)
        bits = np.unpackbits(np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        mask = np.zeros(n, dtype=bool)
        m = min(n, len(bits))
        mask[:m] = bits[:m].astype(bool)
        return torch.from_numpy(mask)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None

    @staticmethod
    def parse(text: str) -> Any:
        return json.loads(text)
