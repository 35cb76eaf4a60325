"""The SQLite spend store behind the ``ledger`` plugin: reserve, settle, release, report.

Standard library only, synchronous and small, so that a crash test or another process
can drive it directly. Every write is one ``BEGIN IMMEDIATE`` transaction: SQLite takes
the database write lock at ``BEGIN``, so the check "settled + reserved + unknown + this
<= cap" and the write that follows cannot interleave with another connection, in this
process or another one sharing the file.

Two tables. ``entries`` holds one row per attempt (a reservation and what became of
it). ``totals`` holds, per UTC month and scope (``total``, ``provider:<name>``), the
sums the caps are checked against; it is updated in the same transaction as the entry,
and a ``CHECK`` constraint on it refuses any write that would put a scope over the cap
recorded with it: a second line of defence behind the check in :meth:`reserve`.

Money is integer micro-dollars. Entry states: ``reserved`` (worst case held),
``settled`` (usage known, its cost counted), ``unknown`` (possibly billed, no usage:
the reservation stays charged), ``released`` (never sent, nothing charged).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
TOTAL = "total"

_SCHEMA = """
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
CREATE INDEX IF NOT EXISTS entries_open ON entries (state, lease_until);
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


class LedgerStore:
    """One connection to a ledger file. Methods are thread-safe (one lock) and blocking."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    # --- opening ---------------------------------------------------------------------

    def open(self) -> None:
        """Open (creating the file and schema if needed); raises :class:`LedgerError`."""
        with self._lock:
            if self._db is not None:
                return
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(
                    self.path,
                    timeout=self.busy_timeout_s,
                    isolation_level=None,
                    check_same_thread=False,
                )
            except (OSError, sqlite3.Error) as exc:
                raise LedgerError(f"cannot open {self.path}: {exc}") from None
            try:
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerError(f"{self.path}: cannot switch to WAL mode (got {mode})")
                db.execute("PRAGMA synchronous = FULL")
                db.execute("BEGIN IMMEDIATE")
                try:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise LedgerError(
                            f"{self.path} was written by a newer llm-gateway-mcp "
                            f"(schema {version}); upgrade, or point LLM_GATEWAY_LEDGER_PATH "
                            "elsewhere"
                        )
                    # Not executescript(): it would COMMIT the open transaction first.
                    for statement in _SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                db.close()
                raise LedgerError(f"cannot open {self.path}: {exc}") from None
            except BaseException:
                db.close()
                raise
            self._db = db

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed or rolled back as a whole."""
        with self._lock:
            db = self._db
            if db is None:
                raise LedgerError(f"{self.path} is not open")
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: {exc}") from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                if isinstance(exc, sqlite3.Error):
                    raise LedgerError(f"{self.path}: {exc}") from None
                raise

    # --- writes ----------------------------------------------------------------------

    def reserve(self, items: Sequence[Item], caps: Caps, *, now: datetime, lease_s: float) -> None:
        """Reserve every item or none: refuse with :class:`CapExceeded` if any scope
        (the month's total, each provider) would go over its cap."""
        month = month_of(now)
        deltas: dict[str, int] = {}
        for item in items:
            deltas[TOTAL] = deltas.get(TOTAL, 0) + item.amount_micro
            scope = provider_scope(item.provider)
            deltas[scope] = deltas.get(scope, 0) + item.amount_micro
        stamp = now.isoformat()
        lease_until = now.timestamp() + lease_s
        with self._write() as db:
            uses = _read_scopes(db, month, list(deltas))
            breaches = [
                Breach(uses[scope], cap, delta)
                for scope, delta in deltas.items()
                if (cap := caps.for_scope(scope)) is not None
                and uses[scope].used_micro + delta > cap
            ]
            if breaches:
                raise CapExceeded(breaches)
            db.executemany(
                "INSERT INTO entries (id, month, provider, model, task_class, request_id, "
                "attempt, state, reserved_micro, priced, created_at, updated_at, lease_until) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, 'reserved', ?, ?, ?, ?, ?)",
                [
                    (
                        i.id,
                        month,
                        i.provider,
                        i.model,
                        i.task_class,
                        i.request_id,
                        i.attempt,
                        i.amount_micro,
                        int(i.priced),
                        stamp,
                        stamp,
                        lease_until,
                    )
                    for i in items
                ],
            )
            for scope, delta in deltas.items():
                db.execute(
                    "UPDATE totals SET reserved_micro = reserved_micro + ?, cap_micro = ? "
                    "WHERE month = ? AND scope = ?",
                    (delta, caps.for_scope(scope), month, scope),
                )

    def settle(
        self,
        entry_id: str,
        *,
        cost_micro: int | None,
        now: datetime,
        input_tokens: int | None = None,
        output_tokens: int | None = None,
        error_class: str | None = None,
    ) -> bool:
        """Record what an attempt cost (idempotent: False if already settled/released).

        ``cost_micro`` None means the usage is known but the price is not: recorded as
        0 with ``priced = 0``. An ``unknown`` entry may still be settled (late usage).
        """
        with self._write() as db:
            row = _open_entry(db, entry_id)
            if row is None:
                return False
            month, provider, state, reserved = row
            cost = cost_micro or 0
            overage = max(0, cost - reserved)
            column = "reserved_micro" if state == "reserved" else "unknown_micro"
            db.execute(
                "UPDATE entries SET state = 'settled', cost_micro = ?, priced = ?, "
                "input_tokens = ?, output_tokens = ?, error_class = ?, updated_at = ? "
                "WHERE id = ?",
                (
                    cost,
                    int(cost_micro is not None),
                    input_tokens,
                    output_tokens,
                    error_class,
                    now.isoformat(),
                    entry_id,
                ),
            )
            _bump(
                db,
                month,
                provider,
                f"{column} = {column} - ?, settled_micro = settled_micro + ?, "
                "overage_micro = overage_micro + ?",
                (reserved, cost, overage),
            )
            return True

    def mark_unknown(self, entry_id: str, *, now: datetime, error_class: str | None = None) -> bool:
        """Sent but no usage came back: keep the reservation charged as ``unknown``."""
        with self._write() as db:
            row = _open_entry(db, entry_id)
            if row is None or row[2] != "reserved":
                return False
            month, provider, _, reserved = row
            db.execute(
                "UPDATE entries SET state = 'unknown', error_class = ?, updated_at = ? "
                "WHERE id = ?",
                (error_class, now.isoformat(), entry_id),
            )
            _bump(
                db,
                month,
                provider,
                "reserved_micro = reserved_micro - ?, unknown_micro = unknown_micro + ?",
                (reserved, reserved),
            )
            return True

    def release(self, entry_id: str, *, now: datetime, error_class: str | None = None) -> bool:
        """Nothing was sent: give the reservation back. Only a ``reserved`` entry."""
        with self._write() as db:
            row = _open_entry(db, entry_id)
            if row is None or row[2] != "reserved":
                return False
            month, provider, _, reserved = row
            db.execute(
                "UPDATE entries SET state = 'released', cost_micro = 0, error_class = ?, "
                "updated_at = ? WHERE id = ?",
                (error_class, now.isoformat(), entry_id),
            )
            _bump(db, month, provider, "reserved_micro = reserved_micro - ?", (reserved,))
            return True

    def expire_leases(self, now: datetime) -> int:
        """Turn reservations whose lease ran out into ``unknown`` (their process died
        or hung: they may have been billed). Returns how many."""
        with self._write() as db:
            rows = db.execute(
                "SELECT id, month, provider, reserved_micro FROM entries "
                "WHERE state = 'reserved' AND lease_until < ?",
                (now.timestamp(),),
            ).fetchall()
            for entry_id, month, provider, reserved in rows:
                db.execute(
                    "UPDATE entries SET state = 'unknown', error_class = 'lease_expired', "
                    "updated_at = ? WHERE id = ?",
                    (now.isoformat(), entry_id),
                )
                _bump(
                    db,
                    month,
                    provider,
                    "reserved_micro = reserved_micro - ?, unknown_micro = unknown_micro + ?",
                    (reserved, reserved),
                )
            return len(rows)

    # --- reads -----------------------------------------------------------------------

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._lock:
            if self._db is None:
                raise LedgerError(f"{self.path} is not open")
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise LedgerError(f"{self.path}: {exc}") from None

    def scopes(self, month: str) -> dict[str, ScopeUse]:
        """Every scope with activity in ``month``."""
        rows = self._read(
            "SELECT scope, settled_micro, overage_micro, reserved_micro, unknown_micro, "
            "cap_micro FROM totals WHERE month = ?",
            (month,),
        )
        return {r[0]: ScopeUse(*r) for r in rows}

    def breakdown(self, month: str) -> list[dict[str, Any]]:
        """Sums per (provider, model, task class, state) for ``month``."""
        rows = self._read(
            "SELECT provider, model, task_class, state, COUNT(*), "
            "SUM(CASE state WHEN 'settled' THEN cost_micro WHEN 'released' THEN 0 "
            "ELSE reserved_micro END), SUM(1 - priced) "
            "FROM entries WHERE month = ? GROUP BY provider, model, task_class, state",
            (month,),
        )
        keys = ("provider", "model", "task_class", "state", "count", "micro", "unpriced")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    def entry(self, entry_id: str) -> dict[str, Any] | None:
        """One entry as a dict (tests, debugging)."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"{self.path} is not open")
            cur = self._db.execute("SELECT * FROM entries WHERE id = ?", (entry_id,))
            row = cur.fetchone()
            if row is None:
                return None
            return {d[0]: v for d, v in zip(cur.description, row, strict=True)}

    def count(self, state: str) -> int:
        return int(self._read("SELECT COUNT(*) FROM entries WHERE state = ?", (state,))[0][0])

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])


def _read_scopes(db: sqlite3.Connection, month: str, scopes: list[str]) -> dict[str, ScopeUse]:
    db.executemany(
        "INSERT OR IGNORE INTO totals (month, scope) VALUES (?, ?)",
        [(month, s) for s in scopes],
    )
    marks = ",".join("?" * len(scopes))
    rows = db.execute(
        # Only '?' marks are formatted in: the values are bound parameters.
        "SELECT scope, settled_micro, overage_micro, reserved_micro, unknown_micro, cap_micro "  # noqa: S608
        f"FROM totals WHERE month = ? AND scope IN ({marks})",
        (month, *scopes),
    ).fetchall()
    return {r[0]: ScopeUse(*r) for r in rows}


def _open_entry(db: sqlite3.Connection, entry_id: str) -> tuple[str, str, str, int] | None:
    row = db.execute(
        "SELECT month, provider, state, reserved_micro FROM entries WHERE id = ? "
        "AND state IN ('reserved', 'unknown')",
        (entry_id,),
    ).fetchone()
    return None if row is None else (row[0], row[1], row[2], row[3])


def _bump(
    db: sqlite3.Connection, month: str, provider: str, assignments: str, params: tuple[int, ...]
) -> None:
    """Apply the same change to the month's ``total`` and ``provider:<name>`` rows."""
    for scope in (TOTAL, provider_scope(provider)):
        db.execute(
            f"UPDATE totals SET {assignments} WHERE month = ? AND scope = ?",  # noqa: S608
            (*params, month, scope),
        )
