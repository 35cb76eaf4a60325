"""Holds: a reservation also reserves the next attempts' worst cases for its provider, so
those attempts go out without a commit of their own, under the same caps and invariant."""

from __future__ import annotations

import signal
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from _money_helpers import PRICE, GatedProvider, fake, flush, rows, run_child, store, worst_micro

from llmgw.kernel import ConfigError, Outcome, ProviderRequest, Request, Usage
from llmgw.kernel.config import load_settings
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies import ledger_ops as ops
from llmgw.plugins.policies.ledger import format_spend, spend_report
from llmgw.plugins.policies.ledger_sql import HOLD_MODEL
from llmgw.plugins.policies.ledger_store import Caps, Item, month_of

HERE = Path(__file__).parent
W = worst_micro("hi", 100)  # one attempt of `quick`'s worst case
YAML = """
plugins: [ledger, router, fake]
gateway: {{deadline_s: 1}}
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
  big: {{provider: fake, model: m1, max_tokens: 750}}
  other: {{provider: alt, model: m1, max_tokens: 100}}
  bigalt: {{provider: alt, model: m1, max_tokens: 750}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: alt, model: m1}}]
    max_tokens: 100
ledger:
{ledger}
"""


def gw(
    tmp_path: Path,
    ledger: str = "  hold_ahead: 3",
    providers: list[FakeProvider] | None = None,
    **kw: Any,
) -> Any:
    return gateway_from_yaml(
        YAML.format(ledger=ledger),
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
        providers=providers or [fake(), fake("alt")],
        **kw,
    )


def slow_fake(delay_s: float) -> list[FakeProvider]:
    """``fake`` answering after ``delay_s`` (calls overlap), and ``alt``."""
    return [GatedProvider(prices={"m1": PRICE}, delay=lambda: delay_s), fake("alt")]


class FullBill(FakeProvider):
    """Answers with every token it was allowed: billed close to the worst case."""

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.received.append(request)
        return Outcome.success("x", Usage(input_tokens=1, output_tokens=request.max_tokens))


def plugin(g: Any) -> Any:
    return next(p.obj for p in g.plugins if p.name == "ledger")


def audit_ok(path: Path, month: str) -> None:
    s = store(path)
    try:
        assert s.month_audit(month).problems == []
        assert s.integrity_check() == "ok"
    finally:
        s.close()


@pytest.mark.anyio
async def test_one_call_in_hold_ahead_plus_one_waits_for_a_commit(tmp_path: Path) -> None:
    g = gw(tmp_path)
    ledger = plugin(g)
    for n in range(9):
        env = await g.route(Request("quick", "hi", request_id=f"r{n}"))
        assert env.ok
    # Calls 1, 5 and 9 reserved (inline: nothing else of the gateway was out), each with a
    # hold of 3 more; the six others were covered by a hold and waited for nothing.
    assert ledger.writer.stats.inline == 3
    await flush(g)
    attempts = rows(tmp_path / "l.db")
    assert [(r["request_id"], r["state"], r["reserved_micro"]) for r in attempts] == [
        (f"r{n}", "settled", W) for n in range(9)
    ]
    assert all(r["cost_micro"] > 0 for r in attempts)
    holds = rows(tmp_path / "l.db", holds=True)
    assert [(r["model"], r["task_class"], r["attempt"]) for r in holds] == [
        (HOLD_MODEL, HOLD_MODEL, 0)
    ] * 3
    # The first two were used up (drawn to 0) and given back; the last one is held.
    assert [(r["state"], r["reserved_micro"]) for r in holds] == [
        ("released", 0),
        ("released", 0),
        ("reserved", 3 * W),
    ]
    info = g.routing_info()["ledger"]["total"]
    assert info["held_usd"] == 3 * W / 1e6 and info["reserved_usd"] == 0
    assert info["committed_usd"] == pytest.approx(info["settled_usd"] + 3 * W / 1e6)
    audit_ok(tmp_path / "l.db", month_of(datetime.now(UTC)))
    await g.aclose()
    # Shutdown gives the hold back: nothing stays reserved.
    assert [r["state"] for r in rows(tmp_path / "l.db", holds=True)] == ["released"] * 3
    s = store(tmp_path / "l.db")
    try:
        (total,) = [
            u for name, u in s.scopes(month_of(datetime.now(UTC))).items() if name == "total"
        ]
        assert total.reserved_micro == 0 and total.unknown_micro == 0
    finally:
        s.close()


