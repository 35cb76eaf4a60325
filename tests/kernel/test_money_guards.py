"""Guards the kernel keeps around money, found by review: growth after approval, billing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llmgw.kernel import ErrorClass, Outcome, PluginError, Request, Usage, hookimpl
from llmgw.kernel.results import attempt_cost
from llmgw.kernel.testing import FakeProvider, flat_price, gateway_from_yaml

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
