"""The ledger's data and SQL: the schema, the value types, the reads and the lease expiry.

No connection handling here: :mod:`.ledger_store` opens the file, runs the writes (these
and the set-wise ones of :mod:`.ledger_ops`) inside ``BEGIN IMMEDIATE`` and turns SQLite
errors into :class:`LedgerError`.

Two tables. ``entries`` holds one row per attempt (a reservation and what became of
it). ``totals`` holds, per UTC month and scope (``total``, ``provider:<name>``), the
sums the caps are checked against; it is updated in the same transaction as the entry,
and a ``CHECK`` constraint on it refuses any write that would put a scope over the cap
recorded with it: a second line of defence behind the check in
:meth:`.ledger_ops.Reserve.apply`.

Money is integer micro-dollars. Entry states: ``reserved`` (worst case held),
``settled`` (usage known, its cost counted), ``unknown`` (possibly billed, no usage:
the reservation stays charged), ``released`` (never sent, nothing charged). A hold (model
:data:`HOLD_MODEL`, attempt 0) is a reservation for a provider's next attempts: each one
made is moved out of it into an entry of its own, and what is left is released when
unused, or turned ``unknown`` as any reservation when its lease runs out.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
TOTAL = "total"
#: A hold's entry (money reserved ahead for a provider's next attempts, drawn from as they
#: are made: see :mod:`.ledger`) carries this model and task class, and attempt 0.
HOLD_MODEL = "(held ahead)"

#: The current definition of each index that has had another one, and the earlier
#: definitions a ledger file may still carry: :func:`migrate_indexes` rebuilds an index
#: found in an earlier form. An index is derived data, so rebuilding it loses nothing, and
#: a file rebuilt this way still opens in an older version (it creates its indexes only
#: if missing, by name), so the schema version does not change. A definition that is
#: neither current nor earlier (written by a newer version) is left alone: two versions
#: sharing one file must not rebuild it at every start.
#:
#: ``entries_open`` holds only the reservations still open (what expiring leases looks
#: for). It used to hold every entry by state: a settle then moved its entry within the
#: index (a leaf page of the reserved part and one of the settled part), one WAL frame
#: more per commit than taking it out, and the index grew with every settled entry.
INDEXES = {
    "entries_open": "CREATE INDEX entries_open ON entries (lease_until) WHERE state = 'reserved'",
}
SUPERSEDED = {
    "entries_open": ("CREATE INDEX entries_open ON entries (state, lease_until)",),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id TEXT PRIMARY KEY,
    month TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    task_class TEXT NOT NULL,
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 1,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'settled', 'unknown', 'released')),
    reserved_micro INTEGER NOT NULL CHECK (reserved_micro >= 0),
    cost_micro INTEGER CHECK (cost_micro IS NULL OR cost_micro >= 0),
    priced INTEGER NOT NULL DEFAULT 1 CHECK (priced IN (0, 1)),
    error_class TEXT,
    input_tokens INTEGER,
    output_tokens INTEGER,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    lease_until REAL NOT NULL,
    CHECK (state <> 'settled' OR cost_micro IS NOT NULL)
);
CREATE INDEX IF NOT EXISTS entries_open ON entries (lease_until) WHERE state = 'reserved';
CREATE INDEX IF NOT EXISTS entries_month ON entries (month);
CREATE TABLE IF NOT EXISTS totals (
    month TEXT NOT NULL,
    scope TEXT NOT NULL,
    cap_micro INTEGER CHECK (cap_micro IS NULL OR cap_micro >= 0),
    settled_micro INTEGER NOT NULL DEFAULT 0 CHECK (settled_micro >= 0),
    overage_micro INTEGER NOT NULL DEFAULT 0 CHECK (overage_micro >= 0),
    reserved_micro INTEGER NOT NULL DEFAULT 0 CHECK (reserved_micro >= 0),
    unknown_micro INTEGER NOT NULL DEFAULT 0 CHECK (unknown_micro >= 0),
    PRIMARY KEY (month, scope),
    -- overage (usage above its own reservation) is real spend the bound did not foresee:
    -- reserve() counts it, but it cannot make a settle fail.
    CHECK (cap_micro IS NULL OR
           settled_micro - overage_micro + reserved_micro + unknown_micro <= cap_micro)
);
"""


def _normal(sql_text: str) -> str:
    """SQL text with its whitespace collapsed (SQLite stores a statement as written)."""
    return " ".join(sql_text.replace("IF NOT EXISTS ", "").split())


