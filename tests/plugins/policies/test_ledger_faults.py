"""No reservation leaks: every fault class, sent or not, retries, fallbacks, cancellations."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog.testing
from _money_helpers import (
    PRICE,
    Advise,
    Chain,
    GatedProvider,
    fake,
    flush,
    rows,
    states,
    worst_micro,
)

from llmgw.kernel import ErrorClass, Outcome, ProviderRequest, Request, Target, Usage, hookimpl
from llmgw.kernel.logs import configure_logging, reset_logging
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml

YAML = """
plugins: [{plugins}]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: fake, model: m2}}]
    max_tokens: 100
"""
UPSTREAM = [
    ErrorClass.RATE_LIMITED,
    ErrorClass.OVERLOADED,
    ErrorClass.SERVER_ERROR,
    ErrorClass.TIMEOUT,
    ErrorClass.CONNECTION_ERROR,
    ErrorClass.MALFORMED_RESPONSE,
    ErrorClass.QUOTA_EXHAUSTED,
    ErrorClass.AUTH_ERROR,
    ErrorClass.MODEL_NOT_FOUND,
    ErrorClass.INVALID_REQUEST,
    ErrorClass.CONTEXT_LENGTH_EXCEEDED,
    ErrorClass.REQUEST_TOO_LARGE,
    ErrorClass.CONTENT_REFUSED,
    ErrorClass.TRUNCATED_OUTPUT,
]


def gw(tmp_path: Path, provider: FakeProvider, plugins: str = "ledger, router, fake", **kw: Any):
    return gateway_from_yaml(
        YAML.format(plugins=plugins),
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
        providers=[provider],
        **kw,
    )


class Exploding(FakeProvider):
    async def complete(self, request: ProviderRequest) -> Outcome:
        raise RuntimeError("provider bug")


@pytest.mark.anyio
@pytest.mark.parametrize("advice", [None, "retry", "fallback"])
async def test_fault_matrix_leaves_no_open_reservation(tmp_path: Path, advice: str | None) -> None:
    p = fake()
    cases = list(itertools.product(UPSTREAM, [True, False], [None, Usage(7, 9)]))
    cases = [(c, s, u) for c, s, u in cases if s or u is None]  # not sent: never billed
    for cls, sent, usage in cases:
        p.then(Outcome.failure(cls, "x", sent=sent, usage=usage))
    plugins = "ledger, router, fake"
    extra: dict[str, object] = {}
    if advice:
        plugins = "ledger, advise, chain, router, fake"
        extra = {
            "advise": Advise(advice),
            "chain": Chain(Target("fake", "m1", 100), Target("fake", "m2", 100)),
        }
    g = gw(tmp_path, p, plugins=plugins, extra_plugins=extra)
    task = "chain" if advice else "quick"
    while p.script:
        await g.route(Request(task, "hi"))
    for _ in range(3):  # and panels over the echo
        assert (await g.route(Request("duo", "hi"))).ok
    await flush(g)
    got = states(tmp_path / "l.db")
    assert got["reserved"] == 0, got
    billed = sum(1 for _, s, u in cases if u is not None)
    unknown = sum(1 for _, s, u in cases if s and u is None)
    released = sum(1 for _, s, _u in cases if not s)
    assert got["unknown"] == unknown
    assert got["released"] == released
    assert got["settled"] == billed + 6 + (len(p.received) - len(cases) - 6)
    settled = [r for r in rows(tmp_path / "l.db") if r["error_class"] and r["state"] == "settled"]
    assert all(r["cost_micro"] == 7 * 10 + 9 * 100 for r in settled)
    print(
        f"\nfault matrix ({advice=}): {len(cases)} faults, open reservations at end: "
        f"{got['reserved']}"
    )


@pytest.mark.anyio
async def test_provider_crash_is_charged_as_unknown(tmp_path: Path) -> None:
    g = gw(tmp_path, Exploding(prices={"m1": PRICE}))
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "internal_error"
    await flush(g)
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["unknown"]


async def _cancel_when_entered(g: Any, request: Request, entered: anyio.Event) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(g.route, request)
        await entered.wait()
        tg.cancel_scope.cancel()


@contextlib.contextmanager
def _attempt_log() -> Iterator[list[dict[str, Any]]]:
    """The llm.attempt events logged meanwhile (INFO, whatever an earlier test set)."""
    events: list[dict[str, Any]] = []
    configure_logging("INFO", stream=io.StringIO())
    try:
        with structlog.testing.capture_logs() as captured:
            yield events
    finally:
        reset_logging()
    events += [x for x in captured if x.get("event") == "llm.attempt"]


@pytest.mark.anyio
async def test_cancelled_while_sent_stays_charged_as_unknown(tmp_path: Path) -> None:
    p = GatedProvider(prices={"m1": PRICE, "m2": PRICE}, hang=True)
    g = gw(tmp_path, p)
    with _attempt_log() as events:
        await _cancel_when_entered(g, Request("quick", "hi"), p.entered)
    await g.aclose()
    got = rows(tmp_path / "l.db")
    assert [(r["state"], r["error_class"]) for r in got] == [("unknown", "cancelled")]
    assert states(tmp_path / "l.db")["reserved"] == 0
    # The audit trail has the attempt too (it had no llm.attempt line): sent, cancelled.
    (line,) = events
    assert (line["error_class"], line["sent"], line["disposition"]) == (
        "cancelled",
        True,
        "cancelled",
    )


@pytest.mark.anyio
async def test_cancelled_panel_leaves_no_open_reservation(tmp_path: Path) -> None:
    p = GatedProvider(prices={"m1": PRICE, "m2": PRICE}, hang=True)
    g = gw(tmp_path, p)
    await _cancel_when_entered(g, Request("duo", "hi"), p.entered)
    await g.aclose()
    got = states(tmp_path / "l.db")
    assert got["reserved"] == 0
    # members that had started are charged; one not yet started would be released
    assert got["unknown"] + got["released"] == 2 and got["unknown"] >= 1


class StallBefore:
    """A ``before_call`` after the ledger's that waits: a cancel lands before sending."""

    def __init__(self) -> None:
        self.entered: anyio.Event | None = None

    @hookimpl
    async def before_call(self, call: Any) -> None:
        assert self.entered is not None
        self.entered.set()
        await anyio.sleep_forever()


