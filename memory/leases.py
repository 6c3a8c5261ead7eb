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
import time
from typing import TYPE_CHECKING

from memory.store import StoreError

if TYPE_CHECKING:
    from memory.store import Store

log = logging.getLogger("memento.leases")

DEFAULT_TTL_MS = 3_000  # renewed every second while held; a dead holder frees the name within 3 s
RELEASE_WAIT_S = 0.5  # a release on a healthy store takes milliseconds


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
        """Free the name (idempotent). On a healthy store this returns once it is free, so the
        holder's client finds the session free on its next turn. On a hung store the call would
        take the store's whole timeout (4 s on Redis: two 2 s reads), and the caller is usually
        sending a 503 for that same outage: so it waits at most RELEASE_WAIT_S and the release
        finishes in the background, retried while the TTL lasts."""
        if self._done.is_set():
            return
        self._done.set()
        finisher = threading.Thread(target=self._release_until_done, name=f"release {self.name}", daemon=True)
        finisher.start()
        finisher.join(RELEASE_WAIT_S)

    def _release_until_done(self) -> None:
        if self._try_release():
            return
        # the store is down: keep trying while the TTL lasts, so the name is free as soon as it
        # is back rather than only when the lease expires
        deadline = time.monotonic() + self.ttl_ms / 1000
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if self._try_release():
                return
        log.warning("could not release lease %s; it expired instead", self.name)

    def _try_release(self) -> bool:
        try:
            self.store.release_lease(self.name, self.token)
            return True
        except StoreError:
            return False
