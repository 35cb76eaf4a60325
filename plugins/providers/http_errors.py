"""Turning what an upstream said into the error taxonomy: status, body, hints, ``sent``.

Every provider uses these helpers so the same HTTP status means the same class
everywhere. Upstream text is read here only to classify (is this a context-length
error?); it never leaves this module: :func:`failure` builds the message a user sees
from the class and safe fields (provider, model, status, retry hint).
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import replace
from email.utils import parsedate_to_datetime
from typing import Any

import httpx2

from llmgw.kernel import ErrorClass, Outcome, Usage
from llmgw.kernel.errors import default_message

# Upstream wording of a context-window overflow, per provider (OpenAI and DeepSeek
# "maximum context length", Anthropic "prompt is too long" and "input length and
# `max_tokens` exceed context limit", Gemini "input token count").
_CONTEXT = re.compile(
    r"maximum context length|context[ _]length|context window|prompt is too long|"
    r"exceeds? (?:the )?context limit|input token count|too many (?:input )?tokens",
    re.I,
)
_CREDIT = re.compile(r"credit balance|insufficient[ _]balance|billing", re.I)


def status_class(status: int) -> ErrorClass:
    """The class an HTTP status means by itself (bodies may refine it)."""
    if status == 429:
        return ErrorClass.RATE_LIMITED
    if status in {401, 403}:
        return ErrorClass.AUTH_ERROR
    if status == 402:
        return ErrorClass.QUOTA_EXHAUSTED
    if status == 404:
        return ErrorClass.MODEL_NOT_FOUND
    if status == 413:
        return ErrorClass.REQUEST_TOO_LARGE
    if status in {408, 504}:
        return ErrorClass.TIMEOUT
    if status in {503, 529}:
        return ErrorClass.OVERLOADED
    if status >= 500 or status == 409:
        return ErrorClass.SERVER_ERROR
    if 400 <= status < 500:
        return ErrorClass.INVALID_REQUEST
    return ErrorClass.MALFORMED_RESPONSE  # 1xx/3xx where an answer was expected


def refine_invalid(cls: ErrorClass, message: str) -> tuple[ErrorClass, str | None]:
    """A 400-class error whose text says context overflow or billing; else unchanged."""
    if cls in {ErrorClass.INVALID_REQUEST, ErrorClass.REQUEST_TOO_LARGE} and _CONTEXT.search(
        message
    ):
        return ErrorClass.CONTEXT_LENGTH_EXCEEDED, "context_length"
    if cls == ErrorClass.INVALID_REQUEST and _CREDIT.search(message):
        return ErrorClass.QUOTA_EXHAUSTED, "billing"
    return cls, None


# --- retry hints ----------------------------------------------------------------------------

_MAX_HINT_S = 24 * 3600.0


def retry_hint(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, else ``Retry-After`` (seconds or HTTP date)."""
    if not headers:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if value >= 0:  # clamped like Retry-After below (NaN is not >= 0: ignored)
            return min(value, _MAX_HINT_S)
    ra = headers.get("retry-after")
    if not ra:
        return None
    ra = ra.strip()
    try:
        value = float(ra)
    except ValueError:
        try:
            when = parsedate_to_datetime(ra)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        value = when.timestamp() - (time.time() if now is None else now)
        value = max(0.0, value)
    # A hint beyond the ceiling is clamped, not dropped: "wait a day" must still read as
    # longer than any retry budget, so the call falls back instead of retrying.
    return min(value, _MAX_HINT_S) if value >= 0 else None


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")


def gemini_retry_delay(body: Any) -> float | None:
    """``RetryInfo.retryDelay`` ("4s", "0.5s") from a Google RPC error body's details."""
    err = body.get("error", body) if isinstance(body, dict) else None
    details = err.get("details") if isinstance(err, dict) else None
    if not isinstance(details, list):
        return None
    for item in details:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("RetryInfo"):
            m = _DURATION.match(str(item.get("retryDelay", "")))
            if m:
                return min(float(m.group(1)), _MAX_HINT_S)
    return None


# --- transport errors -------------------------------------------------------------------

# Failures that happen before the request can have reached the upstream.
_NOT_SENT: tuple[type[BaseException], ...] = (
    httpx2.ConnectError,
    httpx2.ConnectTimeout,
    httpx2.PoolTimeout,
    httpx2.LocalProtocolError,
    httpx2.UnsupportedProtocol,
)


# Of those, the ones that say nothing about the upstream: our own pool is full, our
# request could not be encoded, the base URL's scheme is wrong.
_LOCAL: dict[type[BaseException], str] = {
    httpx2.PoolTimeout: "pool_timeout",
    httpx2.LocalProtocolError: "local_protocol_error",
    httpx2.UnsupportedProtocol: "unsupported_protocol",
}


def transport_failure(
    provider: str, model: str, exc: BaseException, *, deadline_limited: bool = False
) -> Outcome:
    """The failed outcome of a transport exception (:func:`transport_class`).

    ``details["local"]`` marks a failure on our side of the wire, which the breaker does
    not count against the upstream: one of ``_LOCAL``, or a connect timeout cut short by
    the caller's remaining deadline (``deadline_limited``: the deadline was below the
    configured connect timeout), not by the upstream.
    """
    cls, sent = transport_class(exc)
    local = next((v for k, v in _LOCAL.items() if isinstance(exc, k)), None)
    if local is None and deadline_limited and isinstance(exc, httpx2.ConnectTimeout):
        local = "deadline"
    return failure(provider, model, cls, sent=sent, local=local)


