"""Everything the service opens once at start-up and closes at shutdown, kept on `app.state.rt`.

The model, its engine (owned by the worker thread), the transcript store, the persona registry
and, lazily, vector memory (Chroma client + embedder are heavy: opened on first use of `vector`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.metrics import Metrics
from service.settings import Settings
from service.worker import EngineWorker, SerialExecutor

log = logging.getLogger("memento")


class InFlight:
    """Sessions with a turn in progress: a second concurrent turn would interleave the transcript
    (user, user, assistant, assistant), so it is refused with 409 instead."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def claim(self, session_id: str) -> Callable[[], None] | None:
        """A release function, or None when the session is already busy."""
        with self._lock:
            if session_id in self._ids:
                return None
            self._ids.add(session_id)

        def release() -> None:
            with self._lock:
                self._ids.discard(session_id)

        return release


@dataclass
class Runtime:
    settings: Settings
    lm: Any  # model.LoadedModel
    engine: Any  # model.Engine; only the worker thread calls it
    store: Any  # memory.store.Store
    personas: Any  # persona.PersonaRegistry
    worker: EngineWorker
    background: SerialExecutor
    metrics: Metrics
    started_at: float = 0.0
    in_flight: InFlight = field(default_factory=InFlight)
    _vector: Any = None
    _vector_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    @property
    def context_window(self) -> int:
        return int(self.lm.context_window)

    def vector(self) -> Any:
        """Vector memory, opened on first use (embedded Chroma under the data dir, or a server)."""
        with self._vector_lock:
            if self._vector is None:
                self._vector = open_vector_memory(self.settings)
            return self._vector

    def close(self) -> None:
        self.background.wait_idle(timeout=10)
        self.background.stop()
        self.worker.stop()
        for thing in (self._vector, self.store):
            close = getattr(thing, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # shutting down: report, keep closing the rest
                    log.exception("closing %s failed", type(thing).__name__)


def open_vector_memory(settings: Settings) -> Any:
    from memory.vector_store import open_vector_memory as _open

    return _open(settings.data_dir, chroma_url=settings.chroma_url, embeddings_name=settings.embeddings)


def load_engine(settings: Settings, progress: bool = True) -> tuple[Any, Any]:
    from model import Engine, load_model

    lm = load_model(
        settings.model, device=settings.device, dtype=settings.dtype, data_dir=str(settings.data_dir), progress=progress
    )
    return lm, Engine(lm, kv_budget_bytes=settings.kv_budget, max_batch=settings.max_running)


def open_runtime(settings: Settings, *, lm: Any = None, engine: Any = None, store: Any = None) -> Runtime:
    """Open everything; `lm` / `engine` / `store` may be injected (tests use a tiny model)."""
    from memory.store import open_store
    from persona.registry import PersonaRegistry

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if lm is None:
        lm, engine = load_engine(settings)
    elif engine is None:
        from model import Engine

        engine = Engine(lm, kv_budget_bytes=settings.kv_budget, max_batch=settings.max_running)
    if store is None:
        store = open_store(settings.store_url)
    personas = PersonaRegistry(extra_dir=settings.persona_dir, local_dir=settings.data_dir / "personas", store=store)
    personas.get(settings.persona)  # fail at start-up, not on the first request, if the default is missing
    worker = EngineWorker(queue_size=settings.queue_size, threads=settings.max_running,
                          owner_running=settings.owner_running, owner_waiting=settings.owner_waiting)
    background = SerialExecutor()
    metrics = Metrics()
    metrics.bind_queue(lambda: worker.depth, lambda: worker.busy)
    if hasattr(engine, "stats"):
        metrics.bind_engine(engine.stats)
    worker.start()
    background.start()
    return Runtime(settings, lm, engine, store, personas, worker, background, metrics)
