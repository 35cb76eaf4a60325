"""What a ledger refusal says: the scope, its cap and where it was set, the headroom, the fix.

Never upstream text, never a key: only figures the ledger holds and names from the config.
"""

from __future__ import annotations

from llmgw.kernel import Call, CallRefused, ErrorClass

from .ledger_config import LEDGER_ENV, TOTAL_CAP_ENV, env_name
from .ledger_store import TOTAL, Breach, CapExceeded, Caps

MICRO = 1_000_000


def usd(micro: int) -> str:
    # Micro-dollars in full: a refusal near a cap must not print a headroom equal to what
    # it refuses (rounded to $0.0001, $0.000142 and $0.000145 both read $0.0001).
    return f"${micro / MICRO:.6f}"


def scope_label(scope: str, caps: Caps, origin: dict[str, str]) -> str:
    """``total monthly cap ($5.0000, LLM_GATEWAY_CAP_TOTAL_MONTHLY)`` and the like."""
    cap = caps.for_scope(scope)
    if scope == TOTAL:
        name = "total monthly cap"
    else:
        name = f"monthly cap of provider {scope.removeprefix('provider:')!r}"
    return f"{name} ({usd(cap or 0)}, {origin.get(scope, '')})"


def _breach_text(b: Breach, caps: Caps, origin: dict[str, str]) -> str:
    u = b.use
    return (
        f"{scope_label(u.scope, caps, origin)}: used {usd(u.used_micro)} (settled "
        f"{usd(u.settled_micro)}, reserved in flight or held ahead {usd(u.reserved_micro)}, "
        f"unknown {usd(u.unknown_micro)}), headroom {usd(b.headroom_micro)}, this needs up to "
        f"{usd(b.needed_micro)}"
    )


def cap_message(exc: CapExceeded, call: Call, caps: Caps, origin: dict[str, str]) -> str:
    """The refusal of a reservation that would put one or more scopes over their cap."""
    what = (
        f"panel {call.task_class!r}"
        if call.is_panel
        else (call.target.key if call.target else call.task_class)
    )
    parts = [_breach_text(b, caps, origin) for b in exc.breaches]
    names = [
        TOTAL_CAP_ENV if b.use.scope == TOTAL else env_name(b.use.scope.removeprefix("provider:"))
        for b in exc.breaches
    ]
    # The kernel adds "nothing was sent" to a panel's refusal itself.
    sent = "" if call.is_panel else "; nothing was sent"
    return (
        f"{what} would exceed the " + "; and the ".join(parts) + f"{sent}. Fix: lower "
        f"max_tokens, wait for next month (UTC), or raise the cap ({', '.join(names)} or "
        "ledger.caps); what other gateways on this ledger hold ahead is given back when "
        "they go idle (ledger.hold_idle_s)"
    )


def ledger_failed(error: str, caps: Caps, origin: dict[str, str]) -> CallRefused:
    """Fail closed: the ledger cannot record spend, so no call goes out."""
    if caps.any:
        held = ", ".join(scope_label(s, caps, origin) for s in sorted(origin))
        tail = f"caps in force: {held}; headroom unknown while the ledger cannot be read"
    else:
        tail = f"no cap is set: {LEDGER_ENV}=0 runs without a ledger"
    return CallRefused(
        ErrorClass.BUDGET_EXCEEDED,
        f"the spend ledger failed ({error}); calls are refused until it can record "
        f"spend (fail closed); {tail}",
        fallback=False,
    )


def totals_damaged(
    problems: list[str], caps: Caps, origin: dict[str, str], recheck_s: float
) -> CallRefused:
    """Fail closed: the totals the caps are checked against are not what the entries add
    up to (a hand edit, a restored file), so a cap could let spend through."""
    more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
    held = ", ".join(scope_label(s, caps, origin) for s in sorted(origin))
    return CallRefused(
        ErrorClass.BUDGET_EXCEEDED,
        f"the spend ledger's totals do not match its entries ({problems[0]}{more}), so the "
        f"caps in force ({held}) cannot be enforced against them; calls are refused until "
        "it is repaired (fail closed). Fix: run `llmgw spend --repair` (it says so if the "
        f"damage is in the entries themselves); calls resume within {recheck_s:g} s of it",
        fallback=False,
    )
