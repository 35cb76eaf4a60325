"""The fallback plugin: chains appended to routes, advice per class, config errors."""

from __future__ import annotations

import sqlite3
import textwrap
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from llmgw.kernel import (
    ConfigError,
    ErrorClass,
    Gateway,
    Outcome,
    Price,
    ProviderRequest,
    Request,
    Route,
    Target,
    Usage,
)
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.fallback import FallbackPlugin


@dataclass
class Failing(FakeProvider):
    """Fails every call to a model listed in ``broken`` with that model's class."""

    broken: dict[str, ErrorClass] | None = None

    async def complete(self, request: ProviderRequest) -> Outcome:
        error = (self.broken or {}).get(request.model)
        if error is None:
            return await super().complete(request)
        self.received.append(request)
        return Outcome.failure(error, "fake failure", sent=True)


BASE = """
plugins: [retry, fallback, router, fake]
task_classes:
  qa: {provider: a, model: m1, max_tokens: 100}
  duo:
    members: [{provider: a, model: m1}, {provider: b, model: m2}]
    quorum: 2
fallback:
  chains:
    qa:
      - {provider: b, model: m2, max_tokens: 300}
      - {provider: c, model: m3}
    duo:
      - {provider: c, model: m3}
      - {provider: c, model: m4}
"""


def _gw(text: str = BASE, *providers: FakeProvider, clock: FakeClock | None = None) -> Gateway:
    provs = providers or (FakeProvider("a"), FakeProvider("b"), FakeProvider("c"))
    return gateway_from_yaml(text, providers=provs, clock=clock or FakeClock())


def _route(gw: Gateway, request: Request) -> Route:
    route = gw.hooks.resolve_route(request, gw.settings)
    assert route is not None
    return route


def test_the_chain_is_appended_in_order_with_labels_and_max_tokens() -> None:
    gw = _gw()
    route = _route(gw, Request("qa", "hi"))
    assert route.targets == (
        Target("a", "m1", 100, "primary"),
        Target("b", "m2", 300, "fallback[0]"),
        Target("c", "m3", 100, "fallback[1]"),
    )
    # a caller's explicit max_tokens bounds every target of the chain
    route = _route(gw, Request("qa", "hi", max_tokens=50))
    assert [t.max_tokens for t in route.targets] == [50, 50, 50]


@pytest.mark.anyio
async def test_fallback_walks_the_chain_in_order() -> None:
    a = Failing("a", broken={"m1": ErrorClass.AUTH_ERROR})
    b = Failing("b", broken={"m2": ErrorClass.QUOTA_EXHAUSTED})
    c = FakeProvider("c")
    gw = _gw(BASE, a, b, c)
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "c" and env.meta["fallback_from"] == "a/m1"
    assert [
        (x["provider"], x["error_class"] if not x["ok"] else "ok") for x in env.meta["attempts"]
    ] == [("a", "auth_error"), ("b", "quota_exhausted"), ("c", "ok")]
    assert c.received[0].max_tokens == 100


@pytest.mark.anyio
async def test_retry_wins_while_attempts_remain_then_fallback() -> None:
    a = Failing("a", broken={"m1": ErrorClass.SERVER_ERROR})
    gw = _gw(BASE, a, FakeProvider("b"), FakeProvider("c"))
    env = await gw.route(Request("qa", "hi"))
    assert [(x["provider"], x["attempt"]) for x in env.meta["attempts"]] == [
        ("a", 1),
        ("a", 2),
        ("a", 3),
        ("b", 1),
    ]
    assert env.meta["fallback_from"] == "a/m1"


@pytest.mark.anyio
async def test_spend_is_counted_once_per_attempt_including_billed_errors() -> None:
    price = Price(Decimal("1"), Decimal("2"), source="test")  # $/Mtok: 1 µ$ in, 2 µ$ out

    def billed_failure(request: ProviderRequest) -> Outcome:
        return Outcome.failure(ErrorClass.SERVER_ERROR, "boom", sent=True, usage=Usage(1000, 10))

    a = FakeProvider("a", prices={"m1": price}).then(billed_failure, billed_failure, billed_failure)
    b = FakeProvider("b", prices={"m2": price})
    gw = _gw(BASE, a, b, FakeProvider("c"))
    env = await gw.route(Request("qa", "hello world"))
    per_attempt = [x["cost_usd"] for x in env.meta["attempts"]]
    assert per_attempt[:3] == [0.00102] * 3
    assert env.meta["cost_usd_approx"] == pytest.approx(sum(per_attempt))
    assert len(env.meta["attempts"]) == 4


