"""Month-to-date spend from the ledger: by provider, model and task class, against caps.

Used by ``llmgw spend`` (through :func:`spend_report`, no gateway needed) and by the
ledger plugin's ``report_info`` in ``llm_routing_info``. Months are UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from llmgw.kernel import Settings
from llmgw.kernel.config import pydantic_errors

from .ledger_config import LedgerConfig, ledger_enabled, ledger_path, resolve_caps
from .ledger_sql import HOLD_MODEL, Audit
from .ledger_store import (
    TOTAL,
    Caps,
    LedgerError,
    LedgerReader,
    LedgerStore,
    ScopeUse,
    month_of,
)

MICRO = 1_000_000
#: Problems of :func:`.ledger_sql.audit` that rebuilding the totals cannot mend: the
#: file's pages or indexes, or the entries the totals are rebuilt from.
BELOW_TOTALS = ("integrity_check:", "entries:")


def _usd(micro: int | None) -> float | None:
    return None if micro is None else micro / MICRO


def _holding(row: dict[str, Any]) -> bool:
    """A hold's row, not given back with an attempt's amount left in it (those are
    charged, as attempts are)."""
    return row["model"] == HOLD_MODEL and not row["stranded"]


def _scope_dict(
    use: ScopeUse, cap: int | None, source: str | None, held: int = 0
) -> dict[str, Any]:
    """One scope's figures. ``reserved_usd`` is what attempts out now hold, ``held_usd``
    what holds keep ahead for the next ones; both count against the cap."""
    return {
        "settled_usd": _usd(use.settled_micro),
        "unknown_usd": _usd(use.unknown_micro),
        "reserved_usd": _usd(max(0, use.reserved_micro - held)),
        "held_usd": _usd(held),
        "committed_usd": _usd(use.used_micro),
        "overage_usd": _usd(use.overage_micro),
        "cap_usd": _usd(cap),
        "cap_source": source,
        "headroom_usd": None if cap is None else _usd(max(0, cap - use.used_micro)),
    }


class SpendSource(Protocol):
    """What a report reads: a :class:`LedgerStore`, or a read-only :class:`LedgerReader`."""

    def scopes(self, month: str) -> dict[str, ScopeUse]: ...

    def breakdown(self, month: str) -> list[dict[str, Any]]: ...

    def snapshot(self, month: str) -> tuple[dict[str, ScopeUse], list[dict[str, Any]]]: ...


def build_report(
    store: SpendSource | None,
    caps: Caps,
    origin: dict[str, str],
    *,
    month: str,
    path: str,
    enabled: bool,
    error: str | None = None,
) -> dict[str, Any]:
    """The spend report of ``month`` from an open store (or an empty one if None)."""
    scopes, rows = store.snapshot(month) if store is not None else ({}, [])
    total = scopes.get(TOTAL, ScopeUse(TOTAL))
    held: dict[str, int] = {}
    for r in rows:
        if _holding(r) and r["state"] == "reserved":
            held[r["provider"]] = held.get(r["provider"], 0) + (r["micro"] or 0)
    providers: dict[str, Any] = {}
    names = {s.removeprefix("provider:") for s in scopes if s != TOTAL} | set(caps.providers)
    for name in sorted(names):
        scope = f"provider:{name}"
        providers[name] = _scope_dict(
            scopes.get(scope, ScopeUse(scope)),
            caps.providers.get(name),
            origin.get(scope),
            held.get(name, 0),
        )
    by_model: dict[str, dict[str, Any]] = {}
    by_class: dict[str, dict[str, Any]] = {}
    unpriced = 0
    for r in rows:
        if _holding(r) and r["state"] != "unknown":
            # Not attempts: what holds keep is in held_usd, what they gave back is nothing.
            # A hold whose lease ran out (its process died), or one given back with an
            # attempt's amount left in it, stays listed: it is charged.
            continue
        unpriced += r["unpriced"] or 0
        for key, table in (
            (f"{r['provider']}/{r['model']}", by_model),
            (r["task_class"], by_class),
        ):
            slot = table.setdefault(
                key,
                {
                    "settled_usd": 0.0,
                    "unknown_usd": 0.0,
                    "reserved_usd": 0.0,
                    "attempts": 0,
                    "released": 0,
                },
            )
            if r["state"] == "released":
                slot["released"] += r["count"]
            else:
                slot[f"{r['state']}_usd"] += (r["micro"] or 0) / MICRO
            slot["attempts"] += r["count"]
    return {
        "enabled": enabled,
        "path": path,
        "month": month,
        "error": error,
        "total": _scope_dict(total, caps.total, origin.get(TOTAL), sum(held.values())),
        "providers": providers,
        "by_model": by_model,
        "by_task_class": by_class,
        "unpriced_attempts": unpriced,
    }


def ledger_of(settings: Settings) -> tuple[LedgerConfig, Caps, dict[str, str], Path]:
    """The ``ledger`` section, the caps (with where each is set) and the file's path, as
    the plugin would use them. Raises :class:`llmgw.kernel.ConfigError` for an invalid
    section or cap variable."""
    try:
        config = LedgerConfig.model_validate(
            settings.section("ledger") or {}, context={"settings": settings}
        )
    except ValidationError as exc:
        raise pydantic_errors(
            exc, file=settings.file_label, prefix="ledger", plugin="ledger"
        ) from None
    caps, origin = resolve_caps(settings, config)
    return config, caps, origin, ledger_path(settings, config)


def spend_report(
    settings: Settings, *, now: datetime | None = None, check: bool = False
) -> dict[str, Any]:
    """Month-to-date spend for ``llmgw spend``: reads the ledger the config points at.

    Never creates a ledger: with no file yet the report is all zeros. It reads the file
    as it is: in a process that also runs a gateway, ``await`` its ledger plugin's
    ``flush()`` first, or the settles still queued there are not counted yet (their
    reservations are, at the worst case). Raises
    :class:`llmgw.kernel.ConfigError` for an invalid ``ledger`` section or cap variable.

    ``check``: also check the whole ledger against itself (``report["check"]``, see
    :func:`.ledger_sql.audit`): ``ok`` is False when it is damaged or cannot be read.
    """
    config, caps, origin, path = ledger_of(settings)
    at = now or datetime.now(UTC)
    month = month_of(at)
    enabled = ledger_enabled(settings.env)
    if not path.exists():
        report = build_report(None, caps, origin, month=month, path=str(path), enabled=enabled)
        if check:
            report["check"] = check_dict(None, note="no ledger file yet")
        return report
    if check:
        # Read-only from the start: no schema, no index rebuilt, nothing written.
        return _checked_report(path, config, caps, origin, month=month, at=at, enabled=enabled)
    store = LedgerStore(path, busy_timeout_s=config.busy_timeout_s)
    try:
        store.open()
        report = build_report(store, caps, origin, month=month, path=str(path), enabled=enabled)
        # The check a gateway makes as it opens the ledger (this month only).
        report["totals_damage"] = store.month_audit(month).problems
        return report
    except LedgerError as exc:
        return build_report(
            None, caps, origin, month=month, path=str(path), enabled=enabled, error=str(exc)
        )
    finally:
        store.close()


def _checked_report(
    path: Path,
    config: LedgerConfig,
    caps: Caps,
    origin: dict[str, str],
    *,
    month: str,
    at: datetime,
    enabled: bool,
) -> dict[str, Any]:
    reader: LedgerReader | None = None
    try:
        reader = LedgerReader(path, busy_timeout_s=config.busy_timeout_s)
        found = reader.audit(at)
        report = build_report(reader, caps, origin, month=month, path=str(path), enabled=enabled)
        report["check"] = check_dict(found)
    except LedgerError as exc:
        report = build_report(
            None, caps, origin, month=month, path=str(path), enabled=enabled, error=str(exc)
        )
        report["check"] = check_dict(None, error=str(exc))
    finally:
        if reader is not None:
            reader.close()
    return report


def check_dict(
    found: Audit | None, *, note: str | None = None, error: str | None = None
) -> dict[str, Any]:
    """``checked``: the ledger was read whole; ``ok``: nothing wrong was found and, when it
    could not be read (``error``), False: damage is not ruled out."""
    if found is None:
        return {
            "checked": False,
            "ok": error is None,
            "error": error,
            "entries": 0,
            "months": [],
            "problems": [],
            "notes": [note] if note else [],
        }
    return {
        "checked": True,
        "ok": found.ok,
        "error": None,
        "entries": found.entries,
        "months": found.months,
        "problems": found.problems,
        "notes": found.notes,
    }


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:,.6f}"


def format_spend(report: dict[str, Any]) -> str:
    """The report as a short text table for a terminal."""
    lines = [
        f"spend ledger: {report['path']}" + ("" if report["enabled"] else "  (ledger is OFF)"),
        f"month (UTC): {report['month']}",
    ]
    if report.get("error"):
        lines.append(f"error: {report['error']}")
    head = f"{'scope':<24}{'settled':>12}{'unknown':>12}{'reserved':>12}{'cap':>12}{'headroom':>12}"
    lines += ["", head, "-" * len(head)]
    scopes = [("total", report["total"])] + [
        (f"provider {n}", s) for n, s in report["providers"].items()
    ]
    for label, s in scopes:
        lines.append(
            f"{label:<24}{_money(s['settled_usd']):>12}{_money(s['unknown_usd']):>12}"
            f"{_money(s['reserved_usd']):>12}{_money(s['cap_usd']):>12}"
            f"{_money(s['headroom_usd']):>12}"
        )
        if s.get("held_usd"):
            lines.append(f"{'':<24}held ahead for the next attempts: {_money(s['held_usd'])}")
        if s.get("overage_usd"):
            lines.append(f"{'':<24}overage above reservations: {_money(s['overage_usd'])}")
    for title, table in (("model", report["by_model"]), ("task class", report["by_task_class"])):
        if not table:
            continue
        lines += [
            "",
            f"{'by ' + title:<32}{'settled':>12}{'unknown':>12}{'reserved':>12}{'attempts':>10}",
        ]
        for key, s in sorted(table.items()):
            lines.append(
                f"{key:<32}{_money(s['settled_usd']):>12}{_money(s['unknown_usd']):>12}"
                f"{_money(s['reserved_usd']):>12}{s['attempts']:>10}"
            )
    if report.get("unpriced_attempts"):
        lines.append(
            f"\n{report['unpriced_attempts']} attempt(s) had no known price "
            "(not counted in dollars)"
        )
    lines.append(
        "\nunknown = sent but no usage came back (timeout, reset, crash): "
        "charged at the reserved worst case"
    )
    if report["total"].get("held_usd"):
        lines.append(
            "held ahead = reserved by a running gateway for its next attempts (counted "
            "against the caps; given back when unused)"
        )
    if any(key.endswith(f"/{HOLD_MODEL}") for key in report["by_model"]):
        lines.append(
            f"{HOLD_MODEL} unknown or reserved = a hold a gateway never gave back in full (it "
            "stopped without shutting down, or an attempt's entry could not be written): it "
            "may cover attempts it sent, so it stays charged"
        )
    damage = report.get("totals_damage")
    if damage and report.get("check") is None:
        lines.append(f"\nWARNING: this month's totals do not match its entries ({len(damage)}):")
        lines += [f"  {p}" for p in damage]
        lines.append(
            "A gateway refuses calls while a damaged row is one a cap is checked against. Run "
            "`llmgw spend --repair` to rebuild them from the entries (`--check` checks every "
            "month)."
        )
    check = report.get("check")
    if check is not None:
        lines.append("")
        if not check["checked"]:
            lines.append(
                f"ledger check: could not read the ledger ({check['error']})"
                if check["error"]
                else "ledger check: nothing to check"
            )
        elif check["ok"]:
            lines.append(
                f"ledger check: OK ({check['entries']:,} entries in {len(check['months'])} "
                "month(s); every scope's totals match its entries; integrity_check ok)"
            )
        else:
            lines.append(f"ledger check: {len(check['problems'])} PROBLEM(S)")
            lines += [f"  {p}" for p in check["problems"]]
            lines.append(
                "Caps are checked against the totals, so a wrong total lets spend through "
                "or refuses it wrongly."
            )
            if any(p.startswith(BELOW_TOTALS) for p in check["problems"]):
                lines.append(
                    "The damage is below the totals: stop the gateways that use this file, "
                    "keep a copy of it, and restore a backup (or recover the file with "
                    "sqlite3's .recover)."
                )
            else:
                lines.append(
                    "Run `llmgw spend --repair` to rebuild the totals from the entries (it "
                    "copies the file aside first; gateways may keep running)."
                )
        lines += [f"note: {n}" for n in check["notes"]]
    return "\n".join(lines)
