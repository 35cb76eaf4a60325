"""Kill switches: checked on every call, whatever plugins: says, live without restart."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest
from _money_helpers import Advise, Chain, fake

from llmgw.kernel import (
    Call,
    ErrorClass,
    Outcome,
    ProviderRequest,
    Request,
    Target,
    Usage,
    hookimpl,
)
from llmgw.kernel.testing import FakeProvider, gateway_from_yaml

BASE = """
plugins: [{plugins}]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
  big: {{provider: fake, model: m1, max_tokens: 20000}}
  unpriced: {{provider: fake, model: nopr, max_tokens: 10}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: fake, model: m2}}]
    max_tokens: 600
kill_switch:
  expensive_threshold_usd: 0.1
"""
# quick: worst case ~$0.0103; big: ~$2.0; duo: 2 x ~$0.0603 = ~$0.12 (> $0.10 threshold)


def gw(
    env: dict[str, str] | None = None,
    plugins: str = "kill_switch, router, fake",
    provider: FakeProvider | None = None,
    **kw: object,
):
    provider = provider or fake(models=("m1", "m2"))
    return gateway_from_yaml(
        BASE.format(plugins=plugins), env=env or {}, providers=[provider], **kw
    ), provider


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["1", "true", "YES", "on", " On ", "enabled"])
async def test_disabled_blocks_every_call_before_anything_is_sent(value: str) -> None:
    g, p = gw({"LLM_GATEWAY_DISABLED": value})
    for cls in ("quick", "duo"):
        env = await g.route(Request(cls, "hi"))
        assert env.status == "error"
        assert env.error_class == "kill_switch"
        assert "LLM_GATEWAY_DISABLED" in (env.error or "")
    assert p.received == []


@pytest.mark.anyio
@pytest.mark.parametrize("value", ["0", "false", "no", "off", ""])
async def test_switch_off_values_let_calls_through(value: str) -> None:
    g, p = gw({"LLM_GATEWAY_DISABLED": value, "LLM_GATEWAY_EXPENSIVE_DISABLED": value})
    assert (await g.route(Request("big", "hi"))).ok
    assert len(p.received) == 1


@pytest.mark.anyio
async def test_disabled_refusal_allows_no_fallback() -> None:
    cheap = Target("fake", "m2", 10, label="fallback")
    g, p = gw(
        {"LLM_GATEWAY_DISABLED": "1"},
        plugins="kill_switch, chain, router, fake",
        extra_plugins={"chain": Chain(Target("fake", "m1", 100), cheap)},
    )
    env = await g.route(Request("chain", "hi"))
    assert env.error_class == "kill_switch"
    assert [a["stage"] for a in env.meta["attempts"]] == ["rejected"]
    assert p.received == []


@pytest.mark.anyio
async def test_expensive_blocks_above_threshold_and_allows_cheap_calls() -> None:
    g, p = gw({"LLM_GATEWAY_EXPENSIVE_DISABLED": "1"})
    env = await g.route(Request("big", "hi"))
    assert env.error_class == "kill_switch"
    assert "$2.0" in (env.error or "") and "$0.1000" in (env.error or "")
    assert p.received == []
    assert (await g.route(Request("quick", "hi"))).ok
    # the same class with a smaller explicit max_tokens passes
    assert (await g.route(Request("big", "hi", max_tokens=100))).ok
    assert len(p.received) == 2


@pytest.mark.anyio
async def test_expensive_refusal_lets_a_cheaper_fallback_pass() -> None:
    g, p = gw(
        {"LLM_GATEWAY_EXPENSIVE_DISABLED": "1"},
        plugins="kill_switch, chain, router, fake",
        extra_plugins={
            "chain": Chain(Target("fake", "m1", 20000), Target("fake", "m2", 100, label="fallback"))
        },
    )
    env = await g.route(Request("chain", "hi"))
    assert env.ok
    assert env.meta["model"] == "m2"
    assert [r.model for r in p.received] == ["m2"]


@pytest.mark.anyio
async def test_unknown_price_counts_as_expensive_only_while_the_switch_is_on() -> None:
    g, _ = gw({"LLM_GATEWAY_EXPENSIVE_DISABLED": "1"})
    env = await g.route(Request("unpriced", "hi"))
    assert env.error_class == "kill_switch"
    assert "unknown" in (env.error or "")
    g2, _ = gw({})
    assert (await g2.route(Request("unpriced", "hi"))).ok


@pytest.mark.anyio
async def test_expensive_checks_the_panel_total() -> None:
    # Each member (~$0.06) is under the $0.10 threshold; the panel (~$0.12) is not.
    g, p = gw({"LLM_GATEWAY_EXPENSIVE_DISABLED": "1"})
    env = await g.route(Request("duo", "hi"))
    assert env.error_class == "kill_switch"
    assert "panel" in (env.error or "")
    assert p.received == []
    assert (await g.route(Request("duo", "hi", max_tokens=100))).ok


@pytest.mark.anyio
async def test_switch_flipped_mid_call_stops_the_retry(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = fake()

    def first(request: object) -> Outcome:
        # The operator flips the switch while the first attempt is in flight.
        monkeypatch.setenv("LLM_GATEWAY_DISABLED", "1")
        return Outcome.failure(ErrorClass.SERVER_ERROR, "boom", sent=True)

    provider.then(first, Outcome.success("never", Usage(1, 1)))
    g, p = gw(
        {},
        plugins="kill_switch, retry_always, router, fake",
        provider=provider,
        extra_plugins={"retry_always": Advise("retry")},
    )
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "kill_switch"
    # refused by the preflight the kernel runs again before the retry (nothing sent)
    assert [a["stage"] for a in env.meta["attempts"]] == ["sent", "rejected"]
    assert len(p.received) == 1


@pytest.mark.anyio
async def test_a_switch_flipped_while_a_panel_waits_stops_every_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The panel's own checks pass; then, while it waits in a later before_call (as for
    the ledger's lock), the switch is turned on: no member goes out. Each member is
    checked in its own before_call, right before it would be sent."""
    monkeypatch.delenv("LLM_GATEWAY_DISABLED", raising=False)

    class SlowPanelStep:
        @hookimpl
        async def before_call(self, call: Call) -> None:
            if call.is_panel:
                await anyio.sleep(0.01)
                monkeypatch.setenv("LLM_GATEWAY_DISABLED", "1")  # the operator, meanwhile

    g, p = gw(
        {},
        plugins="kill_switch, slow_step, router, fake",
        extra_plugins={"slow_step": SlowPanelStep()},
    )
    env = await g.route(Request("duo", "hi", max_tokens=100))
    assert p.received == []
    for member in env.data["members"]:
        assert member["meta"]["error_class"] == "kill_switch"
        assert [a["stage"] for a in member["meta"]["attempts"]] == ["refused"]


