"""Memento's own decoder-only transformer: weights, tokenizers, KV cache, sampling, engine.

Imports nothing from memory/, persona/ or service/.
"""

from typing import Any

# Lazy so that `import model.tokenizer` does not pull torch-heavy modules it does not need.
_EXPORTS = {
    "load_model": "model.registry",
    "LoadedModel": "model.registry",
    "ModelArgs": "model.config",
    "Engine": "model.engine",
    "SamplingParams": "model.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'model' has no attribute {name!r}")


__all__ = list(_EXPORTS)
