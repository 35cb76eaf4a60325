"""Panels as the kernel runs them: per-member envelopes, quorum, distinct providers, timing."""

from __future__ import annotations

import time

import anyio
import pytest

from llmgw.kernel import (
    Call,
    ConfigError,
    ErrorClass,
    Outcome,
    ProviderRequest,
    Rejection,
    Request,
    Route,
    Settings,
    Target,
    hookimpl,
    wire,
)
from llmgw.kernel.errors import ConfigErrors
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml
from llmgw.kernel.wire import Pacing

TRIO = """
plugins: [{extra}independence, router, fake]
task_classes:
  trio:
    members:
      - {{provider: alpha, model: a-1}}
      - {{provider: beta, model: b-1}}
      - {{provider: gamma, model: g-1}}
    max_tokens: 100
    quorum: 2
    min_distinct_providers: 3
independence:
  panels:
    trio: {{mode: blind, enforce: hard}}
"""


def trio(extra: str = "") -> str:
    return TRIO.format(extra=f"{extra}, " if extra else "")


def three() -> list[FakeProvider]:
    return [FakeProvider("alpha"), FakeProvider("beta"), FakeProvider("gamma")]


class OpenBreaker:
    """Stands in for an open circuit breaker on one target."""

    def __init__(self, key: str) -> None:
        self.key = key

    @hookimpl
    def preflight(self, call: Call) -> Rejection | None:
        if call.target is not None and call.target.key == self.key:
            return Rejection(
                ErrorClass.CIRCUIT_OPEN, f"circuit for {self.key} is open", fallback=True
            )
        return None


@pytest.mark.anyio
async def test_one_member_failing_still_meets_quorum() -> None:
    alpha, beta, gamma = three()
    beta.fail_with(ErrorClass.SERVER_ERROR)
    async with gateway_from_yaml(trio(), providers=[alpha, beta, gamma]) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "success"
    members = env.data["members"]
    assert [m["status"] for m in members] == ["success", "error", "success"]
    assert members[1]["meta"]["error_class"] == "server_error"
    assert members[0]["meta"]["provider"] == "alpha" and members[2]["meta"]["model"] == "g-1"
    for m in members:
        assert {"provider", "model", "latency_ms", "tokens", "attempts"} <= set(m["meta"])
    assert env.meta["panel"] == {
        "members": 3,
        "succeeded": 2,
        "quorum": 2,
        "member_error_classes": [None, "server_error", None],
    }
    assert "[alpha/a-1]" in (env.text or "") and "[beta/b-1]" not in (env.text or "")


@pytest.mark.anyio
async def test_all_members_failing_is_an_error_naming_every_class() -> None:
    alpha, beta, gamma = three()
    alpha.fail_with(ErrorClass.SERVER_ERROR)
    beta.fail_with(ErrorClass.RATE_LIMITED)
    gamma.fail_with(ErrorClass.QUOTA_EXHAUSTED)
    async with gateway_from_yaml(trio(), providers=[alpha, beta, gamma]) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "error"
    assert env.text is None
    assert env.error_class == ErrorClass.PANEL_FAILED.value
    assert env.meta["panel"]["member_error_classes"] == [
        "server_error",
        "rate_limited",
        "quota_exhausted",
    ]
    for cls in ("server_error", "rate_limited", "quota_exhausted"):
        assert cls in (env.error or "")
    assert [m["status"] for m in env.data["members"]] == ["error"] * 3


@pytest.mark.anyio
async def test_below_quorum_is_an_error() -> None:
    alpha, beta, gamma = three()
    alpha.fail_with(ErrorClass.SERVER_ERROR)
    beta.fail_with(ErrorClass.TIMEOUT)
    async with gateway_from_yaml(trio(), providers=[alpha, beta, gamma]) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "error"
    assert env.meta["panel"]["succeeded"] == 1
    assert "only 1 of 3" in (env.error or "")


@pytest.mark.anyio
async def test_a_member_without_a_key_does_not_crash_the_panel() -> None:
    alpha, beta, gamma = three()
    beta.available = False
    async with gateway_from_yaml(trio(), providers=[alpha, beta, gamma]) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "success"
    member = env.data["members"][1]
    assert member["status"] == "error"
    assert member["meta"]["error_class"] == "auth_error"
    assert member["meta"]["attempts"][0]["sent"] is False
    assert env.meta["visibility"]["certified"] is True