@pytest.mark.anyio
async def test_holds_never_cost_a_call_that_fits_the_cap(tmp_path: Path) -> None:
    # Room for 10.5 worst cases of calls billed at nearly their worst case: ten calls fit,
    # with holds or without, and the eleventh is refused. A hold takes at most a quarter
    # of what is left, in whole worst cases, and the reservation that replaces it gives
    # it back first.
    cap = 10 * W + W // 2
    accepted = {}
    for hold_ahead in (0, 8):
        path = tmp_path / str(hold_ahead)
        path.mkdir()
        g = gw(
            path,
            f"  hold_ahead: {hold_ahead}\n  caps: {{total_monthly_usd: {cap / 1e6}}}",
            providers=[FullBill(prices={"m1": PRICE}), fake("alt")],
        )
        n = 0
        while n < 20 and (await g.route(Request("quick", "hi"))).ok:
            n += 1
            await flush(g)
            s = store(path / "l.db")
            try:
                used = s.scopes(month_of(datetime.now(UTC)))["total"].used_micro
            finally:
                s.close()
            assert used <= cap  # the invariant, holds included, after every call
        accepted[hold_ahead] = (n, plugin(g).writer.stats.inline)
        refused = await g.route(Request("quick", "hi"))
        assert refused.error_class == "budget_exceeded"
        await g.aclose()
        assert [r["state"] for r in rows(path / "l.db")] == ["settled"] * n
        audit_ok(path / "l.db", month_of(datetime.now(UTC)))
    assert accepted[0][0] == accepted[8][0] == 10
    # Without holds every call committed its own reservation; with them, fewer did.
    assert accepted[0][1] == 11 and accepted[8][1] < 11


@pytest.mark.anyio
async def test_a_hold_too_small_for_an_attempt_is_given_back_before_it_is_checked(
    tmp_path: Path,
) -> None:
    # The first call holds two more of its worst cases. The next one is 7.5 times larger:
    # its reservation fits the cap only once that hold is given back, which happens in the
    # same transaction, before the check.
    big = worst_micro("hi", 750)
    cap = 9 * W + 10
    g = gw(
        tmp_path,
        f"  hold_ahead: 2\n  caps: {{total_monthly_usd: {cap / 1e6}}}",
        providers=[FullBill(prices={"m1": PRICE}), fake("alt")],
    )
    assert (await g.route(Request("quick", "hi"))).ok
    assert plugin(g).holds[(month_of(datetime.now(UTC)), "fake")].free == 2 * W
    first = PRICE.cost_micro_usd(Usage(input_tokens=1, output_tokens=100))
    assert cap - first - 2 * W < big <= cap - first
    assert (await g.route(Request("big", "hi"))).ok
    await g.aclose()
    holds = rows(tmp_path / "l.db", holds=True)
    assert [(r["state"], r["reserved_micro"]) for r in holds] == [("released", 2 * W)]
    audit_ok(tmp_path / "l.db", month_of(datetime.now(UTC)))


@pytest.mark.anyio
async def test_a_panel_is_covered_by_its_providers_holds_all_or_none(tmp_path: Path) -> None:
    g = gw(tmp_path, "  hold_ahead: 1")
    ledger = plugin(g)
    for _ in range(3):
        assert (await g.route(Request("duo", "hi"))).ok
    # Panel 1 reserved both members with a hold of one more for each provider; panel 2
    # drew one from each; panel 3 found both empty and reserved again.
    assert len(ledger.holds) == 2
    await g.aclose()
    attempts = rows(tmp_path / "l.db")
    assert sorted((r["provider"], r["state"]) for r in attempts) == sorted(
        [("fake", "settled"), ("alt", "settled")] * 3
    )
    holds = rows(tmp_path / "l.db", holds=True)
    assert sorted((r["provider"], r["state"]) for r in holds) == sorted(
        [("fake", "released"), ("alt", "released")] * 2
    )
    audit_ok(tmp_path / "l.db", month_of(datetime.now(UTC)))


