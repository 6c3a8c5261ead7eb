"""One generation for the memory layer's own prompts (summaries, core-block edits).

    text = chat_complete(engine, tokenizer, messages, max_tokens=256, repetition_penalty=1.1)

`engine` is either the service's backend seam (`complete_messages`: local or a remote engine, the
prompt rendered on its side) or a bare `model.Engine` (benchmarks, maintenance, tests), for which
the chat template is applied here. Greedy by default: memory text should not vary run to run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chat_complete(engine: Any, tokenizer: Any, messages: list[dict[str, str]], *, max_tokens: int,
                  temperature: float = 0.0, repetition_penalty: float = 1.0, processors: Sequence[Any] = ()) -> str:
    if hasattr(engine, "complete_messages"):
        return engine.complete_messages(messages, max_tokens=max_tokens, temperature=temperature,
                                        repetition_penalty=repetition_penalty, processors=processors)
    from model.sampling import SamplingParams

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, repetition_penalty=repetition_penalty)
    return engine.complete(ids, params, session_id=None, logits_processors=list(processors)).text
