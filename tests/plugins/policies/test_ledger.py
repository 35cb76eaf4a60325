"""The ledger plugin in a gateway: reserve before sending, settle after, monthly caps."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _money_helpers import Advise, Chain, fake, flush, rows, states, store, worst_micro

from llmgw.kernel import (
    ConfigError,
    ErrorClass,
    Outcome,
    PluginError,
    Rejection,
    Request,
    Target,
    Usage,
    hookimpl,
)
from llmgw.kernel.config import load_settings
from llmgw.kernel.testing import FakeClock, FakeProvider, gateway_from_yaml
from llmgw.plugins.policies.ledger import format_spend, spend_report
from llmgw.plugins.policies.ledger_store import Caps, Item

BASE = """
plugins: [{plugins}]
task_classes:
  quick: {{provider: fake, model: m1, max_tokens: 100}}
  other: {{provider: alt, model: m1, max_tokens: 100}}
  unpriced: {{provider: fake, model: nopr, max_tokens: 10}}
  duo:
    members: [{{provider: fake, model: m1}}, {{provider: fake, model: m2}}]
    max_tokens: 100
{extra}
"""
W = worst_micro("hi", 100)  # ~$0.0103 per attempt of `quick`


def gw(
    tmp_path: Path,
    *,
    env: dict[str, str] | None = None,
    extra: str = "",
    plugins: str = "ledger, router, fake",
    providers: list[FakeProvider] | None = None,
    **kw: Any,
):
    env = {"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db"), **(env or {})}
    provs = providers or [fake(), fake("alt")]
    return gateway_from_yaml(
        BASE.format(plugins=plugins, extra=extra), env=env, providers=provs, **kw
    ), provs[0]


def cap_yaml(total: float | None = None, **providers: float) -> str:
    lines = ["ledger:", "  caps:"]
    if total is not None:
        lines.append(f"    total_monthly_usd: {total}")
    if providers:
        lines.append(
            "    providers: {" + ", ".join(f"{k}: {v}" for k, v in providers.items()) + "}"
        )
    return "\n".join(lines)


@pytest.mark.anyio
async def test_each_call_reserves_then_settles_what_it_cost(tmp_path: Path) -> None:
    g, _p = gw(tmp_path)
    env = await g.route(Request("quick", "hi", request_id="r-1"))
    assert env.ok
    await flush(g)
    (row,) = rows(tmp_path / "l.db")
    assert (row["state"], row["provider"], row["model"], row["task_class"], row["request_id"]) == (
        "settled",
        "fake",
        "m1",
        "quick",
        "r-1",
    )
    assert row["reserved_micro"] == W
    assert row["cost_micro"] == round(env.meta["cost_usd_approx"] * 1e6)
    assert row["month"] == "2026-11" or row["month"] == datetime.now(UTC).strftime("%Y-%m")
    await g.aclose()


@pytest.mark.anyio
async def test_total_cap_refuses_with_scope_cap_and_headroom_and_no_fallback(
    tmp_path: Path,
) -> None:
    # a call's worst case is $0.01026 and the fake echo bills $0.00031: the cap fits one call
    g, p = gw(
        tmp_path,
        extra=cap_yaml(total=0.0105),
        plugins="ledger, chain, router, fake",
        extra_plugins={"chain": Chain(Target("fake", "m1", 100), Target("fake", "m2", 10))},
    )
    assert (await g.route(Request("quick", "hi"))).ok  # the echo costs far less than W
    env = await g.route(Request("chain", "hi"))
    # headroom is under a quick call's worst case: refused, and no fallback past a total cap
    await flush(g)
    used = sum(r["cost_micro"] for r in rows(tmp_path / "l.db"))
    assert used == 310
    assert env.error_class == "budget_exceeded"
    msg = env.error or ""
    # Micro-dollars in full: 10,500 - 310 = 10,190 of headroom against W.
    assert "total monthly cap ($0.010500, ledger.caps.total_monthly_usd)" in msg
    assert "headroom $0.010190," in msg
    assert f"needs up to ${W / 1e6:.6f}" in msg
    assert [a["stage"] for a in env.meta["attempts"]] == ["refused"]
    assert len(p.received) == 1


@pytest.mark.anyio
async def test_provider_cap_refusal_falls_back_to_another_provider(tmp_path: Path) -> None:
    alt = fake("alt")
    g, _p = gw(
        tmp_path,
        extra=cap_yaml(fake=0.005),
        plugins="ledger, chain, router, fake",
        providers=[fake(), alt],
        extra_plugins={"chain": Chain(Target("fake", "m1", 100), Target("alt", "m1", 100))},
    )
    env = await g.route(Request("chain", "hi"))
    assert env.ok
    assert env.meta["provider"] == "alt"
    assert env.meta["attempts"][0]["error_class"] == "budget_exceeded"
    assert env.meta["attempts"][0]["stage"] == "refused"
    assert len(alt.received) == 1


@pytest.mark.anyio
async def test_env_caps_override_config_and_are_enforced_without_max_tokens(
    tmp_path: Path,
) -> None:
    # config says $100, the env says $0.001: the env wins; the request sets no max_tokens
    g, p = gw(
        tmp_path, extra=cap_yaml(total=100, fake=100), env={"LLM_GATEWAY_CAP_FAKE_MONTHLY": "0.001"}
    )
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "budget_exceeded"
    assert "LLM_GATEWAY_CAP_FAKE_MONTHLY" in (env.error or "")
    assert p.received == []
    info = g.routing_info()["ledger"]
    assert info["providers"]["fake"]["cap_usd"] == 0.001
    assert info["providers"]["fake"]["cap_source"] == "LLM_GATEWAY_CAP_FAKE_MONTHLY"
    assert info["total"]["cap_usd"] == 100


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"LLM_GATEWAY_CAP_TOTAL_MONTHLY": "ten"}, "LLM_GATEWAY_CAP_TOTAL_MONTHLY='ten' is not"),
        ({"LLM_GATEWAY_CAP_TOTAL_MONTHLY": "-1"}, "LLM_GATEWAY_CAP_TOTAL_MONTHLY='-1' is not"),
        ({"LLM_GATEWAY_CAP_FAKE_MONTHLY": "nan"}, "LLM_GATEWAY_CAP_FAKE_MONTHLY='nan' is not"),
        # Beyond what the ledger can count (it overflowed later, as a traceback or as a
        # ledger error on every call).
        ({"LLM_GATEWAY_CAP_TOTAL_MONTHLY": "1e400"}, "'1e400' is not a dollar amount between"),
        ({"LLM_GATEWAY_CAP_TOTAL_MONTHLY": "1e13"}, "'1e13' is not a dollar amount between"),
        ({"LLM_GATEWAY_CAP_OPENIA_MONTHLY": "5"}, "provider 'openia', which routing.yaml"),
        ({"LLM_GATEWAY_LEDGER": "maybe"}, "LLM_GATEWAY_LEDGER='maybe' is not understood"),
        (
            {"LLM_GATEWAY_LEDGER": "0", "LLM_GATEWAY_CAP_TOTAL_MONTHLY": "5"},
            "LLM_GATEWAY_LEDGER=0 turns the spend ledger off, but a monthly cap is set",
        ),
    ],
)
def test_bad_environment_is_a_clear_config_error(
    tmp_path: Path, env: dict[str, str], needle: str
) -> None:
    with pytest.raises((ConfigError, PluginError)) as info:
        gw(tmp_path, env=env)
    assert needle in str(info.value)
    assert "environment" in str(info.value)


@pytest.mark.anyio
async def test_a_path_in_llm_gateway_ledger_is_the_ledger_file(tmp_path: Path) -> None:
    """The original product took LLM_GATEWAY_LEDGER as the ledger's file; it was refused
    ("use 1 or 0"). A path there turns the ledger on in that file; the _PATH variable
    still wins."""
    env = {"LLM_GATEWAY_LEDGER": str(tmp_path / "seed.db")}
    g = gateway_from_yaml(
        BASE.format(plugins="ledger, router, fake", extra=""),
        env=env,
        providers=[fake(), fake("alt")],
    )
    async with g:
        assert (await g.route(Request("quick", "hi"))).ok
        assert g.routing_info()["ledger"]["enabled"] is True
    assert (tmp_path / "seed.db").exists()
    g, _p = gw(tmp_path, env=env)  # LLM_GATEWAY_LEDGER_PATH (l.db) set as well: it wins
    async with g:
        assert (await g.route(Request("quick", "hi"))).ok
    assert (tmp_path / "l.db").exists()


def test_caps_must_name_known_providers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"caps\.providers names 'nope'"):
        gw(tmp_path, extra=cap_yaml(nope=1))
    with pytest.raises(ConfigError, match="lease_s"):
        gw(tmp_path, extra="ledger: {lease_s: 30}")


@pytest.mark.anyio
async def test_essential_when_a_cap_is_set_even_if_omitted_from_plugins(tmp_path: Path) -> None:
    # neither ledger nor cost listed; the cap comes from the environment
    g, p = gw(tmp_path, plugins="router, fake", env={"LLM_GATEWAY_CAP_TOTAL_MONTHLY": "0.001"})
    names = [pl.name for pl in g.plugins]
    assert "ledger" in names and "cost" not in names
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "budget_exceeded"
    assert p.received == []


@pytest.mark.anyio
async def test_removed_from_plugins_without_caps_the_gateway_serves_without_a_ledger(
    tmp_path: Path,
) -> None:
    g, _p = gw(tmp_path, plugins="router, fake")
    assert "ledger" not in [pl.name for pl in g.plugins]
    assert (await g.route(Request("quick", "hi"))).ok
    assert not (tmp_path / "l.db").exists()


@pytest.mark.anyio
async def test_ledger_off_by_env_when_no_cap(tmp_path: Path) -> None:
    g, _p = gw(tmp_path, env={"LLM_GATEWAY_LEDGER": "0"})
    assert (await g.route(Request("quick", "hi"))).ok
    assert not (tmp_path / "l.db").exists()
    assert g.routing_info()["ledger"]["enabled"] is False


@pytest.mark.anyio
async def test_unknown_price_refused_while_a_cap_applies(tmp_path: Path) -> None:
    g, p = gw(tmp_path, extra=cap_yaml(total=10))
    env = await g.route(Request("unpriced", "hi"))
    assert env.error_class == "budget_exceeded"
    assert "price of fake/nopr is unknown" in (env.error or "")
    assert "total monthly cap ($10.0000" in (env.error or "")
    assert p.received == []
    # a cap on another provider does not apply to this call
    g2, _p2 = gw(
        tmp_path,
        extra=cap_yaml(alt=10),
    )
    assert (await g2.route(Request("unpriced", "hi"))).ok
    await flush(g2)
    unpriced = [r for r in rows(tmp_path / "l.db") if r["model"] == "nopr"]
    assert [(r["state"], r["priced"]) for r in unpriced] == [("settled", 0)]


@pytest.mark.anyio
async def test_billed_errors_are_recorded_and_unbilled_ones_released(tmp_path: Path) -> None:
    p = fake()
    p.then(
        Outcome.failure(ErrorClass.CONTENT_REFUSED, "x", sent=True, usage=Usage(10, 20)),
        Outcome.failure(ErrorClass.TIMEOUT, "x", sent=True),
        Outcome.failure(ErrorClass.CONNECTION_ERROR, "x", sent=False),
        # an HTTP error answer without usage: definite, not billed
        Outcome.failure(ErrorClass.OVERLOADED, "x", sent=True, status_code=503),
    )
    g, _ = gw(tmp_path, providers=[p, fake("alt")])
    for _ in range(4):
        assert not (await g.route(Request("quick", "hi"))).ok
    await flush(g)
    got = [(r["state"], r["cost_micro"], r["error_class"]) for r in rows(tmp_path / "l.db")]
    assert got == [
        ("settled", 10 * 10 + 20 * 100, "content_refused"),
        ("unknown", None, "timeout"),
        ("released", 0, "connection_error"),
        ("settled", 0, "overloaded"),
    ]
    total = g.routing_info()["ledger"]["total"]
    assert total["settled_usd"] == 0.0021
    assert total["unknown_usd"] == W / 1e6
    assert total["reserved_usd"] == 0


@pytest.mark.anyio
async def test_fallback_spend_recorded_once_per_attempt(tmp_path: Path) -> None:
    p = fake()
    p.then(Outcome.failure(ErrorClass.SERVER_ERROR, "x", sent=True, usage=Usage(5, 7)))
    g, _ = gw(
        tmp_path,
        plugins="ledger, fallback_always, chain, router, fake",
        providers=[p, fake("alt")],
        extra_plugins={
            "fallback_always": Advise("fallback"),
            "chain": Chain(Target("fake", "m1", 100), Target("fake", "m2", 50)),
        },
    )
    env = await g.route(Request("chain", "hi"))
    assert env.ok and env.meta["model"] == "m2"
    await flush(g)
    got = rows(tmp_path / "l.db")
    assert [(r["model"], r["state"]) for r in got] == [("m1", "settled"), ("m2", "settled")]
    assert len({r["id"] for r in got}) == 2
    billed = [round(a["cost_usd"] * 1e6) for a in env.meta["attempts"]]
    assert [r["cost_micro"] for r in got] == billed
    total = g.routing_info()["ledger"]["total"]
    assert round(total["settled_usd"] * 1e6) == sum(billed)  # counted once, not twice
    assert round(env.meta["cost_usd_approx"] * 1e6) == sum(billed)


@pytest.mark.anyio
async def test_retries_reserve_for_themselves(tmp_path: Path) -> None:
    p = fake()
    p.fail_with(ErrorClass.OVERLOADED, sent=True).fail_with(ErrorClass.OVERLOADED, sent=False)
    g, _ = gw(
        tmp_path,
        plugins="ledger, retry_always, router, fake",
        providers=[p, fake("alt")],
        extra_plugins={"retry_always": Advise("retry")},
    )
    assert (await g.route(Request("quick", "hi"))).ok
    await flush(g)
    assert [r["state"] for r in rows(tmp_path / "l.db")] == ["unknown", "released", "settled"]


class RejectModel:
    """Preflight-rejects one model with fallback allowed (like an open breaker)."""

    def __init__(self, model: str) -> None:
        self.model = model

    @hookimpl
    def preflight(self, call: Any) -> Rejection | None:
        if call.target is not None and call.target.model == self.model:
            return Rejection(ErrorClass.CIRCUIT_OPEN, "open", fallback=True)
        return None


@pytest.mark.anyio
async def test_panel_reserves_all_members_at_once_or_nothing(tmp_path: Path) -> None:
    # each member fits the cap, both together do not
    g, p = gw(tmp_path, extra=cap_yaml(total=round(1.5 * W / 1e6, 6)))
    env = await g.route(Request("duo", "hi"))
    assert env.error_class == "budget_exceeded"
    assert "panel 'duo'" in (env.error or "") and "nothing was sent" in (env.error or "")
    assert p.received == []
    assert rows(tmp_path / "l.db") == []


@pytest.mark.anyio
async def test_panel_members_use_the_panel_reservation_and_unused_ones_are_released(
    tmp_path: Path,
) -> None:
    g, _p = gw(tmp_path)
    assert (await g.route(Request("duo", "hi"))).ok
    await flush(g)
    got = rows(tmp_path / "l.db")
    assert sorted((r["model"], r["state"]) for r in got) == [("m1", "settled"), ("m2", "settled")]
    # member m2's target is rejected in its own preflight: its pre-reservation is released
    g2, _p2 = gw(
        tmp_path / "2",
        plugins="ledger, reject_m2, router, fake",
        extra_plugins={"reject_m2": RejectModel("m2")},
    )
    (tmp_path / "2").mkdir(exist_ok=True)
    env = await g2.route(Request("duo", "hi"))
    assert not env.ok
    await flush(g2)
    got = rows(tmp_path / "2" / "l.db")
    assert sorted((r["model"], r["state"]) for r in got) == [("m1", "settled"), ("m2", "released")]
    assert states(tmp_path / "2" / "l.db")["reserved"] == 0


@pytest.mark.anyio
async def test_panel_member_retry_reserves_for_itself(tmp_path: Path) -> None:
    p = fake()

    def script(request: Any) -> Outcome:
        if request.model == "m2" and not any(r.model == "m2" for r in p.received[:-1]):
            return Outcome.failure(ErrorClass.SERVER_ERROR, "x", sent=True)
        return Outcome.success("ok", Usage(1, 1))

    p.then(script, script, script)
    g, _ = gw(
        tmp_path,
        providers=[p, fake("alt")],
        plugins="ledger, retry_always, router, fake",
        extra_plugins={"retry_always": Advise("retry")},
    )
    assert (await g.route(Request("duo", "hi"))).ok
    await flush(g)
    got = sorted((r["model"], r["state"]) for r in rows(tmp_path / "l.db"))
    assert got == [("m1", "settled"), ("m2", "settled"), ("m2", "unknown")]


@pytest.mark.anyio
async def test_expired_reservations_become_unknown_at_start(tmp_path: Path) -> None:
    s = store(tmp_path / "l.db")
    clock = FakeClock()
    s.reserve(
        [Item("crashed", "fake", "m1", "quick", "r", 500)], Caps(), now=clock.now(), lease_s=600
    )
    s.close()
    clock.advance(601)
    g, _ = gw(tmp_path, clock=clock)
    info = g.routing_info()["ledger"]
    assert info["expired_at_start"] == 1
    assert info["total"]["unknown_usd"] == 0.0005
    assert rows(tmp_path / "l.db")[0]["state"] == "unknown"


@pytest.mark.anyio
async def test_months_follow_the_injected_utc_clock(tmp_path: Path) -> None:
    clock = FakeClock(wall=datetime(2027, 1, 31, 23, 59, 59, tzinfo=UTC))
    g, _ = gw(tmp_path, clock=clock)
    assert (await g.route(Request("quick", "hi"))).ok
    clock.advance(2)
    assert (await g.route(Request("quick", "hi"))).ok
    await flush(g)
    assert [r["month"] for r in rows(tmp_path / "l.db")] == ["2027-01", "2027-02"]


@pytest.mark.anyio
async def test_fails_closed_when_the_ledger_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    env_vars = {
        "LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "file" / "l.db"),
        "LLM_GATEWAY_CAP_TOTAL_MONTHLY": "5",
    }
    g, p = gw(tmp_path, env=env_vars)
    env = await g.route(Request("quick", "hi"))
    assert env.error_class == "budget_exceeded"
    msg = env.error or ""
    assert "spend ledger failed" in msg and "fail closed" in msg
    assert "total monthly cap ($5.000000, LLM_GATEWAY_CAP_TOTAL_MONTHLY)" in msg
    assert p.received == []
    assert g.routing_info()["ledger"]["error"]


@pytest.mark.anyio
async def test_fails_closed_when_locked_past_the_timeout(tmp_path: Path) -> None:
    import sqlite3

    g, p = gw(tmp_path, extra="ledger: {busy_timeout_s: 0.05}")
    other = sqlite3.connect(tmp_path / "l.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        env = await g.route(Request("quick", "hi"))
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert env.error_class == "budget_exceeded"
    assert "locked" in (env.error or "") and "LLM_GATEWAY_LEDGER=0" in (env.error or "")
    assert p.received == []
    assert (await g.route(Request("quick", "hi"))).ok


@pytest.mark.anyio
async def test_spend_report_without_a_gateway(tmp_path: Path) -> None:
    g, _ = gw(tmp_path, extra=cap_yaml(total=1, fake=0.5))
    for _ in range(3):
        assert (await g.route(Request("quick", "hi"))).ok
    await g.aclose()
    text = BASE.format(plugins="ledger, router, fake", extra=cap_yaml(total=1, fake=0.5))
    settings = load_settings(text=text, env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db")})
    report = spend_report(settings, now=datetime.now(UTC))
    spent = sum(r["cost_micro"] for r in rows(tmp_path / "l.db")) / 1e6
    assert report["total"]["settled_usd"] == pytest.approx(spent)
    assert report["total"]["headroom_usd"] == pytest.approx(1 - spent)
    assert report["providers"]["fake"]["cap_usd"] == 0.5
    assert report["by_model"]["fake/m1"]["attempts"] == 3
    assert report["by_task_class"]["quick"]["settled_usd"] == pytest.approx(spent)
    out = format_spend(report)
    assert "total" in out and "provider fake" in out and "$0.500000" in out and "quick" in out
    # no ledger file: an empty report, and no file is created
    empty = spend_report(
        load_settings(text=text, env={"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "none.db")})
    )
    assert empty["total"]["settled_usd"] == 0
    assert not (tmp_path / "none.db").exists()


def test_default_path_is_the_user_data_dir(tmp_path: Path) -> None:
    import platformdirs

    from llmgw.plugins.policies.ledger_config import ledger_path

    settings = load_settings(text=BASE.format(plugins="router", extra=""), env={})
    assert ledger_path(settings, None) == (
        Path(platformdirs.user_data_dir("llm-gateway-mcp")) / "ledger.db"
    )
    cfg_file = tmp_path / "routing.yaml"
    settings = load_settings(cfg_file, text=BASE.format(plugins="router", extra=""), env={})
    from llmgw.plugins.policies.ledger_config import LedgerConfig

    assert ledger_path(settings, LedgerConfig(path="data/l.db")) == tmp_path / "data" / "l.db"


@pytest.mark.anyio
async def test_llmgw_spend_prints_the_month(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from llmgw.kernel.cli import main

    g, _ = gw(tmp_path)
    assert (await g.route(Request("quick", "hi"))).ok
    await g.aclose()
    config = tmp_path / "routing.yaml"
    config.write_text(BASE.format(plugins="ledger, router", extra=cap_yaml(total=2)))
    monkeypatch.setenv("LLM_GATEWAY_LEDGER_PATH", str(tmp_path / "l.db"))
    assert main(["spend", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "l.db") in out
    assert "$2.0000" in out and "fake/m1" in out and "quick" in out


def test_default_lease_must_outlast_a_long_deadline(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        gw(tmp_path, extra="gateway: {deadline_s: 1000}\n")
    assert "ledger.lease_s" in str(err.value)
    assert "gateway.deadline_s" in str(err.value)


def test_one_env_cap_variable_for_two_providers_is_refused(tmp_path: Path) -> None:
    """`my-llm` and `my_llm` both map to LLM_GATEWAY_CAP_MY_LLM_MONTHLY: the variable
    capped one of them, which one by the hash seed, and left the other uncapped."""
    text = BASE.replace("other: {{provider: alt,", "other: {{provider: my_llm,").replace(
        "unpriced: {{provider: fake,", "unpriced: {{provider: my-llm,"
    )
    env = {"LLM_GATEWAY_LEDGER_PATH": str(tmp_path / "l.db"), "LLM_GATEWAY_CAP_MY_LLM_MONTHLY": "0"}
    with pytest.raises((ConfigError, PluginError)) as info:
        gateway_from_yaml(
            text.format(plugins="ledger, router, fake", extra=""),
            env=env,
            providers=[fake(), fake("my_llm"), fake("my-llm")],
        )
    assert "LLM_GATEWAY_CAP_MY_LLM_MONTHLY names two providers, 'my-llm' and 'my_llm'" in str(
        info.value
    )


def test_a_report_reads_its_totals_and_breakdowns_in_one_snapshot(tmp_path: Path) -> None:
    """The totals and the per-model breakdown were two reads: with another process
    writing, about one report in ten disagreed with itself."""
    from llmgw.plugins.policies.ledger_report import build_report
    from llmgw.plugins.policies.ledger_store import Caps, Item, LedgerStore

    path = tmp_path / "l.db"
    writer, reader = LedgerStore(path), LedgerStore(path)
    writer.open()
    reader.open()
    stop = threading.Event()
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)

    def write() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            writer.reserve(
                [Item(f"e{n}", "fake", "m1", "quick", f"r{n}", 10)], Caps(), now=now, lease_s=600
            )
            writer.settle(f"e{n}", cost_micro=7, now=now)

    t = threading.Thread(target=write)
    t.start()
    try:
        bad = 0
        for _ in range(300):
            r = build_report(reader, Caps(), {}, month="2026-11", path=str(path), enabled=True)
            model = r["by_model"].get("fake/m1", {})
            total = r["total"]
            if model and (
                model["settled_usd"] != total["settled_usd"]
                or model["reserved_usd"] != total["reserved_usd"]
            ):
                bad += 1
    finally:
        stop.set()
        t.join()
        writer.close()
        reader.close()
    assert bad == 0