@pytest.mark.anyio
async def test_a_panel_one_provider_short_reserves_every_member(tmp_path: Path) -> None:
    g = gw(tmp_path, "  hold_ahead: 2")
    assert (await g.route(Request("duo", "hi"))).ok  # holds of 2 for fake and alt
    assert (await g.route(Request("quick", "hi"))).ok  # fake's hold: 1 left
    assert (await g.route(Request("quick", "hi"))).ok  # fake's hold: 0 left
    before = plugin(g).writer.stats.inline
    # alt could cover its member, fake cannot: nothing is drawn, both are reserved.
    assert (await g.route(Request("duo", "hi"))).ok
    await flush(g)
    assert plugin(g).writer.stats.inline + plugin(g).writer.stats.loop > before
    alt = [r for r in rows(tmp_path / "l.db", holds=True) if r["provider"] == "alt"]
    assert [(r["state"], r["reserved_micro"]) for r in alt] == [
        ("released", 2 * W),  # replaced in full: given back in the new reservation's commit
        ("reserved", 2 * W),
    ]
    await g.aclose()
    audit_ok(tmp_path / "l.db", month_of(datetime.now(UTC)))


@pytest.mark.anyio
async def test_calls_in_flight_ask_for_one_hold_at_a_time(tmp_path: Path) -> None:
    # Forty calls at once: the ones that find the hold used up reserve for themselves,
    # and only the first of them asks for a new hold (not forty holds, forty given back).
    g = gw(
        tmp_path,
        "  hold_ahead: 8\n  caps: {total_monthly_usd: 5}",
        providers=slow_fake(0.002),
    )
    async with anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(g.route, Request("quick", "hi"))
    await g.aclose()
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["settled"] * 40
    holds = rows(tmp_path / "l.db", holds=True)
    assert 1 <= len(holds) <= 5, len(holds)
    assert {r["state"] for r in holds} == {"released"}
    audit_ok(tmp_path / "l.db", month_of(datetime.now(UTC)))


@pytest.mark.anyio
async def test_an_idle_gateway_gives_its_holds_back(tmp_path: Path) -> None:
    g = gw(tmp_path, "  hold_ahead: 4\n  hold_idle_s: 0.2")
    assert (await g.route(Request("quick", "hi"))).ok
    assert (await g.route(Request("quick", "hi"))).ok  # drawn: the idle time starts again
    deadline = time.monotonic() + 10
    while plugin(g).holds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not plugin(g).holds
    await flush(g)
    assert [(r["state"], r["reserved_micro"]) for r in rows(tmp_path / "l.db", holds=True)] == [
        ("released", 3 * W)
    ]
    assert g.routing_info()["ledger"]["total"]["held_usd"] == 0
    inline = plugin(g).writer.stats.inline
    assert (await g.route(Request("quick", "hi"))).ok  # reserves (and holds) afresh
    assert plugin(g).writer.stats.inline == inline + 1
    await g.aclose()


@pytest.mark.anyio
async def test_a_new_month_is_not_drawn_from_the_last_months_hold(tmp_path: Path) -> None:
    clock = FakeClock(wall=datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC))
    g = gw(tmp_path, clock=clock)
    assert (await g.route(Request("quick", "hi"))).ok
    clock.advance(2)
    assert (await g.route(Request("quick", "hi"))).ok
    await g.aclose()
    assert [r["month"] for r in rows(tmp_path / "l.db")] == ["2027-01", "2027-02"]
    holds = rows(tmp_path / "l.db", holds=True)
    assert [(r["month"], r["state"], r["reserved_micro"]) for r in holds] == [
        ("2027-01", "released", 3 * W),
        ("2027-02", "released", 3 * W),
    ]
    audit_ok(tmp_path / "l.db", "2027-01")
    audit_ok(tmp_path / "l.db", "2027-02")