def migrate_indexes(db: sqlite3.Connection) -> list[str]:
    """Drop each index stored in one of its :data:`SUPERSEDED` forms (the schema then
    creates it as :data:`INDEXES` defines it); the names of those dropped. Runs in the
    caller's transaction, with the schema: a failure leaves the old index in place."""
    dropped = []
    for name, earlier in SUPERSEDED.items():
        row = db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'index' AND name = ?", (name,)
        ).fetchone()
        if row is not None and _normal(str(row[0])) in {_normal(e) for e in earlier}:
            db.execute(f'DROP INDEX "{name}"')
            dropped.append(name)
    return dropped


class LedgerError(Exception):
    """The ledger could not be read or written (cannot open, locked, disk error)."""


@dataclass(frozen=True)
class Item:
    """One reservation to make: an attempt's worst case and what it is for."""

    id: str
    provider: str
    model: str
    task_class: str
    request_id: str
    amount_micro: int
    priced: bool = True
    attempt: int = 1


@dataclass(frozen=True)
class ScopeUse:
    """What one scope holds in a month."""

    scope: str
    settled_micro: int = 0
    overage_micro: int = 0
    reserved_micro: int = 0
    unknown_micro: int = 0
    cap_micro: int | None = None

    @property
    def used_micro(self) -> int:
        """What counts against a cap: settled (with overage), reserved and unknown."""
        return self.settled_micro + self.reserved_micro + self.unknown_micro


@dataclass(frozen=True)
class Breach:
    """One scope a reservation would push over its cap."""

    use: ScopeUse
    cap_micro: int
    needed_micro: int

    @property
    def headroom_micro(self) -> int:
        return max(0, self.cap_micro - self.use.used_micro)


class CapExceeded(Exception):
    """A reservation was refused: it would put one or more scopes over their cap."""

    def __init__(self, breaches: Sequence[Breach]) -> None:
        self.breaches = list(breaches)
        super().__init__(", ".join(b.use.scope for b in breaches))

    @property
    def provider_only(self) -> bool:
        """True when only provider caps are hit (another provider may have headroom)."""
        return all(b.use.scope != TOTAL for b in self.breaches)


@dataclass(frozen=True)
class Caps:
    """Monthly caps in micro-dollars: ``total`` and per provider name (None: no cap)."""

    total: int | None = None
    providers: Mapping[str, int] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return self.total is not None or bool(self.providers)

    def for_scope(self, scope: str) -> int | None:
        if scope == TOTAL:
            return self.total
        return self.providers.get(scope.removeprefix("provider:"))


def month_of(now: datetime) -> str:
    """The UTC month key, ``YYYY-MM`` (a naive time is taken as UTC)."""
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return now.astimezone(UTC).strftime("%Y-%m")


def provider_scope(provider: str) -> str:
    return f"provider:{provider}"


# --- writes: in :mod:`.ledger_ops` (reserve, settle, mark unknown, release, expire leases,
# applied set-wise inside a transaction the caller holds).


# --- reads ---------------------------------------------------------------------------

_SCOPE_COLUMNS = "scope, settled_micro, overage_micro, reserved_micro, unknown_micro, cap_micro"


def scopes(db: sqlite3.Connection, month: str) -> dict[str, ScopeUse]:
    """Every scope with activity in ``month``."""
    rows = db.execute(
        f"SELECT {_SCOPE_COLUMNS} FROM totals WHERE month = ?",  # noqa: S608 (a constant)
        (month,),
    ).fetchall()
    return {r[0]: ScopeUse(*r) for r in rows}


#: The error class of a hold given back with something left in it: an attempt drawn from
#: it whose own entry could not be written (it was sent, so that amount stays charged).
HOLD_STRANDED = "draw_not_written"


def breakdown(db: sqlite3.Connection, month: str) -> list[dict[str, Any]]:
    """Sums per (provider, model, task class, state) for ``month``; ``stranded``: the rows
    of holds given back with something left (:data:`HOLD_STRANDED`), apart."""
    rows = db.execute(
        "SELECT provider, model, task_class, state, COUNT(*), "
        "SUM(CASE state WHEN 'settled' THEN cost_micro WHEN 'released' THEN 0 "
        "ELSE reserved_micro END), SUM(1 - priced), "
        "COALESCE(error_class = ?2 AND attempt = 0, 0) AS stranded "
        "FROM entries WHERE month = ?1 GROUP BY provider, model, task_class, state, stranded",
        (month, HOLD_STRANDED),
    ).fetchall()
    keys = ("provider", "model", "task_class", "state", "count", "micro", "unpriced", "stranded")
    return [dict(zip(keys, r, strict=True)) for r in rows]


