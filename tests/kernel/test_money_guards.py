"""Guards the kernel keeps around money, found by review: growth after approval, billing."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmgw.kernel import ErrorClass, Outcome, PluginError, Request, Usage, hookimpl
from llmgw.kernel.results import attempt_cost
from llmgw.kernel.testing import FakeClock, FakeProvider, flat_price, gateway_from_yaml

YAML = """
plugins: [{plugins}]
ledger:
  caps: {{total_monthly_usd: 0.05}}
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
"""


class Grow:
    """A plugin listed after the ledger that enlarges the request."""

    @hookimpl
    async def before_call(self, call: Any) -> None:
        call.max_tokens = 100_000


@pytest.mark.anyio
@pytest.mark.parametrize(
    "plugins",
    [
        "kill_switch, ledger, grow, router, fake",
        "kill_switch, cost, grow, router, fake",
    ],
)
async def test_a_request_enlarged_after_approval_is_never_sent(
    tmp_path: Path, plugins: str
) -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "100")})  # $100 per M output tokens
    text = YAML.format(plugins=plugins)
    if "cost," in plugins:
        text += "cost: {block_usd: 0.05}\n"
        text = text.replace("ledger:\n  caps: {total_monthly_usd: 0.05}\n", "")
    gw = gateway_from_yaml(
        text,
        providers=[fake],
        extra_plugins={"grow": Grow()},
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "error"
    assert env.meta["error_class"] == "budget_exceeded"
    assert "enlarged the request after its cost was approved" in (env.error or "")
    assert fake.received == []
    await gw.aclose()


class Seen:
    """Listed outside `swap`: records the target its after_call is shown."""

    def __init__(self) -> None:
        self.targets: list[Any] = []

    @hookimpl
    def after_call(self, call: Any, outcome: Any) -> None:
        self.targets.append(call.target)


class Swap:
    """A plugin listed after the ledger that sends elsewhere, or at another price."""

    def __init__(self, what: str) -> None:
        self.what = what

    @hookimpl
    async def before_call(self, call: Any) -> None:
        if self.what == "target":
            call.target = replace(call.target, provider="other", model="dear")
        else:
            call.max_tokens = 100_000
            call.price = None  # an unknown price skipped the kernel's own check


@pytest.mark.anyio
@pytest.mark.parametrize("what", ["target", "price"])
async def test_a_target_or_price_changed_after_approval_is_never_sent(
    tmp_path: Path, what: str
) -> None:
    """A hook could send to another provider and model than the one reserved for: the
    other provider's cap and breaker were never asked, and the ledger billed the first
    model's price."""
    fake = FakeProvider(prices={"m1": flat_price("1", "1")})
    other = FakeProvider("other", prices={"dear": flat_price("1000", "1000")})
    seen = Seen()
    gw = gateway_from_yaml(
        YAML.format(plugins="kill_switch, seen, ledger, swap, router, fake"),
        providers=[fake, other],
        extra_plugins={"swap": Swap(what), "seen": seen},
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
    )
    env = await gw.route(Request("quick", "hi"))
    # The layers outside (a breaker's probe ticket, the ledger) see what they checked.
    assert [(t.provider, t.model) for t in seen.targets] == [("fake", "m1")]
    assert env.status == "error"
    assert f"a plugin changed the attempt's {what} in before_call" in (env.error or "")
    assert fake.received == [] and other.received == []
    total = gw.routing_info()["ledger"]["total"]
    # Nothing charged: all that counts is the hold the reservation took for later attempts.
    assert total["reserved_usd"] == 0 and total["committed_usd"] == total["held_usd"]
    await gw.aclose()


@pytest.mark.anyio
async def test_the_same_plugin_listed_before_the_ledger_is_reserved_for(tmp_path: Path) -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "0.1")})
    gw = gateway_from_yaml(
        YAML.format(plugins="kill_switch, grow, ledger, router, fake"),
        providers=[fake],
        extra_plugins={"grow": Grow()},
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.ok
    assert fake.received[0].max_tokens == 100_000
    await gw.aclose()


def _call(price: bool = True) -> Any:
    return SimpleNamespace(price=flat_price() if price else None)


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        (Outcome.success("x", Usage(10, 10)), 30),
        (Outcome.failure(ErrorClass.CONNECTION_ERROR, "x", sent=False), 0),
        (Outcome.failure(ErrorClass.OVERLOADED, "x", sent=True, status_code=503), 0),
        (Outcome.failure(ErrorClass.RATE_LIMITED, "x", sent=True, status_code=429), 0),
        (Outcome.failure(ErrorClass.INVALID_REQUEST, "x", sent=True, status_code=400), 0),
        # the model may have run: kept unknown (charged at the reservation)
        (Outcome.failure(ErrorClass.TIMEOUT, "x", sent=True, status_code=504), None),
        (Outcome.failure(ErrorClass.TIMEOUT, "x", sent=True, status_code=408), None),
        (Outcome.failure(ErrorClass.SERVER_ERROR, "x", sent=True, status_code=500), None),
        (Outcome.failure(ErrorClass.TIMEOUT, "x", sent=True), None),
        (Outcome.failure(ErrorClass.MALFORMED_RESPONSE, "x", sent=True, status_code=200), None),
        (Outcome.failure(ErrorClass.CONTENT_REFUSED, "x", sent=True, usage=Usage(5, 0)), 5),
    ],
)
def test_attempt_cost(outcome: Outcome, expected: int | None) -> None:
    assert attempt_cost(_call(), outcome) == expected


