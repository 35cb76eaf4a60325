"""The gateway loop: routing, overrides, dispositions, deadlines, panels, every hook."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from llmgw.kernel import (
    Envelope,
    ErrorClass,
    Outcome,
    Provider,
    Rejection,
    Request,
    Route,
    Target,
    ToolSpec,
    Usage,
    Verdict,
    hookimpl,
)
from llmgw.kernel.testing import FakeClock, FakeProvider, flat_price, gateway_from_yaml, mcp_session

YAML = """
plugins: [{names}router, fake]
providers:
  fake: {{models: [big-model]}}
  fake2: {{models: [shared]}}
  fake3: {{models: [shared]}}
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100, system: be brief}}
  duo:
    members:
      - {{provider: fake, model: m1}}
      - {{provider: fake2, model: m2}}
  trio:
    members:
      - {{provider: fake, model: a}}
      - {{provider: fake2, model: b}}
      - {{provider: fake3, model: c}}
    max_tokens: 200
"""


def gw_with(
    *plugins: tuple[str, object], providers: list[FakeProvider] | None = None, **kw: Any
) -> Any:
    names = "".join(f"{n}, " for n, _ in plugins)
    provs = providers or [FakeProvider(), FakeProvider(name="fake2"), FakeProvider(name="fake3")]
    return gateway_from_yaml(
        YAML.format(names=names), providers=provs, extra_plugins=dict(plugins), **kw
    )


@pytest.mark.anyio
async def test_request_reaches_the_provider_with_class_defaults() -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "2")})
    gw = gw_with(providers=[fake, FakeProvider(name="fake2"), FakeProvider(name="fake3")])
    env = await gw.route(Request("quick", "hello"))
    assert env.ok
    sent = fake.received[0]
    assert (sent.model, sent.max_tokens, sent.system) == ("m1", 100, "be brief")
    assert [(m.role, m.content) for m in sent.messages] == [("user", "hello")]
    # cost from usage: 1 input token at $1/M + 3 output tokens at $2/M = 7 micro-dollars
    assert env.meta["cost_usd_approx"] == pytest.approx(7e-6)


@pytest.mark.anyio
async def test_max_tokens_and_system_from_the_caller_win() -> None:
    fake = FakeProvider()
    gw = gw_with(providers=[fake, FakeProvider(name="fake2"), FakeProvider(name="fake3")])
    await gw.route(Request("quick", "hello", system="custom", max_tokens=7))
    assert (fake.received[0].system, fake.received[0].max_tokens) == ("custom", 7)


@pytest.mark.anyio
async def test_override_model_only_for_declared_models() -> None:
    gw = gw_with()
    env = await gw.route(Request("quick", "x", override_model="big-model"))
    assert env.ok and env.meta["model"] == "big-model"
    env = await gw.route(Request("quick", "x", override_model="gpt-99"))
    assert env.meta["error_class"] == "bad_argument"
    assert "not declared" in (env.error or "")
    env = await gw.route(Request("quick", "x", override_model="shared"))
    assert "several providers" in (env.error or "")
    env = await gw.route(Request("quick", "x", override_model="fake3/shared"))
    assert env.meta["provider"] == "fake3"
    env = await gw.route(Request("duo", "x", override_model="big-model"))
    assert "panel" in (env.error or "")


@pytest.mark.anyio
async def test_override_model_still_passes_every_policy() -> None:
    class Deny:
        @hookimpl
        def preflight(self, call: Any) -> Rejection | None:
            if call.target and call.target.model == "big-model":
                return Rejection(ErrorClass.POLICY_REFUSED, "no big model")
            return None

    gw = gw_with(("deny", Deny()))
    env = await gw.route(Request("quick", "x", override_model="big-model"))
    assert env.meta["error_class"] == "policy_refused"


@pytest.mark.anyio
async def test_a_plugin_can_route_before_the_default_router() -> None:
    class Pin:
        @hookimpl
        def resolve_route(self, request: Request, settings: Any) -> Route | None:
            if request.prompt.startswith("pin:"):
                return Route(request.task_class, targets=(Target("fake2", "pinned", 5),))
            return None

    gw = gw_with(("pin", Pin()))
    assert (await gw.route(Request("quick", "pin: x"))).meta["model"] == "pinned"
    assert (await gw.route(Request("quick", "free"))).meta["model"] == "m1"


@pytest.mark.anyio
async def test_bad_requests_are_refused_before_routing() -> None:
    fake = FakeProvider()
    gw = gw_with(providers=[fake, FakeProvider(name="fake2"), FakeProvider(name="fake3")])
    for req in (
        Request("quick", ""),
        Request("quick", "x", max_tokens=0),
        Request("quick", "x" * 2_000_000),
        Request("quick", "\ud800"),
    ):
        env = await gw.route(req)
        assert env.status == "error"
        assert env.meta["error_class"] == "bad_argument"
    assert fake.received == []


@pytest.mark.anyio
async def test_rejection_with_fallback_moves_to_the_next_target() -> None:
    class TwoTargets:
        @hookimpl
        def resolve_route(self, request: Request, settings: Any) -> Route:
            return Route("quick", targets=(Target("fake", "m1", 10), Target("fake2", "m2", 10)))

    class Open:
        @hookimpl
        def preflight(self, call: Any) -> Rejection | None:
            if call.target.model == "m1":
                return Rejection(ErrorClass.CIRCUIT_OPEN, "open", fallback=True)
            return None

    gw = gw_with(("two", TwoTargets()), ("open", Open()))
    env = await gw.route(Request("quick", "x"))
    assert env.ok and env.meta["model"] == "m2"
    assert env.meta["fallback_from"] == "fake/m1"
    assert [a["stage"] for a in env.meta["attempts"]] == ["rejected", "sent"]


@pytest.mark.anyio
async def test_retry_respects_the_deadline() -> None:
    clock = FakeClock()
    fake = FakeProvider()
    for _ in range(10):
        fake.fail_with(ErrorClass.SERVER_ERROR)

    class Slow:
        @hookimpl
        def after_call(self, call: Any, outcome: Outcome) -> Any:
            from llmgw.kernel import Disposition

            return None if outcome.ok else Disposition("retry", 50.0)

    gw = gw_with(
        ("slow", Slow()),
        providers=[fake, FakeProvider(name="fake2"), FakeProvider(name="fake3")],
        clock=clock,
    )
    env = await gw.route(Request("quick", "x"))
    assert env.status == "error"
    # deadline 120 s: sleeps of 50 s fit twice, the third would cross it
    assert clock.sleeps == [50.0, 50.0]
    assert len(fake.received) == 3


@pytest.mark.anyio
async def test_panel_quorum_and_member_errors() -> None:
    fake2 = FakeProvider(name="fake2").fail_with(ErrorClass.SERVER_ERROR)
    fake3 = FakeProvider(name="fake3", available=False)
    gw = gw_with(providers=[FakeProvider(), fake2, fake3])
    env = await gw.route(Request("trio", "x"))
    assert env.status == "error"
    assert env.meta["error_class"] == "panel_failed"
    assert env.meta["panel"]["member_error_classes"] == [None, "server_error", "auth_error"]
    assert [m["status"] for m in env.data["members"]] == ["success", "error", "error"]
    env = await gw.route(Request("trio", "x"))  # fake2 recovered: 2 of 3 reach quorum 2
    assert env.status == "success"
    assert env.meta["panel"]["succeeded"] == 2


@pytest.mark.anyio
async def test_panel_all_failed_is_never_success() -> None:
    provs = [
        FakeProvider().fail_with(ErrorClass.TIMEOUT),
        FakeProvider(name="fake2").fail_with(ErrorClass.OVERLOADED),
        FakeProvider(name="fake3"),
    ]
    gw = gw_with(providers=provs)
    env = await gw.route(Request("duo", "x"))
    assert env.status == "error"
    assert "0 of 2" in (env.error or "")


@pytest.mark.anyio
async def test_panel_preflight_sees_every_member_and_can_refuse_before_dispatch() -> None:
    seen: list[int] = []

    class PanelGuard:
        @hookimpl
        def preflight(self, call: Any) -> Rejection | None:
            if call.is_panel:
                seen.append(len(call.members))
                return Rejection(ErrorClass.BUDGET_EXCEEDED, "panel too expensive")
            return None

    provs = [FakeProvider(), FakeProvider(name="fake2"), FakeProvider(name="fake3")]
    gw = gw_with(("guard", PanelGuard()), providers=provs)
    env = await gw.route(Request("trio", "x"))
    assert seen == [3]
    assert env.meta["error_class"] == "budget_exceeded"
    assert "nothing was sent" in (env.error or "")
    assert all(p.received == [] for p in provs)


@pytest.mark.anyio
async def test_verify_revise_means_needs_human_review() -> None:
    class Checker:
        @hookimpl
        async def verify(self, request: Request, result: Envelope) -> Verdict | None:
            if "bad" in (result.text or ""):
                return Verdict("REVISE", ("contains 'bad'",))
            return Verdict("ACCEPT")

    gw = gw_with(("checker", Checker()))
    env = await gw.route(Request("quick", "good"))
    assert env.status == "success"
    env = await gw.route(Request("quick", "bad"))
    assert env.status == "needs_human_review"
    assert env.meta["verdicts"][0] == {
        "verdict": "REVISE",
        "reasons": ["contains 'bad'"],
        "source": "checker",
        "parse_error": False,
    }


@pytest.mark.anyio
async def test_report_info_shutdown_register_tools_and_providers() -> None:
    events: list[str] = []

    class Everything:
        @hookimpl
        def register_providers(self, register: Callable[[Provider], None]) -> None:
            register(FakeProvider(name="extra"))

        @hookimpl
        def report_info(self) -> dict[str, Any]:
            return {"hello": "world"}

        @hookimpl
        async def shutdown(self) -> None:
            events.append("shutdown")

        @hookimpl
        def register_tools(self, register: Callable[[ToolSpec], None]) -> None:
            async def shout(text: str, level: str = "loud", progress: Any = None) -> Envelope:
                if progress:
                    await progress(1, 1, "shouted")
                return Envelope("success", text.upper(), {"level": level})

            register(
                ToolSpec("shout", "Upper-case text.", shout, choices={"level": ["loud", "quiet"]})
            )

    gw = gw_with(("every", Everything()))
    info = gw.routing_info()
    assert info["every"] == {"hello": "world"}
    assert "extra" in info["providers"]
    async with mcp_session(gw) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert tools["shout"].input_schema["properties"]["level"]["enum"] == ["loud", "quiet"]
        r = await client.call_tool("shout", {"text": "hi"})
        assert r.structured_content["data"]["text"] == "HI"
        r = await client.call_tool("shout", {"text": "hi", "level": "meh"})
        assert r.is_error and "level must be one of" in r.structured_content["error"]
    await gw.aclose()
    assert events == ["shutdown"]


@pytest.mark.anyio
async def test_billed_error_usage_and_unknown_price_are_reported() -> None:
    fake = FakeProvider(prices={"m1": flat_price("1", "1")}).then(
        Outcome.failure(
            ErrorClass.CONTENT_REFUSED,
            "refused",
            sent=True,
            usage=Usage(input_tokens=10, output_tokens=5),
        )
    )
    gw = gw_with(providers=[fake, FakeProvider(name="fake2"), FakeProvider(name="fake3")])
    env = await gw.route(Request("quick", "x"))
    assert env.meta["error_class"] == "content_refused"
    assert env.meta["cost_usd_approx"] == pytest.approx(15e-6)
    env = await gw.route(Request("duo", "x"))  # fake2/m2 has no price
    assert env.meta["cost_usd_approx"] is None
    assert "cost" in env.meta["cost_note"]
