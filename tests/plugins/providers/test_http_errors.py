"""The shared classification helpers: retry hints, transport errors, statuses, messages."""

from __future__ import annotations

from email.utils import formatdate

import httpx2
import pytest

from llmgw.kernel import ErrorClass as E
from llmgw.plugins.policies.breaker import classify
from llmgw.plugins.providers.http_errors import (
    failure,
    finish_outcome,
    gemini_retry_delay,
    refine_invalid,
    retry_hint,
    status_class,
    token_count,
    transport_class,
    transport_failure,
)

NOW = 1_800_000_000.0


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.5"}, 0.5),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # ms wins
        ({"retry-after-ms": "junk", "retry-after": "9"}, 9.0),
        ({"retry-after": formatdate(NOW + 42, usegmt=True)}, 42.0),
        ({"retry-after": formatdate(NOW - 42, usegmt=True)}, 0.0),  # already past
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": "999999999"}, 86400.0),  # clamped: still longer than any retry
        # The millisecond form is clamped alike, not dropped (dropped, a 250-hour hint was
        # retried at once instead of falling back).
        ({"retry-after-ms": "900000000"}, 86400.0),
        ({"retry-after-ms": "inf", "retry-after": "9"}, 86400.0),
        ({"retry-after-ms": "nan", "retry-after": "9"}, 9.0),
    ],
)
def test_retry_hint(headers: dict[str, str], expected: float | None) -> None:
    assert retry_hint(httpx2.Headers(headers), now=NOW) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {
                "error": {
                    "details": [
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "13s"}
                    ]
                }
            },
            13.0,
        ),
        ({"error": {"details": [{"@type": "x.RetryInfo", "retryDelay": "0.5s"}]}}, 0.5),
        ({"error": {"details": [{"@type": "x.QuotaFailure"}]}}, None),
        ({"error": {"details": "nope"}}, None),
        ("not a dict", None),
    ],
)
def test_gemini_retry_delay(body: object, expected: float | None) -> None:
    assert gemini_retry_delay(body) == expected


@pytest.mark.parametrize(
    ("exc", "cls", "sent"),
    [
        (httpx2.ConnectError("refused"), E.CONNECTION_ERROR, False),
        (httpx2.ConnectTimeout("slow connect"), E.TIMEOUT, False),
        (httpx2.PoolTimeout("pool"), E.TIMEOUT, False),
        (httpx2.ReadTimeout("slow answer"), E.TIMEOUT, True),
        (httpx2.WriteTimeout("slow upload"), E.TIMEOUT, True),
        (httpx2.ReadError("reset"), E.CONNECTION_ERROR, True),
        (httpx2.RemoteProtocolError("closed"), E.CONNECTION_ERROR, True),
        (httpx2.LocalProtocolError("bad"), E.CONNECTION_ERROR, False),
        (httpx2.DecodingError("gzip"), E.MALFORMED_RESPONSE, True),
    ],
)
def test_transport_class(exc: BaseException, cls: E, sent: bool) -> None:
    assert transport_class(exc) == (cls, sent)


@pytest.mark.parametrize(
    ("exc", "deadline_limited", "local", "breaker"),
    [
        # The upstream could not be reached: the breaker counts it.
        (httpx2.ConnectError("refused"), False, None, "failure"),
        (httpx2.ConnectError("refused"), True, None, "failure"),
        (httpx2.ConnectTimeout("slow connect"), False, None, "failure"),
        (httpx2.ReadTimeout("slow answer"), True, None, "failure"),  # sent: may be billed
        # Our side of the wire: not held against the upstream.
        (httpx2.ConnectTimeout("cut short"), True, "deadline", "ignored"),
        (httpx2.PoolTimeout("our pool is full"), False, "pool_timeout", "ignored"),
        (httpx2.LocalProtocolError("bad"), False, "local_protocol_error", "ignored"),
        (httpx2.UnsupportedProtocol("htp://"), False, "unsupported_protocol", "ignored"),
    ],
)
def test_transport_failures_on_our_side_are_marked_local(
    exc: BaseException, deadline_limited: bool, local: str | None, breaker: str
) -> None:
    out = transport_failure("openai", "m", exc, deadline_limited=deadline_limited)
    assert out.details.get("local") == local
    assert (out.error_class, out.sent) == transport_class(exc)
    assert classify(out) == breaker


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, E.INVALID_REQUEST),
        (401, E.AUTH_ERROR),
        (403, E.AUTH_ERROR),
        (402, E.QUOTA_EXHAUSTED),
        (404, E.MODEL_NOT_FOUND),
        (408, E.TIMEOUT),
        (413, E.REQUEST_TOO_LARGE),
        (422, E.INVALID_REQUEST),
        (429, E.RATE_LIMITED),
        (500, E.SERVER_ERROR),
        (502, E.SERVER_ERROR),
        (503, E.OVERLOADED),
        (529, E.OVERLOADED),
        (504, E.TIMEOUT),
    ],
)
def test_status_class(status: int, cls: E) -> None:
    assert status_class(status) == cls