@pytest.mark.anyio
async def test_panel_members_fall_back_without_duplicating_a_panel_model() -> None:
    a = Failing("a", broken={"m1": ErrorClass.OVERLOADED})
    b = Failing("b", broken={"m2": ErrorClass.OVERLOADED})
    c = FakeProvider("c")
    gw = _gw(BASE.replace("[retry, ", "["), a, b, c)
    route = _route(gw, Request("duo", "hi"))
    for member in route.members:
        keys = [t.key for t in member.targets]
        assert keys[1:] == ["c/m3", "c/m4"]
    env = await gw.route(Request("duo", "hi"))
    assert env.ok
    landed = [m["meta"]["model"] for m in env.data["members"]]
    assert sorted(landed) == ["m3", "m4"]  # never both on the same fallback
    assert len(c.received) == 2


def test_a_panel_route_never_gets_another_members_model() -> None:
    gw = _gw()
    plugin = gw.pm.get_plugin("fallback")
    assert isinstance(plugin, FallbackPlugin)
    # a route built by another plugin whose panel already uses c/m3
    route = Route(
        "duo",
        members=(
            Route("duo", targets=(Target("a", "m1", 10, "member[0]"),)),
            Route("duo", targets=(Target("c", "m3", 10, "member[1]"),)),
        ),
    )
    amended = plugin.amend(route)
    assert [t.key for t in amended.members[0].targets] == ["a/m1", "c/m4"]
    assert [t.key for t in amended.members[1].targets] == ["c/m3", "c/m4"]


@pytest.mark.parametrize(
    ("chains", "path", "problem"),
    [
        ("nope: [{provider: b, model: m2}]", "fallback.chains.nope", "unknown task class"),
        (
            "qa: [{provider: b, model: m2}, {provider: b, model: m2}]",
            r"fallback.chains.qa\[1\]",
            "listed twice",
        ),
        ("qa: [{provider: a, model: m1}]", r"fallback.chains.qa\[0\]", "primary"),
        (
            "duo: [{provider: c, model: m3}, {provider: b, model: m2}]",
            r"fallback.chains.duo\[1\]",
            "member of this panel",
        ),
    ],
)
def test_config_errors_name_the_entry(chains: str, path: str, problem: str) -> None:
    text = BASE.split("fallback:")[0] + "fallback:\n  chains:\n" + textwrap.indent(chains, "    ")
    with pytest.raises(ConfigError, match=rf"{path}: .*{problem}") as info:
        _gw(text)
    assert "fix:" in str(info.value)


@pytest.mark.anyio
@pytest.mark.parametrize("on", [False, True])
async def test_content_refused_falls_back_only_when_configured(on: bool) -> None:
    a = Failing("a", broken={"m1": ErrorClass.CONTENT_REFUSED})
    b = FakeProvider("b")
    gw = _gw(BASE + f"  on_content_refused: {str(on).lower()}\n", a, b, FakeProvider("c"))
    env = await gw.route(Request("qa", "hi"))
    assert env.ok is on
    assert len(b.received) == (1 if on else 0)
    if not on:
        assert env.meta["error_class"] == "content_refused"


@pytest.mark.anyio
async def test_context_overflow_goes_only_to_a_larger_window() -> None:
    a = Failing("a", broken={"m1": ErrorClass.CONTEXT_LENGTH_EXCEEDED})
    b, c = FakeProvider("b"), FakeProvider("c")
    gw = _gw(BASE, a, b, c)
    env = await gw.route(Request("qa", "hi"))
    assert env.meta["error_class"] == "context_length_exceeded"  # default: no fallback
    assert not b.received and not c.received

    gw = _gw(BASE + "  larger_context: [c/m3]\n", a, b, c)
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "c"
    assert [x["stage"] for x in env.meta["attempts"]] == ["sent", "rejected", "sent"]
    assert not b.received


