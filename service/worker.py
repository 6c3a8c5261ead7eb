"""Model work off the event loop: one thread owns the Engine, requests wait in a bounded queue.

    worker = EngineWorker(queue_size=16); worker.start()
    job = worker.submit(fn)            # fn(job) runs on the worker thread; QueueFull when the queue is full
    async for item in open_stream(worker, fn, keepalive=10):  # job.emit(x) items, KEEPALIVE on long waits
        ...

A job that is cancelled (client gone, deadline passed) is told through `job.should_stop()`,
which the engine polls between tokens, so the worker moves on to the next request promptly.
Background jobs (summaries for memory) run only when no request is waiting, or once they
have waited `background_max_wait` seconds, so they never starve.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("memento.worker")

KEEPALIVE = object()  # yielded by stream_job when nothing happened for `keepalive` seconds
_DONE = object()


class QueueFull(Exception):
    def __init__(self, depth: int, retry_after: int):
        super().__init__(f"{depth} requests are already waiting for the model; retry in {retry_after}s")
        self.depth = depth
        self.retry_after = retry_after


class JobCancelled(Exception):
    """The job was cancelled before it started (its client left or its deadline passed)."""


class Job:
    def __init__(self, fn: Callable[[Job], Any], emit: Callable[[Any], None] | None, deadline: float | None):
        self.fn = fn
        self.future: Future[Any] = Future()
        self.cancel_event = threading.Event()
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.started: float | None = None  # when the worker picked it up (queue wait = started - submitted)
        self._emit = emit

    def emit(self, item: Any) -> None:
        if self._emit is not None:
            self._emit(item)

    def cancel(self) -> None:
        self.cancel_event.set()

    def should_stop(self) -> bool:
        if self.cancel_event.is_set():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline


class EngineWorker:
    def __init__(self, queue_size: int = 16, background_max_wait: float = 30.0, name: str = "memento-engine"):
        self.queue_size = queue_size
        self.background_max_wait = background_max_wait
        self._fg: deque[Job] = deque()
        self._bg: deque[Job] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._stopping = False
        self._busy = False
        self._avg_seconds = 2.0  # EWMA of request durations, for Retry-After

    # --- lifecycle ---
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in list(self._fg) + list(self._bg):
                job.cancel()
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- state for metrics and 429s ---
    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return len(self._fg)

    @property
    def busy(self) -> bool:
        return self._busy

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil((self.depth + 1) * self._avg_seconds)))

    # --- submitting ---
    def submit(
        self,
        fn: Callable[[Job], Any],
        *,
        emit: Callable[[Any], None] | None = None,
        timeout: float | None = None,
        background: bool = False,
    ) -> Job:
        job = Job(fn, emit, time.monotonic() + timeout if timeout else None)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the model worker is shutting down")
            if not background and len(self._fg) >= self.queue_size:
                raise QueueFull(len(self._fg), self.retry_after())
            (self._bg if background else self._fg).append(job)
            self._cond.notify()
        return job

    def call(self, fn: Callable[[Job], Any], *, background: bool = False, timeout: float | None = None) -> Any:
        """Run `fn` on the worker and wait for it (for threads other than the event loop)."""
        return self.submit(fn, background=background, timeout=timeout).future.result()

    # --- the thread ---
    def _next(self) -> Job | None:
        with self._cond:
            while not self._stopping and not self._fg and not self._bg:
                self._cond.wait()
            if self._stopping:
                return None
            bg_overdue = self._bg and time.monotonic() - self._bg[0].submitted > self.background_max_wait
            if self._fg and not bg_overdue:
                return self._fg.popleft()
            return self._bg.popleft()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue
            if job.should_stop():
                job.future.set_exception(JobCancelled("cancelled before it started"))
                continue
            self._busy = True
            started = job.started = time.monotonic()
            try:
                job.future.set_result(job.fn(job))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                job.future.set_exception(exc)
            finally:
                self._busy = False
                self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - started)


async def run_job(
    worker: EngineWorker,
    fn: Callable[[Job], Any],
    *,
    timeout: float | None = None,
    on_done: Callable[[], None] | None = None,
) -> Any:
    """Await a job's result from the event loop; cancelling the awaiting task cancels the job.
    `on_done` runs when the job ends, whether it ran, failed or was skipped."""
    job = worker.submit(fn, timeout=timeout)
    if on_done is not None:
        job.future.add_done_callback(lambda _f: on_done())
    try:
        return await asyncio.wrap_future(job.future)
    finally:
        job.cancel()  # no-op once done; stops generation if our caller went away


def open_stream(
    worker: EngineWorker,
    fn: Callable[[Job], Any],
    *,
    keepalive: float = 10.0,
    timeout: float | None = None,
    on_done: Callable[[], None] | None = None,
) -> AsyncIterator[Any]:
    """Submit `fn` now (QueueFull raises here, before any response is sent) and return an async
    iterator over what it `emit`s, then its return value, with KEEPALIVE on quiet stretches.
    Closing the iterator early (the client disconnected) cancels the job. Call from the event loop.
    """
    loop = asyncio.get_running_loop()
    items: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    job = worker.submit(fn, emit=put, timeout=timeout)
    if on_done is not None:
        job.future.add_done_callback(lambda _f: on_done())
    job.future.add_done_callback(lambda _f: put(_DONE))
    return _relay(job, items, keepalive)


async def _relay(job: Job, items: asyncio.Queue[Any], keepalive: float) -> AsyncIterator[Any]:
    try:
        while True:
            try:
                item = await asyncio.wait_for(items.get(), keepalive)
            except asyncio.TimeoutError:
                yield KEEPALIVE
                continue
            if item is _DONE:
                break
            yield item
        yield job.future.result()
    finally:
        job.cancel()


class SerialExecutor:
    """One background thread running tasks in order; a task queued under a key that is
    already waiting is dropped (the waiting one will see the newer state anyway)."""

    def __init__(self, name: str = "memento-memory"):
        self._tasks: deque[tuple[Hashable, Callable[[], None]]] = deque()
        self._keys: set[Hashable] = set()
        self._cond = threading.Condition()
        self._stopping = False
        self._running = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, key: Hashable, task: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping or key in self._keys:
                return
            self._keys.add(key)
            self._tasks.append((key, task))
            self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return not self._tasks and not self._running

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """For tests and shutdown: wait until every queued task has run."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.idle():
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._tasks:
                    self._cond.wait()
                if self._stopping and not self._tasks:
                    return
                key, task = self._tasks.popleft()
                self._keys.discard(key)
                self._running = True
            try:
                task()
            except Exception:  # background memory work must never take the server down
                log.exception("background memory task %r failed", key)
            finally:
                with self._cond:
                    self._running = False
