"""The async facade: call order, first-result emulation, reverse unwinding, cancellation."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from llmgw.kernel import (
    CallRefused,
    Disposition,
    ErrorClass,
    Outcome,
    Rejection,
    Request,
    Verdict,
    hookimpl,
)
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml

YAML = """
plugins: [{names}, router, fake]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 50}}
"""


class Recorder:
    """A plugin that logs each hook it sees into a shared list."""

    def __init__(
        self,
        name: str,
        log: list[str],
        *,
        reject: bool = False,
        refuse: bool = False,
        advice: Disposition | None = None,
        crash_after: bool = False,
    ) -> None:
        self.name, self.log, self.reject, self.refuse = name, log, reject, refuse
        self.advice, self.crash_after = advice, crash_after

    @hookimpl
    async def preflight(self, call: Any) -> Rejection | None:
        self.log.append(f"preflight:{self.name}")
        if self.reject:
            return Rejection(ErrorClass.POLICY_REFUSED, f"{self.name} says no")
        return None

    @hookimpl
    async def before_call(self, call: Any) -> None:
        self.log.append(f"before:{self.name}")
        if self.refuse:
            raise CallRefused(ErrorClass.BUDGET_EXCEEDED, f"{self.name} refuses")

    @hookimpl
    def after_call(self, call: Any, outcome: Outcome) -> Disposition | None:
        self.log.append(f"after:{self.name}:{outcome.error_class or 'ok'}")
        if self.crash_after:
            raise RuntimeError("boom")
        return self.advice


def build(log: list[str], provider: FakeProvider | None = None, **plugins: Recorder) -> Any:
    names = ", ".join(plugins)
    return gateway_from_yaml(
        YAML.format(names=names), providers=[provider or FakeProvider()], extra_plugins=plugins
    )


@pytest.mark.anyio
async def test_config_order_is_call_order_and_after_call_unwinds_in_reverse() -> None:
    log: list[str] = []
    gw = build(log, a=Recorder("a", log), b=Recorder("b", log), c=Recorder("c", log))
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "success"
    assert log == [
        "preflight:a",
        "preflight:b",
        "preflight:c",
        "before:a",
        "before:b",
        "before:c",
        "after:c:ok",
        "after:b:ok",
        "after:a:ok",
    ]


@pytest.mark.anyio
async def test_reordering_plugins_reorders_calls() -> None:
    log: list[str] = []
    plugins = {"c": Recorder("c", log), "a": Recorder("a", log)}
    gw = build(log, **plugins)
    await gw.route(Request("quick", "hi"))
    assert [e for e in log if e.startswith("before")] == ["before:c", "before:a"]


@pytest.mark.anyio
async def test_first_rejection_wins_and_later_preflights_are_not_called() -> None:
    log: list[str] = []
    provider = FakeProvider()
    gw = build(
        log, provider, a=Recorder("a", log), b=Recorder("b", log, reject=True), c=Recorder("c", log)
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "error"
    assert env.meta["error_class"] == "policy_refused"
    assert "b says no" in (env.error or "")
    assert log == ["preflight:a", "preflight:b"]
    assert provider.received == []


@pytest.mark.anyio
async def test_refusal_unwinds_only_plugins_whose_before_call_completed() -> None:
    log: list[str] = []
    provider = FakeProvider()
    gw = build(
        log, provider, a=Recorder("a", log), b=Recorder("b", log, refuse=True), c=Recorder("c", log)
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.meta["error_class"] == "budget_exceeded"
    assert provider.received == []
    assert log[-3:] == ["before:a", "before:b", "after:a:budget_exceeded"]


@pytest.mark.anyio
async def test_after_call_exception_does_not_skip_the_others() -> None:
    log: list[str] = []
    gw = build(log, a=Recorder("a", log), b=Recorder("b", log, crash_after=True))
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "success"
    assert log[-2:] == ["after:b:ok", "after:a:ok"]


@pytest.mark.anyio
async def test_provider_exception_still_unwinds() -> None:
    log: list[str] = []

    def explode(_req: Any) -> Outcome:
        raise ValueError("provider bug")

    provider = FakeProvider().then(explode)
    gw = build(log, provider, a=Recorder("a", log), b=Recorder("b", log))
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "error"
    assert env.meta["error_class"] == "internal_error"
    assert "provider bug" not in (env.error or "")
    assert log[-2:] == ["after:b:internal_error", "after:a:internal_error"]


@pytest.mark.anyio
async def test_cancellation_unwinds_after_call_in_reverse() -> None:
    log: list[str] = []
    started = anyio.Event()

    class Hanging(FakeProvider):
        async def complete(self, request: Any) -> Outcome:
            started.set()
            await anyio.sleep_forever()
            raise AssertionError("unreachable")

    gw = build(log, Hanging(), a=Recorder("a", log), b=Recorder("b", log))
    async with anyio.create_task_group() as tg:
        tg.start_soon(gw.route, Request("quick", "hi"))
        await started.wait()
        tg.cancel_scope.cancel()
    assert log[-2:] == ["after:b:cancelled", "after:a:cancelled"]


@pytest.mark.anyio
async def test_dispositions_stop_beats_retry_beats_fallback() -> None:
    assert Disposition.combine([Disposition("fallback"), Disposition("retry", 1.0)]) == Disposition(
        "retry", 1.0
    )
    assert Disposition.combine(
        [Disposition("retry", 1.0), Disposition("retry", 3.0)]
    ) == Disposition("retry", 3.0)
    assert Disposition.combine([Disposition("retry", 9.0), Disposition("stop")]) == Disposition(
        "stop"
    )
    assert Disposition.combine([]) is None


@pytest.mark.anyio
async def test_retry_disposition_drives_the_kernel_loop() -> None:
    provider = FakeProvider().fail_with(ErrorClass.SERVER_ERROR).fail_with(ErrorClass.SERVER_ERROR)

    class RetryTwice:
        @hookimpl
        def after_call(self, call: Any, outcome: Outcome) -> Disposition | None:
            if not outcome.ok and call.attempt < 3:
                return Disposition("retry", 0.0)
            return None

    gw = gateway_from_yaml(
        YAML.format(names="r"), providers=[provider], extra_plugins={"r": RetryTwice()}
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "success"
    assert [a["attempt"] for a in env.meta["attempts"]] == [1, 2, 3]
    assert len(provider.received) == 3


@pytest.mark.anyio
async def test_sync_and_async_hook_implementations_are_both_supported() -> None:
    seen: list[str] = []

    class Mixed:
        @hookimpl
        def preflight(self, call: Any) -> None:
            seen.append("sync-preflight")

        @hookimpl
        async def before_call(self, call: Any) -> None:
            seen.append("async-before")

    gw = gateway_from_yaml(
        YAML.format(names="m"), providers=[FakeProvider()], extra_plugins={"m": Mixed()}
    )
    assert (await gw.route(Request("quick", "hi"))).ok
    assert seen == ["sync-preflight", "async-before"]


# --- a plugin's mistakes: contained, named, failing closed -------------------------------


class BrokenReport:
    @hookimpl
    def report_info(self) -> dict[str, Any]:
        raise KeyError("oops")


def test_a_failing_report_info_hides_no_other_section() -> None:
    """One plugin's broken report made llm_routing_info and check-config fail whole."""
    gw = gateway_from_yaml(
        YAML.format(names="broken, breaker"),
        providers=[FakeProvider()],
        extra_plugins={"broken": BrokenReport()},
    )
    info = gw.routing_info()
    assert info["broken"] == {"error": "report_info failed (KeyError); see the log"}
    assert "breakers" in str(info["breaker"]) or info["breaker"]