@pytest.mark.anyio
async def test_a_provider_wide_failure_skips_that_providers_other_models() -> None:
    text = BASE.replace("- {provider: b, model: m2, max_tokens: 300}", "- {provider: a, model: m9}")
    a = Failing("a", broken={"m1": ErrorClass.QUOTA_EXHAUSTED})
    c = FakeProvider("c")
    gw = _gw(text, a, FakeProvider("b"), c)
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "c"
    assert len(a.received) == 1  # a/m9 shares the exhausted account: not tried
    assert env.meta["attempts"][1]["stage"] == "rejected"


@pytest.mark.anyio
async def test_non_fallback_classes_end_the_route() -> None:
    for error in (ErrorClass.INVALID_REQUEST, ErrorClass.MODEL_NOT_FOUND):
        a = Failing("a", broken={"m1": error})
        b = FakeProvider("b")
        gw = _gw(BASE, a, b, FakeProvider("c"))
        env = await gw.route(Request("qa", "hi"))
        assert env.meta["error_class"] == error.value and not b.received


@pytest.mark.anyio
async def test_unknown_task_class_is_still_reported_through_the_wrapper() -> None:
    gw = _gw()
    env = await gw.route(Request("nope", "hi"))
    assert env.meta["error_class"] == "unknown_task_class"


def test_a_chain_entry_of_a_disabled_provider_is_skipped_and_reported() -> None:
    gw = gateway_from_yaml(BASE, providers=[FakeProvider("a"), FakeProvider("b")])
    route = _route(gw, Request("qa", "hi"))
    assert [t.key for t in route.targets] == ["a/m1", "b/m2"]
    info = gw.routing_info()["fallback"]
    assert info["chains"]["qa"][1] == {"target": "c/m3", "inactive": "provider not enabled"}
    assert (
        "fallback.chains.qa[1]: provider 'c' is not registered by any enabled plugin, so "
        "this entry is skipped; enable its plugin in plugins: or remove the entry"
    ) in info["warnings"]


@pytest.mark.anyio
async def test_without_the_fallback_plugin_routes_have_only_their_primary() -> None:
    a = Failing("a", broken={"m1": ErrorClass.OVERLOADED})
    b = FakeProvider("b")
    text = BASE.replace("fallback, ", "").split("fallback:")[0]
    gw = _gw(text, a, b, FakeProvider("c"))
    assert len(_route(gw, Request("qa", "hi")).targets) == 1
    env = await gw.route(Request("qa", "hi"))
    assert env.meta["error_class"] == "overloaded" and not b.received
    assert len(a.received) == 3  # retries still happen; there is just nowhere to go after
    ok = await gw.route(Request("duo", "hi"))
    assert ok.meta["panel"]["members"] == 2  # the gateway still serves


@pytest.mark.anyio
async def test_with_the_ledger_each_attempt_is_recorded_once(tmp_path: Path) -> None:
    price = Price(Decimal("1"), Decimal("2"), source="test")
    billed = Outcome.failure(ErrorClass.OVERLOADED, "boom", sent=True, usage=Usage(1000, 10))
    a = FakeProvider("a", prices={"m1": price}).then(billed, billed, billed)
    b = FakeProvider("b", prices={"m2": price})
    text = (
        BASE.replace("[retry, ", "[breaker, ledger, retry, ")
        + "ledger: {caps: {total_monthly_usd: 5}}\n"
    )
    db = tmp_path / "ledger.db"
    gw = gateway_from_yaml(
        text,
        providers=[a, b, FakeProvider("c")],
        clock=FakeClock(),
        env={"LLM_GATEWAY_LEDGER_PATH": str(db)},
    )
    env = await gw.route(Request("qa", "hello world"))
    await gw.aclose()
    assert env.ok and env.meta["fallback_from"] == "a/m1"
    with sqlite3.connect(db) as con:
        rows = con.execute(
            "SELECT provider, attempt, state, cost_micro FROM entries WHERE attempt > 0 "
            "ORDER BY created_at, attempt"
        ).fetchall()
    assert sorted(rows) == sorted(
        [
            ("a", 1, "settled", 1020),
            ("a", 2, "settled", 1020),
            ("a", 3, "settled", 1020),
            ("b", 1, "settled", round(env.meta["attempts"][3]["cost_usd"] * 1_000_000)),
        ]
    )
    assert env.meta["cost_usd_approx"] == pytest.approx(sum(r[3] for r in rows) / 1_000_000)


