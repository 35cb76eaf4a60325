"""The ledger's writes (reserve, settle, mark unknown, release, expire leases), applied
set-wise.

A group commit (:meth:`.ledger_store.LedgerStore.run_batch`) runs many writes in one
transaction. Written one statement per row, a reservation costs ~6 SQLite statements and a
settle 3, and on the writer thread each statement gives up the GIL and waits to get it back
from the busy event loop (~0.1 ms each under load on 2 cores: see bench/README.md). So the
writes of a batch are applied to a :class:`Batch`, an in-memory view of the rows they
touch, and written at the end with a fixed number of statements whatever the batch's size:
read the month's scope totals (only when the batch reserves: a settle changes totals by
increments and needs no read), read the open entries being settled, insert the new
entries, update the changed ones, update the totals by their increments (and create a
scope's row at its month's first reservation).

Exactly the same checks as one transaction per write:

- The caller holds the write lock (``BEGIN IMMEDIATE``) from the reads to the writes, so
  what the batch read cannot change under it, in this process or another one.
- Writes are applied in submission order to the in-memory rows: a settle submitted before
  a reservation frees its headroom first, and every reservation is checked against the
  totals as the writes before it left them.
- An op checks everything before it changes anything (:meth:`Reserve.apply` raises
  :class:`.ledger_sql.CapExceeded` with the batch untouched), so a refused reservation needs
  no savepoint of its own.
- The ``CHECK`` constraints on ``totals`` and ``entries`` still judge what is written; a
  failed statement makes the store redo the batch one savepoint per write (the slow,
  statement-per-row path is then each op run alone: :meth:`Op.__call__`).
- Netted into one change per row, a batch could pass a step that a CHECK would refuse one
  write at a time (on a damaged ledger: a settle taking a total below zero, hidden by a
  later reservation in the same scope). So each scope keeps the lowest point its
  ``reserved`` and ``unknown`` reached, a batch checks it against the values read before
  a reservation uses them and before writing (:meth:`_Scope.check`), and raises
  :class:`Inconsistent` for the store to redo the batch one savepoint per write.

Each write statement carries all its rows in one multi-row ``VALUES`` list (an insert, or
an ``UPDATE ... FROM (VALUES ...)`` joined on the primary key), so it is one SQLite step
whatever the count; updates of one or two rows run a plain ``UPDATE`` per row, which is
cheaper there, and so does every update on an SQLite older than 3.33. The settled entries
are read in one statement too (as one JSON value with SQLite >= 3.38, one step). Measured
in bench/README.md: on its own the set-wise form costs about the CPU of the statement per
row form; under load it is faster, because each step gives the GIL up and takes it back.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from .ledger_sql import (
    HOLD_STRANDED,
    TOTAL,
    Breach,
    CapExceeded,
    Caps,
    Item,
    ScopeUse,
    month_of,
    provider_scope,
)

__all__ = [
    "Ahead",
    "Batch",
    "Draw",
    "ExpireLeases",
    "GiveBack",
    "MarkUnknown",
    "Op",
    "Release",
    "Reserve",
    "Settle",
    "apply_all",
]


def _probe() -> tuple[bool, int]:
    """What this process's SQLite library offers: JSON functions (built in from 3.38, but a
    build may leave them out) and the bound-parameter limit of one statement."""
    db = sqlite3.connect(":memory:")
    try:
        try:
            db.execute("SELECT json_group_array(json_array(1, 'a'))").fetchone()
            json_ok = True
        except sqlite3.Error:
            json_ok = False
        return json_ok, db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    finally:
        db.close()


#: JSON functions (one-step reads) and the parameter limit, asked of the library itself.
JSON_FUNCTIONS, MAX_VARIABLES = _probe()

_OPEN = ("reserved", "unknown")


class Inconsistent(Exception):
    """A batch written set-wise would pass a state one write at a time would refuse; the
    store then runs the batch one savepoint per write, where SQLite's CHECKs judge each."""