@pytest.mark.anyio
async def test_held_money_is_reported_apart_and_counts_against_the_cap(tmp_path: Path) -> None:
    g = gw(tmp_path, "  hold_ahead: 3\n  caps: {total_monthly_usd: 1}")
    assert (await g.route(Request("quick", "hi"))).ok
    report = g.routing_info()["ledger"]
    assert report["total"]["held_usd"] == report["providers"]["fake"]["held_usd"] == 3 * W / 1e6
    assert report["total"]["headroom_usd"] == pytest.approx(
        1 - report["total"]["settled_usd"] - 3 * W / 1e6
    )
    # Not an attempt: no line of its own by model or task class while it is held.
    assert set(report["by_model"]) == {"fake/m1"} and set(report["by_task_class"]) == {"quick"}
    text = format_spend(report)
    assert "held ahead for the next attempts: $0.030" in text
    assert "held ahead = reserved by a running gateway" in text
    await g.aclose()


def test_hold_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"hold_idle_s \(700.0\) plus busy_timeout_s \(5.0\) must"
    ):
        gw(tmp_path, "  hold_idle_s: 700")
    with pytest.raises(ConfigError, match="hold_ahead"):
        gw(tmp_path, "  hold_ahead: -1")


CRASH_CHILD = """
import os, signal, sys
sys.path.insert(0, sys.argv[2])
import anyio
from llmgw.kernel import Request
from test_ledger_holds import gw
from pathlib import Path

async def main():
    g = gw(Path(sys.argv[1]), "  hold_ahead: 8")
    for _ in range(5):
        assert (await g.route(Request("quick", "hi"))).ok
    os.kill(os.getpid(), signal.SIGKILL)  # holding, its draws and settles maybe queued

anyio.run(main)
"""


def test_a_process_killed_while_holding_keeps_what_is_left_charged(tmp_path: Path) -> None:
    out = run_child(tmp_path, CRASH_CHILD, str(tmp_path), str(HERE))
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    # The next start, after the lease: whatever the child had committed, the five calls
    # it made stay paid for (settled, or inside what is left of the hold, now unknown),
    # and nothing beyond the reservation and its hold is charged.
    clock = FakeClock(wall=datetime.now(UTC) + timedelta(seconds=601))
    g = gw(tmp_path, "  hold_ahead: 8", clock=clock)
    total = g.routing_info()["ledger"]["total"]
    one_cost = PRICE.cost_micro_usd(Usage(input_tokens=1, output_tokens=3))  # fake()'s echo
    charged = round((total["settled_usd"] + total["unknown_usd"]) * 1e6)
    assert 5 * one_cost <= charged <= 9 * W
    assert total["reserved_usd"] == total["held_usd"] == 0 and total["unknown_usd"] > 0
    holds = rows(tmp_path / "l.db", holds=True)
    assert [(r["state"], r["error_class"]) for r in holds] == [("unknown", "lease_expired")]
    assert all(r["state"] in ("settled", "unknown") for r in rows(tmp_path / "l.db"))
    audit_ok(tmp_path / "l.db", month_of(clock.now()))
    report = g.routing_info()["ledger"]
    assert report["by_model"][f"fake/{HOLD_MODEL}"]["unknown_usd"] > 0  # listed: charged
    assert f"{HOLD_MODEL} unknown or reserved = a hold a gateway never gave back" in (
        format_spend(report)
    )


