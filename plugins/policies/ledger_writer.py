"""The ledger's writer thread: every write of a gateway, in submission order, group-committed.

Why a thread: a ``synchronous=FULL`` commit waits for the disk (``fsync``), and a write may
wait for another process's lock (up to ``busy_timeout_s``); on the event loop that would
stall every other request. Why one: the writes of one process are then ordered (a settle
submitted before a reservation frees its headroom first).

Group commit: the thread drains what is queued (up to :attr:`LedgerWriter.max_batch`
writes) and runs it in ONE ``BEGIN IMMEDIATE ... COMMIT`` (:meth:`LedgerStore.run_batch`),
each write as if in its own savepoint, so N concurrent calls pay one ``fsync`` instead of
N. A write's future completes only after that ``COMMIT`` returned: acknowledged means
durable, exactly as with one transaction per write; the awaited writes of a batch are
handed back to their event loop in one wake-up (one ``call_soon_threadsafe`` per batch).
When the transaction cannot begin or commit, every write of the batch fails with the
:class:`LedgerError` (fail closed: a reservation is refused; a settle leaves its entry
reserved, charged at the worst case, until the lease turns it ``unknown`` at the next
start). The batch is not retried: a COMMIT fails on a disk error, which a second try at
once would meet again, and a retry would only delay the refusals.

Writes nobody waits for (settles, draws from a hold, marked ``lazy``) may wait up to
:attr:`LedgerWriter.linger_s` (50 ms) for a write somebody waits for (a reservation) and join
its commit: a gateway serving one call after another then pays one ``fsync`` per
reservation, not one per write, and with holds (one reservation per ``hold_ahead + 1``
calls) the thread has nothing left to do in the background, where its statements would
take the GIL from the busy event loop (5 ms here before holds: measured in
bench/README.md). Waiting longer only keeps the worst case counted a little longer (see
:mod:`.ledger`). So a lazy write does not even
wake the thread: the thread finds it when an urgent write, a flush, a close or a full batch
wakes it, or at its own look at the queue every 10 ms; then it waits out what is left of
the linger. Waking the thread for every settle cost two thread switches per call (the wake
and the linger's end), each taking the GIL from the event loop.

Inline fast path (:meth:`LedgerWriter.run_inline`): a thread hop costs ~0.1-0.3 ms (a
condition wake-up, ``call_soon_threadsafe``, the future wrappers) next to a ~0.15 ms
commit. So when the writer is idle (its thread runs nothing, only lazy writes are queued)
and the caller asks for it (the ledger does when no other call of its gateway is between
its reservation and its settle, so no group commit is lost), the write runs on the
caller's thread, on the same connection under the same lock, with the queued lazy writes
ahead of it in the same transaction. ``BEGIN IMMEDIATE`` is tried once: when another
process holds the lock, the write goes to the thread, which waits for it. Everything
above still holds: one transaction, COMMIT before anything is acknowledged, submission
order, a refusal or failure per write. Under load (other calls out, or work queued) the
thread and its group commit are used as before.

Loop batches (:meth:`LedgerWriter._loop_batch`): under load, a write someone awaits is
queued for the event loop itself, which applies everything queued (the lazy writes and
its own, in submission order) in one transaction and hands only the ``COMMIT`` to the
thread. While that COMMIT waits for the disk, the loop queues the next batch. Applied on
the thread instead, each SQLite statement of a batch gave the GIL up and had to take it
back from the busy event loop: a batch that costs ~0.35 ms of CPU alone cost ~1.3 ms
under load (see bench/README.md). The rules do not change: ``BEGIN IMMEDIATE`` is tried
once (another connection holding the lock, or the thread running a batch, and the writes
go to the thread, which waits); every write is acknowledged only after the COMMIT; a
failed apply or COMMIT fails every write of the batch; writes the loop has not taken
within ``loop_grace_s`` (a blocked or closed loop) are taken by the thread.

The thread is started on demand and stops after :attr:`idle_exit_s` without work (a test
process builds many gateways); it is not a daemon, so work queued when the interpreter
exits is still committed (it notices the main thread's end at its next look, within 10 ms).
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from .ledger_store import LedgerError, LedgerStore

T = TypeVar("T")


@dataclass
class _Job:
    """A write (``op`` of the connection, batched) or a plain step (``fn``, run alone)."""

    future: cf.Future[Any]
    op: Callable[[sqlite3.Connection], Any] | None = None
    fn: Callable[[], Any] | None = None
    lazy: bool = False
    queued_at: float = 0.0
    running: bool = False  # claimed by a batch (see _claim); may be put back if it could not begin
    #: Queued for the event loop to apply (:meth:`LedgerWriter.run`): not urgent for the
    #: thread, which takes it only if the loop has not within ``loop_grace_s``.
    loop_batch: bool = False
    #: The asyncio future a caller awaits (:meth:`LedgerWriter.run`), resolved from
    #: ``future`` on its loop, one loop wake-up per batch (see :func:`_wake`).
    waiter: asyncio.Future[Any] | None = None


@dataclass
class WriterStats:
    """What the writer has done (tests, benchmarks)."""

    batches: int = 0
    writes: int = 0
    largest: int = 0
    sizes: list[int] = field(default_factory=list)
    #: Batches run inline on the caller's thread (:meth:`LedgerWriter.run` with ``inline``).
    inline: int = 0
    #: Inline attempts that found the database locked by another connection and went to
    #: the thread instead.
    inline_fallbacks: int = 0
    #: Batches applied on the event loop and committed on the thread.
    loop: int = 0
    #: Loop batches handed to the thread instead (database locked, thread busy, closing).
    loop_handovers: int = 0


class LedgerWriter:
    """Runs a store's writes on one thread, many per transaction."""

    max_batch = 256
    idle_exit_s = 1.0
    #: How often an idle thread looks at its queue: a settle (which does not wake it)
    #: commits within this plus :attr:`linger_s` when no reservation comes to take it.
    poll_s = 0.01
    #: How long lazy writes (settles) may wait for an urgent one (a reservation) to share
    #: its commit; a flush, a close or a full batch commits them at once.
    linger_s = 0.05
    #: Under load, apply batches on the event loop and commit them on the thread (see the
    #: module docstring); False: the thread runs them whole (as the tests compare).
    loop_batches = True
    #: How long writes the loop queued for itself wait for it before the thread runs them.
    loop_grace_s = 0.1

    def __init__(self, store: LedgerStore, *, name: str = "llmgw-ledger") -> None:
        self.store = store
        self.name = name
        self.stats = WriterStats()
        self._queue: deque[_Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False
        self._urgent = 0  # queued jobs that are not lazy
        self._running = False  # the thread has taken a batch and not finished it
        self._inline = False  # a caller runs a batch inline (the thread must wait)
        self._commit: _Job | None = None  # a loop batch's COMMIT, for the thread to run next
        self._committing = False  # a loop batch is applied and its COMMIT not yet done
        #: The event loop a loop batch is scheduled on (None: none). Per loop: a loop
        #: closed with its batch pending must not stop another loop from scheduling one.
        self._scheduled: asyncio.AbstractEventLoop | None = None
        self._released_at = 0.0  # when the last loop batch's COMMIT ended
        #: A loop batch found the thread running a batch: the loop to reschedule it on.
        self._resume: asyncio.AbstractEventLoop | None = None

    # --- submitting ------------------------------------------------------------------

    def submit(self, op: Callable[[sqlite3.Connection], T], *, lazy: bool = False) -> cf.Future[T]:
        """Queue a write; its future completes after the COMMIT of its batch.

        ``lazy``: nobody waits for it (a settle), so it may wait up to :attr:`linger_s`
        for an urgent write (a reservation someone waits for) and share its ``fsync``.
        """
        return self._put(_Job(cf.Future(), op=op, lazy=lazy, queued_at=time.monotonic()))

    def submit_plain(self, fn: Callable[[], T]) -> cf.Future[T]:
        """Queue a step that runs alone, outside any transaction, after every earlier write
        has committed (opening the store, a flush)."""
        return self._put(_Job(cf.Future(), fn=fn))

    def flush(self) -> cf.Future[None]:
        """A future done once every write submitted before it has committed (or failed)."""
        return self.submit_plain(lambda: None)

    @property
    def pending(self) -> int:
        """Writes queued and not yet started."""
        return len(self._queue)

    def _put(self, job: _Job) -> cf.Future[Any]:
        with self._cond:
            # Closed: refuse, except the follow-ups the thread queues while it drains
            # (releasing a reservation whose caller was cancelled).
            if self._closed and threading.current_thread() is not self._thread:
                job.future.set_exception(LedgerError(f"{self.store.path}: the ledger is closed"))
                return job.future
            self._queue.append(job)
            waits = not job.lazy and not job.loop_batch
            self._urgent += waits
            if not self._ensure_thread() and (waits or len(self._queue) >= self.max_batch):
                # A lazy write alone does not wake the thread: it waits for the next
                # urgent one anyway, and the thread looks at the queue every poll_s
                # (see the module docstring).
                self._cond.notify()
        return job.future

    def _ensure_thread(self) -> bool:
        """Start the thread if it is not running (the lock held); True if started."""
        if self._thread is not None:
            return False
        self._thread = threading.Thread(target=self._loop, name=self.name)
        self._thread.start()
        return True

    async def run(
        self,
        op: Callable[[sqlite3.Connection], T],
        *,
        if_abandoned: Callable[[T], object] | None = None,
        inline: bool = False,
        on_done: Callable[[T | None, BaseException | None], object] | None = None,
    ) -> T:
        """Queue a write and wait for its commit on the event loop.

        The write is queued before the first ``await``, so it runs to the end even if this
        task is cancelled while waiting (a native ``Task.cancel()`` is not stopped by a
        shield of the caller's); ``if_abandoned`` then gets its result on the writer thread
        (a reservation nobody will use is released there).

        ``inline``: first try :meth:`run_inline` (no ``await`` at all, so nothing to
        abandon); when it cannot run at once, queue as above.

        ``on_done``: called with ``(result, None)`` or ``(None, exception)`` as soon as the
        write is over, on whichever thread completed it, before any write committed after
        it is handed back, and also when this task was cancelled meanwhile.
        """
        if inline:
            try:
                done, value = self.run_inline(op)
            except BaseException as exc:
                if on_done is not None:
                    on_done(None, exc)
                raise
            if done:
                if on_done is not None:
                    on_done(value, None)
                return cast(T, value)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[T] = loop.create_future()
        job = self._put(
            _Job(
                cf.Future(),
                op=op,
                queued_at=time.monotonic(),
                waiter=waiter,
                loop_batch=self.loop_batches,
            )
        )
        if on_done is not None:
            report = on_done

            def over(f: cf.Future[T]) -> None:
                if f.cancelled():
                    report(None, asyncio.CancelledError())
                elif (exc := f.exception()) is not None:
                    report(None, exc)
                else:
                    report(f.result(), None)

            job.add_done_callback(over)
        if job.done():  # refused at once (closed): no batch will resolve the waiter
            _resolve([(waiter, job)])
        elif self.loop_batches:
            self._schedule(loop)  # every write queued before the loop gets to it joins
        try:
            return await waiter
        except asyncio.CancelledError:
            # The write still runs (it is queued); the waiter alone is cancelled.
            self._abandon(job, if_abandoned)
            raise

    def run_inline(self, op: Callable[[sqlite3.Connection], T]) -> tuple[bool, T | None]:
        """Run ``op`` on this thread, now, when the writer is idle: ``(True, value)`` after
        its COMMIT (or its exception raised), ``(False, None)`` when it must be queued.

        Idle: the thread runs nothing and only lazy writes are queued. Those were submitted
        before ``op``, so they join its transaction ahead of it, in order (a settle frees
        its headroom before the reservation is checked), each in its savepoint, and their
        futures complete after the COMMIT: one ``fsync`` for both, as on the thread. The
        store's lock is taken without waiting and ``BEGIN IMMEDIATE`` tried once: locked
        by another connection, the lazy writes go back to the head of the queue and the
        caller queues ``op`` behind them (the thread waits for the lock).
        """
        with self._cond:
            if (
                self._closed
                or self._running
                or self._inline
                or self._urgent
                or len(self._queue) >= self.max_batch
                or any(j.op is None for j in self._queue)
            ):
                return False, None
            jobs = list(self._queue)
            self._queue.clear()
            self._inline = True
        try:
            live = _claim(jobs)
            ops = [j.op for j in live if j.op is not None]
            try:
                results = self.store.try_batch([*ops, op])
            except BaseException as exc:
                _complete(live, exc)
                _wake(live)
                raise
            if results is None:
                with self._cond:
                    self._queue.extendleft(reversed(live))
                    self.stats.inline_fallbacks += 1
                return False, None
            self._count(len(results))  # still alone: the thread waits while _inline
            self.stats.inline += 1
        finally:
            with self._cond:
                self._inline = False
                if self._queue:
                    self._cond.notify()
        *theirs, (ok, value) = results
        _complete(live, theirs)
        _wake(live)  # writes the loop had queued for itself (they have waiters)
        if not ok:
            raise value
        return True, value

    async def run_plain(self, fn: Callable[[], T]) -> T:
        """Queue a plain step (:meth:`submit_plain`) and wait for it."""
        return await self._wait(self.submit_plain(fn), None)

    async def _wait(self, job: cf.Future[T], if_abandoned: Callable[[T], object] | None) -> T:
        try:
            return await asyncio.shield(asyncio.wrap_future(job))
        except asyncio.CancelledError:
            self._abandon(job, if_abandoned)
            raise

    @staticmethod
    def _abandon(job: cf.Future[T], if_abandoned: Callable[[T], object] | None) -> None:
        """Its caller is gone: ``if_abandoned`` gets the write's result once committed."""
        if if_abandoned is not None:
            callback = if_abandoned

            def done(f: cf.Future[T]) -> None:
                if not f.cancelled() and f.exception() is None:
                    callback(f.result())

            job.add_done_callback(done)

    # --- batches applied on the event loop ---------------------------------------------

    def _loop_batch(self, loop: asyncio.AbstractEventLoop) -> None:
        """On the event loop: apply what is queued (up to the first plain step) in one
        transaction, and hand its COMMIT to the thread (see the module docstring)."""
        if self._scheduled is loop:
            self._scheduled = None
        with self._cond:
            if self._committing:
                return  # the COMMIT in progress schedules the next batch when it ends
            if not any(j.loop_batch for j in self._queue):
                return  # taken already (by the thread, or an inline batch)
            if self._running and not self._closed:
                self._resume = loop  # the thread reschedules it when its batch ends
                return
            if self._closed or self._inline or self._urgent:
                self._hand_over()
                return
            jobs: list[_Job] = []
            while self._queue and self._queue[0].op is not None and len(jobs) < self.max_batch:
                jobs.append(self._queue.popleft())
            if not jobs:  # a plain step first: the thread runs it, then the rest
                self._hand_over()
                return
            self._inline = self._committing = True
        try:
            db = self.store.begin_nowait()
        except BaseException as exc:  # not open, I/O error, read-only: fail closed
            self._ended(loop, _claim(jobs), exc)  # resets _inline/_committing, reschedules
            return
        if db is None:  # another connection holds the write lock: the thread waits for it
            with self._cond:
                self._queue.extendleft(reversed(jobs))
                self._inline = self._committing = False
                self._hand_over()
            return
        live = _claim(jobs)
        try:
            results = self.store.apply(db, [j.op for j in live if j.op is not None])
        except BaseException as exc:
            # Rolled back, nothing written: every write of the batch fails (fail closed).
            self._ended(loop, live, exc)
            return
        self._count(len(live))
        self.stats.loop += 1

        def commit() -> None:
            try:
                self.store.finish(db, results)
            except BaseException as exc:
                self._ended(loop, live, exc)
            else:
                self._ended(loop, live, results)

        with self._cond:
            self._commit = _Job(cf.Future(), fn=commit)
            if not self._ensure_thread():
                self._cond.notify()

    def _ended(
        self,
        loop: asyncio.AbstractEventLoop,
        jobs: list[_Job],
        outcome: list[tuple[bool, Any]] | BaseException,
    ) -> None:
        """A loop batch is over: committed (a result per write), or failed as a whole (the
        exception). Complete its writes, free the store for the next batch, wake the
        waiters and schedule what queued meanwhile."""
        _complete(jobs, outcome)
        with self._cond:
            self._inline = self._committing = False
            self._released_at = time.monotonic()
            more = any(j.loop_batch for j in self._queue)
            if self._queue and not more:
                self._cond.notify()
        _wake(jobs)
        if more:
            try:
                loop.call_soon_threadsafe(self._schedule, loop)
            except RuntimeError:  # the loop is closed: the thread takes them
                with self._cond:
                    self._hand_over()

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        """Run a loop batch on ``loop`` soon, unless one is scheduled there already."""
        if self._scheduled is not loop:
            self._scheduled = loop
            loop.call_soon(self._loop_batch, loop)

    def _hand_over(self) -> None:
        """Queued loop writes go to the thread as urgent writes (the lock held)."""
        n = 0
        for j in self._queue:
            if j.loop_batch:
                j.loop_batch = False
                n += 1
        if n:
            self._urgent += n
            self.stats.loop_handovers += 1
            self._cond.notify()

    # --- closing ---------------------------------------------------------------------

    def close(self, timeout: float | None = None) -> None:
        """Refuse new work, let the thread commit everything queued, and wait for it."""
        with self._cond:
            self._closed = True
            thread = self._thread
            self._cond.notify()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    # --- the thread ------------------------------------------------------------------

    def _take(self) -> list[_Job] | None:
        """The next batch: a plain step alone, or the queued writes up to the next plain
        step (at most ``max_batch``). None when the thread should stop."""
        idle = 0.0
        with self._cond:
            self._release_locked()
            while self._commit is None and (not self._queue or self._lingering() or self._inline):
                if self._inline:  # a caller runs a batch inline: it notifies when done
                    # (only if work is queued then; a settle queued after it does not)
                    self._cond.wait(self.poll_s)
                    continue
                if not self._queue:
                    if self._closed or idle >= self.idle_exit_s:
                        self._thread = None
                        return None
                    if not threading.main_thread().is_alive():
                        idle = self.idle_exit_s  # the interpreter is exiting: stop when empty
                        continue
                    self._cond.wait(self.poll_s)
                    idle += self.poll_s
                else:
                    idle = 0.0
                    self._cond.wait(self._deadline() - time.monotonic())
            if self._commit is not None:  # a loop batch's COMMIT: before anything else
                commit, self._commit = self._commit, None
                return [commit]
            if self._queue[0].op is None:
                jobs = [self._queue.popleft()]
            else:
                jobs = []
                while self._queue and self._queue[0].op is not None and len(jobs) < self.max_batch:
                    jobs.append(self._queue.popleft())
            self._urgent -= sum(not j.lazy and not j.loop_batch for j in jobs)
            self._running = True
            return jobs

    def _release_locked(self) -> None:
        """The thread's batch or step is over (the lock held): the store is free again, and
        a loop batch that found it busy is rescheduled. Done before the batch's waiters are
        woken, so a caller that goes on at once finds the writer idle (and runs inline)."""
        self._running = False
        if self._resume is not None:
            loop, self._resume = self._resume, None
            try:
                loop.call_soon_threadsafe(self._schedule, loop)
            except RuntimeError:  # the loop is closed: take its writes here
                self._hand_over()

    def _release(self) -> None:
        with self._cond:
            self._release_locked()

    def _count(self, n: int) -> None:
        self.stats.batches += 1
        self.stats.writes += n
        self.stats.largest = max(self.stats.largest, n)
        if len(self.stats.sizes) < 10_000:
            self.stats.sizes.append(n)

    def _lingering(self) -> bool:
        """Only lazy writes are queued, fewer than a batch, and the oldest may still wait
        for an urgent write to share its commit."""
        return (
            self._urgent == 0
            and len(self._queue) < self.max_batch
            and not self._closed
            and time.monotonic() < self._deadline()
            and threading.main_thread().is_alive()
        )

    def _deadline(self) -> float:
        """When the thread takes the queue if nothing urgent comes first: writes the
        event loop queued for itself are its own (it takes them within a loop iteration),
        unless it has not after ``loop_grace_s`` (a loop blocked or gone); lazy writes
        linger ``linger_s`` from when queued, or from the end of the last loop batch."""
        for j in self._queue:
            if j.loop_batch:
                return j.queued_at + self.loop_grace_s
        return max(self._queue[0].queued_at, self._released_at) + self.linger_s

    def _loop(self) -> None:
        while (jobs := self._take()) is not None:
            if jobs[0].fn is not None:
                self._run_plain(jobs[0])
            else:
                self._run_batch(jobs)

    def _run_plain(self, job: _Job) -> None:
        if not job.future.set_running_or_notify_cancel():
            return
        assert job.fn is not None
        try:
            value = job.fn()
        except BaseException as exc:
            self._release()
            job.future.set_exception(exc)
        else:
            self._release()
            job.future.set_result(value)

    def _run_batch(self, jobs: list[_Job]) -> None:
        live = _claim(jobs)
        if not live:
            _wake(jobs)
            return
        ops = [j.op for j in live if j.op is not None]
        try:
            results = self.store.run_batch(ops)
        except BaseException as exc:
            # Nothing of the batch was written: every write of it fails (fail closed).
            self._release()
            _complete(live, exc)
            _wake(jobs)
            return
        self._count(len(live))
        self._release()
        # After the COMMIT: completing a future runs its callbacks here (they may queue
        # more writes, e.g. releasing an abandoned reservation) and wakes its event loop.
        _complete(live, results)
        _wake(jobs)


def _claim(jobs: list[_Job]) -> list[_Job]:
    """The writes of a batch that will run: marked running (their futures can no longer
    be cancelled), whether or not a batch that could not begin had taken them before."""
    live = [j for j in jobs if j.running or j.future.set_running_or_notify_cancel()]
    for j in live:
        j.running = True
    return live


def _complete(jobs: list[_Job], outcome: Sequence[tuple[bool, Any]] | BaseException) -> None:
    """Complete each write of a batch: with its own result, or with the error that failed
    the whole batch (its waiters are woken apart: :func:`_wake`)."""
    for i, j in enumerate(jobs):
        if isinstance(outcome, BaseException):
            j.future.set_exception(outcome)
        elif outcome[i][0]:
            j.future.set_result(outcome[i][1])
        else:
            j.future.set_exception(outcome[i][1])


def _wake(jobs: list[_Job]) -> None:
    """Hand the results of a batch's awaited writes to their event loops: one
    ``call_soon_threadsafe`` per loop and batch (a wake-up of the loop's self-pipe), not one
    per write as :func:`asyncio.wrap_future` would. Called after the futures completed."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], cf.Future[Any]]]]
    by_loop = {}
    for j in jobs:
        if j.waiter is not None:
            by_loop.setdefault(j.waiter.get_loop(), []).append((j.waiter, j.future))
    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, pairs)
        except RuntimeError:  # the loop is closed: nobody awaits these any more
            pass


def _resolve(pairs: list[tuple[asyncio.Future[Any], cf.Future[Any]]]) -> None:
    """On the waiters' loop: copy each completed write's outcome to its waiter (skipping
    a waiter whose task was cancelled meanwhile)."""
    for waiter, job in pairs:
        if waiter.done():
            continue
        if job.cancelled():
            waiter.cancel()
        elif (exc := job.exception()) is not None:
            waiter.set_exception(exc)
        else:
            waiter.set_result(job.result())
