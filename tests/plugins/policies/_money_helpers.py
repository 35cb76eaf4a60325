"""Shared helpers for the kill switch, cost and ledger tests (not a test module)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from llmgw.kernel import Disposition, Outcome, ProviderRequest, Request, Route, Target, hookimpl
from llmgw.kernel.testing import FakeProvider, flat_price
from llmgw.kernel.types import input_token_bound
from llmgw.plugins.policies.ledger_store import LedgerStore

#: $10 per million input tokens, $100 per million output tokens: 100 output tokens = $0.01.
PRICE = flat_price("10", "100")


def worst_micro(prompt: str, max_tokens: int, system: str | None = None) -> int:
    """The worst case the kernel computes for a one-message request at :data:`PRICE`."""
    from llmgw.kernel import Message

    return PRICE.worst_case_micro_usd(
        input_token_bound(system, [Message("user", prompt)]), max_tokens
    )


def fake(name: str = "fake", models: tuple[str, ...] = ("m1", "m2"), **kw: Any) -> FakeProvider:
    return FakeProvider(name=name, prices=dict.fromkeys(models, PRICE), **kw)


class Chain:
    """A ``resolve_route`` plugin: class ``chain`` goes to the given targets in order."""

    def __init__(self, *targets: Target) -> None:
        self.targets = targets

    @hookimpl
    def resolve_route(self, request: Request) -> Route | None:
        if request.task_class != "chain":
            return None
        return Route("chain", targets=self.targets)


class Advise:
    """An ``after_call`` plugin advising ``action`` after every failed attempt."""

    def __init__(self, action: str = "fallback") -> None:
        self.action = action

    @hookimpl
    def after_call(self, outcome: Outcome) -> Disposition | None:
        return None if outcome.ok else Disposition(self.action)  # type: ignore[arg-type]


class GatedProvider(FakeProvider):
    """A fake provider whose ``complete`` waits (so calls overlap or can be cancelled)."""

    def __init__(
        self,
        *args: Any,
        delay: Callable[[], float] | None = None,
        hang: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.delay = delay
        self.hang = hang
        self.entered = anyio.Event()

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.entered.set()
        if self.hang:
            await anyio.sleep_forever()
        if self.delay is not None:
            await anyio.sleep(self.delay())
        return await super().complete(request)


async def flush(gateway: Any) -> None:
    """Wait until the ledger has committed every write queued so far: ``after_call`` hands
    settles to the ledger's writer without waiting for them (the documented flush)."""
    for plugin in gateway.plugins:
        if plugin.name == "ledger":
            await plugin.obj.flush()


def store(path: Path) -> LedgerStore:
    s = LedgerStore(path)
    s.open()
    return s


def states(path: Path, *, holds: bool = False) -> dict[str, int]:
    """How many attempts' ledger entries (``holds``: holds' entries) are in each state."""
    found = {st: 0 for st in ("reserved", "settled", "unknown", "released")}
    for row in rows(path, holds=holds):
        found[row["state"]] += 1
    return found


def rows(path: Path, *, holds: bool = False) -> list[dict[str, Any]]:
    """The attempts' ledger entries in the order they were made (``holds``: the holds'
    entries instead: attempt 0, money reserved ahead for a provider's next attempts)."""
    import sqlite3

    db = sqlite3.connect(path)
    try:
        which = "attempt = 0" if holds else "attempt > 0"
        cur = db.execute(f"SELECT * FROM entries WHERE {which} ORDER BY created_at, rowid")  # noqa: S608
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        db.close()


def run_child(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``script`` as a child process (``python child.py *args``) with a bare
    environment and error-level logs: the crash tests kill it or let it exit."""
    path = tmp_path / "child.py"
    path.write_text(script)
    return subprocess.run(
        [sys.executable, str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LLM_GATEWAY_LOG_LEVEL": "ERROR"},
    )


def fail_once(
    monkeypatch: pytest.MonkeyPatch,
    obj: object,
    name: str,
    error: BaseException,
    before: Callable[..., object] | None = None,
) -> None:
    """Make ``obj.name`` raise ``error`` on its next call only (``before`` gets the call's
    arguments first, e.g. to roll back as SQLite would)."""
    real = getattr(obj, name)

    def failing(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(obj, name, real)
        if before is not None:
            before(*args, **kwargs)
        raise error

    monkeypatch.setattr(obj, name, failing)
