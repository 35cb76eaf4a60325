"""Every provider x every class of the taxonomy, through the real SDK or HTTP client.

Each row injects one fault at the fake upstream and calls ``provider.complete`` directly;
the class, the retry hint, ``sent`` and the outcome must be exactly as specified.
"""

from __future__ import annotations

import socket

import pytest
from provider_support import KEYS, PROVIDERS, Stack, gateway_yaml, request

from llmgw.kernel import ErrorClass
from llmgw.kernel.fake_upstream import Fault
from llmgw.kernel.testing import gateway_from_yaml

E = ErrorClass
OK = None  # expected class of a success

# fault -> (class or OK, retry hint in seconds or None, sent)
COMMON: dict[str, tuple[ErrorClass | None, float | None, bool]] = {
    "rate_limited": (E.RATE_LIMITED, 2.0, True),
    "rate_limited_ms": (E.RATE_LIMITED, 1.5, True),  # retry-after-ms wins over Retry-After
    "rate_limited_date": (E.RATE_LIMITED, 30.0, True),  # an HTTP date 30 s ahead
    "rate_limited_retryinfo": (E.RATE_LIMITED, None, True),  # Gemini-only body field
    "rate_limited_nohint": (E.RATE_LIMITED, None, True),
    "overloaded": (E.OVERLOADED, None, True),
    "overloaded_529": (E.OVERLOADED, None, True),
    "server_error": (E.SERVER_ERROR, None, True),
    "bad_gateway": (E.SERVER_ERROR, None, True),
    "gateway_timeout": (E.TIMEOUT, None, True),
    "slow": (E.TIMEOUT, None, True),
    "reset": (E.CONNECTION_ERROR, None, True),
    "drop": (E.CONNECTION_ERROR, None, True),
    "non_json": (E.MALFORMED_RESPONSE, None, True),
    "truncated": (E.MALFORMED_RESPONSE, None, True),
    "empty": (E.MALFORMED_RESPONSE, None, True),
    "quota_exhausted": (E.QUOTA_EXHAUSTED, None, True),
    "insufficient_quota": (E.QUOTA_EXHAUSTED, None, True),
    "payment_required": (E.QUOTA_EXHAUSTED, None, True),
    "auth_error": (E.AUTH_ERROR, None, True),
    "forbidden": (E.AUTH_ERROR, None, True),
    "echo_key": (E.AUTH_ERROR, None, True),
    "model_not_found": (E.MODEL_NOT_FOUND, None, True),
    "context_length": (E.CONTEXT_LENGTH_EXCEEDED, None, True),
    "request_too_large": (E.REQUEST_TOO_LARGE, None, True),
    "invalid_request": (E.INVALID_REQUEST, None, True),
    "unprocessable": (E.INVALID_REQUEST, None, True),
    "safety": (E.CONTENT_REFUSED, None, True),
    "refusal": (E.CONTENT_REFUSED, None, True),
    "prompt_blocked": (E.CONTENT_REFUSED, None, True),
    "length_empty": (E.TRUNCATED_OUTPUT, None, True),
    "length": (OK, None, True),
    # A normal finish with no text answers nothing: retried once, then a fallback.
    "empty_answer": (E.MALFORMED_RESPONSE, None, True),
    # The wire's error object in a 200 body: classed as that error.
    "error_in_answer": (E.RATE_LIMITED, None, True),
}

OVERRIDES: dict[tuple[str, str], tuple[ErrorClass | None, float | None, bool]] = {
    ("gemini", "rate_limited_retryinfo"): (E.RATE_LIMITED, 4.0, True),
    # google-genai reads a 200 as a response and keeps no body to classify: unreadable.
    ("gemini", "error_in_answer"): (E.MALFORMED_RESPONSE, None, True),
}

ROWS = [
    pytest.param(
        provider, fault, *OVERRIDES.get((provider, fault), expected), id=f"{provider}-{fault}"
    )
    for provider in PROVIDERS
    for fault, expected in COMMON.items()
]