def transport_class(exc: BaseException) -> tuple[ErrorClass, bool]:
    """(class, sent) for an exception raised while talking to the upstream.

    Connection refused, connect timeout and pool timeout happen before any byte of the
    request left: ``sent`` is False. A read/write timeout or a reset after the request
    went out may be billed: ``sent`` is True.
    """
    sent = not isinstance(exc, _NOT_SENT)
    if isinstance(exc, httpx2.TimeoutException | TimeoutError):
        return ErrorClass.TIMEOUT, sent
    if isinstance(exc, httpx2.DecodingError):
        return ErrorClass.MALFORMED_RESPONSE, True
    return ErrorClass.CONNECTION_ERROR, sent


def find_cause(exc: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of ``kinds`` in ``exc``'s cause/context chain (SDKs wrap them)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, kinds):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


# --- outcomes ------------------------------------------------------------------------------


def failure(
    provider: str,
    model: str,
    error_class: ErrorClass,
    *,
    sent: bool,
    status: int | None = None,
    retry_after_s: float | None = None,
    reason: str | None = None,
    usage: Usage | None = None,
    finish_reason: str | None = None,
    local: str | None = None,
) -> Outcome:
    """A failed outcome whose message is built only from safe fields, never upstream text.

    ``local``: the failure is on our side of the wire (see :func:`transport_failure`)."""
    parts = [f"{provider}/{model}: {default_message(error_class)}"]
    extra = []
    if status is not None:
        extra.append(f"HTTP {status}")
    if retry_after_s is not None:
        extra.append(f"retry after {retry_after_s:.1f} s")
    if extra:
        parts.append(f" ({'; '.join(extra)})")
    details: dict[str, Any] = {}
    if reason:
        details["reason"] = reason
    if status is not None:
        details["status"] = status
    if local is not None:
        details["local"] = local
    return Outcome.failure(
        error_class,
        "".join(parts),
        sent=sent,
        status_code=status,
        retry_after_s=retry_after_s,
        usage=usage,
        finish_reason=finish_reason,
        details=details,
    )


def missing_key(provider: str, key_env: str) -> Outcome:
    """The outcome of a call to a provider whose key variable is unset: nothing is sent."""
    return Outcome.failure(
        ErrorClass.AUTH_ERROR,
        f"{key_env} is not set; export it (or put it in .env beside routing.yaml) to use "
        f"provider {provider!r}",
        sent=False,
        details={"reason": "missing_key", "key_env": key_env},
    )


def unusable_key_reason(key_env: str) -> str:
    """Why a key cannot be used (the provider's status and the refused call say it)."""
    return (
        f"{key_env} holds characters an HTTP header cannot carry (non-ASCII, control "
        "characters or spaces); check it for pasted quotes"
    )


def unusable_key(provider: str, key_env: str) -> Outcome:
    """The outcome of a call whose key cannot be sent in a header: nothing is sent."""
    return Outcome.failure(
        ErrorClass.AUTH_ERROR,
        f"{unusable_key_reason(key_env)}. Provider {provider!r} was not called",
        sent=False,
        details={"reason": "unusable_key", "key_env": key_env},
    )


# --- bodies ------------------------------------------------------------------------------


async def read_capped(resp: httpx2.Response, limit: int) -> bytes | None:
    """A streamed response's body, decompressed, or None once it exceeds ``limit`` bytes
    (a Content-Length over it is not read at all): an endpoint that answers without end
    cannot fill the gateway's memory, compressed or not."""
    declared = resp.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.aiter_bytes():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


# --- usage ------------------------------------------------------------------------------


def token_count(value: Any) -> int | None:
    """A token count as an upstream's usage reports it: a whole number >= 0 (an integral
    float such as ``12.0`` too), else None (missing, null, negative, fractional, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def detail_count(value: Any) -> int:
    """An optional detail of a usage (cached or reasoning tokens): its count, 0 when it is
    missing or unusable. Only for counts that can lower a cost or are already part of a
    required count: an unusable one then never makes an attempt look cheaper."""
    return token_count(value) or 0


def finish_outcome(
    provider: str,
    model: str,
    text: str,
    usage: Usage | None,
    finish_reason: str,
    *,
    truncated: bool,
) -> Outcome:
    """Success; ``truncated_output`` when the answer was cut at max_tokens with no text;
    ``malformed_response`` when it ended with no text at all.

    Our choice: an answer cut at ``max_tokens`` that has text is a SUCCESS with
    ``finish_reason="length"`` and ``details={"truncated": True}`` (the caller asked for
    that bound and partial text is useful); only an empty cut answer (e.g. all tokens
    spent on reasoning) is the error ``truncated_output``. An answer that ended without
    any text (``content: null``, no text part, a tool call nobody asked for) answers
    nothing: it is retried once and falls back like any unusable answer, and a panel
    does not count it towards its quorum. The attempt is billed by its usage.
    """
    if not truncated and not text.strip():
        empty = failure(
            provider,
            model,
            ErrorClass.MALFORMED_RESPONSE,
            sent=True,
            usage=usage,
            finish_reason=finish_reason,
            reason="empty_answer",
        )
        return replace(empty, message=f"{provider}/{model}: the provider answered with no text")
    if truncated:
        if not text.strip():
            return failure(
                provider,
                model,
                ErrorClass.TRUNCATED_OUTPUT,
                sent=True,
                usage=usage,
                finish_reason="length",
                reason="empty_at_max_tokens",
            )
        return Outcome.success(text, usage, finish_reason="length", details={"truncated": True})
    return Outcome.success(text, usage, finish_reason=finish_reason)
