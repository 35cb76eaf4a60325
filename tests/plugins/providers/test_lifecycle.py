"""One HTTP client per provider for the gateway's life; lazy SDK imports; closing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from provider_support import KEYS, PROVIDERS, Stack, gateway_yaml, request

from llmgw.kernel import ErrorClass, Request
from llmgw.kernel.testing import gateway_from_yaml


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_calls_reuse_one_connection(stack: Stack, provider: str) -> None:
    for i in range(5):
        env = await stack.gw.route(Request(f"ask_{provider}", f"question {i}"))
        assert env.ok, env.error
    assert len(stack.up.requests) == 5
    assert len({r.connection_id for r in stack.up.requests}) == 1
    assert len({r.peer_port for r in stack.up.requests}) == 1


@pytest.mark.anyio
async def test_each_provider_keeps_its_own_client(stack: Stack) -> None:
    for provider in PROVIDERS:
        await stack.provider(provider).complete(request(provider))
        await stack.provider(provider).complete(request(provider))
    # five providers, one connection each
    assert len(stack.up.connections()) == len(PROVIDERS)


@pytest.mark.anyio
async def test_aclose_closes_every_client(upstream) -> None:
    gw = gateway_from_yaml(gateway_yaml(upstream), env=KEYS)
    for provider in PROVIDERS:
        assert (await gw.providers[provider].complete(request(provider))).ok
    clients = [getattr(p, "_client", None) for p in gw.providers.values()]
    assert all(c is not None for c in clients)
    await gw.aclose()
    assert all(getattr(p, "_client", None) is None for p in gw.providers.values())
    openai_client = clients[list(gw.providers).index("openai")]
    assert openai_client.is_closed


LAZY = """
import json, sys
from llmgw.kernel.testing import gateway_from_yaml
import llmgw.plugins.providers.anthropic, llmgw.plugins.providers.gemini
import llmgw.plugins.providers.openai
# The SDKs, and httpcore2, which httpx2 imports with a client's first transport.
LAZY_MODULES = ("anthropic", "google.genai", "httpcore2")
after_import = {m: m in sys.modules for m in LAZY_MODULES}
gw = gateway_from_yaml('''
plugins: [router, anthropic, gemini, openai]
task_classes:
  a: {provider: anthropic, model: claude-haiku-4-5}
  g: {provider: gemini, model: gemini-2.5-flash}
  o: {provider: openai, model: gpt-4o-mini}
''', env={"ANTHROPIC_API_KEY": "sk-ant-x-0123456789", "GEMINI_API_KEY": "g-0123456789",
        "OPENAI_API_KEY": "sk-0123456789"})
gw.routing_info()
after_build = {m: m in sys.modules for m in LAZY_MODULES}
print(json.dumps({"import": after_import, "build": after_build}))
"""


def test_sdks_are_imported_lazily() -> None:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LAZY)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    nothing = {"anthropic": False, "google.genai": False, "httpcore2": False}
    assert seen == {"import": nothing, "build": nothing}


@pytest.mark.anyio
async def test_end_to_end_through_the_gateway(stack: Stack) -> None:
    env = await stack.gw.route(Request("ask_anthropic", "2+2?", system="answer briefly"))
    assert env.ok
    assert env.text == "echo[claude-haiku-4-5]: 2+2?"
    assert env.meta["provider"] == "anthropic"
    assert env.meta["tokens"]["total"] > 0
    assert env.meta["cost_usd_approx"] > 0  # genai-prices knows claude-haiku-4-5
    body = stack.up.requests[0].body
    assert body["system"] == "answer briefly"
    assert body["max_tokens"] == 64  # the task class bound, always explicit


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("provider", "fault", "error_class"),
    [
        ("openai", "insufficient_quota", "quota_exhausted"),
        ("deepseek", "payment_required", "quota_exhausted"),
        ("anthropic", "refusal", "content_refused"),
        ("gemini", "safety", "content_refused"),
        ("local", "context_length", "context_length_exceeded"),
    ],
)
async def test_end_to_end_fault_by_prompt_marker(
    stack: Stack, provider: str, fault: str, error_class: str
) -> None:
    env = await stack.gw.route(Request(f"ask_{provider}", f"please [[fault:{fault}]]"))
    assert env.status == "error"
    assert env.meta["error_class"] == error_class
    assert env.error is not None and env.error.startswith(f"{provider}/")


@pytest.mark.anyio
async def test_report_info_lists_models_prices_and_availability(upstream) -> None:
    text = gateway_yaml(
        upstream, extra="prices:\n  openai/gpt-4o-mini: {input_per_mtok: 1, output_per_mtok: 2}\n"
    )
    env = {k: v for k, v in KEYS.items() if k != "GEMINI_API_KEY"}
    gw = gateway_from_yaml(text, env=env)
    try:
        info = gw.routing_info()
    finally:
        await gw.aclose()
    openai = info["openai"]
    assert openai["available"] is True and openai["key_env"] == "OPENAI_API_KEY"
    mini = next(m for m in openai["models"] if m["model"] == "gpt-4o-mini")
    assert mini["price"]["input_per_mtok"] == "1"
    assert mini["price_source"] == "routing.yaml prices"
    gem = info["gemini"]
    assert gem["available"] is False and "GEMINI_API_KEY" in gem["reason"]
    flash = next(m for m in gem["models"] if m["model"] == "gemini-2.5-flash")
    assert flash["price_source"].startswith("genai-prices ")
    local = info["openai_compatible"]["endpoints"]["local"]
    assert local["models"] == [{"model": "llama3.2", "price": None, "price_source": None}]
    dumped = json.dumps(info, default=str)
    assert all(k not in dumped for k in KEYS.values())


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize(
    "bad", ["sk-\u201cpasted\u201d-0123456789", "sk-test two-words-0123456789"]
)
async def test_a_key_no_header_can_carry_is_refused_before_sending(
    upstream, provider: str, bad: str
) -> None:
    # Smart quotes from a paste, or a stray word: the HTTP client would fail to encode the
    # header. Said plainly, nothing sent, and not held against the upstream's health.
    key_env = PROVIDERS[provider][1]
    gw = gateway_from_yaml(gateway_yaml(upstream), env={**KEYS, key_env: bad})
    try:
        status = gw.providers[provider].status()
        assert not status.available and key_env in status.reason
        out = await gw.providers[provider].complete(request(provider))
    finally:
        await gw.aclose()
    assert out.error_class is ErrorClass.AUTH_ERROR and not out.sent
    assert key_env in out.message and "quotes" in out.message
    assert bad not in out.message and bad not in status.reason
    assert upstream.requests == []


def test_time_spent_before_sending_comes_off_the_request_timeout() -> None:
    """The SDK providers import their SDK on first use (~1.4 s for anthropic) and then
    sent with the whole timeout: a request left after its call's deadline."""
    import time as _time

    from llmgw.kernel import ErrorClass, Message, Outcome, ProviderRequest
    from llmgw.plugins.providers.base import BaseProvider

    request = ProviderRequest(
        provider="anthropic",
        model="m",
        system=None,
        messages=(Message("user", "hi"),),
        max_tokens=10,
        timeout_s=2.0,
    )
    late = BaseProvider.time_left(request, _time.monotonic() - 5.0)
    assert isinstance(late, Outcome)
    assert late.error_class is ErrorClass.DEADLINE_EXCEEDED and late.sent is False
    ready = BaseProvider.time_left(request, _time.monotonic() - 0.5)
    assert isinstance(ready, ProviderRequest) and 1.0 < ready.timeout_s < 1.6
