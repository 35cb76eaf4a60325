"""Group commit and settles off the critical path: a batch shares one transaction but each
write succeeds or fails alone; a failed COMMIT fails every write of its batch; a settle not
yet committed when the process dies leaves its reservation charged (unknown at the next
start); whatever reports spend waits for the queued writes first; a locked database is
retried in short jittered steps, not SQLite's growing sleeps."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import pytest
from _money_helpers import PRICE, fail_once, fake, flush, rows, run_child, worst_micro

from llmgw.kernel import Outcome, ProviderRequest, Request
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies import ledger_ops as ops
from llmgw.plugins.policies.ledger_store import CapExceeded, Caps, Item, LedgerError, LedgerStore
from llmgw.plugins.policies.ledger_writer import LedgerWriter

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
HERE = Path(__file__).parent
YAML = """
plugins: [ledger, router, fake]
task_classes:
  quick: {provider: fake, model: m1, max_tokens: 100}
ledger:
  caps: {total_monthly_usd: 5}
"""


def item(i: str, amount: int) -> Item:
    return Item(i, "a", "m", "cls", f"req-{i}", amount)


def reserve(i: str, amount: int, caps: Caps) -> Any:
    return ops.Reserve([item(i, amount)], caps, NOW, 60)


class Stalled:
    """Holds a writer's thread in a plain step until released: what is queued meanwhile
    becomes one batch (or, for a crash, never commits)."""

    def __init__(self, writer: LedgerWriter) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()

        def hold() -> None:
            self.entered.set()
            self.gate.wait(10)

        self.done = writer.submit_plain(hold)
        assert self.entered.wait(5)

    def release(self) -> None:
        self.gate.set()
        self.done.result(5)


def test_a_refused_reservation_in_a_batch_rolls_back_alone(st: LedgerStore) -> None:
    caps = Caps(total=100)
    writer = LedgerWriter(st)
    stall = Stalled(writer)
    jobs = [
        writer.submit(reserve("a", 50, caps)),
        writer.submit(reserve("b", 60, caps)),  # 50 + 60 > 100: refused
        writer.submit(reserve("c", 50, caps)),  # fits after a: committed
        writer.submit(ops.Settle("a", 20, NOW)),
    ]
    stall.release()
    assert jobs[0].result(5) is None
    with pytest.raises(CapExceeded) as info:
        jobs[1].result(5)
    assert info.value.breaches[0].headroom_micro == 50
    assert jobs[2].result(5) is None
    assert jobs[3].result(5) is True
    writer.close()
    assert writer.stats.sizes[-1] == 4  # one transaction for the four writes
    assert st.entry("b") is None
    assert st.entry("a")["state"] == "settled" and st.entry("c")["state"] == "reserved"
    total = st.scopes("2026-11")["total"]
    assert (total.settled_micro, total.reserved_micro, total.used_micro) == (20, 50, 70)


def test_a_failed_statement_in_a_batch_rolls_back_alone(st: LedgerStore) -> None:
    def broken(db: sqlite3.Connection) -> None:
        ops.Reserve([item("x", 5)], Caps(), NOW, 60)(db)
        db.execute("INSERT INTO no_such_table VALUES (1)")  # fails after a partial write

    results = st.run_batch([reserve("a", 10, Caps()), broken, reserve("b", 10, Caps())])
    assert [ok for ok, _ in results] == [True, False, True]
    assert isinstance(results[1][1], LedgerError) and "no_such_table" in str(results[1][1])
    assert st.entry("x") is None  # its reservation was rolled back with it
    assert st.scopes("2026-11")["total"].reserved_micro == 20


def test_a_failed_commit_fails_every_write_of_the_batch(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    st.reserve([item("old", 30)], Caps(), now=NOW, lease_s=60)
    writer = LedgerWriter(st)
    stall = Stalled(writer)
    jobs = [
        writer.submit(reserve("a", 10, Caps())),
        writer.submit(ops.Settle("old", 5, NOW)),
        writer.submit(reserve("b", 10, Caps())),
    ]
    fail_once(monkeypatch, st, "_commit", sqlite3.OperationalError("disk I/O error"))
    stall.release()
    for job in jobs:
        with pytest.raises(LedgerError, match="disk I/O error"):
            job.result(5)
    # nothing of the batch was written; the ledger still works afterwards
    assert st.entry("a") is None and st.entry("b") is None
    assert st.entry("old")["state"] == "reserved"
    assert writer.submit(reserve("c", 10, Caps())).result(5) is None
    writer.close()
    total = st.scopes("2026-11")["total"]
    assert (total.reserved_micro, total.settled_micro) == (40, 0)


def test_a_closed_writer_commits_what_was_queued_and_refuses_more(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    stall = Stalled(writer)
    job = writer.submit(reserve("a", 10, Caps()))
    threading.Timer(0.02, stall.gate.set).start()
    writer.close()  # drains: the queued reservation is committed before close returns
    assert job.done() and job.result() is None and st.entry("a") is not None
    with pytest.raises(LedgerError, match="closed"):
        writer.submit(reserve("b", 10, Caps())).result(1)


@pytest.mark.anyio
async def test_concurrent_calls_share_commits(tmp_path: Path) -> None:
    class Slow(FakeProvider):
        async def complete(self, request: ProviderRequest) -> Outcome:
            await anyio.sleep(0.001)
            return await super().complete(request)

    g = gateway_from_yaml(
        # Every attempt reserves for itself (no holds): the group commit is what is tested.
        YAML + "  hold_ahead: 0\n",
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
        providers=[Slow(prices={"m1": PRICE})],
    )
    async with anyio.create_task_group() as tg:
        for _ in range(50):
            tg.start_soon(g.route, Request("quick", "hi"))
    ledger = g.plugins[[p.name for p in g.plugins].index("ledger")].obj
    await g.aclose()
    stats = ledger.writer.stats
    assert stats.writes == 100  # 50 reservations + 50 settles
    assert stats.batches < stats.writes and stats.largest > 1
    # under load the reservations were group-committed (applied on the event loop, the
    # COMMIT on the thread), not inline
    assert stats.inline < 5 and stats.loop >= 1 and ledger.in_flight == 0
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled"] * 50


class StallsTheLedger(FakeProvider):
    """Answers, but first holds the ledger's writer: the settle of this call is queued
    behind the stall, so the call returns before its settle can commit."""

    stall: Stalled | None = None
    ledger: Any = None

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.stall = Stalled(self.ledger.writer)
        return await super().complete(request)


def _stalling_gateway(path: Path, clock: FakeClock | None = None) -> tuple[Any, StallsTheLedger]:
    p = StallsTheLedger(prices={"m1": PRICE})
    g = gateway_from_yaml(
        YAML, env={"LLM_GATEWAY_LEDGER_PATH": str(path)}, providers=[p], clock=clock
    )
    p.ledger = g.plugins[[x.name for x in g.plugins].index("ledger")].obj
    return g, p


@pytest.mark.anyio
async def test_after_call_returns_before_the_settle_and_reports_flush_first(
    tmp_path: Path,
) -> None:
    g, p = _stalling_gateway(tmp_path / "l.db")
    env = await g.route(Request("quick", "hi"))
    assert env.ok
    # returned while the settle waits behind the stall: the worst case is still counted
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["reserved"]
    assert p.stall is not None
    threading.Timer(0.05, p.stall.gate.set).start()
    info = g.routing_info()["ledger"]  # waits for the queued settle before reading
    assert info["total"]["reserved_usd"] == 0
    assert info["total"]["settled_usd"] == env.meta["cost_usd_approx"] > 0
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled"]
    await g.aclose()


@pytest.mark.anyio
async def test_flush_and_shutdown_wait_for_queued_settles(tmp_path: Path) -> None:
    g, p = _stalling_gateway(tmp_path / "l.db")
    assert (await g.route(Request("quick", "hi"))).ok
    assert p.stall is not None
    threading.Timer(0.05, p.stall.gate.set).start()
    await flush(g)
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled"]
    assert (await g.route(Request("quick", "hi"))).ok
    assert p.stall is not None
    threading.Timer(0.05, p.stall.gate.set).start()
    await g.aclose()  # shutdown drains the queue
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled", "settled"]


CRASH_CHILD = """
import os, sys
sys.path.insert(0, sys.argv[2])
import anyio
from llmgw.kernel import Request
from llmgw.kernel.testing import FakeClock
from test_ledger_writer import _stalling_gateway, rows
from pathlib import Path