def test_failure_message_uses_only_safe_fields() -> None:
    out = failure("openai", "gpt-4o", E.RATE_LIMITED, sent=True, status=429, retry_after_s=2)
    assert out.message == (
        "openai/gpt-4o: the provider is rate limiting this key; retry later "
        "(HTTP 429; retry after 2.0 s)"
    )
    assert out.details == {"status": 429}


def test_truncation_policy() -> None:
    cut = finish_outcome("p", "m", "partial", None, "length", truncated=True)
    assert cut.ok and cut.finish_reason == "length" and cut.details == {"truncated": True}
    empty = finish_outcome("p", "m", "  ", None, "length", truncated=True)
    assert not empty.ok and empty.error_class == E.TRUNCATED_OUTPUT and empty.sent


def test_an_answer_with_no_text_is_not_a_success() -> None:
    out = finish_outcome("p", "m", " \n", None, "stop", truncated=False)
    assert (out.ok, out.sent, out.error_class) == (False, True, E.MALFORMED_RESPONSE)
    assert out.details["reason"] == "empty_answer"
    assert out.message == "p/m: the provider answered with no text"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (12, 12),
        (12.0, 12),  # some compatible servers write counts as floats
        (None, None),
        (-1, None),
        (12.5, None),
        (True, None),
        ("12", None),
        (float("nan"), None),
        (float("inf"), None),
    ],
)
def test_token_count_accepts_only_whole_non_negative_numbers(
    value: object, expected: int | None
) -> None:
    assert token_count(value) == expected


@pytest.mark.parametrize(
    "message",
    [
        "prompt is too long: 210000 tokens > 200000 maximum",
        "input length and `max_tokens` exceed context limit: 190000 + 20000 > 200000, "
        "decrease input length or `max_tokens` and try again",
    ],
)
def test_anthropic_context_overflow_wordings(message: str) -> None:
    assert refine_invalid(E.INVALID_REQUEST, message)[0] == E.CONTEXT_LENGTH_EXCEEDED


@pytest.mark.anyio
async def test_an_anthropic_error_event_in_a_200_body_is_classed_by_its_type(stack) -> None:  # type: ignore[no-untyped-def]
    """An overload met after the status line was sent arrives as an error object in a 200
    body: overloaded (retried with backoff), not an unreadable answer (retried once)."""
    anthropic = stack.provider("anthropic")
    body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    out = anthropic.parse("claude-sonnet-4-6", body)
    assert (out.error_class, out.sent) == (E.OVERLOADED, True)
    assert "Overloaded" not in (out.message or "")  # never the upstream's text
    odd = anthropic.parse("claude-sonnet-4-6", {"type": "error", "error": {"type": "new_kind"}})
    assert odd.error_class == E.MALFORMED_RESPONSE  # an unknown type stays unread
    too_long = {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "prompt is too long: 9 > 8"},
    }
    out = anthropic.parse("claude-sonnet-4-6", too_long)
    assert out.error_class == E.CONTEXT_LENGTH_EXCEEDED


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "cls"),
    [
        ({"code": 429, "message": "Rate limit exceeded"}, E.RATE_LIMITED),
        ({"code": 402, "message": "Insufficient credits"}, E.QUOTA_EXHAUSTED),
        ({"code": 502, "message": "Provider returned error"}, E.SERVER_ERROR),
        ({"code": "rate_limit_exceeded", "message": "slow down"}, E.RATE_LIMITED),
        ({"message": "no code at all"}, E.SERVER_ERROR),
    ],
)
async def test_a_routers_error_object_in_a_200_body_is_classed(stack, error, cls) -> None:  # type: ignore[no-untyped-def]
    """OpenRouter answers 200 with an error object when the model's provider fails after
    the status was sent: classed as that error (a quota marks the provider), not read as
    an unreadable answer."""
    out = stack.provider("local").parse("llama3.2", {"error": error})
    assert (out.error_class, out.sent) == (cls, True)
    assert str(error["message"]) not in out.message


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        # vLLM: the message at the top level, no "error" object.
        {
            "object": "error",
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 9000 tokens.",
            "type": "BadRequestError",
            "code": 400,
        },
        # Ollama: the error as a string.
        {"error": "prompt too long; exceeded max context length by 812 tokens"},
    ],
)
async def test_context_overflow_from_servers_with_their_own_error_shape(stack, body) -> None:  # type: ignore[no-untyped-def]
    local = stack.provider("local")
    out = local.http_error("llama3.2", httpx2.Response(400, json=body))
    assert out.error_class == E.CONTEXT_LENGTH_EXCEEDED
    plain = local.http_error("llama3.2", httpx2.Response(400, json={"message": "bad field"}))
    assert plain.error_class == E.INVALID_REQUEST