class _Scope:
    """One (month, scope) row of ``totals``: what the batch changes (``d_*``, written as
    increments) and, once a reservation needed them, the values read (``base``)."""

    __slots__ = (
        "base",
        "cap",
        "cap_set",
        "d_overage",
        "d_reserved",
        "d_settled",
        "d_unknown",
        "dirty",
        "exists",
        "low_reserved",
        "low_unknown",
    )

    def __init__(self) -> None:
        #: (settled, overage, reserved, unknown) as read; None: not read (a settle alone
        #: does not need them: its entry's reservation made the row).
        self.base: tuple[int, int, int, int] | None = None
        self.exists = True  # known False only for a month read without this scope
        self.cap: int | None = None
        self.cap_set = False
        self.d_settled = self.d_overage = self.d_reserved = self.d_unknown = 0
        #: The lowest ``d_reserved`` / ``d_unknown`` reached so far: written as one net
        #: change, the batch must still pass every step the CHECK constraints would have
        #: judged one write at a time (only these two columns ever go down).
        self.low_reserved = self.low_unknown = 0
        self.dirty = False

    def check(self) -> None:
        """Raise :class:`Inconsistent` if a step of the batch took a column below zero
        (a damaged ledger: an entry holding more than its scope's total)."""
        if self.base is None:
            return
        _, _, reserved, unknown = self.base
        if reserved + self.low_reserved < 0 or unknown + self.low_unknown < 0:
            raise Inconsistent("a write would take a scope total below zero")

    def use(self, name: str) -> ScopeUse:
        """What the scope holds now (read values plus the batch's changes)."""
        assert self.base is not None
        settled, overage, reserved, unknown = self.base
        return ScopeUse(
            name,
            settled + self.d_settled,
            overage + self.d_overage,
            reserved + self.d_reserved,
            unknown + self.d_unknown,
            self.cap,
        )


class _Entry:
    """One open entry as the batch has left it. ``insert`` holds the columns written only
    when the entry is new in this batch (then it is inserted, not updated)."""

    __slots__ = (
        "cost",
        "dirty",
        "error_class",
        "id",
        "input_tokens",
        "insert",
        "lease_until",
        "month",
        "output_tokens",
        "priced",
        "provider",
        "reserved",
        "state",
        "updated_at",
    )

    def __init__(
        self,
        id: str,
        month: str,
        provider: str,
        state: str,
        reserved: int,
        cost: int | None,
        priced: int,
        error_class: str | None,
        input_tokens: int | None,
        output_tokens: int | None,
        updated_at: str,
        insert: tuple[Any, ...] | None = None,
    ) -> None:
        self.id = id
        self.month = month
        self.provider = provider
        self.state = state
        self.reserved = reserved
        self.cost = cost
        self.priced = priced
        self.error_class = error_class
        self.input_tokens = input_tokens
        self.output_tokens = output_tokens
        self.updated_at = updated_at
        self.insert = insert
        #: A new lease end (a hold drawn from or grown keeps its lease); None: unchanged.
        self.lease_until: float | None = None
        self.dirty = False

    def changes(self) -> list[Any]:
        """The ``UPDATE`` row (see ``_UPDATE_ENTRIES``)."""
        return [
            self.id,
            self.state,
            self.cost,
            self.priced,
            self.error_class,
            self.input_tokens,
            self.output_tokens,
            self.updated_at,
            self.reserved,
            self.lease_until,
        ]

    def row(self) -> list[Any]:
        """The ``INSERT`` row (see ``_INSERT_ENTRIES``)."""
        assert self.insert is not None
        model, task_class, request_id, attempt, created_at, lease_until = self.insert
        if self.lease_until is not None:
            lease_until = self.lease_until
        return [
            self.id,
            self.month,
            self.provider,
            model,
            task_class,
            request_id,
            attempt,
            self.state,
            self.reserved,
            self.cost,
            self.priced,
            self.error_class,
            self.input_tokens,
            self.output_tokens,
            created_at,
            self.updated_at,
            lease_until,
        ]


