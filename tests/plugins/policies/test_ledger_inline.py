"""The inline fast path: a reservation made while the writer is idle commits on the caller's
thread (no hop to the writer thread and back), settles queued for a commit join it, a
database locked by another connection sends it to the thread (which waits for the lock),
and what it acknowledged is on disk (a SIGKILL right after it loses nothing)."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _money_helpers import fake, flush, rows, run_child, worst_micro

from llmgw.kernel import Request
from llmgw.kernel.testing import FakeClock, gateway_from_yaml
from llmgw.plugins.policies import ledger_ops as ops
from llmgw.plugins.policies.ledger_store import CapExceeded, Caps, Item, LedgerStore
from llmgw.plugins.policies.ledger_writer import LedgerWriter

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
HERE = Path(__file__).parent
# Every attempt reserves for itself (no holds): how that reservation commits is tested.
YAML = """
plugins: [ledger, router, fake]
task_classes:
  quick: {provider: fake, model: m1, max_tokens: 100}
ledger:
  caps: {total_monthly_usd: 5}
  hold_ahead: 0
"""


def reserve(i: str, amount: int, caps: Caps) -> Any:
    item = Item(i, "a", "m", "cls", f"req-{i}", amount)
    return ops.Reserve([item], caps, NOW, 60)


@pytest.mark.anyio
async def test_an_idle_writer_runs_the_reservation_inline(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    await writer.run(reserve("a", 10, Caps()), inline=True)
    # committed before it returned, and no thread was needed
    assert writer.stats.inline == 1 and writer.stats.writes == 1
    assert writer._thread is None
    other = sqlite3.connect(st.path)
    assert other.execute("SELECT state FROM entries").fetchall() == [("reserved",)]
    other.close()
    # a refusal is raised inline too, and leaves nothing behind
    with pytest.raises(CapExceeded):
        await writer.run(reserve("b", 10, Caps(total=15)), inline=True)
    assert writer.stats.inline == 2 and st.entry("b") is None
    writer.close()


@pytest.mark.anyio
async def test_sequential_calls_reserve_inline_and_pay_one_commit_each(tmp_path: Path) -> None:
    g = gateway_from_yaml(
        YAML, env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")}, providers=[fake()]
    )
    ledger = g.plugins[[p.name for p in g.plugins].index("ledger")].obj
    ledger.writer.linger_s = 5.0  # a settle always waits for the next reservation
    for _ in range(5):
        assert (await g.route(Request("quick", "hi"))).ok
    stats = ledger.writer.stats
    # every reservation inline, each with the previous call's settle in its commit
    assert stats.inline == 5 and stats.sizes == [1, 2, 2, 2, 2]
    assert ledger.in_flight == 0
    await flush(g)
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled"] * 5
    await g.aclose()


@pytest.mark.anyio
async def test_a_panel_reservation_commits_on_the_thread_even_when_alone(tmp_path: Path) -> None:
    # Measured: the panel's slowest member answers sooner so (see the ledger's docstring).
    yaml = YAML.replace(
        "ledger:",
        "  duo:\n    members: [{provider: fake, model: m1}, {provider: fake, model: m2}]\n"
        "    max_tokens: 100\nledger:",
    )
    g = gateway_from_yaml(
        yaml, env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")}, providers=[fake()]
    )
    ledger = g.plugins[[p.name for p in g.plugins].index("ledger")].obj
    ledger.writer.linger_s = 5.0  # the settles wait for the next reservation (no race)
    assert (await g.route(Request("duo", "hi"))).ok
    stats = ledger.writer.stats
    assert stats.inline == 0 and stats.loop == 1 and stats.sizes == [1]
    assert (await g.route(Request("quick", "hi"))).ok  # one call alone: inline again
    assert stats.inline == 1 and ledger.in_flight == 0
    await flush(g)
    got = sorted((r["model"], r["state"]) for r in rows(tmp_path / "l.db"))
    assert got == [("m1", "settled"), ("m1", "settled"), ("m2", "settled")]
    await g.aclose()


@pytest.mark.anyio
async def test_a_locked_database_falls_back_to_the_thread(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    other = sqlite3.connect(st.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(0.05, lambda: other.execute("ROLLBACK")).start()
    await writer.run(reserve("a", 10, Caps()), inline=True)  # waits on the thread
    other.close()
    assert writer.stats.inline == 0 and writer.stats.inline_fallbacks == 1
    assert writer.stats.writes == 1 and st.busy_retries > 0
    assert st.entry("a") is not None
    await writer.run(reserve("b", 10, Caps()), inline=True)  # idle again: inline
    assert writer.stats.inline == 1
    writer.close()


class SlowToReturn(LedgerWriter):
    """A writer whose thread comes back late for its next batch (a busy machine)."""

    def _take(self) -> Any:
        if self._running:
            time.sleep(0.1)
        return super()._take()


@pytest.mark.anyio
@pytest.mark.parametrize("first", ["thread batch", "loop batch", "plain step"])
async def test_the_writer_is_idle_once_its_waiters_wake(st: LedgerStore, first: str) -> None:
    """The thread frees the store before it wakes a batch's waiters, not when it comes back
    for the next batch: the caller that goes on at once runs inline."""
    writer = SlowToReturn(st)
    if first == "thread batch":
        writer.loop_batches = False
        await writer.run(reserve("a", 10, Caps()))
    elif first == "loop batch":
        await writer.run(reserve("a", 10, Caps()))  # its COMMIT runs on the thread
        assert writer.stats.loop == 1
    else:
        await writer.run_plain(lambda: None)
    await writer.run(reserve("b", 10, Caps()), inline=True)
    assert writer.stats.inline == 1 and writer.stats.loop_handovers == 0
    writer.close()


@pytest.mark.anyio
async def test_a_locked_database_puts_the_queued_settles_back_in_order(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    writer.linger_s = 5.0
    caps = Caps(total=100)
    await writer.run(reserve("a", 100, caps), inline=True)
    other = sqlite3.connect(st.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    settled = writer.submit(ops.Settle("a", 10, NOW), lazy=True)
    threading.Timer(0.05, lambda: other.execute("ROLLBACK")).start()
    # fits only once the settle (submitted first) has freed the headroom
    await writer.run(reserve("b", 90, caps), inline=True)
    other.close()
    assert settled.result(1) is True
    assert writer.stats.inline_fallbacks == 1 and writer.stats.sizes[-1] == 2
    writer.close()


@pytest.mark.anyio
async def test_a_queued_settle_joins_the_inline_commit_first(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    writer.linger_s = 5.0  # the thread leaves the lazy settle queued
    caps = Caps(total=100)
    await writer.run(reserve("a", 100, caps), inline=True)
    settled = writer.submit(ops.Settle("a", 10, NOW), lazy=True)
    assert not settled.done()
    # the cap only has room for b if a's settle (submitted first) runs first
    await writer.run(reserve("b", 90, caps), inline=True)
    assert settled.done() and settled.result() is True  # completed after the same COMMIT
    assert writer.stats.inline == 2 and writer.stats.sizes == [1, 2]
    assert st.entry("a")["state"] == "settled"  # type: ignore[index]
    assert st.entry("b")["state"] == "reserved"  # type: ignore[index]
    writer.close()


@pytest.mark.anyio
async def test_work_on_the_thread_sends_the_reservation_to_the_thread(st: LedgerStore) -> None:
    writer = LedgerWriter(st)
    gate = threading.Event()
    entered = threading.Event()

    def hold() -> None:
        entered.set()
        gate.wait(10)

    stall = writer.submit_plain(hold)
    assert entered.wait(5)
    threading.Timer(0.05, gate.set).start()
    await writer.run(reserve("a", 10, Caps()), inline=True)
    stall.result(5)
    # the writer was busy: queued behind its work, in order, not inline
    assert writer.stats.inline == 0 and writer.stats.inline_fallbacks == 0
    assert st.entry("a") is not None
    writer.close()


CRASH_CHILD = """
import os, signal, sys
import anyio
from llmgw.kernel import Request
from llmgw.kernel.testing import FakeClock, FakeProvider, flat_price, gateway_from_yaml

