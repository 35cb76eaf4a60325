"""Batches applied on the event loop and committed on the writer thread (under load).

An awaited write is acknowledged only after its COMMIT; a batch that cannot begin (another
connection holds the lock) or whose thread is busy goes to the thread as before; a failed
apply or COMMIT fails every write of the batch and frees the store; writes the loop does
not take in time are taken by the thread; a cancelled caller's write still commits and is
handed to ``if_abandoned``."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _money_helpers import fail_once

from llmgw.plugins.policies import ledger_ops as ops
from llmgw.plugins.policies.ledger_store import CapExceeded, Caps, Item, LedgerError, LedgerStore
from llmgw.plugins.policies.ledger_writer import LedgerWriter, _Job

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def reserve(i: str, amount: int, caps: Caps | None = None) -> ops.Reserve:
    return ops.Reserve([Item(i, "a", "m", "cls", f"req-{i}", amount)], caps or Caps(), NOW, 60)


async def together(writer: LedgerWriter, writes: list[Any], **kw: Any) -> list[Any]:
    """Queue every write before the loop runs any batch; their results (or errors)."""
    tasks = [asyncio.ensure_future(writer.run(w, **kw)) for w in writes]
    return await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.anyio
async def test_writes_queued_together_are_one_loop_batch_acknowledged_after_commit(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    committed = threading.Event()
    on_thread: list[bool] = []
    real_commit = st._commit

    def slow_commit(db: sqlite3.Connection) -> None:
        on_thread.append(threading.current_thread() is not threading.main_thread())
        time.sleep(0.05)  # a slow disk: nothing may be acknowledged before this returns
        real_commit(db)
        committed.set()

    monkeypatch.setattr(st, "_commit", slow_commit)
    writer = LedgerWriter(st)
    caps = Caps(total=100)
    seen_before_commit: list[bool] = []

    async def one(i: str) -> Any:
        try:
            return await writer.run(reserve(i, 40, caps))
        finally:
            seen_before_commit.append(not committed.is_set())

    results = await asyncio.gather(*(one(i) for i in "abc"), return_exceptions=True)
    writer.close()
    assert results[:2] == [None, None] and isinstance(results[2], CapExceeded)
    assert seen_before_commit == [False, False, False]
    assert on_thread == [True]  # one COMMIT, on the writer thread
    assert (writer.stats.loop, writer.stats.sizes) == (1, [3])
    assert st.scopes("2026-11")["total"].reserved_micro == 80


@pytest.mark.anyio
async def test_a_settle_queued_first_frees_headroom_in_the_same_loop_batch(
    st: LedgerStore,
) -> None:
    caps = Caps(total=100)
    writer = LedgerWriter(st)
    assert await writer.run(reserve("old", 90, caps)) is None
    settled = writer.submit(ops.Settle("old", 20, NOW), lazy=True)
    assert await together(writer, [reserve("new", 70, caps)]) == [None]
    assert settled.result(1) is True
    writer.close()
    total = st.scopes("2026-11")["total"]
    assert (total.settled_micro, total.reserved_micro) == (20, 70)


@pytest.mark.anyio
async def test_a_locked_database_sends_the_loop_batch_to_the_thread(
    st: LedgerStore, tmp_path: Path
) -> None:
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.05, lambda: other.execute("ROLLBACK")).start()
    writer = LedgerWriter(st)
    try:
        assert await together(writer, [reserve("a", 10), reserve("b", 10)]) == [None, None]
    finally:
        writer.close()
        other.close()
    assert writer.stats.loop == 0 and writer.stats.loop_handovers >= 1
    assert st.scopes("2026-11")["total"].reserved_micro == 20


@pytest.mark.anyio
async def test_a_failed_commit_fails_every_write_of_the_loop_batch_and_frees_the_store(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_once(monkeypatch, st, "_commit", sqlite3.OperationalError("disk I/O error"))
    writer = LedgerWriter(st)
    results = await together(writer, [reserve("a", 10), reserve("b", 10)])
    assert all(isinstance(r, LedgerError) and "disk I/O" in str(r) for r in results)
    assert st.entry("a") is None and st.entry("b") is None
    assert await together(writer, [reserve("c", 10), reserve("d", 10)]) == [None, None]
    writer.close()
    assert writer.stats.loop == 2
    assert st.scopes("2026-11")["total"].reserved_micro == 20


@pytest.mark.anyio
async def test_a_failed_apply_fails_every_write_of_the_loop_batch_and_frees_the_store(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fail_once(
        monkeypatch,
        st,
        "_optimistic",
        LedgerError("the transaction was rolled back (disk full)"),
        before=lambda db, ops: db.execute("ROLLBACK"),  # as SQLite does on a full disk
    )
    writer = LedgerWriter(st)
    results = await together(writer, [reserve("a", 10), reserve("b", 10)])
    assert all(isinstance(r, LedgerError) and "rolled back" in str(r) for r in results)
    assert await together(writer, [reserve("c", 10), reserve("d", 10)]) == [None, None]
    writer.close()
    assert st.entry("a") is None and st.entry("c") is not None


def test_writes_the_loop_does_not_take_are_committed_by_the_thread(st: LedgerStore) -> None:
    """A loop that never gets to its batch (blocked, or gone): the thread takes it."""
    writer = LedgerWriter(st)
    writer.loop_grace_s = 0.05
    t0 = time.monotonic()
    job = writer._put(_Job(cf.Future(), op=reserve("a", 10), queued_at=t0, loop_batch=True))
    assert job.result(2) is None
    assert time.monotonic() - t0 >= 0.05  # the loop had its grace first
    writer.close()
    assert st.entry("a") is not None and writer.stats.loop == 0


@pytest.mark.anyio
async def test_a_cancelled_caller_still_gets_its_loop_write_committed_and_handed_over(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_commit = st._commit

    def held(db: sqlite3.Connection) -> None:
        gate.wait(5)
        real_commit(db)

    monkeypatch.setattr(st, "_commit", held)
    writer = LedgerWriter(st)
    abandoned: list[Any] = []
    task = asyncio.ensure_future(
        writer.run(reserve("a", 10), if_abandoned=lambda v: abandoned.append(("a", v)))
    )
    await asyncio.sleep(0.01)  # applied on the loop, its COMMIT held on the thread
    assert writer.stats.loop == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    writer.close()
    assert abandoned == [("a", None)]
    assert st.entry("a") is not None and st.entry("a")["state"] == "reserved"


def test_a_failed_begin_fails_the_loop_batch_and_frees_the_writer(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """BEGIN failing with an I/O error (not "busy"): the writes fail, nothing is stuck."""
    fail_once(monkeypatch, st, "begin_nowait", LedgerError(f"{st.path}: disk I/O error"))
    writer = LedgerWriter(st)

    async def main() -> list[Any]:
        first = await together(writer, [reserve("a", 10), reserve("b", 10)])
        return [*first, await writer.run(reserve("c", 10))]

    results = asyncio.run(main())
    closer = threading.Thread(target=writer.close)
    closer.start()
    closer.join(5)
    assert not closer.is_alive(), "close() hung: the writer was left marked busy"
    assert all(isinstance(r, LedgerError) and "disk I/O" in str(r) for r in results[:2])
    assert results[2] is None  # the next batch works
    assert st.entry("a") is None and st.entry("b") is None and st.entry("c") is not None


def test_a_loop_closed_with_a_batch_pending_does_not_slow_the_next_loop(
    st: LedgerStore,
) -> None:
    writer = LedgerWriter(st)
    loop1 = asyncio.new_event_loop()
    tasks: list[Any] = []

    async def first() -> None:
        tasks.append(loop1.create_task(writer.run(reserve("a", 10))))
        await asyncio.sleep(0)  # the task queues its write and schedules the batch ...
        loop1.stop()  # ... in the loop's last iteration

    tasks.append(loop1.create_task(first()))
    loop1.run_forever()
    loop1.close()  # that batch never runs: the thread commits "a" after loop_grace_s

    async def second() -> float:
        t0 = time.monotonic()
        await writer.run(reserve("b", 10))
        return time.monotonic() - t0

    try:
        took = asyncio.run(second())
    finally:
        writer.close()
    assert st.entry("a") is not None and st.entry("b") is not None
    assert took < writer.loop_grace_s  # scheduled on the new loop, not left to the thread