def test_a_hold_expired_by_another_process_is_still_drawn_from(tmp_path: Path) -> None:
    # A gateway stalled past its lease: another one's start turned its hold unknown. A
    # draw then moves its amount from unknown to the attempt's reservation (charged all
    # along, never double counted), and the attempt settles as usual.
    now = datetime(2027, 3, 10, tzinfo=UTC)
    s = store(tmp_path / "l.db")
    try:
        hold = ops.Ahead(Item("h", "a", HOLD_MODEL, HOLD_MODEL, "hold", 0, attempt=0), 10, 4)
        taken = s.run_batch(
            [ops.Reserve([Item("e1", "a", "m", "c", "r1", 10)], Caps(), now, 60, [hold])]
        )
        assert taken == [(True, [("h", 40)])]
        assert s.expire_leases(now + timedelta(seconds=61)) == 2
        later = now + timedelta(seconds=62)
        (drawn,) = s.run_batch([ops.Draw("h", Item("e2", "a", "m", "c", "r2", 10), later, 60)])
        assert drawn == (True, True)
        assert s.entry("h")["reserved_micro"] == 30 and s.entry("h")["state"] == "unknown"
        assert s.entry("e2")["state"] == "reserved"
        use = s.scopes("2027-03")["total"]
        assert (use.reserved_micro, use.unknown_micro) == (10, 40)
        assert s.settle("e2", cost_micro=7, now=later)
        use = s.scopes("2027-03")["total"]
        assert (use.settled_micro, use.reserved_micro, use.unknown_micro) == (7, 0, 40)
        assert s.month_audit("2027-03").problems == []
    finally:
        s.close()


def test_a_draw_no_hold_covers_is_counted_on_its_own(tmp_path: Path) -> None:
    now = datetime(2027, 3, 10, tzinfo=UTC)
    s = store(tmp_path / "l.db")
    try:
        (drawn,) = s.run_batch([ops.Draw("gone", Item("e1", "a", "m", "c", "r1", 10), now, 60)])
        assert drawn == (True, False)
        assert s.scopes("2027-03")["provider:a"].reserved_micro == 10
        assert s.month_audit("2027-03").problems == []
    finally:
        s.close()


@pytest.mark.anyio
async def test_an_attempt_whose_draw_could_not_be_written_stays_charged(tmp_path: Path) -> None:
    # Another connection holds the write lock past busy_timeout_s (a repair, a backup)
    # while the second call's draw and settle wait to be written: that batch fails. The
    # call was sent, so giving the hold back must leave its worst case reserved (to turn
    # unknown with the lease), not release it with what no attempt took.
    g = gw(tmp_path, "  hold_ahead: 3\n  busy_timeout_s: 0.3")
    assert (await g.route(Request("quick", "hi", request_id="r1"))).ok
    await flush(g)
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert (await g.route(Request("quick", "hi", request_id="r2"))).ok  # drawn, sent
    await flush(g)  # its draw and settle failed: the database was locked
    other.execute("ROLLBACK")
    other.close()
    await g.aclose()  # gives back what no attempt drew
    assert [r["request_id"] for r in rows(tmp_path / "l.db")] == ["r1"]
    holds = rows(tmp_path / "l.db", holds=True)
    assert [(r["state"], r["reserved_micro"], r["error_class"]) for r in holds] == [
        ("reserved", W, "draw_not_written")
    ]
    s = store(tmp_path / "l.db")
    try:
        assert s.scopes(month_of(datetime.now(UTC)))["total"].reserved_micro == W
        assert s.month_audit(month_of(datetime.now(UTC))).problems == []
    finally:
        s.close()
    # Reported as charged, not as held ahead for later attempts.
    env = {"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")}
    report = spend_report(load_settings(text=YAML.format(ledger="  hold_ahead: 3"), env=env))
    assert report["total"]["held_usd"] == 0 and report["total"]["reserved_usd"] == W / 1e6
    assert report["by_model"][f"fake/{HOLD_MODEL}"]["reserved_usd"] == W / 1e6
    assert f"{HOLD_MODEL} unknown or reserved = a hold" in format_spend(report)


