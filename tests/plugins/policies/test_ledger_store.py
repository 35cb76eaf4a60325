"""The SQLite store on its own: all-or-nothing reservations, idempotent settles, leases,
UTC months, and the CHECK constraint behind the application's cap check."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from llmgw.plugins.policies import ledger_ops as sql_ops
from llmgw.plugins.policies import ledger_sql as sql
from llmgw.plugins.policies.ledger_store import (
    CapExceeded,
    Caps,
    Item,
    LedgerError,
    LedgerStore,
    month_of,
)

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)


def item(i: str, amount: int, provider: str = "a") -> Item:
    return Item(i, provider, "m", "cls", f"req-{i}", amount)


def test_opens_in_wal_with_synchronous_full(st: LedgerStore) -> None:
    db = sqlite3.connect(st.path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._db is not None
    assert st._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert st.integrity_check() == "ok"


def test_reserve_all_or_nothing_across_scopes(st: LedgerStore) -> None:
    caps = Caps(total=100, providers={"b": 30})
    st.reserve([item("1", 50, "a")], caps, now=NOW, lease_s=60)
    with pytest.raises(CapExceeded) as info:
        st.reserve([item("2", 10, "a"), item("3", 40, "b")], caps, now=NOW, lease_s=60)
    (breach,) = info.value.breaches
    assert breach.use.scope == "provider:b"
    assert (breach.cap_micro, breach.headroom_micro, breach.needed_micro) == (30, 30, 40)
    assert info.value.provider_only
    assert st.entry("2") is None and st.entry("3") is None  # nothing of the batch was kept
    with pytest.raises(CapExceeded) as info:
        st.reserve([item("4", 51, "a")], caps, now=NOW, lease_s=60)
    assert not info.value.provider_only
    assert info.value.breaches[0].headroom_micro == 50
    st.reserve([item("5", 50, "a")], caps, now=NOW, lease_s=60)  # exactly to the cap
    assert st.scopes("2026-11")["total"].used_micro == 100


def test_settle_is_idempotent_and_counts_overage(st: LedgerStore) -> None:
    caps = Caps(total=1000)
    st.reserve([item("1", 100), item("2", 100)], caps, now=NOW, lease_s=60)
    assert st.settle("1", cost_micro=40, now=NOW, input_tokens=3, output_tokens=4)
    assert not st.settle("1", cost_micro=40, now=NOW)
    assert not st.release("1", now=NOW)
    assert not st.mark_unknown("1", now=NOW)
    assert st.settle("2", cost_micro=130, now=NOW)  # the bound was wrong: recorded anyway
    total = st.scopes("2026-11")["total"]
    assert (total.settled_micro, total.reserved_micro, total.overage_micro) == (170, 0, 30)
    assert total.used_micro == 170
    e = st.entry("1")
    assert e is not None and (e["state"], e["cost_micro"], e["input_tokens"]) == ("settled", 40, 3)


def test_unknown_stays_charged_and_may_still_be_settled(st: LedgerStore) -> None:
    st.reserve([item("1", 100), item("2", 100)], Caps(), now=NOW, lease_s=60)
    assert st.mark_unknown("1", now=NOW, error_class="timeout")
    assert not st.release("1", now=NOW)  # an unknown is never released
    assert st.release("2", now=NOW)
    total = st.scopes("2026-11")["total"]
    assert (total.unknown_micro, total.reserved_micro, total.used_micro) == (100, 0, 100)
    assert st.settle("1", cost_micro=60, now=NOW)  # late usage
    total = st.scopes("2026-11")["total"]
    assert (total.unknown_micro, total.settled_micro) == (0, 60)


def test_expired_leases_become_unknown_never_released(st: LedgerStore) -> None:
    st.reserve([item("old", 70)], Caps(), now=NOW, lease_s=600)
    st.reserve([item("new", 30)], Caps(), now=NOW + timedelta(seconds=300), lease_s=600)
    assert st.expire_leases(NOW + timedelta(seconds=601)) == 1
    old, new = st.entry("old"), st.entry("new")
    assert old is not None and new is not None
    assert (old["state"], old["error_class"]) == ("unknown", "lease_expired")
    assert new["state"] == "reserved"
    total = st.scopes("2026-11")["total"]
    assert (total.unknown_micro, total.reserved_micro) == (70, 30)


def test_months_are_utc() -> None:
    est = timezone(timedelta(hours=-5))
    assert month_of(datetime(2026, 11, 30, 23, 30, tzinfo=est)) == "2026-12"
    assert month_of(datetime(2026, 12, 1, 0, 30, tzinfo=timezone(timedelta(hours=2)))) == "2026-11"
    assert month_of(datetime(2026, 11, 30, 23, 30)) == "2026-11"  # naive: taken as UTC


def test_a_new_month_starts_from_zero_and_settles_to_the_reserving_month(
    st: LedgerStore,
) -> None:
    caps = Caps(total=100)
    late = datetime(2026, 11, 30, 23, 59, tzinfo=UTC)
    st.reserve([item("1", 100)], caps, now=late, lease_s=600)
    st.reserve([item("2", 100)], caps, now=late + timedelta(minutes=2), lease_s=600)
    st.settle("1", cost_micro=10, now=late + timedelta(minutes=3))
    assert st.scopes("2026-11")["total"].settled_micro == 10
    assert st.scopes("2026-12")["total"].reserved_micro == 100


def test_check_constraint_is_a_second_line_of_defence(st: LedgerStore) -> None:
    st.reserve([item("1", 80)], Caps(total=100), now=NOW, lease_s=60)
    raw = sqlite3.connect(st.path)
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("UPDATE totals SET reserved_micro = reserved_micro + 50 WHERE scope='total'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("UPDATE entries SET state = 'bogus'")
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
        raw.execute("UPDATE entries SET reserved_micro = -1")
    raw.close()


def test_locked_past_the_busy_timeout_is_a_ledger_error(tmp_path: Path) -> None:
    s = LedgerStore(tmp_path / "l.db", busy_timeout_s=0.05)
    s.open()
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(LedgerError, match="locked"):
            s.reserve([item("1", 1)], Caps(), now=NOW, lease_s=60)
    finally:
        other.execute("ROLLBACK")
        other.close()
    s.reserve([item("1", 1)], Caps(), now=NOW, lease_s=60)
    s.close()


WRITER = """
import sys, time, uuid
from datetime import UTC, datetime
from llmgw.plugins.policies.ledger_store import Caps, Item, LedgerStore
st = LedgerStore(sys.argv[1])
st.open()
print("writing", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # one write transaction after another, no pause
    i = uuid.uuid4().hex
    st.reserve([Item(i, "a", "m", "c", "r", 1)], Caps(), now=datetime.now(UTC), lease_s=60)
    st.settle(i, cost_micro=1, now=datetime.now(UTC))
st.close()
"""


def test_opening_beside_a_process_that_writes_without_pause(tmp_path: Path) -> None:
    """The schema transaction at open waits for the write lock with the store's short
    jittered retries: SQLite's own handler sleeps in growing steps and, beside a writer
    that frees the lock only for moments, could miss every one until the timeout."""
    path = tmp_path / "l.db"
    LedgerStore(path).open()
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "20"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "writing\n"
        for _ in range(10):
            s = LedgerStore(path, busy_timeout_s=1.0)
            s.open()  # raised "database is locked" now and then before
            s.close()
    finally:
        writer.kill()
        writer.wait()


def test_cannot_open_is_a_ledger_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(LedgerError, match="cannot open"):
        LedgerStore(tmp_path / "file" / "l.db").open()
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(LedgerError, match="cannot open"):
        LedgerStore(tmp_path / "junk.db").open()


# --- the open-reservations index ----------------------------------------------------------

#: How ``entries_open`` was defined before it held only open reservations.
OLD_OPEN_INDEX = "CREATE INDEX entries_open ON entries (state, lease_until)"


def _index_sql(path: Path, name: str = "entries_open") -> str | None:
    db = sqlite3.connect(path)
    try:
        row = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
        ).fetchone()
        return None if row is None else str(row[0])
    finally:
        db.close()


def _plan(st: LedgerStore, query: str, *params: object) -> str:
    assert st._db is not None
    return " ".join(str(r[3]) for r in st._db.execute(f"EXPLAIN QUERY PLAN {query}", params))


def test_the_open_index_holds_only_open_reservations(st: LedgerStore) -> None:
    assert _index_sql(st.path) == sql.INDEXES["entries_open"]
    st.reserve([item("1", 10), item("2", 10), item("3", 10)], Caps(), now=NOW, lease_s=60)
    st.settle("1", cost_micro=5, now=NOW)
    st.release("2", now=NOW)
    assert st._db is not None
    indexed = st._db.execute(
        "SELECT id FROM entries INDEXED BY entries_open WHERE state = 'reserved'"
    )
    assert [r[0] for r in indexed] == ["3"]
    # What expiring leases and counting open reservations ask for is found through it.
    assert "USING INDEX entries_open" in _plan(st, sql_ops.EXPIRED_SQL, 0.0)
    assert "entries_open" in _plan(st, "SELECT COUNT(*) FROM entries WHERE state = 'reserved'")
    assert st.count("reserved") == 1


def test_the_schema_creates_every_index_as_defined() -> None:
    """The definitions :func:`migrate_indexes` compares against are the schema's own."""
    statements = {" ".join(s.split()) for s in sql.SCHEMA.split(";")}
    for definition in sql.INDEXES.values():
        assert definition.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS") in statements


def _old_ledger(path: Path) -> None:
    """A ledger as the previous schema left it: reserved, settled and unknown entries,
    indexed by state."""
    st = LedgerStore(path)
    st.open()
    st.reserve([item("r", 10), item("s", 20), item("u", 30)], Caps(total=1000), now=NOW, lease_s=60)
    st.settle("s", cost_micro=15, now=NOW)
    st.mark_unknown("u", now=NOW)
    st.close()
    db = sqlite3.connect(path)
    db.execute("DROP INDEX entries_open")
    db.execute(OLD_OPEN_INDEX)
    db.commit()
    db.close()
    assert _index_sql(path) == OLD_OPEN_INDEX


def test_opening_a_ledger_with_the_old_index_rebuilds_it_and_keeps_every_entry(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    _old_ledger(path)
    st = LedgerStore(path)
    st.open()
    try:
        assert _index_sql(path) == sql.INDEXES["entries_open"]
        assert st.integrity_check() == "ok"
        states = {e: (st.entry(e) or {}).get("state") for e in ("r", "s", "u")}
        assert states == {"r": "reserved", "s": "settled", "u": "unknown"}
        total = st.scopes("2026-11")["total"]
        assert (total.reserved_micro, total.settled_micro, total.unknown_micro) == (10, 15, 30)
        # The rebuilt index serves the lease expiry: the open reservation turns unknown.
        assert st.expire_leases(NOW + timedelta(seconds=61)) == 1
        assert st.count("reserved") == 0 and st.count("unknown") == 2
    finally:
        st.close()
    # Opening again finds the index as defined: nothing more to rebuild.
    db = sqlite3.connect(path)
    db.execute("BEGIN IMMEDIATE")
    assert sql.migrate_indexes(db) == []
    db.execute("ROLLBACK")
    db.close()


def test_a_rebuilt_ledger_still_opens_with_the_previous_schema(tmp_path: Path) -> None:
    """The previous version creates its indexes only when missing (by name): it keeps the
    rebuilt index, and its lease query still finds the open reservations through it."""
    path = tmp_path / "l.db"
    st = LedgerStore(path)
    st.open()
    st.reserve([item("r", 10)], Caps(), now=NOW, lease_s=60)
    st.close()
    db = sqlite3.connect(path)
    db.execute(OLD_OPEN_INDEX.replace("CREATE INDEX", "CREATE INDEX IF NOT EXISTS"))
    assert _index_sql(path) == sql.INDEXES["entries_open"]
    expired = "SELECT id FROM entries WHERE state = 'reserved' AND lease_until < ?"
    plan = " ".join(str(r[3]) for r in db.execute(f"EXPLAIN QUERY PLAN {expired}", (0.0,)))
    assert "USING INDEX entries_open" in plan
    assert [r[0] for r in db.execute(expired, (NOW.timestamp() + 61,))] == ["r"]
    db.close()


def test_an_index_of_a_newer_version_is_left_alone(tmp_path: Path) -> None:
    """Neither current nor earlier: a newer version wrote it. Rebuilding it would make two
    versions sharing one file rebuild the index at every start."""
    path = tmp_path / "l.db"
    LedgerStore(path).open()
    newer = "CREATE INDEX entries_open ON entries (lease_until, month) WHERE state = 'reserved'"
    db = sqlite3.connect(path)
    db.execute("DROP INDEX entries_open")
    db.execute(newer)
    db.commit()
    db.close()
    st = LedgerStore(path)
    st.open()
    st.close()
    assert _index_sql(path) == newer


def test_a_rebuild_that_fails_reports_why_and_keeps_the_old_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite rolls the whole transaction back when the index build is interrupted; the
    error says so (not "cannot rollback"), the file keeps its old index, and the next
    open rebuilds it."""
    path = tmp_path / "old.db"
    _old_ledger(path)
    db = sqlite3.connect(path)
    with db:
        db.executemany(
            "INSERT INTO entries SELECT ? || id, month, provider, model, task_class, request_id,"
            " attempt, state, reserved_micro, cost_micro, priced, error_class, input_tokens,"
            " output_tokens, created_at, updated_at, lease_until FROM entries WHERE id = 's'",
            [(f"x{i}",) for i in range(3000)],
        )
    db.close()
    real = sql.migrate_indexes

    def interrupted(conn: sqlite3.Connection) -> list[str]:
        dropped = real(conn)
        conn.set_progress_handler(lambda: 1, 2_000)  # stops the long CREATE INDEX only
        return dropped

    monkeypatch.setattr(sql, "migrate_indexes", interrupted)
    with pytest.raises(LedgerError, match="interrupted"):
        LedgerStore(path).open()
    assert _index_sql(path) == OLD_OPEN_INDEX
    monkeypatch.setattr(sql, "migrate_indexes", real)
    st = LedgerStore(path)
    st.open()
    try:
        assert _index_sql(path) == sql.INDEXES["entries_open"]
        assert st.integrity_check() == "ok" and st.count("settled") == 3001
    finally:
        st.close()