async def main():
    g, p = _stalling_gateway(Path(sys.argv[1]), FakeClock())
    env = await g.route(Request("quick", "hi"))
    assert env.ok
    print([r["state"] for r in rows(Path(sys.argv[1]))], flush=True)
    os._exit(0)  # dies with the settle queued behind the stall: never committed

anyio.run(main)
"""


def test_a_crash_after_the_call_returned_leaves_the_reservation_charged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "l.db"
    out = run_child(tmp_path, CRASH_CHILD, str(path), str(HERE))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['reserved']"
    # the next start, after the lease: the reservation is charged as unknown, not lost
    clock = FakeClock()  # the child's clock too
    clock.advance(601)
    g = gateway_from_yaml(
        YAML, env={"LLM_GATEWAY_LEDGER_PATH": str(path)}, providers=[fake()], clock=clock
    )
    info = g.routing_info()["ledger"]
    # The attempt's reservation and the hold it took for the next eight attempts: the
    # process died holding it, so what is left of it stays charged, never released.
    assert info["expired_at_start"] == 2
    assert info["total"]["unknown_usd"] == 9 * worst_micro("hi", 100) / 1e6
    assert [(r["state"], r["error_class"]) for r in rows(path)] == [("unknown", "lease_expired")]
    held = [(r["state"], r["error_class"], r["reserved_micro"]) for r in rows(path, holds=True)]
    assert held == [("unknown", "lease_expired", 8 * worst_micro("hi", 100))]


def test_a_locked_database_is_retried_in_short_steps(tmp_path: Path) -> None:
    s = LedgerStore(tmp_path / "l.db", busy_timeout_s=5)
    s.open()
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    started = time.perf_counter()
    threading.Timer(0.05, lambda: other.execute("ROLLBACK")).start()
    s.reserve([item("a", 1)], Caps(), now=NOW, lease_s=60)
    waited = time.perf_counter() - started
    other.close()
    assert waited >= 0.05  # it waited for the lock (and did not fail at once)
    # SQLite's handler would sleep in growing steps (up to 100 ms, so 3-4 tries in 50 ms);
    # ours retries every 0.25-1 ms
    assert s.busy_retries >= 10
    assert s.entry("a") is not None
    s.close()


def test_the_writer_thread_stops_when_idle_and_restarts(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    writer.idle_exit_s = 0.1
    assert writer.submit(reserve("a", 1, Caps())).result(5) is None
    thread = writer._thread
    assert thread is not None
    thread.join(2)
    assert not thread.is_alive() and writer._thread is None
    assert writer.submit(reserve("b", 1, Caps())).result(5) is None
    writer.close()
    assert st.count("reserved") == 2


def test_futures_complete_only_after_the_commit(st: LedgerStore) -> None:
    seen: list[int] = []
    writer = LedgerWriter(st)

    def check(_: cf.Future[Any]) -> None:
        # the write is visible to another connection: committed before acknowledged
        other = sqlite3.connect(st.path)
        seen.append(other.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
        other.close()

    writer.submit(reserve("a", 1, Caps())).add_done_callback(check)
    writer.close()
    assert seen == [1]


@pytest.mark.anyio
async def test_a_batch_wakes_the_event_loop_once(st: LedgerStore) -> None:
    """The awaited writes of one batch come back to their loop in one wake-up, each with
    its own result or refusal."""
    loop = asyncio.get_running_loop()
    real = loop.call_soon_threadsafe
    wakes: list[object] = []

    def counting(callback: Any, *args: Any, **kwargs: Any) -> Any:
        wakes.append(callback)
        return real(callback, *args, **kwargs)

    writer = LedgerWriter(st)
    caps = Caps(total=100)
    stall = Stalled(writer)
    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        tasks = [asyncio.ensure_future(writer.run(reserve(i, 40, caps))) for i in "abc"]
        await asyncio.sleep(0)  # each run() has queued its write
        stall.release()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        del loop.call_soon_threadsafe
    writer.close()
    assert results[:2] == [None, None] and isinstance(results[2], CapExceeded)
    assert writer.stats.sizes[-1] == 3  # one transaction for the three
    assert len(wakes) == 1
    assert st.scopes("2026-11")["total"].reserved_micro == 80


@pytest.mark.anyio
async def test_a_cancelled_caller_still_gets_its_write_committed_and_handed_over(
    st: LedgerStore,
) -> None:
    writer = LedgerWriter(st)
    stall = Stalled(writer)
    abandoned: list[object] = []
    task = asyncio.ensure_future(
        writer.run(reserve("a", 10, Caps()), if_abandoned=lambda v: abandoned.append(("a", v)))
    )
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stall.release()
    writer.close()
    assert abandoned == [("a", None)]
    assert st.entry("a") is not None and st.entry("a")["state"] == "reserved"


def test_a_batch_without_failure_runs_each_write_once_without_per_write_savepoints(
    st: LedgerStore,
) -> None:
    runs: list[str] = []
    statements: list[str] = []

    def counted(i: str) -> Any:
        def op(db: sqlite3.Connection) -> None:
            runs.append(i)
            reserve(i, 10, Caps())(db)

        return op

    assert st._db is not None
    st._db.set_trace_callback(statements.append)
    results = st.run_batch([counted("a"), counted("b"), counted("c")])
    st._db.set_trace_callback(None)
    assert [ok for ok, _ in results] == [True, True, True]
    assert runs == ["a", "b", "c"]
    assert sum(s.startswith("SAVEPOINT") for s in statements) == 1  # the batch's, not per write
    assert st.scopes("2026-11")["total"].reserved_micro == 30


def test_a_lazy_write_does_not_wake_the_thread_yet_commits_on_its_own(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    writer.submit(reserve("a", 10, Caps())).result(5)  # the thread runs, then idles
    wakes: list[int] = []
    real_notify = writer._cond.notify

    def counted(n: int = 1) -> None:
        wakes.append(n)
        real_notify(n)

    writer._cond.notify = counted  # type: ignore[method-assign]
    started = time.monotonic()
    settled = writer.submit(ops.Settle("a", 4, NOW), lazy=True)
    assert wakes == []  # a settle alone does not wake the thread...
    assert settled.result(5) is True  # ...which still finds it at its own look (poll_s)
    assert time.monotonic() - started < 0.5  # poll_s + linger_s, with room for a slow CI
    assert st.entry("a")["state"] == "settled"
    writer.submit(reserve("b", 10, Caps())).result(5)
    assert wakes  # an urgent write does wake it
    writer.close()


def test_a_full_batch_of_lazy_writes_wakes_the_thread(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    writer.max_batch = 4
    writer.linger_s = 60.0  # only a full batch (or the next urgent write) may end the wait
    for i in range(4):
        writer.submit(reserve(f"r{i}", 10, Caps())).result(5)
    settles = [writer.submit(ops.Settle(f"r{i}", 1, NOW), lazy=True) for i in range(4)]
    assert all(f.result(5) is True for f in settles)
    assert writer.stats.sizes[-1] == 4
    writer.close()


def test_a_settle_queued_just_after_an_inline_batch_commits_within_the_poll(
    st: LedgerStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The thread waits while a caller runs a batch inline; a batch that leaves nothing
    # queued does not notify it, nor does the settle queued right after: the thread must
    # look again within poll_s, not sleep a tenth of a second.
    writer = LedgerWriter(st)
    writer.linger_s = 0.005  # the thread's look is tested here, not the linger
    writer.submit(reserve("a", 10, Caps())).result(5)  # the thread runs, then idles
    real = st.try_batch

    def slow(ops_: Any) -> Any:
        time.sleep(0.03)  # long enough for the thread to see the inline batch running
        return real(ops_)

    monkeypatch.setattr(st, "try_batch", slow)
    done, _ = writer.run_inline(reserve("b", 10, Caps()))
    assert done
    started = time.monotonic()
    settled = writer.submit(ops.Settle("a", 4, NOW), lazy=True)
    assert settled.result(5) is True
    waited = time.monotonic() - started
    assert waited < 0.08, waited  # poll_s (10 ms) + linger_s (5 ms), room for a slow CI
    writer.close()
