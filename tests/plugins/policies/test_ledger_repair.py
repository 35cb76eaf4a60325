"""``llmgw spend --repair``: damaged totals rebuilt from the entries, after a backup."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from _ledger_damage import (
    ENTRY_DAMAGE,
    ENTRY_RULE_DAMAGE,
    NEXT_MONTH,
    NOW,
    TOTALS_DAMAGE,
    audit,
    busy_ledger,
    item,
    tamper,
)
from _money_helpers import fake

from llmgw.kernel import Gateway, Request, Settings
from llmgw.kernel.cli import main
from llmgw.kernel.config import load_settings
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.ledger import DAMAGE_RECHECK_S, format_spend, spend_report
from llmgw.plugins.policies.ledger_repair import (
    backup_path,
    format_repair,
    repair_ledger,
    repaired_ok,
)
from llmgw.plugins.policies.ledger_store import CapExceeded, Caps, LedgerError, LedgerStore

CONFIG = "plugins: [ledger, router]\ntask_classes:\n  quick: {provider: openai, model: m1}\n"


def settings_for(tmp_path: Path, path: Path, extra: str = "") -> Settings:
    """Settings of a routing.yaml with the ledger at ``path`` (``extra``: more YAML)."""
    config = tmp_path / "routing.yaml"
    config.write_text(CONFIG + extra)
    return load_settings(config, env={"LLM_GATEWAY_LEDGER_PATH": str(path)})


def repair(tmp_path: Path, path: Path, at: datetime = NEXT_MONTH) -> dict[str, Any]:
    return repair_ledger(settings_for(tmp_path, path), now=at)


def entries(path: Path) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT * FROM entries ORDER BY id").fetchall()
    finally:
        db.close()


def backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}.bak-*"))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(("statement", "named"), TOTALS_DAMAGE)
def test_damaged_totals_are_rebuilt_from_the_entries(
    tmp_path: Path, statement: str, named: str
) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, statement)
    records = entries(path)
    result = repair(tmp_path, path)
    assert result["state"] == "repaired" and repaired_ok(result)
    assert result["check"]["ok"] and result["check"]["entries"] == 8
    assert audit(path).ok
    assert entries(path) == records  # the record is never rewritten, only summed
    # The backup is the ledger as it was, damage included.
    (backup,) = backups(path)
    assert result["backup"] == str(backup)
    assert named in audit(backup).problems
    damaged = named.split(": ")[0]  # "2026-11 provider:a", "2026-12 total"
    assert damaged in {f"{c['month']} {c['scope']}" for c in result["changes"]}


def test_each_change_says_what_the_row_held_and_holds_now(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "DELETE FROM totals WHERE scope = 'provider:b' AND month = '2026-12'")
    tamper(path, "UPDATE totals SET settled_micro = 5 WHERE scope = 'total' AND month = '2026-11'")
    result = repair(tmp_path, path)
    assert result["changes"] == [
        {
            "month": "2026-11",
            "scope": "total",
            "before": {"settled": 5, "overage": 30, "reserved": 0, "unknown": 290},
            "after": {"settled": 190, "overage": 30, "reserved": 0, "unknown": 290},
            "cap_before": 10_000,
            "cap_after": 10_000,
        },
        {
            "month": "2026-12",
            "scope": "provider:b",
            "before": None,
            "after": {"settled": 0, "overage": 0, "reserved": 300, "unknown": 0},
            "cap_before": None,
            "cap_after": None,
        },
    ]


def test_a_cap_the_entries_exceed_is_cleared_and_still_enforced(tmp_path: Path) -> None:
    """Real spend the damage hid: the rebuilt row is over the cap recorded with it, which
    its CHECK would refuse, so that cap is cleared; reservations are still checked
    against the configured cap, and the next one that fits records it again."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET cap_micro = 100, settled_micro = 0 WHERE scope = 'total'")
    result = repair(tmp_path, path)
    assert result["state"] == "repaired" and result["check"]["ok"]
    nov = next(c for c in result["changes"] if (c["month"], c["scope"]) == ("2026-11", "total"))
    assert (nov["cap_before"], nov["cap_after"]) == (100, None)
    assert nov["after"]["settled"] == 190
    st = LedgerStore(path)
    st.open()
    try:
        with pytest.raises(CapExceeded):
            st.reserve([item("again", 1)], Caps(total=100), now=NOW, lease_s=60)
        st.settle("u", cost_micro=10, now=NOW)  # settles go on
        st.reserve([item("fits", 1)], Caps(total=10_000), now=NOW, lease_s=60)
    finally:
        st.close()
    db = sqlite3.connect(path)
    cap = db.execute(
        "SELECT cap_micro FROM totals WHERE month = '2026-11' AND scope = 'total'"
    ).fetchone()
    db.close()
    assert cap == (10_000,)
    assert audit(path).ok


