"""`memento bench --structured`: what grammar-constrained decoding costs against free decoding.

    result = run_structured_bench(lm)    # {"free_tok_s", "json_schema_tok_s", "ratio", ...}

Same engine, same prompt, same number of tokens, greedy: a reply that must follow a JSON schema
with one long string field (so it never completes early), against the same request without a
schema. Rounds alternate so both see the same machine load; medians are reported. The target in
the OpenAI-API issue is a ratio >= 0.85 (at most 15% slower).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from model.sampling import SamplingParams
from service.structured import GrammarConstraint, schema_grammar

SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"]}
PROMPT = "Reply in JSON with one field, story: a long story about a lighthouse keeper."
TOKENS = 64
ROUNDS = 3


def decode_rate(engine: Any, prompt: list[int], processors: list[Any]) -> tuple[float, int]:
    """Tokens per second after the first token, and the number of tokens generated."""
    params = SamplingParams(temperature=0.0, max_tokens=TOKENS)
    stamps: list[float] = []
    for ev in engine.generate(prompt, params, logits_processors=processors):
        if ev.token_id is not None:
            for p in processors:
                if hasattr(p, "advance"):  # as the service does: the next mask overlaps the forward
                    p.advance(len(stamps), ev.token_id)
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def run_structured_bench(lm: Any, rounds: int = ROUNDS) -> dict[str, Any]:
    from model.engine import Engine

    tok = lm.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}])
    grammar = schema_grammar(SCHEMA)
    engine = Engine(lm)
    try:
        decode_rate(engine, prompt, [])  # warm-up: first-call costs stay out of both sides
        decode_rate(engine, prompt, [GrammarConstraint(tok, grammar)])
        free, constrained, lengths = [], [], []
        for _ in range(rounds):
            free.append(decode_rate(engine, prompt, [])[0])
            rate, n = decode_rate(engine, prompt, [GrammarConstraint(tok, grammar)])
            constrained.append(rate)
            lengths.append(n)
    finally:
        engine.close()
    f, c = statistics.median(free), statistics.median(constrained)
    return {"model": lm.name, "tokens": TOKENS, "constrained_tokens": min(lengths), "free_tok_s": f,
            "json_schema_tok_s": c, "ratio": c / f, "target_ratio>=0.85": c / f >= 0.85}


def print_structured_table(r: dict[str, Any]) -> None:
    print(f"model {r['model']}  {r['tokens']} tokens, greedy, median of {ROUNDS} alternating rounds")
    print(f"{'free decode tok/s':28}{r['free_tok_s']:>8.1f}")
    print(f"{'json_schema decode tok/s':28}{r['json_schema_tok_s']:>8.1f}   ratio {r['ratio']:.2f} "
          f"(target >= 0.85: {r['target_ratio>=0.85']})")
