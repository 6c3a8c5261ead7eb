"""Leases on the store: one holder at a time across every process sharing it.

    lease = Lease.acquire(store, "turn:sess_1")   # None while another process holds it
    ...                                           # a thread renews it every ttl/3
    lease.release()                               # idempotent

A holder that dies (SIGKILL) stops renewing, so its lease expires after `ttl_ms` and the name is
free again: a short TTL kept alive by renewal, not a long one, is what lets a survivor take over
a killed replica's sessions within seconds. The fencing token increases per name, so a stale
holder whose lease expired cannot renew or release the next holder's (memory/store.py).
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from memory.store import StoreError

if TYPE_CHECKING:
    from memory.store import Store

log = logging.getLogger("memento.leases")

DEFAULT_TTL_MS = 10_000


class Lease:
    def __init__(self, store: Store, name: str, token: int, ttl_ms: int) -> None:
        self.store, self.name, self.token, self.ttl_ms = store, name, token, ttl_ms
        self.lost = False  # set when a renewal found someone else holding it
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name=f"lease {name}", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, store: Store, name: str, ttl_ms: int = DEFAULT_TTL_MS) -> Lease | None:
        token = store.acquire_lease(name, ttl_ms)
        return None if token is None else cls(store, name, token, ttl_ms)

    def _renew(self) -> None:
        while not self._done.wait(self.ttl_ms / 3000):
            try:
                if not self.store.renew_lease(self.name, self.token, self.ttl_ms):
                    self.lost = True
                    log.warning("lease %s (token %d) expired and was taken over", self.name, self.token)
                    return
            except StoreError:  # store briefly down: keep trying while the TTL lasts
                log.warning("could not renew lease %s", self.name, exc_info=True)

    def release(self) -> None:
        if self._done.is_set():
            return
        self._done.set()
        try:
            self.store.release_lease(self.name, self.token)
        except StoreError:  # it expires by itself within ttl_ms
            log.warning("could not release lease %s", self.name, exc_info=True)