@pytest.mark.anyio
@pytest.mark.parametrize(("provider", "fault", "cls", "hint", "sent"), ROWS)
async def test_fault_is_classified(
    stack: Stack,
    provider: str,
    fault: str,
    cls: ErrorClass | None,
    hint: float | None,
    sent: bool,
) -> None:
    stack.up.fail_next(1, Fault(fault, delay_s=3.0))
    timeout = 0.3 if fault == "slow" else 5.0
    outcome = await stack.provider(provider).complete(request(provider, timeout_s=timeout))

    assert outcome.sent is sent
    assert outcome.error_class == cls
    assert outcome.ok is (cls is None)
    if hint is None:
        assert outcome.retry_after_s is None
    else:
        assert outcome.retry_after_s == pytest.approx(hint, abs=1.5)
    if not outcome.ok:
        model = PROVIDERS[provider][0]
        assert outcome.message.startswith(f"{provider}/{model}: ")
        assert "fake upstream" not in outcome.message  # never upstream text
        assert "Incorrect API key" not in outcome.message
    assert len(stack.up.requests) == 1
    assert stack.up.requests[0].fault == fault


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_success_has_text_usage_and_finish(stack: Stack, provider: str) -> None:
    outcome = await stack.provider(provider).complete(request(provider, "what is 2+2?"))
    model = PROVIDERS[provider][0]
    assert outcome.ok and outcome.sent
    assert outcome.text == f"echo[{model}]: what is 2+2?"
    assert outcome.finish_reason in {"stop", "end_turn"}
    assert outcome.usage is not None
    assert outcome.usage.input_tokens > 0 and outcome.usage.output_tokens > 0


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["usage_missing", "usage_negative"])
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_an_answer_without_usable_counts_has_no_usage(
    stack: Stack, provider: str, fault: str
) -> None:
    """Counts read as 0 would settle a paid answer at $0; without usage the attempt stays
    charged at its worst case (RELIABILITY.md, money rule 4)."""
    stack.up.fail_next(1, fault)
    outcome = await stack.provider(provider).complete(request(provider, "what is 2+2?"))
    assert outcome.ok and outcome.sent
    assert outcome.text == f"echo[{PROVIDERS[provider][0]}]: what is 2+2?"
    assert outcome.usage is None


@pytest.mark.anyio
@pytest.mark.parametrize("provider", ["openai", "deepseek", "local"])
async def test_a_routers_error_finish_is_a_server_error(stack: Stack, provider: str) -> None:
    """OpenRouter ends an answer whose upstream failed mid-way with finish_reason "error":
    the text is a fragment, not an answer."""
    stack.up.fail_next(1, "finish_error")
    outcome = await stack.provider(provider).complete(request(provider))
    assert not outcome.ok and outcome.sent
    assert outcome.error_class is E.SERVER_ERROR
    assert outcome.details["reason"] == "finish_error"
    assert outcome.usage is not None  # billed by what it reported


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_length_with_text_is_success_marked_truncated(stack: Stack, provider: str) -> None:
    stack.up.fail_next(1, "length")
    outcome = await stack.provider(provider).complete(request(provider, "tell me more"))
    assert outcome.ok
    assert outcome.finish_reason == "length"
    assert outcome.details == {"truncated": True}
    assert outcome.text


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_connection_refused_is_not_sent(provider: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"http://127.0.0.1:{port}"
    urls = {p: dead + ("/v1" if p not in {"anthropic", "gemini"} else "") for p in PROVIDERS}
    gw = gateway_from_yaml(gateway_yaml(None, base_urls=urls), env=KEYS)
    try:
        outcome = await gw.providers[provider].complete(request(provider))
    finally:
        await gw.aclose()
    assert outcome.error_class == E.CONNECTION_ERROR
    assert outcome.sent is False


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_missing_key_fails_without_sending(upstream, provider: str) -> None:
    key_env = PROVIDERS[provider][1]
    env = {k: v for k, v in KEYS.items() if k != key_env}
    gw = gateway_from_yaml(gateway_yaml(upstream), env=env)
    try:
        p = gw.providers[provider]
        status = p.status()
        outcome = await p.complete(request(provider))
    finally:
        await gw.aclose()
    assert status.available is False
    assert key_env in status.reason
    assert outcome.error_class == E.AUTH_ERROR
    assert outcome.sent is False
    assert outcome.message.startswith(f"{key_env} is not set")
    assert upstream.requests == []


@pytest.mark.anyio
@pytest.mark.parametrize("provider", list(PROVIDERS))
async def test_request_deadline_shorter_than_configured_timeout_wins(
    stack: Stack, provider: str
) -> None:
    # providers.<name>.timeout_s is 10 s; the request's remaining deadline is 0.2 s.
    # A first call leaves an open connection, so the deadline cannot run out while a new
    # one is made (a loaded machine): the request is sent and its answer is what is late.
    assert (await stack.provider(provider).complete(request(provider))).ok
    stack.up.fail_next(1, Fault("slow", delay_s=3.0))
    outcome = await stack.provider(provider).complete(request(provider, timeout_s=0.2))
    assert outcome.error_class == E.TIMEOUT
    assert outcome.sent is True
    assert outcome.latency_ms == 0.0  # the kernel fills latency, not the provider
