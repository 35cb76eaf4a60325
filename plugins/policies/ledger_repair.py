"""``llmgw spend --repair``: rebuild a damaged ledger's totals from its entries.

Caps are checked against the ``totals`` rows, which the ledger keeps by increments; a row
changed or deleted by hand (or by a tool that ignored the CHECKs) stays wrong, and lets
spend through or refuses it wrongly, until it is repaired. ``llmgw spend --check`` finds
such damage; this mends it:

1. check the ledger read-only (:func:`.ledger_sql.audit`); a clean ledger is left as it
   is, not a byte written;
2. refuse, writing nothing, when the damage is below the totals: ``integrity_check``
   fails (pages or indexes: restore a backup, or SQLite's ``.recover``) or an entry
   breaks the rules of its table (:data:`.ledger_sql.ENTRY_RULES`; the entries are what
   the totals are rebuilt from);
3. copy the file aside first (SQLite's online backup, one consistent snapshot) to
   ``<ledger>.bak-<UTC time>`` beside it;
4. rebuild the totals rows of the damaged months from their entries in one
   ``BEGIN IMMEDIATE`` transaction (:func:`.ledger_sql.rebuild_totals`). Gateways
   sharing the file may go on running: they read the totals afresh in every transaction
   and wait for the lock meanwhile, up to ``ledger.busy_timeout_s`` (5 s by default; the
   sums take about 1.5 s per million entries of those months on two cores, so for a
   ledger that large stop the gateways first);
5. check again, and report each row changed.

The backup is the ledger as it was before the repair. Restoring it also takes back
every write made since, so it is an undo only while no gateway has written.

Open reservations past their lease are left to the next gateway start, which turns them
``unknown`` (still charged), as always.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from llmgw.kernel import Settings

from .ledger_report import BELOW_TOTALS, check_dict, ledger_of
from .ledger_sql import TOTALS_FIELDS, RepairRefused, TotalsChange, counted, usd_text
from .ledger_store import LedgerError, LedgerReader, LedgerStore


def backup_path(path: Path, at: datetime) -> Path:
    """``<ledger>.bak-<UTC time>`` beside the ledger, numbered if that name is taken."""
    stem = f"{path.name}.bak-{at.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    candidate = path.with_name(stem)
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{stem}-{n}")
        n += 1
    return candidate


def repair_ledger(settings: Settings, *, now: datetime | None = None) -> dict[str, Any]:
    """Repair the ledger the config points at; what was done, as a dict.

    ``state`` is ``absent`` (no file: nothing to do), ``clean`` (nothing wrong, nothing
    written), ``repaired`` (see ``changes``, ``backup`` and ``check``, the check after
    the repair), ``refused`` (damage the repair cannot mend, see ``problems``; nothing
    written) or ``failed`` (the file could not be read or written, see ``error``; the
    transaction rolled back). Raises :class:`llmgw.kernel.ConfigError` for an invalid
    ``ledger`` section.
    """
    config, _caps, _origin, path = ledger_of(settings)
    at = now or datetime.now(UTC)
    result: dict[str, Any] = {
        "path": str(path),
        "state": "absent",
        "backup": None,
        "changes": [],
        "problems": [],
        "error": None,
        "check": None,
    }
    if not path.exists():
        return result
    try:
        reader = LedgerReader(path, busy_timeout_s=config.busy_timeout_s)
        try:
            before = reader.audit(at)
            if before.ok:
                result["state"] = "clean"
                result["check"] = check_dict(before)
                return result
            below = [p for p in before.problems if p.startswith(BELOW_TOTALS)]
            if below:
                result["state"] = "refused"
                result["problems"] = below
                return result
            backup = backup_path(path, at)
            reader.backup(backup)
            result["backup"] = str(backup)
        finally:
            reader.close()
        store = LedgerStore(path, busy_timeout_s=config.busy_timeout_s)
        try:
            store.open()
            changes = store.rebuild_totals(sorted(before.damaged_months))
        finally:
            store.close()
    except RepairRefused as exc:
        result["state"] = "refused"
        result["problems"] = [str(exc)]
        return result
    except LedgerError as exc:
        result["state"] = "failed"
        result["error"] = str(exc)
        return result
    # Committed: from here on the result is "repaired", whatever the check after it says.
    result["state"] = "repaired"
    result["changes"] = [_change_dict(c) for c in changes]
    try:
        after_reader = LedgerReader(path, busy_timeout_s=config.busy_timeout_s)
        try:
            result["check"] = check_dict(after_reader.audit(at))
        finally:
            after_reader.close()
    except LedgerError as exc:
        result["check"] = check_dict(None, error=str(exc))
    return result


def repaired_ok(result: dict[str, Any]) -> bool:
    """Whether the ledger is sound now (nothing to do, or repaired and checked clean)."""
    if result["state"] in ("absent", "clean"):
        return True
    return result["state"] == "repaired" and bool(result["check"] and result["check"]["ok"])


def _change_dict(change: TotalsChange) -> dict[str, Any]:
    before = change.before
    return {
        "month": change.month,
        "scope": change.scope,
        "before": None if before is None else dict(zip(TOTALS_FIELDS, before, strict=True)),
        "after": dict(zip(TOTALS_FIELDS, change.after, strict=True)),
        "cap_before": change.cap_before,
        "cap_after": change.cap_after,
    }


def _change_lines(change: dict[str, Any]) -> list[str]:
    where = f"  {change['month']} {change['scope']}:"
    after = change["after"]
    before = change["before"]
    lines: list[str] = []
    if before is None:
        sums = ", ".join(f"{k} {usd_text(v)}" for k, v in after.items() if v)
        lines.append(f"{where} totals row created ({sums})")
    else:
        lines += [
            f"{where} {k} {usd_text(before[k])} -> {usd_text(after[k])}"
            for k in TOTALS_FIELDS
            if type(before[k]) is not int or before[k] != after[k]
        ]
    cap = change["cap_before"]
    if cap is not None and change["cap_after"] is None:
        why = (
            f"its entries count {usd_text(counted(list(after.values())))} against it"
            if type(cap) is int and cap >= 0
            else "it is not an amount"
        )
        lines.append(
            f"{where} the cap recorded with it ({usd_text(cap)}) is cleared: {why}. New "
            "reservations are still checked against the configured cap (the first that "
            "fits records it again)"
        )
    return lines


def format_repair(result: dict[str, Any]) -> str:
    """The result of :func:`repair_ledger` as text for a terminal."""
    path = result["path"]
    state = result["state"]
    if state == "absent":
        return f"ledger repair: {path}: no ledger file yet, nothing to repair"
    if state == "clean":
        return f"ledger repair: {path}: nothing to repair (every scope's totals match its entries)"
    copy = (
        [f"the backup made before it is not needed and can be deleted: {result['backup']}"]
        if result["backup"]
        else []
    )
    if state == "failed":
        failed = f"ledger repair: {path}: FAILED, the ledger was not changed ({result['error']})"
        return "\n".join([failed, *copy])
    if state == "refused":
        return "\n".join(
            [
                f"ledger repair: {path}: REFUSED, the ledger was not changed. The damage is "
                "below the totals, so they cannot be rebuilt from the entries:",
                *[f"  {p}" for p in result["problems"]],
                "Stop the gateways that use this file, keep a copy of it, and restore a "
                "backup (or recover the file with sqlite3's .recover).",
                *copy,
            ]
        )
    lines = [
        f"ledger repair: {path}: {len(result['changes'])} totals row(s) rebuilt from the entries",
        f"backup of the ledger as it was: {result['backup']}",
    ]
    for change in result["changes"]:
        lines += _change_lines(change)
    check = result["check"]
    if check and check["ok"]:
        lines.append(f"ledger check after the repair: OK ({check['entries']:,} entries)")
    elif check and check["error"]:
        lines.append(f"ledger check after the repair: could not read the ledger ({check['error']})")
    else:
        problems = check["problems"] if check else []
        lines.append(f"ledger check after the repair: {len(problems)} PROBLEM(S) remain")
        lines += [f"  {p}" for p in problems]
    lines.append(
        "To undo: stop the gateways that use this file, copy the backup over it and delete "
        "its -wal and -shm files. That also takes back every write made since the backup: "
        "an undo only while no gateway has written."
    )
    return "\n".join(lines)