@pytest.mark.anyio
async def test_a_hold_unused_while_others_are_drawn_from_is_given_back_before_its_lease(
    tmp_path: Path,
) -> None:
    # alt is called once (a fallback, say) while fake keeps the gateway busy: alt's hold
    # is idle on its own and must be given back before its lease runs out, or another
    # gateway starting later would turn it unknown (charged, never sent).
    ledger = "  hold_ahead: 3\n  hold_idle_s: 1\n  lease_s: 2\n  busy_timeout_s: 0.5"
    g = gw(tmp_path, ledger)
    assert (await g.route(Request("other", "hi"))).ok
    end = time.monotonic() + 3
    while time.monotonic() < end:
        assert (await g.route(Request("quick", "hi"))).ok
        await anyio.sleep(0.3)
    assert (month_of(datetime.now(UTC)), "alt") not in plugin(g).holds
    assert (month_of(datetime.now(UTC)), "fake") in plugin(g).holds
    await flush(g)
    g2 = gw(tmp_path, ledger)  # another gateway starts: it expires what is past its lease
    await g2.aclose()
    await g.aclose()
    alt = [r for r in rows(tmp_path / "l.db", holds=True) if r["provider"] == "alt"]
    assert [(r["state"], r["reserved_micro"]) for r in alt] == [("released", 3 * W)]


@pytest.mark.anyio
async def test_a_hold_for_one_provider_never_refuses_a_call_to_another(tmp_path: Path) -> None:
    # The total cap leaves room for the small call (settled far below its worst case) and
    # then the large one to alt, if fake's hold is given back: the gateway gives its own
    # holds back and checks again before refusing.
    cap = worst_micro("hi", 750) + 2 * W
    result = {}
    for hold_ahead in (0, 8):
        path = tmp_path / str(hold_ahead)
        path.mkdir()
        g = gw(path, f"  hold_ahead: {hold_ahead}\n  caps: {{total_monthly_usd: {cap / 1e6}}}")
        assert (await g.route(Request("quick", "hi"))).ok
        await flush(g)
        env = await g.route(Request("bigalt", "hi"))
        result[hold_ahead] = (env.ok, env.error_class)
        await g.aclose()
        audit_ok(path / "l.db", month_of(datetime.now(UTC)))
    assert result == {0: (True, None), 8: (True, None)}


@pytest.mark.anyio
async def test_a_hold_committed_just_before_a_refusal_is_given_back_for_it(
    tmp_path: Path,
) -> None:
    # A panel's reservation (asking holds for fake and alt) waits for the loop's batch; a
    # call started in the same loop turn commits inline with the panel's write ahead of
    # it in the same transaction, and is refused by the cap. The panel's holds are kept
    # as that write completes, before the refusal is handed back, so the refused call
    # finds them, gives them back and fits.
    cap = worst_micro("hi", 750) + 2 * W + 10
    got = {}
    for hold_ahead in (0, 8):
        path = tmp_path / str(hold_ahead)
        path.mkdir()
        g = gw(path, f"  hold_ahead: {hold_ahead}\n  caps: {{total_monthly_usd: {cap / 1e6}}}")
        envs: dict[str, Any] = {}

        async def one(name: str, cls: str, g: Any = g, envs: dict[str, Any] = envs) -> None:
            envs[name] = await g.route(Request(cls, "hi"))

        async with anyio.create_task_group() as tg:
            tg.start_soon(one, "panel", "duo")
            tg.start_soon(one, "big", "bigalt")
        await g.aclose()
        got[hold_ahead] = {k: (v.ok, v.error_class) for k, v in envs.items()}
        audit_ok(path / "l.db", month_of(datetime.now(UTC)))
    assert got[0] == got[8] == {"panel": (True, None), "big": (True, None)}


@pytest.mark.anyio
async def test_a_hold_taken_while_the_gateway_shuts_down_is_released(tmp_path: Path) -> None:
    g = gw(
        tmp_path,
        "  hold_ahead: 8",
        providers=slow_fake(0.05),
    )
    assert (await g.route(Request("quick", "hi"))).ok
    plugin(g)._give_back(datetime.now(UTC))  # none held: the panel below asks for holds
    await flush(g)

    async with anyio.create_task_group() as tg:
        tg.start_soon(g.route, Request("duo", "hi"))
        await anyio.sleep(0)  # the panel's reservation, with its holds, is queued
        plugin(g).shutdown()  # what the gateway's close runs: the queue is committed
    held = [r for r in rows(tmp_path / "l.db", holds=True) if r["state"] == "reserved"]
    assert held == [] and plugin(g).holds == {}