@pytest.mark.anyio
@pytest.mark.parametrize("error", [ErrorClass.QUOTA_EXHAUSTED, ErrorClass.AUTH_ERROR])
async def test_a_provider_out_of_quota_is_skipped_by_later_requests_for_a_while(
    error: ErrorClass,
) -> None:
    """The account has no quota (or its key is rejected): the next requests go straight to
    the fallback for fallback.provider_hold_s, without sending to it again; once the hold
    is over it is tried again, and an answer clears the mark."""
    clock = FakeClock()
    a = Failing("a", broken={"m1": error})
    b, c = FakeProvider("b"), FakeProvider("c")
    gw = _gw(BASE, a, b, c, clock=clock)
    first = await gw.route(Request("qa", "hi"))
    assert first.ok and len(a.received) == 1
    second = await gw.route(Request("qa", "hi"))
    assert second.ok and len(a.received) == 1  # tried last, after b answered: not sent
    assert [(x["provider"], x["stage"]) for x in second.meta["attempts"]] == [("b", "sent")]
    held = gw.routing_info()["fallback"]["held_providers"]
    assert held["a"]["reason"] == error.value and 0 < held["a"]["skipped_for_s"] <= 60
    clock.advance(61)
    a.broken = {}  # the account works again
    third = await gw.route(Request("qa", "hi"))
    assert third.meta["provider"] == "a" and len(a.received) == 2
    assert gw.routing_info()["fallback"]["held_providers"] == {}
    await gw.aclose()


@pytest.mark.anyio
async def test_a_held_provider_is_tried_after_the_others_not_skipped() -> None:
    """The hold used to skip a held provider's targets while any later target existed, and
    counted its own skip as the provider failing "earlier in this request": with b
    failing, a/m2 (the last target) was skipped too and nothing answered, though a had
    been topped up meanwhile."""
    clock = FakeClock()
    text = (
        "plugins: [retry, fallback, router, fake]\n"
        "task_classes:\n  qa: {provider: a, model: m1}\n"
        "fallback:\n  chains:\n    qa: [{provider: b, model: m1}, {provider: a, model: m2}]\n"
    )
    a = Failing("a", broken={"m1": ErrorClass.QUOTA_EXHAUSTED})
    b = Failing("b", broken={"m1": ErrorClass.SERVER_ERROR})
    gw = _gw(text, a, b, clock=clock)
    await gw.route(Request("qa", "hi"))  # a: quota; a/m2 skipped; b fails: a is marked
    a.broken = {}  # topped up
    env = await gw.route(Request("qa", "hi"))
    assert env.ok and env.meta["provider"] == "a"
    tried = [(x["provider"], x["model"], x["stage"]) for x in env.meta["attempts"]]
    assert tried[0][:2] == ("b", "m1") and tried[-1] == ("a", "m1", "sent")
    assert gw.routing_info()["fallback"]["held_providers"] == {}  # the answer cleared it
    await gw.aclose()


@pytest.mark.anyio
async def test_a_held_provider_is_still_tried_as_the_last_target_left() -> None:
    """No later target can take the call: the held provider is the only chance."""
    text = "plugins: [fallback, router, fake]\ntask_classes:\n  qa: {provider: a, model: m1}\n"
    a = Failing("a", broken={"m1": ErrorClass.QUOTA_EXHAUSTED})
    gw = _gw(text, a)
    for n in (1, 2):
        env = await gw.route(Request("qa", "hi"))
        assert env.error_class == "quota_exhausted" and len(a.received) == n
    await gw.aclose()


@pytest.mark.anyio
async def test_the_error_tells_targets_tried_from_targets_never_sent_to() -> None:
    text = BASE.replace("- {provider: b, model: m2, max_tokens: 300}", "- {provider: a, model: m9}")
    a = Failing("a", broken={"m1": ErrorClass.QUOTA_EXHAUSTED})
    c = Failing("c", broken={"m3": ErrorClass.QUOTA_EXHAUSTED})
    gw = _gw(text, a, FakeProvider("b"), c)
    env = await gw.route(Request("qa", "hi"))
    error = env.error or ""
    assert "also tried: a/m1 (quota_exhausted)" in error
    assert "not sent to: a/m9 (quota_exhausted)" in error  # skipped: a's account is empty
    await gw.aclose()