#: What each scope's totals must be, recomputed from the entries (see :func:`audit`);
#: ``{where}``: nothing, or a filter on the month.
_FROM_ENTRIES_OF = """
SELECT month, provider,
       SUM(CASE state WHEN 'settled' THEN cost_micro ELSE 0 END),
       SUM(CASE state WHEN 'settled' THEN MAX(0, cost_micro - reserved_micro) ELSE 0 END),
       SUM(CASE state WHEN 'reserved' THEN reserved_micro ELSE 0 END),
       SUM(CASE state WHEN 'unknown' THEN reserved_micro ELSE 0 END),
       COUNT(*)
FROM entries {where}
GROUP BY month, provider
"""

#: The four sums of a totals row, in column order.
TOTALS_FIELDS = ("settled", "overage", "reserved", "unknown")


def counted(values: Sequence[int]) -> int:
    """What a totals row counts against its cap: ``settled - overage + reserved +
    unknown`` (overage is spend above a reservation, which a settle may not refuse)."""
    settled, overage, reserved, unknown = values
    return settled - overage + reserved + unknown


@dataclass
class Audit:
    """What :func:`audit` found: ``problems`` (the ledger is damaged) and ``notes``."""

    entries: int = 0
    months: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: The totals rows that do not match their entries, as (month, scope), each with its
    #: problems.
    damaged: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add_damage(self, month: str, scope: str, problem: str) -> None:
        self.problems.append(problem)
        self.damaged.setdefault((month, scope), []).append(problem)

    @property
    def damaged_months(self) -> set[str]:
        """The months with a damaged totals row (what a repair rebuilds)."""
        return {month for month, _ in self.damaged}

    @property
    def ok(self) -> bool:
        return not self.problems


def audit(db: sqlite3.Connection, now: float) -> Audit:
    """Check the ledger against itself, reading only.

    - SQLite's ``integrity_check``;
    - the entries keep the rules of their table (:data:`ENTRY_RULES`: integer, non-negative
      amounts, a known state, a cost once settled), and the totals hold integers;
    - every scope's totals equal what its entries add up to: settled (their cost),
      overage (cost above their reservation), reserved and unknown (their reservation);
    - no scope over the cap recorded with it (``settled - overage + reserved + unknown``);
    - a note for reservations past their lease (a gateway that stopped without settling
      them: the next start of a gateway turns them ``unknown``, still charged).

    Totals are what caps are checked against, and they are kept by increments: a totals
    row changed or deleted by hand stays wrong until it is repaired, and the ledger keeps
    enforcing caps against it. This finds such damage.

    Every read is in one read transaction: the entries and the totals come from the same
    snapshot while gateways go on writing (WAL readers do not block writers).
    """
    db.execute("BEGIN")
    try:
        return _audit(db, now)
    finally:
        if db.in_transaction:  # SQLite may have ended it already (an I/O error)
            db.execute("ROLLBACK")


def _audit(db: sqlite3.Connection, now: float) -> Audit:
    result = Audit()
    integrity = [str(r[0]) for r in db.execute("PRAGMA integrity_check").fetchall()]
    if integrity != ["ok"]:
        result.problems += [f"integrity_check: {line}" for line in integrity]
    for month, scope, problem in db.execute(_TOTALS_NOT_INTEGERS):
        result.add_damage(str(month), str(scope), str(problem))
    result.problems += entry_problems(db)
    expected, result.entries = _expected(db)
    stored = _stored(db)
    result.months = sorted({month for month, _ in expected} | {month for month, _ in stored})
    _compare(expected, stored, result)
    stale = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(reserved_micro), 0) FROM entries "
        "WHERE state = 'reserved' AND lease_until < ?",
        (now,),
    ).fetchone()
    if stale[0]:
        result.notes.append(
            f"{stale[0]} reservation(s) ({usd_text(stale[1])}) are past their lease: a "
            "gateway stopped before settling them. The next gateway start turns them "
            "unknown (still charged)"
        )
    return result


