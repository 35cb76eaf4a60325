"""Ledger throughput: reserve + settle cycles on one SQLite file, from 1 or N processes.

Each process drives :class:`LedgerStore` directly (the ledger plugin's store: WAL,
``synchronous=FULL``, one ``BEGIN IMMEDIATE`` per write) with a total and a provider cap
set, so every reservation checks both. The runner then checks the cap invariant:
per scope ``settled + reserved + unknown <= cap`` and the totals equal the entries.

``python -m bench.ledger_bench run PATH START END TOTAL_CAP PROVIDER_CAP [settle]``
prints one JSON line: cycles, refusals, per-cycle latency percentiles.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from llmgw.plugins.policies.ledger_store import (
    TOTAL,
    CapExceeded,
    Caps,
    Item,
    LedgerStore,
    month_of,
    provider_scope,
)

AMOUNT_MICRO = 1_000  # $0.001 worst case per reservation
PROVIDER = "openai"


def _caps(total: int, provider: int) -> Caps:
    return Caps(total=total, providers={PROVIDER: provider})


def run(
    path: str, start: float, end: float, total_cap: int, provider_cap: int, settle: bool
) -> dict[str, Any]:
    store = LedgerStore(path)
    store.open()
    caps = _caps(total_cap, provider_cap)
    rng = random.Random(os.getpid())
    cycles = refused = 0
    lat: list[float] = []
    while time.time() < start:
        time.sleep(0.0005)
    while time.time() < end:
        t0 = time.perf_counter()
        now = datetime.now(UTC)
        item = Item(
            id=uuid.uuid4().hex,
            provider=PROVIDER,
            model="gpt-4o-mini",
            task_class="quick_answer",
            request_id=uuid.uuid4().hex,
            amount_micro=AMOUNT_MICRO,
        )
        try:
            store.reserve([item], caps, now=now, lease_s=600)
        except CapExceeded:
            refused += 1
            if not settle:
                break  # the cap-race phase: stop at the first refusal
            continue
        if settle:
            # The upstream bills 20-100 % of the worst case.
            cost = rng.randint(AMOUNT_MICRO // 5, AMOUNT_MICRO)
            store.settle(item.id, cost_micro=cost, now=now, input_tokens=10, output_tokens=5)
        cycles += 1
        lat.append((time.perf_counter() - t0) * 1000)
    store.close()
    lat.sort()

    def pct(q: float) -> float | None:
        return lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None

    return {"cycles": cycles, "refused": refused, "p50_ms": pct(0.5), "p99_ms": pct(0.99)}


def check_invariant(path: str) -> dict[str, Any]:
    """Per scope: used <= cap; totals equal the entries; nothing left reserved; integrity."""
    store = LedgerStore(path)
    store.open()
    month = month_of(datetime.now(UTC))
    problems: list[str] = []
    scopes = store.scopes(month)
    for name, use in scopes.items():
        if use.cap_micro is not None and use.used_micro - use.overage_micro > use.cap_micro:
            problems.append(f"{name}: used {use.used_micro} > cap {use.cap_micro}")
    rows = store._read(
        "SELECT state, COUNT(*), SUM(reserved_micro), SUM(COALESCE(cost_micro, 0)) "
        "FROM entries WHERE month = ? GROUP BY state",
        (month,),
    )
    by_state = {r[0]: (r[1], r[2] or 0, r[3] or 0) for r in rows}
    settled = by_state.get("settled", (0, 0, 0))[2]
    reserved = by_state.get("reserved", (0, 0, 0))[1]
    for scope in (TOTAL, provider_scope(PROVIDER)):
        row = scopes.get(scope)
        if row is None:
            problems.append(f"{scope}: no totals row")
            continue
        if row.settled_micro != settled or row.reserved_micro != reserved:
            problems.append(
                f"{scope}: totals settled {row.settled_micro}/reserved {row.reserved_micro} "
                f"!= entries {settled}/{reserved}"
            )
    integrity = store.integrity_check()
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    total = scopes.get(TOTAL)
    out = {
        "ok": not problems,
        "problems": problems,
        "entries": sum(v[0] for v in by_state.values()),
        "open_reservations": by_state.get("reserved", (0, 0, 0))[0],
        "used_micro": total.used_micro if total else 0,
        "cap_micro": total.cap_micro if total else None,
        "overshoot_micro": max(0, (total.used_micro - total.overage_micro) - (total.cap_micro or 0))
        if total and total.cap_micro is not None
        else 0,
    }
    store.close()
    return out


def prepare(path: str) -> None:
    """Create the file and schema before the timed processes start."""
    store = LedgerStore(path)
    store.open()
    store.close()


def main(argv: list[str]) -> int:
    if argv[0] == "run":
        path, start, end, total, provider = argv[1:6]
        settle = len(argv) < 7 or argv[6] != "nosettle"
        out = run(path, float(start), float(end), int(total), int(provider), settle)
        sys.stdout.write(json.dumps(out) + "\n")
        return 0
    raise SystemExit(f"unknown command {argv[0]!r}")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
