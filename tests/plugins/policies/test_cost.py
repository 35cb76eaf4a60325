"""Cost preflight: a true worst-case estimate, warn and block, unknown prices, panel caps."""

from __future__ import annotations

from pathlib import Path

import pytest
from _money_helpers import Chain, fake, states, worst_micro

from llmgw.kernel import ConfigError, Request, Target
from llmgw.kernel.testing import gateway_from_yaml

BASE = """
plugins: [{plugins}]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
  big: {{provider: fake, model: m1, max_tokens: 20000}}
  unpriced: {{provider: fake, model: nopr, max_tokens: 10}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: fake, model: m2}}]
    max_tokens: 600
  trio:
    members:
      - {{provider: fake, model: m1}}
      - {{provider: fake, model: m2}}
      - {{provider: fake, model: nopr}}
    max_tokens: 10
cost:
{cost}
"""
COST = """  warn_usd: 0.005
  block_usd: 1.00
  panel_cap_usd: {duo: 0.10}"""


def gw(
    cost: str = COST,
    plugins: str = "cost, router, fake",
    env: dict[str, str] | None = None,
    **kw: object,
):
    p = fake(models=("m1", "m2"))
    return gateway_from_yaml(
        BASE.format(plugins=plugins, cost=cost), providers=[p], env=env or {}, **kw
    ), p


@pytest.mark.anyio
async def test_estimate_is_the_worst_case_and_the_actual_is_shown_beside_it() -> None:
    g, p = gw()
    env = await g.route(Request("quick", "hello there", system="be brief"))
    assert env.ok
    pre = env.meta["preflight"]
    assert pre["estimate_usd"] == worst_micro("hello there", 100, "be brief") / 1e6
    assert pre["target"] == "fake/m1"
    assert pre["warning"].startswith("worst-case cost $0.0105 is above cost.warn_usd $0.0050")
    assert 0 < env.meta["cost_usd_approx"] <= pre["estimate_usd"]
    assert p.received[0].max_tokens == 100


@pytest.mark.anyio
async def test_under_warn_has_no_warning() -> None:
    g, _ = gw()
    env = await g.route(Request("quick", "hi", max_tokens=10))
    assert env.ok
    assert "warning" not in env.meta["preflight"]


@pytest.mark.anyio
async def test_block_refuses_before_dispatch_and_says_how_to_fit() -> None:
    g, p = gw()
    env = await g.route(Request("big", "hi"))  # no max_tokens: the class's 20000 is used
    assert env.status == "error"
    assert env.error_class == "policy_refused"
    msg = env.error or ""
    assert "is $2.0003," in msg and "cost.block_usd $1.0000" in msg
    assert "max_tokens 20000 at $100/Mtok" in msg
    # (1.00 - input 27 tokens x $10/M) / $100/M = 9997 output tokens fit
    assert "pass max_tokens <= 9997" in msg
    assert p.received == []
    ok = await g.route(Request("big", "hi", max_tokens=9997))
    assert ok.ok


@pytest.mark.anyio
async def test_block_allows_a_cheaper_fallback() -> None:
    g, p = gw(
        plugins="cost, chain, router, fake",
        extra_plugins={
            "chain": Chain(Target("fake", "m1", 20000), Target("fake", "m2", 100, label="fallback"))
        },
    )
    env = await g.route(Request("chain", "hi"))
    assert env.ok
    assert [r.model for r in p.received] == ["m2"]
    assert env.meta["attempts"][0]["error_class"] == "policy_refused"


@pytest.mark.anyio
async def test_unknown_price_allowed_with_a_warning_by_default() -> None:
    g, _ = gw()
    env = await g.route(Request("unpriced", "hi"))
    assert env.ok
    assert env.meta["preflight"]["estimate_usd"] is None
    assert "price of fake/nopr is unknown" in env.meta["preflight"]["warning"]


@pytest.mark.anyio
async def test_unknown_price_blocked_when_configured() -> None:
    g, p = gw(COST + "\n  unknown_price: block")
    env = await g.route(Request("unpriced", "hi"))
    assert env.error_class == "policy_refused"
    assert "unknown_price" in (env.error or "")
    assert p.received == []


@pytest.mark.anyio
async def test_panel_cap_refuses_up_front_nothing_sent_nothing_reserved(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    g, p = gw(plugins="cost, ledger, router, fake", env={"LLM_GATEWAY_LEDGER_PATH": str(db)})
    env = await g.route(Request("duo", "hi"))  # 2 x ~$0.06 > $0.10
    assert env.error_class == "policy_refused"
    assert "cost.panel_cap_usd.duo" in (env.error or "") and "nothing was sent" in (env.error or "")
    assert "fake/m1 $0.0603" in (env.error or "")
    assert p.received == []
    assert sum(states(db).values()) == 0
    ok = await g.route(Request("duo", "hi", max_tokens=100))
    assert ok.ok
    assert ok.meta["preflight"]["estimate_usd"] == 2 * worst_micro("hi", 100) / 1e6


@pytest.mark.anyio
async def test_panel_total_is_checked_against_block_usd() -> None:
    g, p = gw("  block_usd: 0.10")
    env = await g.route(Request("duo", "hi"))
    assert env.error_class == "policy_refused"
    assert "panel 'duo'" in (env.error or "")
    assert p.received == []


@pytest.mark.anyio
async def test_panel_with_a_cap_and_an_unknown_member_price_is_refused() -> None:
    g, p = gw("  panel_cap_usd: {trio: 5}")
    env = await g.route(Request("trio", "hi"))
    assert env.error_class == "policy_refused"
    assert "fake/nopr" in (env.error or "")
    assert p.received == []


@pytest.mark.parametrize(
    ("cost", "needle"),
    [
        ("  panel_cap_usd: {quick: 1}", "'quick', which is not a panel"),
        ("  panel_cap_usd: {nope: 1}", "'nope', which is not a task class"),
        ("  panel_cap_usd: {duo: -1}", "must be >= 0"),
        ("  warn_usd: 2\n  block_usd: 1", "above block_usd"),
        ("  unknown_price: maybe", "cost.unknown_price"),
        ("  blok_usd: 1", "cost.blok_usd: unknown key"),
    ],
)
def test_config_errors_name_the_problem(cost: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        gw(cost)
    assert needle in str(info.value)


@pytest.mark.anyio
async def test_removed_from_plugins_the_gateway_serves_without_estimates() -> None:
    g, p = gw(plugins="router, fake")
    env = await g.route(Request("big", "hi"))
    assert env.ok  # no block any more
    assert "preflight" not in env.meta
    assert len(p.received) == 1


def test_report_info() -> None:
    g, _ = gw()
    assert g.routing_info()["cost"] == {
        "warn_usd": 0.005,
        "block_usd": 1.0,
        "unknown_price": "allow",
        "panel_cap_usd": {"duo": 0.1},
    }