def test_a_clean_ledger_is_not_touched(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    before = digest(path)
    result = repair(tmp_path, path)
    assert result["state"] == "clean" and repaired_ok(result)
    assert digest(path) == before and backups(path) == []


def test_no_ledger_file_is_not_created(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    result = repair(tmp_path, path)
    assert result["state"] == "absent" and repaired_ok(result)
    assert not path.exists()


def _bad_index(path: Path) -> None:
    db = sqlite3.connect(path)
    db.execute("PRAGMA writable_schema = ON")
    db.execute(
        "UPDATE sqlite_master SET sql = replace(sql, '(month)', '(provider)') "
        "WHERE name = 'entries_month'"
    )
    db.commit()
    db.close()


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        *[(lambda p, st=st: tamper(p, st), named) for st, named in ENTRY_RULE_DAMAGE],
        (_bad_index, "integrity_check: row 1 missing from index entries_month"),
    ],
    ids=["fraction", "state", "no-cost", "negative", "index"],
)
def test_damage_below_the_totals_is_refused_and_nothing_written(
    tmp_path: Path, damage: Any, named: str
) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET settled_micro = 0 WHERE scope = 'total'")
    damage(path)
    before = digest(path)
    result = repair(tmp_path, path)
    assert result["state"] == "refused" and not repaired_ok(result)
    assert named in result["problems"]
    assert digest(path) == before and backups(path) == []


