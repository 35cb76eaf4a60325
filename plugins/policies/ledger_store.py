"""The SQLite spend store behind the ``ledger`` plugin: one connection, its transactions.

Standard library only, synchronous and small, so that a crash test, the benchmark or
another process can drive it directly. The data and the SQL live in :mod:`.ledger_sql`;
the thread that batches the plugin's writes in :mod:`.ledger_writer`.

Every write runs in a ``BEGIN IMMEDIATE`` transaction: SQLite takes the database write
lock at ``BEGIN``, so the check "settled + reserved + unknown + this <= cap" and the write
that follows cannot interleave with another connection, in this process or another one
sharing the file. :meth:`LedgerStore.run_batch` runs many writes in one transaction (a
group commit), each as if in its own ``SAVEPOINT`` so that a refused or failed one rolls
back alone (the batch first runs under one savepoint and is redone with one per write only
when a write fails: :meth:`LedgerStore._optimistic`); the caps are checked write by write,
so the invariant holds inside a batch too.

The file is in WAL mode with ``synchronous=FULL``: a returned write is on disk.

Waiting for another process's lock: SQLite's own busy handler sleeps in growing steps
(1, 2, 5, 10 ... 100 ms), so a process that just missed the lock can sleep through many
other processes' transactions and starve for seconds. The store sets ``busy_timeout`` to 0
after opening and retries ``BEGIN IMMEDIATE`` itself every 0.25-1 ms (uniform jitter, so
waiters do not retry in step) until ``busy_timeout_s`` has passed; then it fails closed
with a :class:`LedgerError` saying the database is locked. :meth:`LedgerStore.try_batch`
does not wait at all (one try, the caller queues the batch for the writer thread instead).
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

from . import ledger_ops as ops_
from . import ledger_sql as sql
from .ledger_ops import apply_all
from .ledger_sql import (
    SCHEMA,
    SCHEMA_VERSION,
    TOTAL,
    Breach,
    CapExceeded,
    Caps,
    Item,
    LedgerError,
    ScopeUse,
    month_of,
    provider_scope,
)

__all__ = [
    "TOTAL",
    "Breach",
    "CapExceeded",
    "Caps",
    "Item",
    "LedgerError",
    "LedgerReader",
    "LedgerStore",
    "Op",
    "ScopeUse",
    "month_of",
    "provider_scope",
]

T = TypeVar("T")
#: One write: a function of the connection, run inside a transaction the store holds.
Op = Callable[[sqlite3.Connection], Any]
#: What one write of a batch gave: ``(True, value)`` or ``(False, exception)``.
Result = tuple[bool, Any]

_BUSY_CODES = frozenset({5, 6})  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
RETRY_S = (0.00025, 0.001)  # a waiting BEGIN IMMEDIATE retries after uniform(*RETRY_S)


def _busy(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return (code & 0xFF) in _BUSY_CODES
    text = str(exc)
    return "locked" in text or "busy" in text


class LedgerStore:
    """One connection to a ledger file. Methods are thread-safe (one lock) and blocking."""

    def __init__(self, path: Path | str, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._rng = random.Random()
        #: How many times a ``BEGIN IMMEDIATE`` found the lock taken (figures, tests).
        self.busy_retries = 0
        #: Expired reservations the last :meth:`expire_leases` could not expire.
        self.unexpired: list[str] = []

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
                # Opening may meet another process's recovery or mode switch: SQLite's own
                # handler is fine for that one-off wait. Writes use ours (see the docstring).
                db.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_s * 1000)}")
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise LedgerError(f"{self.path}: cannot switch to WAL mode (got {mode})")
                db.execute("PRAGMA synchronous = FULL")
                # The schema transaction waits for the write lock as every write does (our
                # short jittered retries): SQLite's handler sleeps in growing steps, and
                # beside busy writers it can miss every free moment until the timeout.
                db.execute("PRAGMA busy_timeout = 0")
                self._retrying(lambda: db.execute("BEGIN IMMEDIATE"))
                try:
                    version = db.execute("PRAGMA user_version").fetchone()[0]
                    if version > SCHEMA_VERSION:
                        raise LedgerError(
                            f"{self.path} was written by a newer llm-gateway-mcp "
                            f"(schema {version}); upgrade, or point LLM_GATEWAY_LEDGER_PATH "
                            "elsewhere"
                        )
                    sql.migrate_indexes(db)
                    # Not executescript(): it would COMMIT the open transaction first.
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                    db.execute("COMMIT")
                except BaseException:
                    # SQLite may have rolled back already (an I/O error or an interrupt
                    # while the index is rebuilt): a second ROLLBACK would hide why.
                    self._rollback(db)
                    raise
            except sqlite3.Error as exc:
                db.close()
                if _busy(exc):
                    raise LedgerError(f"cannot open {self._locked()}") from None
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

    def _open_db(self) -> sqlite3.Connection:
        if self._db is None:
            raise LedgerError(f"{self.path} is not open")
        return self._db

    # --- transactions ----------------------------------------------------------------

    def _locked(self) -> str:
        return (
            f"{self.path}: database is locked: another connection held the write lock for "
            f"over {self.busy_timeout_s:g} s (ledger.busy_timeout_s)"
        )

    def _retrying(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` until it does not meet a busy database, for ``busy_timeout_s`` at
        most, sleeping a short jittered while between tries (see the module docstring)."""
        deadline: float | None = None
        while True:
            try:
                return fn()
            except sqlite3.Error as exc:
                if not _busy(exc):
                    raise LedgerError(f"{self.path}: {exc}") from None
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.busy_timeout_s
                elif now >= deadline:
                    raise LedgerError(self._locked()) from None
                self.busy_retries += 1
                time.sleep(min(self._rng.uniform(*RETRY_S), max(0.0, deadline - now)))

    def _begin(self, db: sqlite3.Connection) -> None:
        self._retrying(lambda: db.execute("BEGIN IMMEDIATE"))

    def _commit(self, db: sqlite3.Connection) -> None:
        """The one COMMIT of every write transaction (a test makes it fail here)."""
        db.execute("COMMIT")

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    @contextmanager
    def _rolled_back_on_error(self, db: sqlite3.Connection) -> Iterator[None]:
        """Any exception rolls the transaction back; an SQLite one becomes a LedgerError."""
        try:
            yield
        except BaseException as exc:
            self._rollback(db)
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"{self.path}: {exc}") from None
            raise

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed or rolled back as a whole."""
        with self._lock:
            db = self._open_db()
            self._begin(db)
            with self._rolled_back_on_error(db):
                yield db
                self._commit(db)

    def run_batch(self, ops: Sequence[Op]) -> list[Result]:
        """Run ``ops`` in order in ONE transaction (a group commit) and return, per op,
        ``(True, value)`` or ``(False, exception)``.

        Each op runs as if in its own ``SAVEPOINT`` (:meth:`_optimistic`): one that raises
        (a refused reservation, :class:`CapExceeded`; a failed statement, as
        :class:`LedgerError`) is rolled back alone and the others still commit. Returns only
        after the ``COMMIT``: every result is durable. Raises :class:`LedgerError` when the
        transaction cannot begin (locked past the timeout) or commit, or when SQLite rolled
        it back itself: then nothing of the batch was written and every op has failed (fail closed).
        """
        with self._lock:
            db = self._open_db()
            self._begin(db)
            return self._batch(db, ops)

    def try_batch(self, ops: Sequence[Op]) -> list[Result] | None:
        """:meth:`run_batch` without waiting: ``None``, and nothing done, when another
        thread holds this store or another connection holds the database's write lock
        (``BEGIN IMMEDIATE`` is tried once; ``busy_timeout`` is 0 after :meth:`open`).
        The caller then queues the batch for :meth:`run_batch`, which waits."""
        db = self.begin_nowait()
        if db is None:
            return None
        return self.finish(db, self.apply(db, ops))

    # --- a batch in two steps, possibly on two threads ------------------------------

    def begin_nowait(self) -> sqlite3.Connection | None:
        """Take the store and ``BEGIN IMMEDIATE`` without waiting, for :meth:`apply` then
        :meth:`finish`; ``None``, nothing taken, when another thread holds the store or
        another connection the database's write lock. The store stays taken until
        :meth:`finish`, which may run on another thread (the writer applies a batch on
        the event loop and commits it on its thread: see :mod:`.ledger_writer`)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            db = self._open_db()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                if _busy(exc):
                    self._lock.release()
                    return None
                raise LedgerError(f"{self.path}: {exc}") from None
        except BaseException:
            self._lock.release()  # held here: the busy path returned above
            raise
        return db

    def apply(self, db: sqlite3.Connection, ops: Sequence[Op]) -> list[Result]:
        """The ops of a batch in the transaction :meth:`begin_nowait` opened, not yet
        committed (as :meth:`run_batch` runs them). On a failure that ends the
        transaction it is rolled back, the store released and :class:`LedgerError` raised."""
        try:
            return self._apply(db, ops)
        except BaseException:
            self._lock.release()
            raise

    def finish(self, db: sqlite3.Connection, results: list[Result]) -> list[Result]:
        """COMMIT what :meth:`apply` did and release the store; ``results`` are then
        durable. A failed COMMIT rolls back, releases and raises :class:`LedgerError`."""
        try:
            self._commit_open(db)
        finally:
            self._lock.release()
        return results

    def _batch(self, db: sqlite3.Connection, ops: Sequence[Op]) -> list[Result]:
        """The body of a batch, inside the transaction just begun (the lock held)."""
        results = self._apply(db, ops)
        self._commit_open(db)
        return results

    def _apply(self, db: sqlite3.Connection, ops: Sequence[Op]) -> list[Result]:
        with self._rolled_back_on_error(db):
            if len(ops) == 1:  # alone: the transaction is its savepoint
                try:
                    return [(True, ops[0](db))]
                except Exception as exc:
                    self._rollback(db)
                    return [(False, self._op_error(exc))]
            return self._optimistic(db, ops)

    def _commit_open(self, db: sqlite3.Connection) -> None:
        """COMMIT, unless the batch's only write failed and rolled the transaction back."""
        if not db.in_transaction:
            return
        with self._rolled_back_on_error(db):
            self._commit(db)

    def _optimistic(self, db: sqlite3.Connection, ops: Sequence[Op]) -> list[Result]:
        """Run the ops of a batch, each as if in its own savepoint, at the cost of one.

        The ops first run together inside ONE savepoint for the whole batch, the ledger's
        writes set-wise (:func:`.ledger_ops.apply_all`: a few statements for the whole
        batch; a refused reservation changes nothing, so it needs no savepoint). If that
        succeeds, it is exactly what one savepoint per op would have left. If a statement
        or an op raises, everything since the batch savepoint is rolled back and the batch
        runs again with a savepoint per op (:meth:`_savepoint`), each op alone, so a failed
        write is rolled back alone. An op may therefore run twice, the first run undone:
        ops are functions of the database only (no other side effect)."""
        db.execute("SAVEPOINT batch")
        try:
            results = apply_all(db, ops)
        except Exception as exc:
            if not db.in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error).
                raise LedgerError(f"{self.path}: the transaction was rolled back ({exc})") from None
            db.execute("ROLLBACK TO batch")
            results = [self._savepoint(db, op) for op in ops]
        db.execute("RELEASE batch")
        return results

    def _savepoint(self, db: sqlite3.Connection, op: Op) -> Result:
        db.execute("SAVEPOINT op")
        try:
            value = op(db)
        except Exception as exc:
            if not db.in_transaction:
                # SQLite rolled the whole transaction back (disk full, I/O error): the
                # ops before this one are gone too, so the batch fails as a whole.
                raise LedgerError(f"{self.path}: the transaction was rolled back ({exc})") from None
            db.execute("ROLLBACK TO op")
            db.execute("RELEASE op")
            return (False, self._op_error(exc))
        db.execute("RELEASE op")
        return (True, value)

    def _op_error(self, exc: Exception) -> Exception:
        if isinstance(exc, sqlite3.Error):
            return LedgerError(f"{self.path}: {exc}")
        return exc

    def _one(self, op: Op) -> Any:
        ((ok, value),) = self.run_batch([op])
        if not ok:
            raise value
        return value

    # --- writes, one transaction each ------------------------------------------------

    def reserve(self, items: Sequence[Item], caps: Caps, *, now: datetime, lease_s: float) -> None:
        """Reserve every item or none (:class:`.ledger_ops.Reserve`); raises
        :class:`CapExceeded` naming the scopes that would go over their cap."""
        self._one(ops_.Reserve(items, caps, now, lease_s))

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
        """Record what an attempt cost, idempotently (:class:`.ledger_ops.Settle`)."""
        return bool(
            self._one(
                ops_.Settle(entry_id, cost_micro, now, input_tokens, output_tokens, error_class)
            )
        )

    def mark_unknown(self, entry_id: str, *, now: datetime, error_class: str | None = None) -> bool:
        """Sent but no usage came back: keep the reservation charged as ``unknown``."""
        return bool(self._one(ops_.MarkUnknown(entry_id, now, error_class)))

    def release(self, entry_id: str, *, now: datetime, error_class: str | None = None) -> bool:
        """Nothing was sent: give the reservation back. Only a ``reserved`` entry."""
        return bool(self._one(ops_.Release(entry_id, now, error_class)))

    def rebuild_totals(self, months: Sequence[str] | None = None) -> list[sql.TotalsChange]:
        """Rebuild the totals rows of ``months`` (all: None) from the entries, in one write
        transaction (:func:`.ledger_sql.rebuild_totals`); raises
        :class:`.ledger_sql.RepairRefused`, nothing changed, when the entries themselves
        are damaged."""
        with self.transaction() as db:
            return sql.rebuild_totals(db, months)

    def expire_leases(self, now: datetime) -> int:
        """Turn expired reservations into ``unknown`` (:class:`.ledger_ops.ExpireLeases`);
        returns how many.

        One write for all of them; if that fails (a damaged totals row of some month
        breaks a CHECK), each entry is tried in its own savepoint so that the others are
        still expired, and the ones that could not be are listed in ``unexpired`` (they
        stay reserved: charged in full; ``llmgw spend --repair`` mends their totals)."""
        self.unexpired = []
        try:
            return int(self._one(ops_.ExpireLeases(now)))
        except LedgerError:
            pass
        ids = [i for (i,) in self._read(ops_.EXPIRED_SQL, (now.timestamp(),))]
        results = self.run_batch([ops_.MarkUnknown(i, now, "lease_expired") for i in ids])
        pairs = zip(ids, results, strict=True)
        self.unexpired = [f"{i}: {value}" for i, (ok, value) in pairs if not ok]
        return sum(1 for ok, value in results if ok and value)

    # --- reads -----------------------------------------------------------------------

    def _reading(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with self._lock:
            db = self._open_db()
            return self._retrying(lambda: fn(db))

    def _read(self, query: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._reading(lambda db: db.execute(query, params).fetchall())

    def month_audit(self, month: str) -> sql.Audit:
        """``month``'s totals against its entries, read in one snapshot
        (:func:`.ledger_sql.month_audit`)."""

        def read(db: sqlite3.Connection) -> sql.Audit:
            db.execute("BEGIN")
            try:
                return sql.month_audit(db, month)
            finally:
                self._rollback(db)

        return self._reading(read)

    def scopes(self, month: str) -> dict[str, ScopeUse]:
        """Every scope with activity in ``month``."""
        return self._reading(lambda db: sql.scopes(db, month))

    def breakdown(self, month: str) -> list[dict[str, Any]]:
        """Sums per (provider, model, task class, state) for ``month``."""
        return self._reading(lambda db: sql.breakdown(db, month))

    def snapshot(self, month: str) -> tuple[dict[str, ScopeUse], list[dict[str, Any]]]:
        """:meth:`scopes` and :meth:`breakdown` of ``month`` read in one snapshot, so a
        report's totals and its breakdowns agree while other processes write."""
        return self._reading(lambda db: _snapshot(db, month))

    def entry(self, entry_id: str) -> dict[str, Any] | None:
        """One entry as a dict (tests, debugging)."""

        def one(db: sqlite3.Connection) -> dict[str, Any] | None:
            cur = db.execute("SELECT * FROM entries WHERE id = ?", (entry_id,))
            row = cur.fetchone()
            if row is None:
                return None
            return {d[0]: v for d, v in zip(cur.description, row, strict=True)}

        return self._reading(one)

    def count(self, state: str) -> int:
        """Entries in ``state`` (tests, reports). Only ``reserved`` is indexed: any other
        state reads the whole table, so keep this off the hot path."""
        return int(self._read("SELECT COUNT(*) FROM entries WHERE state = ?", (state,))[0][0])

    def integrity_check(self) -> str:
        return str(self._read("PRAGMA integrity_check")[0][0])


class LedgerReader:
    """A ledger file opened read-only (``mode=ro``): no schema, no index rebuilt, nothing
    written, so a copy kept aside, or a file on a read-only mount, can be read and
    checked as it is. Every failure is a :class:`LedgerError`."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        try:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout_s,
                isolation_level=None,
            )
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot open {self.path} to read: {exc}") from None

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            return fn(self._db)
        except sqlite3.Error as exc:
            raise LedgerError(f"cannot read {self.path}: {exc}") from None

    def scopes(self, month: str) -> dict[str, ScopeUse]:
        """Every scope with activity in ``month``."""
        return self._run(lambda db: sql.scopes(db, month))

    def quick_check(self) -> str:
        """SQLite's ``PRAGMA quick_check``: ``"ok"``, or its first problem."""
        return str(self._run(lambda db: db.execute("PRAGMA quick_check").fetchone()[0]))

    def breakdown(self, month: str) -> list[dict[str, Any]]:
        """Sums per (provider, model, task class, state) for ``month``."""
        return self._run(lambda db: sql.breakdown(db, month))

    def snapshot(self, month: str) -> tuple[dict[str, ScopeUse], list[dict[str, Any]]]:
        """As :meth:`LedgerStore.snapshot`."""
        return self._run(lambda db: _snapshot(db, month))

    def audit(self, now: datetime) -> sql.Audit:
        """The ledger checked against itself (:func:`.ledger_sql.audit`)."""
        return self._run(lambda db: sql.audit(db, now.timestamp()))

    def backup(self, dest: Path) -> None:
        """Copy the ledger as one consistent snapshot to ``dest``, a new file (SQLite's
        online backup: safe while gateways write). A failed copy leaves no file behind."""
        dest = Path(dest)
        try:
            dest.touch(exist_ok=False)  # claimed: an existing file is never written over
        except OSError as exc:
            raise LedgerError(f"cannot create {dest}: {exc}") from None
        try:
            target = sqlite3.connect(dest)
        except sqlite3.Error as exc:
            dest.unlink(missing_ok=True)
            raise LedgerError(f"cannot create {dest}: {exc}") from None
        try:
            self._db.backup(target)
        except BaseException as exc:
            target.close()
            dest.unlink(missing_ok=True)
            if isinstance(exc, sqlite3.Error):
                raise LedgerError(f"cannot copy {self.path} to {dest}: {exc}") from None
            raise
        target.close()

    def close(self) -> None:
        self._db.close()


def _snapshot(
    db: sqlite3.Connection, month: str
) -> tuple[dict[str, ScopeUse], list[dict[str, Any]]]:
    db.execute("BEGIN")  # deferred: one read snapshot (WAL) for both statements
    try:
        return sql.scopes(db, month), sql.breakdown(db, month)
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
