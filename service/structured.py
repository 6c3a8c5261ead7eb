"""Structured output: `response_format` and tool-call grammars as per-row logit processors (llguidance).

    grammar = response_format_grammar(body.response_format)      # None: unconstrained
    check_grammar(grammar, tokenizer, param="response_format")    # 400 naming the problem
    proc = GrammarConstraint(tokenizer, grammar)                  # one per generation (it holds parser state)
    engine.generate(ids, params, logits_processors=[proc])

llguidance compiles a JSON Schema (or a Lark grammar with `%json{...}` pieces, used for tool calls)
and at each step gives the set of tokens that keep the output a valid prefix; every other token's
logit becomes -inf. Once the grammar is complete only end-of-sequence tokens stay allowed, so a
finished reply always parses.

Each generation (each row of the lead's batched scheduler) owns its matcher, so one row's mask
never waits for another's. Where the engine tells us the sampled token before the next forward
(`advance(token_id)`, called by the event consumer), the mask for the next step is computed on a
small thread pool while the forward runs (llguidance releases the GIL); otherwise `__call__`
computes it in line.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from service.errors import APIError

MAX_SCHEMA_CHARS = 32_000  # a schema larger than this is refused: compiling it would stall the worker
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
# No free whitespace (a small model given it can loop on newlines until max_tokens), but the
# separators json.dumps writes, as most JSON a model has seen (and our tool prompt) looks: compact
# "," / ":" blocked SmolLM2-135M's ' "' after a key, and it nested {"setup":{"setup":... instead.
JSON_SEPARATORS = {"item_separator": ", ", "key_separator": ": "}
JSON_DEFAULTS = {"whitespace_flexible": False, "coerce_one_of": True, **JSON_SEPARATORS}

_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memento-grammar")
_TOK_LOCK = threading.Lock()


def ll_tokenizer(tokenizer: Any) -> Any:
    """The shared llguidance tokenizer for `tokenizer` (memory/grammar.py builds and caches it once)."""
    from memory.grammar import _ll_tokenizer

    with _TOK_LOCK:
        return _ll_tokenizer(tokenizer)


def schema_grammar(schema: dict[str, Any]) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)


def lark_grammar(source: str) -> str:
    import llguidance

    return llguidance.LLMatcher.grammar_from_lark(source)


def response_format_grammar(response_format: Any) -> str | None:
    """The grammar `response_format` asks for (`json_object`, `json_schema`), or None for `text`."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return schema_grammar(JSON_OBJECT_SCHEMA)
    spec = response_format.json_schema
    param = "response_format.json_schema.schema"
    if spec is None:
        raise APIError(400, "response_format type 'json_schema' needs a 'json_schema' object "
                       "({'name': ..., 'schema': {...}})", param="response_format.json_schema", code="invalid_value")
    schema = spec.schema_ if spec.schema_ is not None else {"type": "object"}
    check_schema_size(schema, param)
    schema = closed(schema)  # objects without additionalProperties get false, as OpenAI strict mode has it
    try:
        return schema_grammar(schema)
    except Exception as exc:  # llguidance raises on schemas it cannot even read
        raise invalid_schema(param, str(exc)) from exc


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that does not say otherwise."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) if k not in ("const", "enum", "default", "examples") else v for k, v in schema.items()}
    if out.get("type") == "object" or "properties" in out:
        out.setdefault("additionalProperties", False)
    return out


def check_schema_size(schema: Any, param: str) -> None:
    size = len(json.dumps(schema))
    if size > MAX_SCHEMA_CHARS:
        raise APIError(400, f"{param} is {size} characters of JSON; the limit is {MAX_SCHEMA_CHARS}: "
                       "send a smaller schema", param=param, code="schema_too_large")


def invalid_schema(param: str, why: str) -> APIError:
    return APIError(400, f"{param} is not a schema constrained decoding can follow: {why.strip()}",
                    param=param, code="invalid_schema")