def test_a_plugin_name_provided_by_two_packages_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llmgw.kernel import loader

    real = list(loader.entry_points(group="llmgw"))
    ours = next(ep for ep in real if ep.name == "kill_switch")
    shadow = SimpleNamespace(
        name="kill_switch",
        value="evil:Plugin",
        dist=SimpleNamespace(metadata={"Name": "llmgw-evil"}, version="6.6.6"),
        load=lambda: pytest.fail("the shadowing plugin must never be imported"),
    )
    monkeypatch.setattr(loader, "entry_points", lambda group: [shadow, *real])
    found, clashes = loader.scan_entry_points()
    assert found["kill_switch"] is ours
    assert clashes == {"kill_switch": ["llm-gateway-mcp", "llmgw-evil"]}
    with pytest.raises(PluginError) as err:
        gateway_from_yaml(
            "plugins: [kill_switch, router, fake]\n"
            "task_classes:\n  q: {provider: fake, model: m}\n",
            providers=[FakeProvider()],
        )
    assert "llmgw-evil" in str(err.value)
    # left out of plugins:, the essential kill switch is added, and the clash still refused
    with pytest.raises(PluginError):
        gateway_from_yaml(
            "plugins: [router, fake]\ntask_classes:\n  q: {provider: fake, model: m}\n",
            providers=[FakeProvider()],
        )


class SyncProvider(FakeProvider):
    def complete(self, request: Any) -> Any:  # type: ignore[override]
        return Outcome.success("x", Usage(1, 1))


def _ledger_gw(tmp_path: Path, fake: FakeProvider, plugins: str = "") -> Any:
    return gateway_from_yaml(
        YAML.format(plugins=f"kill_switch, ledger, {plugins}router, fake"),
        providers=[fake],
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
    )


def _totals(gw: Any) -> dict[str, Any]:
    return dict(gw.routing_info()["ledger"]["total"])


@pytest.mark.anyio
async def test_an_answer_a_provider_marked_not_sent_is_still_billed(tmp_path: Path) -> None:
    """ok=True with sent=False made the ledger release the reservation: $0 for an answer."""
    fake = FakeProvider(prices={"m1": flat_price("100", "100")})
    fake.then(Outcome(ok=True, sent=False, text="answer"))
    async with _ledger_gw(tmp_path, fake) as gw:
        env = await gw.route(Request("quick", "hi"))
        assert env.ok and env.text == "answer"
        totals = _totals(gw)
    # No usage came back: charged at its worst case, as any sent attempt without usage.
    assert totals["unknown_usd"] > 0 and totals["reserved_usd"] == 0


@pytest.mark.anyio
async def test_an_error_class_given_as_a_string_is_classed_not_a_crash(tmp_path: Path) -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "1")})
    bad = Outcome(ok=False, sent=True, error_class="rate_limited", message="slow down")  # type: ignore[arg-type]
    fake.then(bad, Outcome.success("second", Usage(1, 1)))
    async with _ledger_gw(tmp_path, fake, "retry, ") as gw:
        env = await gw.route(Request("quick", "hi"))
        totals = _totals(gw)
    assert env.ok and env.text == "second"  # rate_limited was retried, as its class says
    assert env.meta["attempts"][0]["error_class"] == "rate_limited"
    assert totals["reserved_usd"] == 0


@pytest.mark.anyio
@pytest.mark.parametrize(
    "usage",
    [Usage(-10_000_000, 0), Usage(1, 10**13), Usage(1.5, 2)],  # type: ignore[arg-type]
)
async def test_an_impossible_usage_is_charged_at_its_worst_case(
    tmp_path: Path, usage: Usage
) -> None:
    """A negative usage gave a negative cost in the envelope and a settle the ledger's CHECK
    refused (the entry stayed reserved)."""
    fake = FakeProvider(prices={"m1": flat_price("1", "1")})
    fake.then(Outcome.success("answer", usage))
    async with _ledger_gw(tmp_path, fake) as gw:
        env = await gw.route(Request("quick", "hi"))
        totals = _totals(gw)
    assert env.ok and env.meta["cost_usd_approx"] is None
    assert totals["reserved_usd"] == 0 and totals["unknown_usd"] > 0


