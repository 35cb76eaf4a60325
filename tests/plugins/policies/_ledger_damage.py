"""A ledger with every kind of write in it, and ways to damage it (check and repair tests)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

from llmgw.plugins.policies.ledger_sql import Audit
from llmgw.plugins.policies.ledger_store import Caps, Item, LedgerReader, LedgerStore

NOW = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
NEXT_MONTH = datetime(2026, 12, 2, 9, 0, tzinfo=UTC)


def item(i: str, amount: int, provider: str = "a") -> Item:
    return Item(i, provider, "m", "cls", f"req-{i}", amount)


def busy_ledger(path: Path) -> None:
    """Every kind of write, two providers, two months, a settle in the month after."""
    st = LedgerStore(path)
    st.open()
    caps = Caps(total=10_000, providers={"a": 6_000})
    st.reserve([item("s", 100), item("o", 100, "b")], caps, now=NOW, lease_s=60)
    st.settle("s", cost_micro=40, now=NOW, input_tokens=3, output_tokens=4)
    st.settle("o", cost_micro=130, now=NOW)  # above its reservation: overage 30
    st.reserve([item("u", 200), item("r", 50, "b")], caps, now=NOW, lease_s=60)
    st.mark_unknown("u", now=NOW, error_class="timeout")
    st.release("r", now=NOW)
    st.reserve([item("late", 70)], caps, now=NOW, lease_s=60)
    st.mark_unknown("late", now=NOW)
    st.settle("late", cost_micro=20, now=NOW)  # usage came back after all
    st.reserve([item("old", 90)], caps, now=NOW, lease_s=60)
    assert st.expire_leases(NOW + timedelta(seconds=61)) == 1
    st.reserve([item("nov", 25)], caps, now=NOW, lease_s=60)
    st.settle("nov", cost_micro=None, now=NEXT_MONTH)  # unpriced, settled in December
    st.reserve([item("dec", 300, "b")], caps, now=NEXT_MONTH, lease_s=600)
    st.close()


def audit(path: Path, at: datetime = NEXT_MONTH) -> Audit:
    reader = LedgerReader(path)
    try:
        return reader.audit(at)
    finally:
        reader.close()


def tamper(path: Path, statement: str) -> None:
    """Change the file behind the ledger's back, CHECKs off (as a hand edit could)."""
    db = sqlite3.connect(path, timeout=60)  # beside a busy writer in some tests
    db.execute("PRAGMA ignore_check_constraints = ON")  # damage the CHECKs would refuse
    db.execute(statement)
    db.commit()
    db.close()


#: Damage to the totals (what ``spend --repair`` mends) and what the check says of it.
TOTALS_DAMAGE = [
    (
        "UPDATE totals SET settled_micro = settled_micro + 7 WHERE scope = 'provider:a' "
        "AND month = '2026-11'",
        "2026-11 provider:a: totals settled $0.000067, its entries add up to $0.000060",
    ),
    (
        "UPDATE totals SET unknown_micro = 0 WHERE scope = 'total' AND month = '2026-11'",
        "2026-11 total: totals unknown $0.000000, its entries add up to $0.000290",
    ),
    (
        "DELETE FROM totals WHERE scope = 'provider:b' AND month = '2026-12'",
        "2026-12 provider:b: no totals row, but its entries add up to reserved $0.000300",
    ),
    (
        "UPDATE totals SET cap_micro = 100 WHERE scope = 'total' AND month = '2026-11'",
        "2026-11 total: $0.000450 counted against a cap of $0.000100",
    ),
    (
        "UPDATE entries SET cost_micro = 41 WHERE id = 's'",
        "2026-11 total: totals settled $0.000190, its entries add up to $0.000191",
    ),
    (
        "UPDATE totals SET reserved_micro = 'x' WHERE scope = 'total' AND month = '2026-12'",
        "2026-12 total: a money column of its totals row holds a value that is not an integer",
    ),
]
#: Damage below the totals: the check names it, the repair refuses it.
ENTRY_DAMAGE = (
    "UPDATE entries SET cost_micro = 40.5 WHERE id = 's'",
    "entries: 1 hold a cost or a reservation that is not an integer",
)
#: Entries that break their table's CHECKs (which a read-only integrity_check does not
#: test): summed, each would undercount spend.
ENTRY_RULE_DAMAGE = [
    ENTRY_DAMAGE,
    (
        "UPDATE entries SET state = 'bogus' WHERE id = 'dec'",
        "entries: 1 have a state other than reserved, settled, unknown or released",
    ),
    (
        "UPDATE entries SET cost_micro = NULL WHERE id = 'o'",
        "entries: 1 are settled without a cost",
    ),
    (
        "UPDATE entries SET cost_micro = -10 WHERE id = 's'",
        "entries: 1 hold a negative cost or reservation",
    ),
]