@pytest.mark.anyio
async def test_a_member_retry_after_a_switch_is_turned_on_is_not_sent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A member's retry is an attempt of its own: checked in preflight and before_call.
    Whichever member goes first, nothing is sent once the switch is on."""
    monkeypatch.delenv("LLM_GATEWAY_DISABLED", raising=False)
    provider = fake()
    after_flip: list[str] = []

    def answer(request: ProviderRequest) -> Outcome:
        if os.environ.get("LLM_GATEWAY_DISABLED"):
            after_flip.append(request.model)
        if request.model == "m1":
            # The operator flips the switch while the panel's first attempts are out.
            monkeypatch.setenv("LLM_GATEWAY_DISABLED", "1")
            return Outcome.failure(ErrorClass.SERVER_ERROR, "boom", sent=True)
        return Outcome.success("ok", Usage(1, 1))

    provider.then(answer, answer, answer)
    g, p = gw(
        {},
        plugins="kill_switch, retry_always, router, fake",
        provider=provider,
        extra_plugins={"retry_always": Advise("retry")},
    )
    env = await g.route(Request("duo", "hi", max_tokens=100))
    assert after_flip == []
    first = env.data["members"][0]
    assert first["meta"]["error_class"] == "kill_switch"
    assert [a["stage"] for a in first["meta"]["attempts"]] == ["sent", "rejected"]
    assert [r.model for r in p.received].count("m1") == 1
    # The next call is refused whole, before anything is sent.
    sent = len(p.received)
    assert (await g.route(Request("duo", "hi", max_tokens=100))).error_class == "kill_switch"
    assert len(p.received) == sent


@pytest.mark.anyio
async def test_dotenv_beside_the_config_flips_a_switch_without_restart(tmp_path: Path) -> None:
    config = tmp_path / "routing.yaml"
    g, p = gw({}, path=config)
    assert (await g.route(Request("quick", "hi"))).ok
    (tmp_path / ".env").write_text("LLM_GATEWAY_DISABLED=1\n")
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "kill_switch"
    assert ".env" in (env.error or "")
    (tmp_path / ".env").write_text("LLM_GATEWAY_DISABLED=0\n# switched off again\n")
    assert (await g.route(Request("quick", "hi"))).ok
    # A broken .env fails closed rather than silently dropping a switch.
    (tmp_path / ".env").write_text("LLM_GATEWAY_DISABLED 1\n")
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "kill_switch"
    assert "cannot read" in (env.error or "")
    assert len(p.received) == 2


@pytest.mark.anyio
async def test_essential_readded_when_omitted_and_enforced_without_max_tokens() -> None:
    # kill_switch and cost are both left out of plugins:; the request sets no max_tokens.
    g, p = gw({"LLM_GATEWAY_EXPENSIVE_DISABLED": "1"}, plugins="router, fake")
    assert g.plugins[0].name == "kill_switch"
    assert next(pl for pl in g.plugins if pl.name == "kill_switch").essential_reason
    env = await g.route(Request("big", "hi"))
    assert env.error_class == "kill_switch"
    g2, p2 = gw({"LLM_GATEWAY_DISABLED": "1"}, plugins="router, fake")
    assert (await g2.route(Request("quick", "hi"))).error_class == "kill_switch"
    assert p.received == p2.received == []


def test_report_info_shows_both_switches_and_the_threshold() -> None:
    g, _ = gw({"LLM_GATEWAY_EXPENSIVE_DISABLED": "yes"})
    info = g.routing_info()["kill_switch"]
    assert info["disabled"] is False
    assert info["expensive_disabled"] is True
    assert info["expensive_threshold_usd"] == 0.1
    assert info["switched_on_by"]["LLM_GATEWAY_EXPENSIVE_DISABLED"] == ["startup environment"]


def test_threshold_must_not_be_negative() -> None:
    from llmgw.kernel import ConfigError

    with pytest.raises(ConfigError, match=r"kill_switch\.expensive_threshold_usd"):
        gateway_from_yaml(
            BASE.format(plugins="kill_switch, router, fake").replace("0.1", "-1"),
            providers=[fake()],
        )
