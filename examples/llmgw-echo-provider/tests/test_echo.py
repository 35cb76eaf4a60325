"""The echo plugin's own tests, written with llmgw.kernel.testing."""

from __future__ import annotations

import pytest

from llmgw.kernel import Request
from llmgw.kernel.testing import gateway_from_yaml, mcp_session

YAML = """
plugins: [kill_switch, router, echo]
echo: {prefix: parrot}
task_classes:
  parrot: {provider: echo, model: echo-1, max_tokens: 3}
"""


@pytest.mark.anyio
async def test_echo_answers_and_prices_the_call() -> None:
    gw = gateway_from_yaml(YAML)
    env = await gw.route(Request("parrot", "one two"))
    assert env.status == "success"
    assert env.text == "parrot[echo-1]: one two"
    # 6 input tokens at $0.50/M + 2 output tokens at $1.50/M
    assert env.meta["cost_usd_approx"] == pytest.approx(6e-6)
    await gw.aclose()


@pytest.mark.anyio
async def test_echo_truncates_at_max_tokens() -> None:
    gw = gateway_from_yaml(YAML)
    env = await gw.route(Request("parrot", "a b c d e"))
    assert env.text == "parrot[echo-1]: a b c"
    assert env.meta["finish_reason"] == "length"
    await gw.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("code", ["rate_limited", "quota_exhausted", "content_refused"])
async def test_echo_errors_map_to_the_taxonomy(code: str) -> None:
    gw = gateway_from_yaml(YAML.replace("kill_switch, ", ""))
    env = await gw.route(Request("parrot", f"x [[echo:{code}]]"))
    assert env.status == "error"
    assert env.meta["error_class"] == code
    await gw.aclose()


@pytest.mark.anyio
async def test_echo_over_mcp() -> None:
    gw = gateway_from_yaml(YAML)
    async with mcp_session(gw) as client:
        r = await client.call_tool("llm_route", {"task_class": "parrot", "prompt": "hi"})
        assert r.structured_content["data"]["text"] == "parrot[echo-1]: hi"
        info = await client.call_tool("llm_routing_info", {})
        assert "echo-1" in info.structured_content["data"]["echo"]["models"]
    await gw.aclose()


def test_bad_settings_are_reported() -> None:
    from llmgw.kernel import ConfigError

    with pytest.raises(ConfigError) as err:
        gateway_from_yaml(YAML.replace("prefix: parrot", "prefix: ''"))
    assert "echo.prefix" in str(err.value)