@pytest.mark.anyio
async def test_cancelled_before_sending_is_released(tmp_path: Path) -> None:
    p = fake()
    stall = StallBefore()
    stall.entered = anyio.Event()
    g = gw(tmp_path, p, plugins="ledger, stall, router, fake", extra_plugins={"stall": stall})
    with _attempt_log() as events:
        await _cancel_when_entered(g, Request("quick", "hi"), stall.entered)
    await g.aclose()
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["released"]
    assert p.received == []
    (line,) = events
    assert (line["error_class"], line["sent"]) == ("cancelled", False)


@pytest.mark.anyio
async def test_many_cancellations_at_random_points_leak_nothing(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    p = GatedProvider(prices={"m1": PRICE, "m2": PRICE}, delay=lambda: rng.uniform(0, 0.002))
    g = gw(tmp_path, p)
    for i in range(100):
        with anyio.move_on_after(rng.uniform(0, 0.004)):
            await g.route(Request("duo" if i % 2 else "quick", "hi"))
    ledger = g.plugins[[x.name for x in g.plugins].index("ledger")].obj
    # every reservation that completed was counted back by its after_call (else the
    # inline fast path would stay off for good)
    assert ledger.in_flight == 0
    await g.aclose()  # let the ledger thread finish what cancelled callers left it
    got = states(tmp_path / "l.db")
    print(
        f"\nrandom cancellations: 100 calls, entries {got}, open reservations at end: "
        f"{got['reserved']}"
    )
    assert got["reserved"] == 0, got
    assert sum(got.values()) >= 100  # every call reserved at least once


class SlowAfter:
    """An async ``after_call`` that awaits (an audit record shipped somewhere), listed after
    the ledger: its after_call runs before the ledger's."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()

    @hookimpl
    async def after_call(self, call: Any, outcome: Outcome) -> None:
        self.entered.set()
        await asyncio.sleep(5)


@pytest.mark.anyio
@pytest.mark.parametrize("task", ["quick", "duo"])
async def test_a_native_cancel_in_an_after_call_still_settles(tmp_path: Path, task: str) -> None:
    """``asyncio.wait_for`` around a route cancels the task natively, which anyio's shield
    around after_call does not stop: the after_call awaiting at that moment ends, and every
    layer inside it (the ledger's settle) still runs before the cancellation goes on."""
    p = fake()
    slow = SlowAfter()
    g = gw(tmp_path, p, plugins="ledger, slow, router, fake", extra_plugins={"slow": slow})
    task_ = asyncio.ensure_future(g.route(Request(task, "hi")))
    await asyncio.wait_for(slow.entered.wait(), 5)
    task_.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task_
    await flush(g)
    ledger = next(pl.obj for pl in g.plugins if pl.name == "ledger")
    assert ledger.in_flight == 0
    await g.aclose()
    got = [(r["model"], r["state"]) for r in rows(tmp_path / "l.db")]
    # Each sent attempt settled from its usage; a panel member the cancel stopped before
    # it started was released; nothing left reserved (it would become unknown at the next
    # start, charged at its worst case).
    assert got and {state for _, state in got} <= {"settled", "released"}, got
    assert sorted(m for m, state in got if state == "settled") == sorted(
        r.model for r in p.received
    )


@pytest.mark.anyio
async def test_a_member_falling_back_is_not_refused_for_its_own_unsent_reservation(
    tmp_path: Path,
) -> None:
    """The cap fits the panel (2 members) and a fallback, not all three at once. A member
    behind an open breaker falls back while the other is still out: what the panel
    reserved for its refused first attempt is released ahead of the fallback's
    reservation, in the same transaction, so the fallback fits."""
    w = worst_micro("hi", 100)
    yaml = f"""
plugins: [breaker, ledger, fallback, router, fake]
task_classes:
  solo_alt: {{provider: alt, model: m1, max_tokens: 100}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: alt, model: m1}}]
    max_tokens: 100
    quorum: 2
fallback:
  chains:
    duo: [{{provider: fb, model: m1}}]
breaker: {{consecutive_failures: 1, open_s: 200}}
ledger:
  caps:
    total_monthly_usd: {round(2.5 * w / 1e6, 6)}
"""
    slow = GatedProvider(name="fake", prices={"m1": PRICE}, delay=lambda: 0.2)
    alt, fb = fake("alt"), fake("fb")
    # A billed error (usage reported): it settles at its cost, not at its worst case.
    alt.then(Outcome.failure(ErrorClass.SERVER_ERROR, "boom", sent=True, usage=Usage(1, 0)))
    g = gateway_from_yaml(
        yaml,
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
        providers=[slow, alt, fb],
    )
    assert (await g.route(Request("solo_alt", "hi"))).error_class == "server_error"  # opens it
    env = await g.route(Request("duo", "hi"))
    assert env.status == "success", env.error
    stages = [(a["provider"], a["stage"]) for a in env.data["members"][1]["meta"]["attempts"]]
    assert stages == [("alt", "rejected"), ("fb", "sent")]
    await flush(g)
    await g.aclose()
    got = sorted((r["provider"], r["state"]) for r in rows(tmp_path / "l.db"))
    assert got == [
        ("alt", "released"),  # the panel's reservation for the refused first attempt
        ("alt", "settled"),  # the earlier call that opened the breaker
        ("fake", "settled"),
        ("fb", "settled"),
    ]