@pytest.mark.anyio
@pytest.mark.parametrize("returned", [None, {"text": "x"}, "x"])
async def test_a_provider_returning_no_outcome_is_a_charged_internal_error(
    tmp_path: Path, returned: Any
) -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "1")})
    fake.then(lambda request: returned)
    async with _ledger_gw(tmp_path, fake) as gw:
        env = await gw.route(Request("quick", "hi"))
        totals = _totals(gw)
    assert env.error_class == ErrorClass.INTERNAL_ERROR.value
    assert "provider 'fake' is broken: complete() returned" in (env.error or "")
    assert totals["reserved_usd"] == 0 and totals["unknown_usd"] > 0


@pytest.mark.anyio
async def test_a_provider_whose_complete_is_not_async_stays_charged(tmp_path: Path) -> None:
    """By the time the kernel sees no awaitable, a sync complete() has run, and a blocking
    SDK call in it may have been billed: the attempt stays charged at its worst case."""
    fake = SyncProvider(prices={"m1": flat_price("1", "1")})
    async with _ledger_gw(tmp_path, fake) as gw:
        env = await gw.route(Request("quick", "hi"))
        totals = _totals(gw)
    assert "its complete() must be `async def`" in (env.error or "")
    assert env.meta["attempts"][0]["sent"] is True
    assert totals["reserved_usd"] == 0 and totals["unknown_usd"] > 0


class Slow:
    """A before_call hook that takes longer than the whole call's deadline."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    @hookimpl
    async def before_call(self, call: Any) -> None:
        self.clock.advance(3.0)


@pytest.mark.anyio
async def test_a_request_whose_deadline_passed_in_before_call_is_not_sent(
    tmp_path: Path,
) -> None:
    """A slow hook (6 s against a 2 s deadline) used to let the request go anyway."""
    clock = FakeClock()
    fake = FakeProvider(prices={"m1": flat_price("1", "1")})
    gw = gateway_from_yaml(
        YAML.format(plugins="kill_switch, ledger, slow, router, fake")
        + "gateway: {deadline_s: 2}\n",
        providers=[fake],
        extra_plugins={"slow": Slow(clock)},
        env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")},
        clock=clock,
    )
    async with gw:
        env = await gw.route(Request("quick", "hi"))
        totals = _totals(gw)
    assert env.error_class == ErrorClass.DEADLINE_EXCEEDED.value
    assert "nothing was sent" in (env.error or "")
    assert fake.received == []
    assert totals["committed_usd"] == totals["held_usd"]  # only held ahead, nothing charged


PANEL_YAML = """
plugins: [kill_switch, {rewriter}ledger, router, fake]
ledger:
  caps: {{total_monthly_usd: 5}}
task_classes:
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: fake, model: m2}}]
    max_tokens: 100
"""


class MemberRewrite:
    """Appends to every member's prompt in the member's own before_call."""

    @hookimpl
    async def before_call(self, call: Any) -> None:
        if call.panel is not None:
            call.messages = [replace(m, content=m.content + " (rewritten)") for m in call.messages]


class PanelRewrite:
    """Appends to every member's prompt in the panel's before_call, as docs/plugins.md says."""

    @hookimpl
    async def before_call(self, call: Any) -> None:
        if call.is_panel:
            for member in call.members:
                member.messages = [
                    replace(m, content=m.content + " (rewritten)") for m in member.messages
                ]


@pytest.mark.anyio
async def test_a_panels_requests_are_rewritten_at_the_panel_not_in_its_members(
    tmp_path: Path,
) -> None:
    """Listed before the ledger, a member-level rewrite was still refused ("order
    request-rewriting plugins before cost and ledger"): a panel is approved as a whole
    before any member's before_call. The message now says where to rewrite it."""
    for rewriter, ok in ((MemberRewrite(), False), (PanelRewrite(), True)):
        fake = FakeProvider(prices={"m1": flat_price("1", "1"), "m2": flat_price("1", "1")})
        gw = gateway_from_yaml(
            PANEL_YAML.format(rewriter="rewrite, "),
            providers=[fake],
            extra_plugins={"rewrite": rewriter},
            env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / f"{ok}.db")},
        )
        async with gw:
            env = await gw.route(Request("duo", "hi"))
        if ok:
            assert env.ok
            assert [r.messages[-1].content for r in fake.received] == ["hi (rewritten)"] * 2
        else:
            assert env.status == "error" and fake.received == []
            members = env.data["members"]
            assert all("rewrite them in the panel's before_call" in m["error"] for m in members)
