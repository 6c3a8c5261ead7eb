"""Vector memory on ChromaDB: past exchanges embedded and retrieved by relevance.

One collection per (owner, embedding model): its name is a hash of both, and its metadata
records the model name and dimension, so vectors of different models are never mixed and one
owner's exchanges can never be returned for another owner. Each exchange (a user message and
the assistant reply) is one record:

    id        "<session_id>:<first message id>"   (re-indexing upserts, never duplicates)
    document  "<user text>\n<assistant text>"     (the embedded text)
    metadata  session_id, owner, first_id, message_ids, turn, messages (JSON of the exchange)

A second collection per (owner, model), `views` (long_term's), holds the same exchange records plus
views of what the user said: the message alone (the reply, often longer, dilutes it) and each of
its sentences when it has several (a first topic no longer hides a second), ids "<id>#1", "<id>#2",
.., the same metadata plus `part`. A query there ranks exchanges by their closest record and returns
each once. The `vector` strategy keeps to `exchanges` (a user's past questions, alone, match a new
question by their form and crowded its top k out in memory.bench); each strategy writes only its
own collection (one upsert a turn) under its own watermark, and catches up when switched to.

    vm = open_vector_memory(data_dir, chroma_url=None, embeddings_name="use-multilingual-v3")
    vm.index_exchange(owner, session_id, exchange, turn)
    hits = vm.query(owner, "what was my dog called?", k=4, session_id=None)   # scope user
    vm.reindex(owner, session_id, messages)       # rebuild from the transcript

Chroma is reached lazily: if the server is down, calls raise `VectorUnavailable` and the next
call tries again (the `vector` strategy then degrades to recent turns and catches up later).
Deleting a session leaves a tombstone in the transcript store; `apply_tombstones` deletes its
vectors when Chroma is reachable (service/runtime.py: after the delete, at start-up, on the next
vector access), so a deletion holds across outages and restarts.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from memory.embeddings import Embedder, get_embedder
from memory.hybrid import sentences
from memory.strategies.base import group_exchanges, is_complete_exchange
from memory.types import Message

_INDEX_BATCH = 64  # exchanges embedded and upserted per call
_MAX_SENTENCES = 8  # sentence views per message: a pasted essay is still one exchange, not 100 records
_FETCH_PER_HIT = 2  # records fetched per exchange wanted in VIEWS: an exchange matches by several
EXCHANGES, VIEWS = "exchanges", "views"  # the two collections of an owner


class VectorUnavailable(Exception):
    """ChromaDB cannot be reached or failed; retrieval is skipped for now."""


@dataclass
class Hit:
    exchange: list[Message]
    session_id: str
    turn: int
    distance: float  # cosine distance, smaller is closer


def collection_name(owner: str, model: str) -> str:
    """Chroma-safe ([a-zA-Z0-9._-], 3-512 chars) and collision-free in practice for any owner string."""
    digest = hashlib.sha256(f"{owner}\0{model}".encode()).hexdigest()[:40]
    return f"memento-{digest}"


def exchange_text(exchange: Sequence[Message]) -> str:
    """The embedded text: the contents only (role labels measurably blur the match with a question)."""
    return "\n".join(m.content for m in exchange)


def extra_views(exchange: Sequence[Message]) -> list[str]:
    """The views collection's texts for one exchange: the user's message alone, then its sentences."""
    said = "\n".join(m.content for m in exchange if m.role == "user").strip()
    views = [said] if said and said != exchange_text(exchange) else []
    parts = sentences(said)
    return views + (parts[:_MAX_SENTENCES] if len(parts) > 1 else [])


class VectorMemory:
    def __init__(self, client: Any | Callable[[], Any], embedder: Embedder, retry_after_s: float = 5.0) -> None:
        """`client`: a chromadb client, or a zero-argument callable that connects (retried on failure).

        After a failure, calls fail fast for `retry_after_s` so a dead server does not add a
        connection timeout to every turn.
        """
        self.retry_after_s = retry_after_s
        self._down_until = 0.0
        self._last_error = ""
        self._client = None if callable(client) and not hasattr(client, "get_or_create_collection") else client
        self._connect = client if self._client is None else None
        self.embedder = embedder
        self.views = True  # write the extra views (memory.bench turns them off to measure them)
        self._collections: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ public API

    def index_exchange(self, owner: str, session_id: str, exchange: list[Message], turn: int) -> None:
        self.index_exchanges(owner, session_id, [(turn, exchange)])

    def index_exchanges(self, owner: str, session_id: str, items: Sequence[tuple[int, list[Message]]],
                        kind: str = EXCHANGES) -> None:
        """Upsert the exchanges' records into the `kind` collection (VIEWS: with their extra views)."""
        for start in range(0, len(items), _INDEX_BATCH):
            ids, docs, metas = [], [], []
            for turn, ex in items[start : start + _INDEX_BATCH]:
                meta = _metadata(owner, session_id, turn, ex)
                extra = extra_views(ex) if kind == VIEWS and self.views else []
                for part, doc in enumerate([exchange_text(ex), *extra]):
                    ids.append(f"{session_id}:{ex[0].id}" + (f"#{part}" if part else ""))
                    docs.append(doc)
                    metas.append({**meta, "part": part} if kind == VIEWS else meta)
            record: dict[str, Any] = {"ids": ids, "embeddings": self.embedder.embed(docs), "documents": docs,
                                      "metadatas": metas}
            self._call(partial(_upsert, record=record), owner, kind)

    def query(
        self,
        owner: str,
        text: str,
        k: int,
        session_id: str | None = None,
        exclude_first_ids: Sequence[str] = (),
        kind: str = EXCHANGES,
    ) -> list[Hit]:
        """Top-k exchanges of `owner` closest to `text` (VIEWS: by their closest record, each once);
        only `session_id`'s when given."""
        if k <= 0:
            return []
        where = _where(session_id, exclude_first_ids)
        [vector] = self.embedder.embed([text])
        res = self._call(
            lambda col: col.query(
                query_embeddings=[vector], n_results=k * (_FETCH_PER_HIT if kind == VIEWS else 1), where=where,
                include=["metadatas", "distances"],
            ),
            owner,
            kind,
        )
        hits: dict[tuple[str, str], Hit] = {}  # closest first: an exchange's first record is its best
        for meta, dist in zip(res["metadatas"][0], res["distances"][0], strict=True):
            key = (str(meta["session_id"]), str(meta["first_id"]))
            if key not in hits and len(hits) < k:
                exchange = [Message(**m) for m in json.loads(meta["messages"])]
                hits[key] = Hit(exchange, key[0], int(meta["turn"]), float(dist))
        return list(hits.values())

    def delete_session(self, owner: str, session_id: str) -> None:
        for kind in (EXCHANGES, VIEWS):
            self._call(lambda col: col.delete(where={"session_id": session_id}), owner, kind)

    def reindex(self, owner: str, session_id: str, messages: list[Message], kind: str = EXCHANGES) -> int:
        """Drop this session's vectors in `kind` and index every complete exchange of the transcript again."""
        self._call(lambda col: col.delete(where={"session_id": session_id}), owner, kind)
        items = indexable_exchanges(messages)
        self.index_exchanges(owner, session_id, items, kind)
        return len(items)

    def count(self, owner: str) -> int:
        return int(self._call(lambda col: col.count(), owner))

    def ping(self) -> None:
        self._call(lambda client: client.heartbeat(), None)

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[[Any], Any], owner: str | None, kind: str = EXCHANGES) -> Any:
        """Run `fn` on the owner's collection of `kind` (or the client when owner is None), mapping failures."""
        if time.monotonic() < self._down_until:
            raise VectorUnavailable(f"{self._last_error} (retrying in {self._down_until - time.monotonic():.0f} s)")
        try:
            target = self._client_or_connect() if owner is None else self._collection(owner, kind)
            return fn(target)
        except ModelMismatch:
            raise
        except Exception as e:  # chromadb/httpx raise many types for "server gone"
            with self._lock:
                self._collections.clear()  # the server may have restarted: look them up again
                self._last_error = f"ChromaDB failed: {type(e).__name__}: {e}"
                self._down_until = time.monotonic() + self.retry_after_s
            raise VectorUnavailable(self._last_error) from e

    def _client_or_connect(self) -> Any:
        with self._lock:
            if self._client is None:
                assert self._connect is not None
                self._client = self._connect()
            return self._client

    def _collection(self, owner: str, kind: str = EXCHANGES) -> Any:
        client = self._client_or_connect()
        with self._lock:
            col = self._collections.get((owner, kind))
            if col is None:
                name = collection_name(owner, self.embedder.name if kind == EXCHANGES else f"{self.embedder.name}#{kind}")
                col = client.get_or_create_collection(
                    name,
                    metadata={
                        "memento_model": self.embedder.name,
                        "memento_dim": self.embedder.dim,
                        "hnsw:space": "cosine",
                    },
                    embedding_function=None,  # we embed ourselves; Chroma must never download one
                )
                meta = col.metadata or {}
                if meta.get("memento_model") != self.embedder.name or meta.get("memento_dim") != self.embedder.dim:
                    raise ModelMismatch(
                        f"Chroma collection {name} holds vectors of {meta.get('memento_model')!r} "
                        f"(dim {meta.get('memento_dim')}), not {self.embedder.name!r}: run `memento memory reindex`"
                    )
                self._collections[(owner, kind)] = col
            return col