def month_audit(db: sqlite3.Connection, month: str) -> Audit:
    """One month's totals against its entries, inside the caller's transaction: what a
    gateway checks as it opens the ledger (the sums of that month only, through its
    index)."""
    result = Audit()
    expected, result.entries = _expected(db, [month])
    result.months = [month]
    _compare(expected, _stored(db, [month]), result)
    return result


Sums = dict[tuple[str, str], tuple[Any, ...]]
Stored = dict[tuple[str, str], tuple[tuple[Any, ...], Any]]


def _month_filter(months: Sequence[str] | None) -> tuple[str, tuple[str, ...]]:
    if months is None:
        return "", ()
    return f"WHERE month IN ({', '.join('?' * len(months))})", tuple(months)


def _expected(db: sqlite3.Connection, months: Sequence[str] | None = None) -> tuple[Sums, int]:
    """What each (month, scope) row of totals must hold, from the entries; and how many
    entries there are (in ``months``, every month: None)."""
    where, params = _month_filter(months)
    sums: Sums = {}
    count = 0
    # One pass over the entries by (month, provider); each month's total is the sum of its
    # providers' (every entry is in one provider scope and in its month's total once).
    for month, provider, *values, n in db.execute(_FROM_ENTRIES_OF.format(where=where), params):
        mine = tuple(v or 0 for v in values)
        sums[month, provider_scope(provider)] = mine
        total = sums.get((month, TOTAL), (0, 0, 0, 0))
        sums[month, TOTAL] = tuple(a + b for a, b in zip(total, mine, strict=True))
        count += n
    return sums, count


def _stored(db: sqlite3.Connection, months: Sequence[str] | None = None) -> Stored:
    """Each totals row (in ``months``): its four sums and its cap."""
    where, params = _month_filter(months)
    return {
        (r[0], r[1]): (tuple(r[2:6]), r[6])
        for r in db.execute(
            "SELECT month, scope, settled_micro, overage_micro, reserved_micro, "  # noqa: S608
            f"unknown_micro, cap_micro FROM totals {where}",
            params,
        )
    }


def _compare(expected: Sums, stored: Stored, result: Audit) -> None:
    """Name, in ``result``, every totals row that is not what its entries add up to, and
    every scope over the cap recorded with it."""
    for key in sorted(expected.keys() | stored.keys()):
        month, scope = key
        want = expected.get(key, (0, 0, 0, 0))
        have, cap = stored.get(key, (None, None))
        if have is None:
            if any(want):
                result.add_damage(
                    month,
                    scope,
                    f"{month} {scope}: no totals row, but its entries add up to " + _amounts(want),
                )
            continue
        for name, h, w in zip(TOTALS_FIELDS, have, want, strict=True):
            if h != w:
                result.add_damage(
                    month,
                    scope,
                    f"{month} {scope}: totals {name} {usd_text(h)}, "
                    f"its entries add up to {usd_text(w)}",
                )
        if not all(isinstance(v, int) for v in (*have, cap if cap is not None else 0)):
            continue  # named above; no cap arithmetic on text
        if cap is not None and counted(have) > cap:
            result.add_damage(
                month,
                scope,
                f"{month} {scope}: {usd_text(counted(have))} "
                f"counted against a cap of {usd_text(cap)}",
            )


#: Money columns must hold integers (micro-dollars); a CHECK does not refuse text or a
#: fraction (text sorts above every number), and ``integrity_check`` does not name them.
_TOTALS_NOT_INTEGERS = (
    "SELECT month, scope, month || ' ' || scope || ': a money column of its totals row holds a "
    "value that is not an integer' FROM totals WHERE typeof(settled_micro) <> 'integer' "
    "OR typeof(overage_micro) <> 'integer' OR typeof(reserved_micro) <> 'integer' "
    "OR typeof(unknown_micro) <> 'integer' "
    "OR (cap_micro IS NOT NULL AND typeof(cap_micro) <> 'integer')"
)
#: The rules the entries table's CHECKs state, asked of the entries directly: on a
#: read-only connection ``integrity_check`` does not test CHECK constraints, and a file
#: written with them off (``PRAGMA ignore_check_constraints``) can break them. The totals
#: are sums of the entries, so entries that break these cannot be summed into totals.
ENTRY_RULES = (
    "SELECT 'entries: ' || COUNT(*) || ' hold a cost or a reservation that is not an "
    "integer' FROM entries WHERE typeof(reserved_micro) <> 'integer' "
    "OR (cost_micro IS NOT NULL AND typeof(cost_micro) <> 'integer') HAVING COUNT(*) > 0",
    "SELECT 'entries: ' || COUNT(*) || ' hold a negative cost or reservation' FROM entries "
    "WHERE reserved_micro < 0 OR cost_micro < 0 HAVING COUNT(*) > 0",
    "SELECT 'entries: ' || COUNT(*) || ' have a state other than reserved, settled, "
    "unknown or released' FROM entries "
    "WHERE state NOT IN ('reserved', 'settled', 'unknown', 'released') HAVING COUNT(*) > 0",
    "SELECT 'entries: ' || COUNT(*) || ' are settled without a cost' FROM entries "
    "WHERE state = 'settled' AND cost_micro IS NULL HAVING COUNT(*) > 0",
)