_ENTRY_READ = (
    "id, month, provider, state, reserved_micro, cost_micro, priced, error_class, "
    "input_tokens, output_tokens, updated_at"
)
# The unary + keeps the planner on the primary key, whatever index on ``state`` the file
# has: an index by state (as ``entries_open`` was before it held only open reservations)
# would scan every open entry of the ledger for the few ids a batch reads.
_OPEN_SQL = "+state IN ('reserved', 'unknown')"
_INSERT_COLUMNS = (
    "id, month, provider, model, task_class, request_id, attempt, state, reserved_micro, "
    "cost_micro, priced, error_class, input_tokens, output_tokens, created_at, updated_at, "
    "lease_until"
)
_SCOPE_READ = "scope, settled_micro, overage_micro, reserved_micro, unknown_micro, cap_micro"

# Statement texts: constants, or formatted with '?' marks only (values are always bound).
# A write carries all its rows in one multi-row VALUES list: one statement, one SQLite step.
_INSERT_ENTRIES = f"INSERT INTO entries ({_INSERT_COLUMNS}) VALUES {{}}"  # noqa: S608
_UPDATE_ENTRIES = (
    "UPDATE entries SET state = v.column2, cost_micro = v.column3, priced = v.column4, "
    "error_class = v.column5, input_tokens = v.column6, output_tokens = v.column7, "
    "updated_at = v.column8, reserved_micro = v.column9, "
    "lease_until = COALESCE(v.column10, lease_until) "
    "FROM (VALUES {}) AS v WHERE entries.id = v.column1"
)
_UPDATE_TOTALS = (
    "UPDATE totals SET settled_micro = settled_micro + v.column3, "
    "overage_micro = overage_micro + v.column4, reserved_micro = reserved_micro + v.column5, "
    "unknown_micro = unknown_micro + v.column6, "
    "cap_micro = CASE WHEN v.column7 THEN v.column8 ELSE cap_micro END "
    "FROM (VALUES {}) AS v WHERE totals.month = v.column1 AND totals.scope = v.column2"
)
_INSERT_TOTALS = (
    "INSERT INTO totals (month, scope, settled_micro, overage_micro, reserved_micro, "
    "unknown_micro, cap_micro) VALUES {}"
)
# The same updates for a row or two: a plain UPDATE per row is cheaper than a join.
_UPDATE_ENTRY = (
    "UPDATE entries SET state = ?2, cost_micro = ?3, priced = ?4, error_class = ?5, "
    "input_tokens = ?6, output_tokens = ?7, updated_at = ?8, reserved_micro = ?9, "
    "lease_until = COALESCE(?10, lease_until) WHERE id = ?1"
)
_UPDATE_TOTAL = (
    "UPDATE totals SET settled_micro = settled_micro + ?3, "
    "overage_micro = overage_micro + ?4, reserved_micro = reserved_micro + ?5, "
    "unknown_micro = unknown_micro + ?6, cap_micro = CASE WHEN ?7 THEN ?8 ELSE cap_micro END "
    "WHERE month = ?1 AND scope = ?2"
)
_READ_SCOPES = f"SELECT {_SCOPE_READ} FROM totals WHERE month = ?"  # noqa: S608
EXPIRED_SQL = "SELECT id FROM entries WHERE state = 'reserved' AND lease_until < ?"
_READ_SCOPES_JSON = (
    f"SELECT json_group_array(json_array({_SCOPE_READ})) FROM totals WHERE month = ?"  # noqa: S608
)
# Reading the entries a batch settles: as one JSON value when SQLite has JSON functions
# (one step), else row by row.
_READ_ENTRIES_JSON = (
    f"SELECT json_group_array(json_array({_ENTRY_READ})) FROM entries "  # noqa: S608
    f"WHERE id IN ({{}}) AND {_OPEN_SQL}"
)
_READ_ENTRIES = f"SELECT {_ENTRY_READ} FROM entries WHERE id IN ({{}}) AND {_OPEN_SQL}"  # noqa: S608

#: ``UPDATE ... FROM`` (one statement updating many rows) is in every SQLite >= 3.33.
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)


@functools.lru_cache(maxsize=256)
def _marks(rows: int, width: int) -> str:
    """``(?, ?), (?, ?)`` for ``rows`` rows of ``width`` values (``?, ?`` for width 0)."""
    if width == 0:
        return ", ".join("?" * rows)
    one = "(" + ", ".join("?" * width) + ")"
    return ", ".join([one] * rows)