def apply_tombstones(vm: VectorMemory | None, store: Any) -> int:
    """Delete the vectors of each session the store holds a tombstone for, then drop the tombstone
    (vm None: no Chroma exists, so only the tombstones go). A failure (VectorUnavailable) leaves
    the rest for the next try. Returns how many were applied."""
    done = 0
    for session_id, owner in store.list_tombstones():
        if vm is not None:
            vm.delete_session(owner, session_id)
        store.drop_tombstone(session_id)
        done += 1
    return done


class ModelMismatch(ValueError):
    """A collection's recorded embedding model differs from ours (never mix vector spaces)."""


def indexable_exchanges(messages: list[Message], first_turn: int = 0) -> list[tuple[int, list[Message]]]:
    """(turn index, exchange) for each complete user+assistant exchange."""
    return [
        (first_turn + i, g) for i, g in enumerate(group_exchanges(messages)) if is_complete_exchange(g)
    ]


def _upsert(col: Any, record: dict[str, Any]) -> None:
    col.upsert(**record)


def _metadata(owner: str, session_id: str, turn: int, exchange: list[Message]) -> dict[str, Any]:
    messages = [
        {"id": m.id, "session_id": m.session_id, "role": m.role, "content": m.content, "created_at": m.created_at}
        for m in exchange
    ]
    return {
        "owner": owner,
        "session_id": session_id,
        "turn": turn,
        "first_id": exchange[0].id,
        "message_ids": ",".join(m.id for m in exchange),
        "messages": json.dumps(messages, ensure_ascii=False),
    }