@pytest.mark.anyio
async def test_a_member_behind_an_open_breaker_is_skipped_without_sending() -> None:
    alpha, beta, gamma = three()
    async with gateway_from_yaml(
        trio("breaker_stub"),
        providers=[alpha, beta, gamma],
        extra_plugins={"breaker_stub": OpenBreaker("gamma/g-1")},
    ) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert gamma.received == []
    assert env.status == "success"
    member = env.data["members"][2]
    assert member["meta"]["error_class"] == "circuit_open"
    assert member["meta"]["attempts"][0]["stage"] == "rejected"
    assert member["meta"]["attempts"][0]["by"] == "breaker_stub"


@pytest.mark.anyio
async def test_open_breaker_on_every_member_fails_the_panel() -> None:
    class AllOpen:
        @hookimpl
        def preflight(self, call: Call) -> Rejection | None:
            if call.target is None:
                return None
            return Rejection(ErrorClass.CIRCUIT_OPEN, "open", fallback=True)

    providers = three()
    async with gateway_from_yaml(
        trio("all_open"), providers=providers, extra_plugins={"all_open": AllOpen()}
    ) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "error"
    assert env.meta["panel"]["member_error_classes"] == ["circuit_open"] * 3
    assert all(p.received == [] for p in providers)


def test_min_distinct_providers_is_a_config_check() -> None:
    yaml = """
    plugins: [router, fake]
    task_classes:
      same:
        members:
          - {provider: alpha, model: a-1}
          - {provider: alpha, model: a-2}
        min_distinct_providers: 2
    """
    with pytest.raises((ConfigError, ConfigErrors)) as err:
        gateway_from_yaml(yaml, providers=three())
    text = str(err.value)
    assert "task_classes.same" in text
    assert "min_distinct_providers is 2" in text


@pytest.mark.anyio
async def test_min_distinct_providers_is_checked_again_before_dispatch() -> None:
    class SameVendorRouter:
        @hookimpl
        def resolve_route(self, request: Request, settings: Settings) -> Route:
            return Route(
                request.task_class,
                members=(
                    Route(request.task_class, targets=(Target("alpha", "a-1", 50),)),
                    Route(request.task_class, targets=(Target("alpha", "a-2", 50),)),
                ),
                quorum=2,
                min_distinct_providers=2,
            )

    providers = three()
    async with gateway_from_yaml(
        trio("same_vendor"),
        providers=providers,
        extra_plugins={"same_vendor": SameVendorRouter()},
    ) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "error"
    assert env.error_class == ErrorClass.POLICY_REFUSED.value
    assert "nothing was sent" in (env.error or "")
    assert all(p.received == [] for p in providers)


class SlowProvider(FakeProvider):
    """A fake that takes ``delay_s`` of real time to answer."""

    delay_s: float = 0.0

    async def complete(self, request: ProviderRequest) -> Outcome:
        await anyio.sleep(self.delay_s)
        return await super().complete(request)


@pytest.mark.anyio
async def test_panel_wall_time_is_about_the_slowest_member() -> None:
    delays = {"alpha": 0.03, "beta": 0.06, "gamma": 0.12}
    providers = []
    for name, delay in delays.items():
        p = SlowProvider(name)
        p.delay_s = delay
        providers.append(p)
    async with gateway_from_yaml(trio(), providers=providers) as gw:
        t0 = time.perf_counter()
        env = await gw.route(Request("trio", "Review this."))
        wall = time.perf_counter() - t0
    assert env.status == "success"
    slowest, total = max(delays.values()), sum(delays.values())
    assert slowest <= wall < slowest + (total - slowest) / 2  # concurrent, not serial
    assert slowest * 1000 <= env.meta["latency_ms"] < wall * 1000 + 1
    member_ms = [m["meta"]["latency_ms"] for m in env.data["members"]]
    assert env.meta["latency_ms"] >= max(member_ms)


@pytest.mark.anyio
async def test_panel_progress_reports_each_member() -> None:
    seen: list[tuple[float, float, str]] = []

    async def progress(done: float, total: float, message: str) -> None:
        seen.append((done, total, message))

    alpha, beta, gamma = three()
    beta.fail_with(ErrorClass.SERVER_ERROR)
    async with gateway_from_yaml(trio(), providers=[alpha, beta, gamma]) as gw:
        await gw.route(Request("trio", "Review this."), progress=progress)
    assert [s[:2] for s in seen] == [(1, 3), (2, 3), (3, 3)]
    assert sorted(s[2] for s in seen) == ["member 1 ok", "member 2 failed", "member 3 ok"]