def test_the_repair_runs_beside_a_gateway_that_keeps_writing(tmp_path: Path) -> None:
    """Online: the rebuild takes the write lock, and the writer's transactions read the
    totals afresh, so neither loses the other's writes."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    caps = Caps(total=10**12, providers={"a": 10**12})
    stop = threading.Event()
    cycles = [0]

    def write() -> None:
        st = LedgerStore(path)
        st.open()
        try:
            while not stop.is_set():
                now = datetime.now(UTC)
                i = uuid.uuid4().hex
                st.reserve([item(i, 1_000)], caps, now=now, lease_s=600)
                st.settle(i, cost_micro=300, now=now)
                cycles[0] += 1
        finally:
            st.close()

    writer = threading.Thread(target=write)
    writer.start()
    try:
        while cycles[0] < 20:
            stop.wait(0.01)
        tamper(path, "UPDATE totals SET settled_micro = 1 WHERE scope = 'provider:a'")
        result = repair(tmp_path, path)
        done_at_repair = cycles[0]
        while cycles[0] < done_at_repair + 20:
            stop.wait(0.01)
    finally:
        stop.set()
        writer.join()
    assert result["state"] == "repaired" and result["check"]["ok"], result
    assert audit(path).ok


def test_backups_never_overwrite_each_other(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    at = datetime(2026, 12, 1, 22, 5, 9, tzinfo=UTC)
    first = backup_path(path, at)
    assert first.name == "l.db.bak-20261201T220509Z"
    first.write_text("taken")
    second = backup_path(path, at)
    assert second.name == "l.db.bak-20261201T220509Z-1"


def test_llmgw_spend_repair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "routing.yaml"
    config.write_text(CONFIG)
    path = tmp_path / "l.db"
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(path))
    cmd = ["spend", "--repair", "--config", str(config)]
    assert main(cmd) == 0
    assert "no ledger file yet, nothing to repair" in capsys.readouterr().out
    busy_ledger(path)
    assert main(cmd) == 0
    assert "nothing to repair" in capsys.readouterr().out

    tamper(path, "UPDATE totals SET cap_micro = 100 WHERE scope = 'total' AND month = '2026-11'")
    # The plain report warns when this month's totals are damaged (a later month here:
    # the damage is in November, the report's month is now).
    assert main(["spend", "--config", str(config)]) == 0
    assert "WARNING" not in capsys.readouterr().out
    assert main(["spend", "--check", "--config", str(config)]) == 1
    assert "Run `llmgw spend --repair`" in capsys.readouterr().out
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "1 totals row(s) rebuilt from the entries" in out
    assert "backup of the ledger as it was: " + str(backups(path)[0]) in out
    assert "2026-11 total: the cap recorded with it ($0.000100) is cleared" in out
    assert "ledger check after the repair: OK (8 entries)" in out
    assert "spend ledger: " in out  # then the usual report
    assert main(["spend", "--check", "--config", str(config)]) == 0
    capsys.readouterr()

    tamper(path, ENTRY_DAMAGE[0])
    assert main(cmd) == 1
    out = capsys.readouterr().out
    assert "REFUSED, the ledger was not changed" in out and ENTRY_DAMAGE[1] in out
    assert "spend ledger: " not in out
    assert main(["spend", "--check", "--config", str(config)]) == 1
    assert "The damage is below the totals" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exc:
        main(["spend", "--check", "--repair", "--config", str(config)])
    assert exc.value.code == 2


def test_only_the_damaged_months_are_rebuilt(tmp_path: Path) -> None:
    """The rebuild sums the entries of the months the check found damaged (the write
    lock is held meanwhile), not the whole ledger."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET reserved_micro = 7 WHERE month = '2026-12'")
    tamper(path, "UPDATE totals SET settled_micro = 1 WHERE month = '2026-11'")
    st = LedgerStore(path)
    st.open()
    try:
        changes = st.rebuild_totals(["2026-12"])
        assert {c.month for c in changes} == {"2026-12"}
        assert st.rebuild_totals([]) == []
    finally:
        st.close()
    left = audit(path)
    assert left.damaged_months == {"2026-11"}
    result = repair(tmp_path, path)
    assert {c["month"] for c in result["changes"]} == {"2026-11"}
    assert result["check"]["ok"]


