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
from pathlib import Path
from typing import Any

from llmgw.plugins.policies.ledger_store import (
    TOTAL,
    CapExceeded,
    Caps,
    Item,
    LedgerReader,
    LedgerStore,
    month_of,
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
    """The ledger's own check (:meth:`LedgerReader.audit`, as ``llmgw spend --check``:
    integrity, every total against its entries, every scope within its recorded cap), the
    number of entries, and how far the month's total went over its cap."""
    now = datetime.now(UTC)
    reader = LedgerReader(Path(path))
    try:
        found = reader.audit(now)
        total = reader.scopes(month_of(now)).get(TOTAL)
    finally:
        reader.close()
    overshoot = 0
    if total is not None and total.cap_micro is not None:
        overshoot = max(0, total.used_micro - total.overage_micro - total.cap_micro)
    return {
        "ok": found.ok,
        "problems": list(found.problems),
        "entries": found.entries,
        "overshoot_micro": overshoot,
    }


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