class WireProvider(FakeProvider):
    """A fake that logs when it starts and when its request is on the wire."""

    log: list[tuple[str, str]]
    delay_s: float = 0.0
    signals: bool = True

    async def complete(self, request: ProviderRequest) -> Outcome:
        self.log.append(("start", self.name))
        for _ in range(5):  # yield to the loop as an HTTP client's writes do
            await anyio.sleep(0)
        if self.signals:
            self.log.append(("sent", self.name))
            wire.sent()
        await anyio.sleep(self.delay_s)
        return await super().complete(request)


def wire_trio(delays: dict[str, float], *, silent: str = "") -> list[WireProvider]:
    log: list[tuple[str, str]] = []
    providers = []
    for name, delay in delays.items():
        p = WireProvider(name)
        p.log, p.delay_s, p.signals = log, delay, name != silent
        providers.append(p)
    return providers


@pytest.mark.anyio
async def test_members_start_one_after_another_once_each_request_is_out() -> None:
    providers = wire_trio({"alpha": 0.0, "beta": 0.0, "gamma": 0.0})
    async with gateway_from_yaml(trio(), providers=providers) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "success"
    # Never seen before: config order, each member starting after the previous one sent.
    assert providers[0].log == [
        ("start", "alpha"),
        ("sent", "alpha"),
        ("start", "beta"),
        ("sent", "beta"),
        ("start", "gamma"),
        ("sent", "gamma"),
    ]


@pytest.mark.anyio
async def test_the_member_expected_to_answer_last_starts_first() -> None:
    providers = wire_trio({"alpha": 0.02, "beta": 0.0, "gamma": 0.06})
    async with gateway_from_yaml(trio(), providers=providers) as gw:
        await gw.route(Request("trio", "Review this."))  # learns the answer times
        log = providers[0].log
        log.clear()
        env = await gw.route(Request("trio", "Review this."))
        pacing = gw.panel_pacing
    assert env.status == "success"
    assert [name for event, name in log if event == "start"] == ["gamma", "alpha", "beta"]
    expected = [pacing.expected_ms(k) for k in ("gamma/g-1", "alpha/a-1", "beta/b-1")]
    assert all(ms is not None for ms in expected)
    assert expected == sorted(expected, reverse=True)  # type: ignore[type-var]
    # The envelope keeps config order whatever the start order was.
    assert [m["meta"]["provider"] for m in env.data["members"]] == ["alpha", "beta", "gamma"]


@pytest.mark.anyio
async def test_a_member_that_never_signals_holds_the_next_back_only_briefly() -> None:
    providers = wire_trio({"alpha": 0.3, "beta": 0.0, "gamma": 0.0}, silent="alpha")
    async with gateway_from_yaml(trio(), providers=providers) as gw:
        t0 = time.perf_counter()
        env = await gw.route(Request("trio", "Review this."))
        wall = time.perf_counter() - t0
    assert env.status == "success"
    starts = [name for event, name in providers[0].log if event == "start"]
    assert starts == ["alpha", "beta", "gamma"]
    # beta did not wait for alpha's answer (0.3 s), only for the short on-the-wire wait.
    assert wall < 0.3 + 0.15


@pytest.mark.anyio
async def test_a_member_that_fails_before_sending_does_not_hold_the_others() -> None:
    providers = wire_trio({"alpha": 0.0, "beta": 0.0, "gamma": 0.0})
    providers[0].available = False  # refused by the provider: nothing sent, no signal
    async with gateway_from_yaml(trio(), providers=providers) as gw:
        env = await gw.route(Request("trio", "Review this."))
    assert env.status == "success"  # quorum 2
    assert [m["status"] for m in env.data["members"]] == ["error", "success", "success"]


def test_pacing_order_unseen_first_then_slowest_to_fastest() -> None:
    p = Pacing()
    assert p.order(["a", "b", "c"]) == [0, 1, 2]
    p.record("a", 10.0)
    p.record("c", 50.0)
    assert p.order(["a", "b", "c"]) == [1, 2, 0]
    p.record("b", 30.0)
    assert p.order(["a", "b", "c"]) == [2, 1, 0]
    for _ in range(20):  # a moving average: c turns fast
        p.record("c", 1.0)
    assert p.order(["a", "b", "c"]) == [1, 0, 2]