def test_a_locked_ledger_fails_cleanly_and_names_its_unneeded_backup(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET settled_micro = 1 WHERE scope = 'total'")
    settings = settings_for(tmp_path, path, "ledger: {busy_timeout_s: 0.2}\n")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another connection keeps the write lock
    try:
        before = entries(path)
        result = repair_ledger(settings, now=NEXT_MONTH)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result["state"] == "failed" and not repaired_ok(result)
    assert "held the write lock for over 0.2 s (ledger.busy_timeout_s)" in result["error"]
    assert entries(path) == before and not audit(path).ok  # unchanged
    out = format_repair(result)
    assert "FAILED, the ledger was not changed" in out
    assert f"not needed and can be deleted: {result['backup']}" in out


def test_a_cap_that_is_not_an_amount_is_cleared_as_such(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET cap_micro = 'abc' WHERE scope = 'total' AND month = '2026-11'")
    result = repair(tmp_path, path)
    assert result["check"]["ok"]
    text = format_repair(result)
    assert "2026-11 total: the cap recorded with it ('abc') is cleared: it is not an amount" in text


# --- a gateway opening a damaged ledger ----------------------------------------------

GATEWAY = """
plugins: [ledger, router, fake]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
{caps}
"""
CAPS = "ledger:\n  caps: {total_monthly_usd: 2}\n"


def damaged_gateway(path: Path, caps: str, clock: FakeClock) -> tuple[Gateway, FakeProvider]:
    provider = fake()
    g = gateway_from_yaml(
        GATEWAY.format(caps=caps),
        env={"LLM_GATEWAY_LEDGER_PATH": str(path)},
        providers=[provider],
        clock=clock,
    )
    return g, provider


@pytest.mark.anyio
async def test_damaged_totals_refuse_calls_while_a_cap_is_set_until_repaired(
    tmp_path: Path,
) -> None:
    """Caps are checked against the totals: a gateway that opens a ledger whose totals
    for this month do not match its entries fails closed, names the damage and the fix,
    and lets calls through again once a repair has mended it (no restart)."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET unknown_micro = 0 WHERE scope = 'total' AND month = '2026-11'")
    clock = FakeClock(wall=NOW)
    g, provider = damaged_gateway(path, CAPS, clock)
    try:
        env = await g.route(Request("quick", "hi"))
        assert env.status == "error" and env.error_class == "budget_exceeded"
        assert env.error is not None
        assert "totals do not match its entries (2026-11 total: totals unknown" in env.error
        assert "total monthly cap ($2.0000" in env.error
        assert "llmgw spend --repair" in env.error
        assert provider.received == []  # nothing sent
        info = g.hooks.report_info()["ledger"]
        assert info["totals_damage"] == [
            "2026-11 total: totals unknown $0.000000, its entries add up to $0.000290"
        ]
        st = LedgerStore(path)
        st.open()
        try:
            assert [c.scope for c in st.rebuild_totals(["2026-11"])] == ["total"]
        finally:
            st.close()
        # Re-read at most every DAMAGE_RECHECK_S: still refused until then.
        assert (await g.route(Request("quick", "hi"))).status == "error"
        clock.advance(DAMAGE_RECHECK_S)
        assert (await g.route(Request("quick", "hi"))).ok
        assert g.hooks.report_info()["ledger"]["totals_damage"] == []
    finally:
        await g.aclose()
    assert audit(path, NOW).ok


@pytest.mark.anyio
async def test_damaged_totals_without_a_cap_are_reported_not_refused(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET settled_micro = 1 WHERE scope = 'provider:a'")
    g, provider = damaged_gateway(path, "", FakeClock(wall=NOW))
    try:
        assert (await g.route(Request("quick", "hi"))).ok
        assert len(provider.received) == 1
        (problem,) = g.hooks.report_info()["ledger"]["totals_damage"]
        assert problem.startswith("2026-11 provider:a: totals settled $0.000001")
    finally:
        await g.aclose()


@pytest.mark.anyio
async def test_damage_in_another_month_does_not_stop_this_one(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET reserved_micro = 1 WHERE month = '2026-12'")
    g, _ = damaged_gateway(path, CAPS, FakeClock(wall=NOW))
    try:
        assert (await g.route(Request("quick", "hi"))).ok
        assert g.hooks.report_info()["ledger"]["totals_damage"] == []
    finally:
        await g.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("caps", [CAPS, ""])
async def test_a_stale_lease_in_a_damaged_old_month_does_not_close_the_ledger(
    tmp_path: Path, caps: str
) -> None:
    """Expiring the leases at start was one write: a stale reservation in a month whose
    totals were damaged broke a CHECK, the write was rolled back and the ledger counted
    as unopenable, so every call of every month was refused, caps or none."""
    path = tmp_path / "l.db"
    busy_ledger(path)  # December holds a reservation with a 600 s lease
    tamper(path, "UPDATE totals SET reserved_micro = 1 WHERE month = '2026-12'")
    january = FakeClock(wall=NEXT_MONTH + timedelta(days=40))
    g, _ = damaged_gateway(path, caps, january)
    try:
        assert (await g.route(Request("quick", "hi"))).ok
        ledger = g.pm.get_plugin("ledger")
        assert ledger.open_error is None
        assert len(ledger.store.unexpired) == 1  # stays reserved, charged in full
    finally:
        await g.aclose()


def test_the_spend_report_warns_of_this_months_damaged_totals(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET reserved_micro = 1 WHERE scope = 'total' AND month = '2026-12'")
    settings = settings_for(tmp_path, path)
    report = spend_report(settings, now=NEXT_MONTH)
    assert report["totals_damage"] == [
        "2026-12 total: totals reserved $0.000001, its entries add up to $0.000300"
    ]
    text = format_spend(report)
    assert "WARNING: this month's totals do not match its entries (1):" in text
    assert "llmgw spend --repair" in text
    clean = spend_report(settings, now=NOW)  # November: not damaged
    assert clean["totals_damage"] == []
    assert "WARNING" not in format_spend(clean)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("caps", "damage"),
    [
        # A total cap only: a provider's row is not what any cap is checked against.
        (CAPS, "UPDATE totals SET settled_micro = 1 WHERE scope = 'provider:a'"),
        # A cap on provider fake only: the damage is in another provider's row.
        (
            "ledger:\n  caps: {providers: {fake: 2}}\n",
            "UPDATE totals SET settled_micro = 1 WHERE scope = 'provider:b' AND month = '2026-11'",
        ),
    ],
    ids=["total-cap", "provider-cap"],
)
async def test_damage_where_no_cap_is_checked_is_reported_not_refused(
    tmp_path: Path, caps: str, damage: str
) -> None:
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, damage)
    g, provider = damaged_gateway(path, caps, FakeClock(wall=NOW))
    try:
        assert (await g.route(Request("quick", "hi"))).ok
        assert len(provider.received) == 1
        assert len(g.hooks.report_info()["ledger"]["totals_damage"]) == 1
    finally:
        await g.aclose()


@pytest.mark.anyio
async def test_reported_damage_is_read_again_after_a_repair(tmp_path: Path) -> None:
    """No cap: nothing is refused, and llm_routing_info re-reads the totals (at most
    every DAMAGE_RECHECK_S) rather than show damage a repair has mended."""
    path = tmp_path / "l.db"
    busy_ledger(path)
    tamper(path, "UPDATE totals SET settled_micro = 1 WHERE scope = 'provider:a'")
    clock = FakeClock(wall=NOW)
    g, _ = damaged_gateway(path, "", clock)
    try:
        assert g.hooks.report_info()["ledger"]["totals_damage"]
        assert repair(tmp_path, path, NOW)["state"] == "repaired"
        assert g.hooks.report_info()["ledger"]["totals_damage"]  # not re-read yet
        clock.advance(DAMAGE_RECHECK_S)
        assert g.hooks.report_info()["ledger"]["totals_damage"] == []
    finally:
        await g.aclose()


@pytest.mark.anyio
async def test_a_failed_check_at_open_neither_refuses_nor_loses_the_expired_leases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "l.db"
    st = LedgerStore(path)
    st.open()
    st.reserve([item("crashed", 500, "fake")], Caps(), now=NOW, lease_s=60)
    st.close()

    def unreadable(self: LedgerStore, month: str) -> None:
        raise LedgerError(f"cannot read {self.path}: disk I/O error")

    monkeypatch.setattr(LedgerStore, "month_audit", unreadable)
    clock = FakeClock(wall=NOW)
    clock.advance(61)
    g, _ = damaged_gateway(path, CAPS, clock)
    try:
        info = g.hooks.report_info()["ledger"]
        assert info["expired_at_start"] == 1 and info["totals_damage"] == []
        assert (await g.route(Request("quick", "hi"))).ok
    finally:
        await g.aclose()
