"""Model work off the event loop: a pool of job threads with fair, bounded admission per owner.

    worker = EngineWorker(queue_size=16, threads=8); worker.start()
    job = worker.submit(fn, owner="alice")   # fn(job) runs on a job thread; QueueFull when over a limit
    async for item in open_stream(worker, fn, keepalive=10):  # job.emit(x) items, KEEPALIVE on long waits
        ...

A turn's job stores the user message, generates, checks and stores the reply on its own thread;
the engine batches the generations of all running jobs in its scheduler thread, so storage and
Korean analysis never hold the model. Admission is fair: waiting jobs are taken round-robin by
owner, each owner may have at most `owner_running` jobs running and `owner_waiting` waiting, and
a refusal (QueueFull -> 429 with Retry-After) names the limit that was hit; an owner with
nothing waiting is admitted even when the queue is full. One owner's flood therefore never keeps
another owner waiting behind it, nor refuses their first request.

A job that is cancelled (client gone, deadline passed) is told through `job.should_stop()`,
which the engine polls every step, so its row leaves the batch promptly. Background jobs
(summaries for memory) run only when no request is waiting, or once they have waited
`background_max_wait` seconds, so they never starve.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Hashable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger("memento.worker")

KEEPALIVE = object()  # yielded by stream_job when nothing happened for `keepalive` seconds
_DONE = object()


class QueueFull(Exception):
    """A limit on waiting requests was hit; `limit` names it ("queue_size" or "owner_waiting")."""

    def __init__(self, depth: int, retry_after: int, limit: str = "queue_size", owner: str | None = None):
        who = f" for {owner!r}" if owner else ""
        super().__init__(f"{depth} requests{who} are already waiting for the model (limit {limit}); "
                         f"retry in {retry_after}s")
        self.depth, self.retry_after, self.limit = depth, retry_after, limit


class JobCancelled(Exception):
    """The job was cancelled before it started (its client left or its deadline passed)."""


class Job:
    def __init__(self, fn: Callable[[Job], Any], emit: Callable[[Any], None] | None, deadline: float | None,
                 owner: str = ""):
        self.fn = fn
        self.owner = owner
        self.future: Future[Any] = Future()
        self.cancel_event = threading.Event()
        self.deadline = deadline
        self.submitted = time.monotonic()
        self.started: float | None = None  # when a thread picked it up (queue wait = started - submitted)
        self._emit = emit

    def emit(self, item: Any) -> None:
        if self._emit is not None:
            self._emit(item)

    @property
    def streams(self) -> bool:
        """Whether what the job emits reaches a client as it is generated."""
        return self._emit is not None

    def cancel(self) -> None:
        self.cancel_event.set()

    def should_stop(self) -> bool:
        if self.cancel_event.is_set():
            return True
        return self.deadline is not None and time.monotonic() > self.deadline


class EngineWorker:
    def __init__(self, queue_size: int = 16, background_max_wait: float = 30.0, name: str = "memento-engine",
                 threads: int = 1, owner_running: int | None = None, owner_waiting: int | None = None):
        """`threads`: jobs running at once (the engine batches their generations);
        `owner_running` / `owner_waiting`: per-owner caps (default: half the threads, at least
        one; and the whole queue)."""
        self.queue_size = queue_size
        self.background_max_wait = background_max_wait
        self.threads = threads
        self.owner_running = owner_running or max(1, threads // 2)
        self.owner_waiting = owner_waiting or queue_size
        self._fg: OrderedDict[str, deque[Job]] = OrderedDict()  # owner -> waiting jobs; rotation order
        self._bg: deque[Job] = deque()
        self._running: Counter[str] = Counter()
        self._cond = threading.Condition()
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        self._stopping = False
        self._avg_seconds = 2.0  # EWMA of request durations, for Retry-After

    # --- lifecycle ---
    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            for job in [j for q in self._fg.values() for j in q] + list(self._bg):
                job.cancel()
            self._cond.notify_all()
        for t in self._threads:
            if t.is_alive():
                t.join(timeout)

    # --- state for metrics and 429s ---
    @property
    def depth(self) -> int:
        """Requests waiting (not counting those running)."""
        return sum(len(q) for q in self._fg.values())

    @property
    def busy(self) -> bool:
        return sum(self._running.values()) > 0

    @property
    def running(self) -> int:
        return sum(self._running.values())

    def retry_after(self, ahead: int | None = None) -> int:
        ahead = self.depth if ahead is None else ahead
        return max(1, min(60, math.ceil((ahead + 1) * self._avg_seconds / max(1, self.threads))))

    # --- submitting ---
    def submit(
        self,
        fn: Callable[[Job], Any],
        *,
        emit: Callable[[Any], None] | None = None,
        timeout: float | None = None,
        background: bool = False,
        owner: str = "",
    ) -> Job:
        job = Job(fn, emit, time.monotonic() + timeout if timeout else None, owner)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the model worker is shutting down")
            if background:
                self._bg.append(job)
            else:
                self._admit(job)
            self._cond.notify()
        return job

    def _admit(self, job: Job) -> None:
        mine = self._fg.get(job.owner)
        # an owner with nothing waiting gets a place even in a full queue: otherwise one user's
        # flood fills the queue and everyone else's first request is a 429 (measured, issue 10);
        # the overshoot is bounded by the number of users
        if self.depth >= self.queue_size and mine:
            raise QueueFull(self.depth, self.retry_after(), "queue_size")
        if mine is not None and len(mine) >= self.owner_waiting:
            raise QueueFull(len(mine), self.retry_after(len(mine)), "owner_waiting", job.owner or None)
        self._fg.setdefault(job.owner, deque()).append(job)

    def call(self, fn: Callable[[Job], Any], *, background: bool = False, timeout: float | None = None) -> Any:
        """Run `fn` on the worker and wait for it (for threads other than the event loop)."""
        return self.submit(fn, background=background, timeout=timeout).future.result()

    # --- the threads ---
    def _take_foreground(self) -> Job | None:
        """The next owner in rotation that is under its running cap gives its oldest job."""
        for owner in list(self._fg):
            if self._running[owner] >= self.owner_running:
                continue
            q = self._fg.pop(owner)
            job = q.popleft()
            if q:
                self._fg[owner] = q  # to the back of the rotation
            return job
        return None

    def _next(self) -> Job | None:
        with self._cond:
            while True:
                if self._stopping:
                    return None
                bg_overdue = self._bg and time.monotonic() - self._bg[0].submitted > self.background_max_wait
                job = None if bg_overdue else self._take_foreground()
                if job is None and self._bg and (bg_overdue or not self.depth):
                    job = self._bg.popleft()
                if job is not None:
                    self._running[job.owner] += 1
                    return job
                self._cond.wait(0.5 if self._bg else None)

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running[job.owner] -= 1
                    self._cond.notify_all()  # an owner under its cap again may have waiting jobs

    def _execute(self, job: Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        if job.should_stop():
            job.future.set_exception(JobCancelled("cancelled before it started"))
            return
        started = job.started = time.monotonic()
        try:
            job.future.set_result(job.fn(job))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
            job.future.set_exception(exc)
        finally:
            self._avg_seconds = 0.8 * self._avg_seconds + 0.2 * (time.monotonic() - started)


async def run_job(
    worker: EngineWorker,
    fn: Callable[[Job], Any],
    *,
    timeout: float | None = None,
    on_done: Callable[[], None] | None = None,
    owner: str = "",
) -> Any:
    """Await a job's result from the event loop; cancelling the awaiting task cancels the job.
    `on_done` runs when the job ends, whether it ran, failed or was skipped."""
    job = worker.submit(fn, timeout=timeout, owner=owner)
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
    owner: str = "",
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

    job = worker.submit(fn, emit=put, timeout=timeout, owner=owner)
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