def entry_problems(db: sqlite3.Connection) -> list[str]:
    """The entries that break :data:`ENTRY_RULES`, one line per rule broken."""
    return [str(r[0]) for query in ENTRY_RULES for r in db.execute(query)]


def usd_text(value: object) -> str:
    """Micro-dollars as ``$0.000123``; a value that is not a number (damage) as its repr."""
    if isinstance(value, int | float):
        return f"${value / 1e6:.6f}"
    return repr(value)


def _amounts(values: tuple[object, ...]) -> str:
    return ", ".join(
        f"{name} {usd_text(v)}" for name, v in zip(TOTALS_FIELDS, values, strict=True) if v
    )


# --- repair ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TotalsChange:
    """One totals row as :func:`rebuild_totals` found it and left it. ``before`` is None
    when the row was missing; a cap is cleared (``cap_after`` None) when the row's entries
    add up to more than it, or when it is not an integer."""

    month: str
    scope: str
    before: tuple[Any, ...] | None
    after: tuple[int, ...]
    cap_before: Any
    cap_after: int | None


class RepairRefused(Exception):
    """The ledger is damaged in a way rebuilding its totals cannot mend."""


def rebuild_totals(
    db: sqlite3.Connection, months: Sequence[str] | None = None
) -> list[TotalsChange]:
    """Set every totals row of ``months`` (every month: None) to what its entries add up
    to, inside the caller's write transaction; the rows changed, in (month, scope) order.

    The entries are the record (one row per attempt, written once and moved through its
    states); the totals are their running sums, kept by increments. So the totals are
    rebuilt from the entries, never the other way round: a row that disagrees with its
    entries takes their sums, a missing row is created (unless its entries count nothing),
    a row with no entries left is set to zero (it keeps its cap). The cap recorded with a
    row is kept unless the rebuilt sums are over it (real spend the damage hid): then it
    is cleared, which the row's CHECK needs. Reservations are still checked against the
    configured caps, and the next reservation in that scope writes its cap again.

    Refuses (:class:`RepairRefused`, nothing changed) when an entry breaks the rules of
    its table (:data:`ENTRY_RULES`): sums of damaged entries would be damage too.

    It holds the write lock while it sums the months' entries (one pass through the
    month index: about 1.5 s per million entries on two cores).
    """
    broken = entry_problems(db)
    if broken:
        raise RepairRefused("; ".join(broken))
    if months is not None and not months:
        return []
    expected = {key: tuple(int(v) for v in sums) for key, sums in _expected(db, months)[0].items()}
    stored = _stored(db, months)
    changes: list[TotalsChange] = []
    for key in sorted(expected.keys() | stored.keys()):
        month, scope = key
        want = expected.get(key, (0, 0, 0, 0))
        have, cap = stored.get(key, (None, None))
        kept_cap = cap if type(cap) is int and cap >= 0 and counted(want) <= cap else None
        if have is not None:
            exact = all(type(v) is int for v in have) and tuple(have) == want
            if exact and kept_cap == cap:
                continue
            db.execute(
                "UPDATE totals SET settled_micro = ?, overage_micro = ?, reserved_micro = ?, "
                "unknown_micro = ?, cap_micro = ? WHERE month = ? AND scope = ?",
                (*want, kept_cap, month, scope),
            )
        elif any(want):  # no row and nothing to count (only released entries): none needed
            db.execute(
                "INSERT INTO totals (month, scope, settled_micro, overage_micro, "
                "reserved_micro, unknown_micro, cap_micro) VALUES (?, ?, ?, ?, ?, ?, NULL)",
                (month, scope, *want),
            )
        else:
            continue
        changes.append(TotalsChange(month, scope, have, want, cap, kept_cap))
    return changes