class DiesOnSend(FakeProvider):
    ledger = None

    async def complete(self, request):
        # the reservation has returned: report it, then die before anything else runs
        stats = self.ledger.writer.stats
        print(stats.inline, self.ledger.writer._thread is None, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

YAML = '''
plugins: [ledger, router, fake]
task_classes:
  quick: {provider: fake, model: m1, max_tokens: 100}
ledger:
  caps: {total_monthly_usd: 5}
  hold_ahead: 0
'''

async def main():
    p = DiesOnSend(prices={"m1": flat_price("10", "100")})
    g = gateway_from_yaml(YAML, env={"LLM_GATEWAY_LEDGER_PATH": sys.argv[1]}, providers=[p],
                          clock=FakeClock())
    p.ledger = g.plugins[[x.name for x in g.plugins].index("ledger")].obj
    await g.route(Request("quick", "hi"))

anyio.run(main)
"""


def test_a_sigkill_right_after_an_inline_reservation_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    out = run_child(tmp_path, CRASH_CHILD, str(path))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    # reserved inline (no writer thread ever started), then killed
    assert out.stdout.split() == ["1", "True"]
    assert [(r["state"], r["reserved_micro"]) for r in rows(path)] == [
        ("reserved", worst_micro("hi", 100))
    ]
    # the next start, after the lease: charged as unknown, never lost
    clock = FakeClock()
    clock.advance(601)
    g = gateway_from_yaml(
        YAML, env={"LLM_GATEWAY_LEDGER_PATH": str(path)}, providers=[fake()], clock=clock
    )
    info = g.routing_info()["ledger"]
    assert info["expired_at_start"] == 1
    assert info["total"]["unknown_usd"] == worst_micro("hi", 100) / 1e6