def _where(session_id: str | None, exclude_first_ids: Sequence[str]) -> dict[str, Any] | None:
    clauses: list[dict[str, Any]] = []
    if session_id is not None:
        clauses.append({"session_id": session_id})
    if exclude_first_ids:
        clauses.append({"first_id": {"$nin": list(exclude_first_ids)}})
    if not clauses:
        return None
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}


def chroma_settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False)


def open_vector_memory(
    data_dir: str | Path, chroma_url: str | None = None, embeddings_name: str = "use-multilingual-v3"
) -> VectorMemory:
    """Embedded persistent Chroma under `<data_dir>/chroma`, or a Chroma server at `chroma_url`."""
    embedder = get_embedder(embeddings_name)
    if chroma_url:
        url = urlparse(chroma_url)
        host = url.hostname
        if url.scheme not in ("http", "https") or not host:
            raise ValueError(f"MEMENTO_CHROMA_URL={chroma_url!r} must look like http://host:port")

        def connect() -> Any:
            import chromadb

            return chromadb.HttpClient(
                host=host,
                port=url.port or (443 if url.scheme == "https" else 8000),
                ssl=url.scheme == "https",
                settings=chroma_settings(),
            )

        return VectorMemory(connect, embedder)

    def open_embedded() -> Any:
        import chromadb

        path = Path(data_dir) / "chroma"
        path.mkdir(parents=True, exist_ok=True)
        return chromadb.PersistentClient(path=str(path), settings=chroma_settings())

    return VectorMemory(open_embedded, embedder)