class Batch:
    """The rows a batch's writes touch, read once and written once (see the module doc).

    Use: :meth:`prefetch` the entries the batch will settle, ``op.apply(batch)`` for each
    write in order, then :meth:`write`. The caller holds the transaction throughout.
    """

    #: Whether the settled entries and the month's totals are read as one JSON value (one
    #: step; class-wide: tests run both forms).
    json_reads: ClassVar[bool] = JSON_FUNCTIONS
    #: Bound parameters per statement; more rows are written in several (tests lower it).
    max_variables: ClassVar[int] = MAX_VARIABLES
    #: Updates of fewer rows than this run one plain statement per row (all of them when
    #: SQLite has no ``UPDATE ... FROM``).
    values_min_rows: ClassVar[int] = 3 if UPDATE_FROM else 2**62

    def __init__(self, db: sqlite3.Connection, *, stepwise: bool = False) -> None:
        self.db = db
        #: Many writes netted into one change per row: check each step before writing
        #: (:meth:`_Scope.check`). One write alone needs no check: SQLite's CHECKs see
        #: its only step.
        self.stepwise = stepwise
        self._scopes: dict[tuple[str, str], _Scope] = {}
        self._months: set[str] = set()
        #: Entries looked up: the open ones as rows, None for "not open" (or absent).
        self._entries: dict[str, _Entry | None] = {}
        #: Entries in the order they were first changed (the write order).
        self._touched: list[_Entry] = []

    def _chunks(self, rows: Sequence[Sequence[Any]], width: int) -> Iterable[Sequence[Any]]:
        per = max(1, self.max_variables // max(1, width))
        for k in range(0, len(rows), per):
            yield rows[k : k + per]

    def _write(self, template: str, rows: Sequence[Sequence[Any]], one: str | None = None) -> None:
        """One statement per chunk of rows: ``template`` with its ``VALUES`` list; or, for
        fewer than :attr:`values_min_rows` rows, ``one`` once per row."""
        if one is not None and len(rows) < self.values_min_rows:
            self.db.executemany(one, rows)
            return
        width = len(rows[0])
        for chunk in self._chunks(rows, width):
            params = [v for row in chunk for v in row]
            self.db.execute(template.format(_marks(len(chunk), width)), params)

    # --- reading ---------------------------------------------------------------------

    def prefetch(self, entry_ids: Iterable[str]) -> None:
        """Read the open entries among ``entry_ids`` in one go (the others are not open)."""
        ids = [i for i in dict.fromkeys(entry_ids) if i not in self._entries]
        if not ids:
            return
        for i in ids:
            self._entries[i] = None
        rows: list[Any] = []
        for chunk in self._chunks([[i] for i in ids], 1):
            params = [i for (i,) in chunk]
            marks = _marks(len(params), 0)
            if self.json_reads and len(params) > 1:
                query = _READ_ENTRIES_JSON.format(marks)
                (text,) = self.db.execute(query, params).fetchone()
                rows += json.loads(text)
            else:
                rows += self.db.execute(_READ_ENTRIES.format(marks), params).fetchall()
        for r in rows:
            self._entries[r[0]] = _Entry(*r)

    def entry(self, entry_id: str) -> _Entry | None:
        """The entry if it is open (``reserved`` or ``unknown``) as the batch left it."""
        if entry_id not in self._entries:
            self.prefetch([entry_id])
        entry = self._entries[entry_id]
        if entry is None or entry.state not in _OPEN:
            return None
        return entry

    def scope(self, month: str, name: str, *, read: bool = False) -> _Scope:
        """A scope of a month as the batch has left it; ``read``: with its values (the
        month's scopes are read once, on the first such call)."""
        scope = self._scopes.get((month, name))
        if scope is None:
            scope = self._scopes[(month, name)] = _Scope()
        if read and scope.base is None:
            if month in self._months:  # read already, and this scope had no row then
                scope.base = (0, 0, 0, 0)
                scope.exists = False
            else:
                self._read_month(month)
        return scope

    def _read_month(self, month: str) -> None:
        self._months.add(month)
        found = set()
        rows: list[Any]
        if self.json_reads:
            (text,) = self.db.execute(_READ_SCOPES_JSON, (month,)).fetchone()
            rows = json.loads(text)
        else:
            rows = self.db.execute(_READ_SCOPES, (month,)).fetchall()
        for name, settled, overage, reserved, unknown, cap in rows:
            scope = self.scope(month, name)
            scope.base = (settled, overage, reserved, unknown)
            if not scope.cap_set:
                scope.cap = cap
            found.add(name)
        for (m, name), scope in self._scopes.items():
            if m == month and name not in found:
                scope.base = (0, 0, 0, 0)
                scope.exists = False

    # --- changing --------------------------------------------------------------------

    def add(self, entry: _Entry) -> None:
        self._entries[entry.id] = entry
        self._touch(entry)

    def _touch(self, entry: _Entry) -> None:
        if not entry.dirty:
            entry.dirty = True
            self._touched.append(entry)

    def touch(self, entry: _Entry, now: datetime) -> None:
        """``entry`` was changed in place (a hold drawn from or grown): write it."""
        entry.updated_at = now.isoformat()
        self._touch(entry)

    def hold(self, month: str, provider: str, amount: int, caps: Caps | None) -> None:
        """Count ``amount`` more (less, if negative) as reserved in both of ``provider``'s
        scopes: the caller checked ``caps`` (recorded with the rows, as a reservation
        does), or, None, must count it whatever they say (the rows keep the caps they
        have)."""
        for name in (TOTAL, provider_scope(provider)):
            s = self.scope(month, name, read=True)  # with its cap, as stored
            s.d_reserved += amount
            s.low_reserved = min(s.low_reserved, s.d_reserved)
            if caps is not None:
                s.cap = caps.for_scope(name)
            s.cap_set = True  # written with the row (created if it had none)
            s.dirty = True

    def shift_to_reserved(self, month: str, provider: str, amount: int) -> None:
        """Move ``amount`` from ``unknown`` to ``reserved`` in both of ``provider``'s scopes
        (drawn from a hold whose lease another process expired: still charged, now as an
        attempt's reservation). A scope without a row is left alone, as in :meth:`move`."""
        for name in (TOTAL, provider_scope(provider)):
            s = self.scope(month, name, read=self.stepwise)
            if not s.exists and not s.cap_set:
                continue
            s.d_unknown -= amount
            s.d_reserved += amount
            s.low_unknown = min(s.low_unknown, s.d_unknown)
            s.dirty = True

    def room(self, month: str, provider: str, caps: Caps, share: int) -> int | None:
        """The least headroom, divided by ``share``, of ``provider``'s scopes that have a
        cap (None: neither has one)."""
        least: int | None = None
        for name in (TOTAL, provider_scope(provider)):
            cap = caps.for_scope(name)
            if cap is None:
                continue
            left = max(0, cap - self.scope(month, name, read=True).use(name).used_micro)
            least = left if least is None else min(least, left)
        return None if least is None else least // max(1, share)

    def move(
        self, entry: _Entry, state: str, *, settled: int = 0, overage: int = 0, now: datetime
    ) -> None:
        """Take ``entry`` from its state to ``state`` in its month's totals (both scopes):
        its reservation leaves the old state's column; ``unknown`` keeps it charged.

        A scope with no row that no reservation of this batch creates (a damaged ledger:
        the entry's reservation made it) is left alone: one write at a time, its UPDATE
        finds no row and changes nothing, so the batch does the same. Only a batch reads
        the month here; it reads it anyway, for the checks of :meth:`write`."""
        for name in (TOTAL, provider_scope(entry.provider)):
            s = self.scope(entry.month, name, read=self.stepwise)
            if not s.exists and not s.cap_set:
                continue
            if entry.state == "reserved":
                s.d_reserved -= entry.reserved
            else:
                s.d_unknown -= entry.reserved
            if state == "unknown":
                s.d_unknown += entry.reserved
            s.d_settled += settled
            s.d_overage += overage
            s.low_reserved = min(s.low_reserved, s.d_reserved)
            s.low_unknown = min(s.low_unknown, s.d_unknown)
            s.dirty = True
        entry.state = state
        entry.updated_at = now.isoformat()
        self._touch(entry)

    # --- writing ---------------------------------------------------------------------

    def write(self) -> None:
        """Write every changed entry and scope: a few statements, whatever the count."""
        if self.stepwise:
            for (month, name), s in list(self._scopes.items()):
                if s.dirty:
                    self.scope(month, name, read=True)  # a read only for settles alone
                    s.check()
        new = [e.row() for e in self._touched if e.insert is not None]
        changed = [e.changes() for e in self._touched if e.insert is None]
        totals: list[list[Any]] = []
        created: list[list[Any]] = []
        for (month, name), s in self._scopes.items():
            if not s.dirty:
                continue
            deltas = [s.d_settled, s.d_overage, s.d_reserved, s.d_unknown]
            if s.exists:
                totals.append([month, name, *deltas, int(s.cap_set), s.cap])
            else:  # a month's first reservation in this scope
                created.append([month, name, *deltas, s.cap])
        if new:
            self._write(_INSERT_ENTRIES, new)
        if changed:
            self._write(_UPDATE_ENTRIES, changed, _UPDATE_ENTRY)
        if totals:
            self._write(_UPDATE_TOTALS, totals, _UPDATE_TOTAL)
        if created:
            self._write(_INSERT_TOTALS, created)
        for e in self._touched:
            e.dirty = False
            e.insert = None  # written: a later change of it in this batch object updates
        self._touched.clear()
        for s in self._scopes.values():
            if s.dirty:
                if s.base is not None:
                    settled, overage, reserved, unknown = s.base
                    s.base = (
                        settled + s.d_settled,
                        overage + s.d_overage,
                        reserved + s.d_reserved,
                        unknown + s.d_unknown,
                    )
                s.d_settled = s.d_overage = s.d_reserved = s.d_unknown = 0
                s.low_reserved = s.low_unknown = 0
                s.exists = True
                s.cap_set = False
                s.dirty = False


class Op:
    """One ledger write. ``apply`` changes a :class:`Batch` (checking everything first);
    calling the op on a connection runs it alone (its own batch, written at once).

    An op that changes an existing entry names it in ``entry_id``: :func:`apply_all` reads
    those up front, all in one statement."""

    def apply(self, batch: Batch) -> Any:
        raise NotImplementedError

    def __call__(self, db: sqlite3.Connection) -> Any:
        batch = Batch(db)
        value = self.apply(batch)
        batch.write()
        return value


@dataclass(frozen=True, slots=True)
class Reserve(Op):
    """Reserve every item or none: refuse with :class:`CapExceeded` if any scope (the
    month's total, each provider) would go over its cap."""

    items: Sequence[Item]
    caps: Caps
    now: datetime
    lease_s: float
    #: Holds to take with the items when the caps leave room (see :class:`Ahead`); never a
    #: reason to refuse the items.
    ahead: Sequence[Ahead] = ()
    #: A hold takes at most this share of a capped scope's headroom left after the items
    #: (4: a quarter), so holds shrink to nothing as a cap nears.
    ahead_share: int = 4

    def apply(self, batch: Batch) -> list[tuple[str, int]] | None:
        """Reserve the items (or raise :class:`CapExceeded`), then each hold the caps leave
        room for: the ``(id, amount)`` of each hold taken (None when none was asked)."""
        month = month_of(self.now)
        deltas: dict[str, int] = {}
        for item in self.items:
            deltas[TOTAL] = deltas.get(TOTAL, 0) + item.amount_micro
            scope = provider_scope(item.provider)
            deltas[scope] = deltas.get(scope, 0) + item.amount_micro
        scopes = {name: batch.scope(month, name, read=True) for name in deltas}
        for read in scopes.values():
            read.check()  # what the writes before it left must be a state to check against
        breaches = [
            Breach(use, cap, delta)
            for name, delta in deltas.items()
            if (cap := self.caps.for_scope(name)) is not None
            and (use := scopes[name].use(name)).used_micro + delta > cap
        ]
        if breaches:
            raise CapExceeded(breaches)
        lease_until = self.now.timestamp() + self.lease_s
        for i in self.items:
            batch.hold(month, i.provider, i.amount_micro, self.caps)
            batch.add(_new_entry(i, month, i.amount_micro, self.now, lease_until))
        taken = []
        for ahead in self.ahead:
            amount = ahead.fit(batch.room(month, ahead.item.provider, self.caps, self.ahead_share))
            if amount:
                batch.hold(month, ahead.item.provider, amount, self.caps)
                batch.add(_new_entry(ahead.item, month, amount, self.now, lease_until))
                taken.append((ahead.item.id, amount))
        return taken if self.ahead else None


def _new_entry(item: Item, month: str, amount: int, now: datetime, lease_until: float) -> _Entry:
    """A ``reserved`` entry for ``item``, new in this batch (inserted when written)."""
    stamp = now.isoformat()
    return _Entry(
        item.id,
        month,
        item.provider,
        "reserved",
        amount,
        None,
        int(item.priced),
        None,
        None,
        None,
        stamp,
        insert=(item.model, item.task_class, item.request_id, item.attempt, stamp, lease_until),
    )


@dataclass(frozen=True, slots=True)
class Ahead:
    """A hold to take: money reserved for a provider's next attempts before they are made,
    so each of them is covered by a reservation already on disk when it is sent (its own
    entry is drawn from the hold afterwards, :class:`Draw`). Up to ``units`` attempts of
    ``unit`` micro-dollars (the worst case of the attempt that asked for it); taken in
    whole units, as far as the caps leave room. ``item.amount_micro`` is not used."""

    item: Item
    unit: int
    units: int

    def fit(self, room: int | None) -> int:
        """The amount to take given ``room`` (None: no cap applies): whole units only."""
        if self.unit <= 0 or self.units <= 0:
            return 0
        units = self.units if room is None else min(self.units, room // self.unit)
        return max(0, units) * self.unit


@dataclass(frozen=True, slots=True)
class Draw(Op):
    """Give an attempt carved from a hold its own ``reserved`` entry, moving its amount out
    of the hold (the totals do not change: the money was reserved with the hold) and
    renewing the hold's lease. True when drawn from the hold.

    A hold that another process's start found expired is ``unknown``: the amount moves
    from ``unknown`` to the attempt's reservation, charged all along. A hold that cannot
    cover it (gone: released, or edited by hand) leaves the attempt reserved on its own,
    counted without a cap check (False): the attempt may be out already, so it must be
    counted, and the cap was checked when its hold was taken. A hold of another provider
    never covers it (each provider's scope holds its own money)."""

    entry_id: str
    item: Item
    now: datetime
    lease_s: float

    def apply(self, batch: Batch) -> bool:
        hold = batch.entry(self.entry_id)
        amount = self.item.amount_micro
        lease_until = self.now.timestamp() + self.lease_s
        drawn = hold is not None and hold.provider == self.item.provider and hold.reserved >= amount
        if hold is not None and drawn:
            month = hold.month
            hold.reserved -= amount
            if hold.state == "unknown":
                batch.shift_to_reserved(month, hold.provider, amount)
            else:
                hold.lease_until = lease_until
            batch.touch(hold, self.now)
        else:
            month = month_of(self.now)
            batch.hold(month, self.item.provider, amount, None)
        batch.add(_new_entry(self.item, month, amount, self.now, lease_until))
        return drawn


@dataclass(frozen=True, slots=True)
class Settle(Op):
    """Record what an attempt cost (idempotent: False if already settled/released).

    ``cost_micro`` None means the usage is known but the price is not: recorded as 0
    with ``priced = 0``. An ``unknown`` entry may still be settled (late usage).
    """

    entry_id: str
    cost_micro: int | None
    now: datetime
    input_tokens: int | None = None
    output_tokens: int | None = None
    error_class: str | None = None

    def apply(self, batch: Batch) -> bool:
        entry = batch.entry(self.entry_id)
        if entry is None:
            return False
        cost = self.cost_micro or 0
        batch.move(
            entry,
            "settled",
            settled=cost,
            overage=max(0, cost - entry.reserved),
            now=self.now,
        )
        entry.cost = cost
        entry.priced = int(self.cost_micro is not None)
        entry.input_tokens = self.input_tokens
        entry.output_tokens = self.output_tokens
        entry.error_class = self.error_class
        return True


@dataclass(frozen=True, slots=True)
class _LeaveReserved(Op):
    """A ``reserved`` entry that ends without usage: :class:`MarkUnknown` or
    :class:`Release` (False, and nothing changed, for an entry in any other state)."""

    entry_id: str
    now: datetime
    error_class: str | None = None
    #: The state it moves to.
    to: ClassVar[str]

    def apply(self, batch: Batch) -> bool:
        entry = batch.entry(self.entry_id)
        if entry is None or entry.state != "reserved":
            return False
        batch.move(entry, self.to, now=self.now)
        if self.to == "released":
            entry.cost = 0
        entry.error_class = self.error_class
        return True


@dataclass(frozen=True, slots=True)
class GiveBack(Op):
    """Release ``amount`` of a ``reserved`` hold: what no attempt drew from it (the rest
    of the entry stays reserved). Released in full, it is ``released`` (its amount kept,
    as a release keeps it); with anything left (an attempt drawn from it whose own entry
    could not be written), it stays ``reserved`` and its lease turns it ``unknown``: that
    attempt was sent. False, and nothing changed, for an entry not ``reserved``."""

    entry_id: str
    amount: int
    now: datetime

    def apply(self, batch: Batch) -> bool:
        entry = batch.entry(self.entry_id)
        if entry is None or entry.state != "reserved":
            return False
        give = max(0, min(self.amount, entry.reserved))
        if give == entry.reserved:  # all of it: released, recording what it held
            batch.move(entry, "released", now=self.now)
            entry.cost = 0
        else:
            if give:
                batch.hold(entry.month, entry.provider, -give, None)
                entry.reserved -= give
            entry.error_class = HOLD_STRANDED  # reported as charged, not as held ahead
            batch.touch(entry, self.now)
        return True


class MarkUnknown(_LeaveReserved):
    """Sent but no usage came back: keep the reservation charged as ``unknown``."""

    __slots__ = ()
    to = "unknown"


class Release(_LeaveReserved):
    """Nothing was sent: give the reservation back. Only a ``reserved`` entry."""

    __slots__ = ()
    to = "released"


@dataclass(frozen=True, slots=True)
class ExpireLeases(Op):
    """Turn reservations whose lease ran out into ``unknown`` (their process died or hung:
    they may have been billed), each as :class:`MarkUnknown` would. Returns how many.

    Run it alone (:meth:`LedgerStore.expire_leases`): it finds the expired leases in the
    database, so in a batch it would not see a reservation made earlier in that batch."""

    now: datetime

    def apply(self, batch: Batch) -> int:
        rows = batch.db.execute(EXPIRED_SQL, (self.now.timestamp(),)).fetchall()
        ids = [entry_id for (entry_id,) in rows]
        batch.prefetch(ids)
        return sum(MarkUnknown(i, self.now, "lease_expired").apply(batch) for i in ids)


def apply_all(db: sqlite3.Connection, ops: Sequence[Any]) -> list[tuple[bool, Any]]:
    """Run a batch's writes in order inside the caller's transaction: the :class:`Op` ones
    set-wise, any other callable of the connection as it is (the batch is written before
    it and read again after it). A refused reservation is a ``(False, CapExceeded)``
    result; any other exception propagates (the caller rolls the batch back and runs it
    one savepoint per write)."""
    results: list[tuple[bool, Any]] = []
    batch = Batch(db, stepwise=True)
    batch.prefetch(i for op in ops if isinstance(i := getattr(op, "entry_id", None), str))
    for op in ops:
        if isinstance(op, Op):
            try:
                results.append((True, op.apply(batch)))
            except CapExceeded as exc:
                results.append((False, exc))
        else:
            batch.write()
            results.append((True, op(db)))
            batch = Batch(db, stepwise=True)
    batch.write()
    return results