def check_grammar(grammar: str, tokenizer: Any, param: str) -> None:
    """Compile `grammar` once now, so a bad schema is the caller's 400 and not an empty reply later."""
    import llguidance

    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer(tokenizer))
    if error:
        raise invalid_schema(param, error)


class GrammarConstraint:
    """Masks logits so the generated text follows `grammar`; one instance per generation."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        import llguidance

        self.matcher = llguidance.LLMatcher(ll_tokenizer(tokenizer), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"grammar does not compile: {self.matcher.get_error()}")
        self.eos_ids = sorted(tokenizer.eos_ids)
        self._consumed = 0
        self._pending: Future[np.ndarray] | None = None  # the next mask, computed ahead
        self._lock = threading.Lock()  # the matcher is used from the engine and the pool

    def advance(self, index: int, token_id: int) -> None:
        """The engine sampled `token_id` as reply token `index`: consume it and start the next mask
        while the forward runs. A late call (the engine already asked for that mask) is ignored."""
        with self._lock:
            if index != self._consumed:
                return
            self.matcher.consume_token(token_id)
            self._consumed += 1
            self._pending = _POOL.submit(self._mask_locked)

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        mask = self._mask_for(generated)
        n = logits.shape[-1]
        m = min(n, len(mask))
        # the blocked set built in numpy and applied by one masked_fill: fewer torch ops per token
        # (each costs a thread-pool round trip, slow on a busy CPU)
        block = np.ones(n, dtype=bool)
        block[:m] = ~mask[:m]
        if logits.device.type == "cpu":  # numpy is single-threaded: no OpenMP round trip, which
            out = logits.numpy().copy()  # costs ms on a busy 2-core CPU (measured 1.35 ms vs 32 us)
            out[block] = -np.inf
            return torch.from_numpy(out)
        return logits.masked_fill(torch.from_numpy(block).to(logits.device), float("-inf"))

    def _mask_for(self, generated: list[int]) -> np.ndarray:
        with self._lock:
            pending = self._pending if self._consumed == len(generated) else None
            self._pending = None
            if pending is None:
                for token in generated[self._consumed:]:  # tokens nobody announced through advance()
                    self.matcher.consume_token(token)
                self._consumed = len(generated)
                return self._compute()
        return pending.result()  # outside the lock: the pool's task needs it

    def _mask_locked(self) -> np.ndarray:
        with self._lock:
            return self._compute()

    def _compute(self) -> np.ndarray:
        if self.matcher.is_error() or self.matcher.is_stopped():
            mask = np.zeros(max(self.eos_ids, default=0) + 1, dtype=bool)
            mask[self.eos_ids] = True
            return mask
        raw = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little").astype(bool)

    @property
    def error(self) -> str | None:
        return self.matcher.get_error() if self.matcher.is_error() else None


class ReplyRepetitionPenalty:
    """Hugging Face's repetition penalty (a positive logit divided by `penalty`, a negative one
    multiplied) over the reply's own tokens, not the prompt's: under a grammar the reply copies
    the prompt's values, and only its repeating itself should cost. In numpy on CPU (see
    GrammarConstraint.__call__)."""

    def __init__(self, penalty: float) -> None:
        self.penalty = penalty

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:
        if not generated:
            return logits
        if logits.device.type != "cpu":
            from model.sampling import apply_repetition_penalty

            return apply_repetition_penalty(logits, generated, self.penalty)
        out = logits.numpy().copy()
        ids = np.unique(np.asarray(generated, dtype=np.int64))
        ids = ids[ids < out.shape[-1]]
        seen = out[ids]
        out[ids] = np.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return torch.from_numpy(out)


class ConstraintFactory:
    """A fresh GrammarConstraint per generation (n choices, retries): the grammar is compiled once."""

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        self.tokenizer = tokenizer
        self.grammar = grammar

    def __call__(self) -> GrammarConstraint:
        return GrammarConstraint(self.tokenizer, self.grammar)
