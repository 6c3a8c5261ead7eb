"""Everything the service opens once at start-up and closes at shutdown, kept on `app.state.rt`.

The backend (service/backend.py: our model and its engine, or a remote OpenAI-compatible engine
when MEMENTO_ENGINE_URL is set, with no local weights), the transcript store, the persona registry
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
    """Sessions with a turn in progress, across every API process on the store: a second
    concurrent turn would interleave the transcript (user, user, assistant, assistant), so it is
    refused with 409 instead. Each claim is a lease in the store (memory/leases.py), renewed while
    the turn runs; if its process dies, the lease expires within `ttl_ms` and the session is free
    for the other replicas."""

    def __init__(self, store: Any, ttl_ms: int | None = None) -> None:
        from memory.leases import DEFAULT_TTL_MS

        self.store = store
        self.ttl_ms = ttl_ms or DEFAULT_TTL_MS

    def claim(self, session_id: str) -> Callable[[], None] | None:
        """A release function (idempotent), or None when the session is already busy."""
        from memory.leases import Lease

        lease = Lease.acquire(self.store, f"turn:{session_id}", self.ttl_ms)
        return None if lease is None else lease.release


@dataclass
class Runtime:
    settings: Settings
    lm: Any  # model.LoadedModel; None with a remote engine
    engine: Any  # model.Engine; None with a remote engine
    store: Any  # memory.store.Store
    personas: Any  # persona.PersonaRegistry
    worker: EngineWorker
    background: SerialExecutor
    metrics: Metrics
    started_at: float = 0.0
    in_flight: Any = None  # InFlight on this store (set in __post_init__)
    _vector: Any = None
    _vector_lock: threading.Lock = field(default_factory=threading.Lock)
    _tombstones_due: bool = True  # deleted sessions' vectors may still be in Chroma (see apply_tombstones)
    backend: Any = None  # service.backend.Backend: the only way the service reaches the model

    def __post_init__(self) -> None:
        if self.in_flight is None:
            self.in_flight = InFlight(self.store)
        if self.backend is None:
            from service.backend import LocalBackend

            self.backend = LocalBackend(self.lm, self.engine, self.settings.context_window)

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def context_window(self) -> int:
        return int(self.backend.context_window)

    @property
    def model_name(self) -> str:
        return str(self.backend.name)

    def vector(self) -> Any:
        """Vector memory, opened on first use (embedded Chroma under the data dir, or a server)."""
        vm = self._open_vector()
        if self._tombstones_due:
            self.apply_tombstones()
        return vm

    def _open_vector(self) -> Any:
        with self._vector_lock:
            if self._vector is None:
                self._vector = open_vector_memory(self.settings)
            return self._vector

    def apply_tombstones(self) -> None:
        """Delete from Chroma the vectors of every session deleted while it was down (or by a
        process that never opened it): their tombstones wait in the store until this succeeds."""
        from memory.store import StoreError
        from memory.vector_store import VectorUnavailable, apply_tombstones

        try:
            # no Chroma ever used here (no server, no embedded dir): the tombstones just go
            vm = self._open_vector() if self._vector is not None or self.vectors_may_exist() else None
            apply_tombstones(vm, self.store)
            self._tombstones_due = False
        except (VectorUnavailable, StoreError) as exc:
            self._tombstones_due = True  # tried again on the next vector access
            log.warning("vector tombstones wait for Chroma: %s", exc)

    def vectors_may_exist(self) -> bool:
        return bool(self.settings.chroma_url) or (self.settings.data_dir / "chroma").exists()

    def schedule_tombstones(self) -> None:
        """At start-up, off the request path: a previous run's deletions are finished now."""
        self.background.submit(("tombstones", ""), self.apply_tombstones)

    def close(self) -> None:
        self.background.wait_idle(timeout=10)
        self.background.stop()
        self.worker.stop()
        for thing in (self._vector, self.store, self.backend):
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
    import torch

    from model import load_model

    # load on one thread so this thread never holds an OpenMP team: the engine's scheduler thread
    # must be the process's only one, or libgomp stops spin-waiting (see model.engine.Engine)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    lm = load_model(
        settings.model, device=settings.device, dtype=settings.dtype, data_dir=str(settings.data_dir), progress=progress
    )
    compile = settings.compile == "on" or (settings.compile == "auto" and lm.device.type == "cpu")
    return lm, new_engine(lm, settings, compile, progress, threads)


def new_engine(lm: Any, settings: Settings, compile: bool, progress: bool = False, threads: int | None = None) -> Any:
    """The batching engine over `lm`; compiled decode artefacts go to <data_dir>/compile."""
    from model import Engine

    return Engine(lm, kv_budget_bytes=settings.kv_budget, max_batch=settings.max_running, compile=compile,
                  compile_dir=str(settings.data_dir / "compile"), progress=progress, threads=threads)


def open_runtime(settings: Settings, *, lm: Any = None, engine: Any = None, store: Any = None) -> Runtime:
    """Open everything; `lm` / `engine` / `store` may be injected (tests use a tiny model)."""
    from memory.store import open_store
    from persona.registry import PersonaRegistry

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    backend = None
    if lm is None and settings.engine_url:
        from service.remote_engine import RemoteBackend

        backend = RemoteBackend.open(settings)  # no weights: the engine holds the model
    elif lm is None:
        lm, engine = load_engine(settings)
    elif engine is None:  # an injected model (tests): compiled only when asked for explicitly
        engine = new_engine(lm, settings, compile=settings.compile == "on")
    if store is None:
        store = open_store(settings.store_url)
    personas = PersonaRegistry(extra_dir=settings.persona_dir, local_dir=settings.data_dir / "personas", store=store)
    personas.get(settings.persona)  # fail at start-up, not on the first request, if the default is missing
    worker = EngineWorker(queue_size=settings.queue_size, threads=settings.max_running,
                          owner_running=settings.owner_running, owner_waiting=settings.owner_waiting)
    background = SerialExecutor()
    metrics = Metrics()
    metrics.bind_queue(lambda: worker.depth, lambda: worker.busy)
    if engine is not None and hasattr(engine, "stats"):
        metrics.bind_engine(engine.stats)
    worker.start()
    background.start()
    return Runtime(settings, lm, engine, store, personas, worker, background, metrics, backend=backend)