class BadRouter:
    @hookimpl(tryfirst=True)
    def resolve_route(self, request: Any, settings: Any) -> Any:
        raise KeyError(request.task_class)


@pytest.mark.anyio
async def test_a_router_that_raises_is_an_internal_error_envelope() -> None:
    gw = gateway_from_yaml(
        YAML.format(names="bad").replace("[bad, router, fake]", "[bad, router, fake]"),
        providers=[FakeProvider()],
        extra_plugins={"bad": BadRouter()},
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.error_class == ErrorClass.INTERNAL_ERROR.value
    assert "a resolve_route implementation failed (KeyError)" in (env.error or "")


class Verifies:
    def __init__(self, value: Any) -> None:
        self.value = value

    @hookimpl
    def verify(self, request: Any, result: Any) -> Any:
        return self.value


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["REVISE", {"verdict": "REVISE"}, 0, Verdict("accept")])  # type: ignore[arg-type]
async def test_a_verify_result_that_is_not_a_verdict_fails_closed(value: Any) -> None:
    """A string "REVISE" was ignored: the status stayed success."""
    gw = gateway_from_yaml(
        YAML.format(names="v"), providers=[FakeProvider()], extra_plugins={"v": Verifies(value)}
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.status == "needs_human_review"
    (verdict,) = env.meta["verdicts"]
    assert verdict["verdict"] == "REVISE"
    expected = "not ACCEPT or REVISE" if isinstance(value, Verdict) else "not a Verdict"
    assert expected in verdict["reasons"][0]


class Advises:
    def __init__(self, advice: Any) -> None:
        self.advice = advice

    @hookimpl
    def after_call(self, call: Any, outcome: Outcome) -> Any:
        return self.advice


BAD_ADVICE = [
    Disposition("retryy"),  # type: ignore[arg-type]
    Disposition(["retry"]),  # type: ignore[arg-type]
    Disposition("retry", "soon"),  # type: ignore[arg-type]
    Disposition("retry", float("nan")),
    Disposition("retry", -1.0),
    Disposition("retry", True),
]


@pytest.mark.anyio
@pytest.mark.parametrize("advice", BAD_ADVICE, ids=repr)
async def test_an_unusable_disposition_is_dropped_and_every_layer_still_unwinds(
    advice: Disposition,
) -> None:
    """Disposition("retryy") raised KeyError out of the request loop; an unhashable action
    raised inside the unwinding, so the layers inside it (the ledger's settle) never ran."""
    log: list[str] = []
    fake = FakeProvider()
    fake.fail_with(ErrorClass.OVERLOADED)
    gw = gateway_from_yaml(
        YAML.format(names="outer, adv, inner"),
        providers=[fake],
        extra_plugins={
            "outer": Recorder("outer", log),
            "adv": Advises(advice),
            "inner": Recorder("inner", log),
        },
    )
    env = await gw.route(Request("quick", "hi"))
    assert env.error_class == ErrorClass.OVERLOADED.value
    assert len(fake.received) == 1
    assert [e for e in log if e.startswith("after")] == [
        "after:inner:overloaded",
        "after:outer:overloaded",
    ]
