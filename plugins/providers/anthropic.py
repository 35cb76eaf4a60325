"""The ``anthropic`` plugin: the Messages API through the official SDK (``AsyncAnthropic``).

The SDK is imported on the first call (importing it costs ~0.8 s), in a worker thread so
the event loop keeps serving; importing this module or building the plugin does not
import it. One client per provider, SDK retries off (``max_retries=0``). The SDK sends
the key in a header only. We ask for the raw HTTP response and read the JSON ourselves:
the same defensive parsing as the other providers, no model validation surprises.

Key from ``ANTHROPIC_API_KEY``; base URL from ``providers.anthropic.base_url``, else
``ANTHROPIC_BASE_URL``, else https://api.anthropic.com (the SDK's form, without /v1).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from typing import Any

import httpx2

from llmgw.kernel import (
    ErrorClass,
    Outcome,
    ProviderRequest,
    Usage,
)

from .base import BaseProvider, Connection, ProviderPlugin
from .http_errors import (
    detail_count,
    failure,
    find_cause,
    finish_outcome,
    refine_invalid,
    retry_hint,
    status_class,
    token_count,
)
from .pricing import PriceBook

NAME = "anthropic"

# Anthropic's error.type values (https://docs.anthropic.com/en/api/errors).
_TYPES: dict[str, ErrorClass] = {
    "rate_limit_error": ErrorClass.RATE_LIMITED,
    "overloaded_error": ErrorClass.OVERLOADED,
    "api_error": ErrorClass.SERVER_ERROR,
    "timeout_error": ErrorClass.TIMEOUT,
    "authentication_error": ErrorClass.AUTH_ERROR,
    "permission_error": ErrorClass.AUTH_ERROR,
    "billing_error": ErrorClass.QUOTA_EXHAUSTED,
    "not_found_error": ErrorClass.MODEL_NOT_FOUND,
    "request_too_large": ErrorClass.REQUEST_TOO_LARGE,
}
_TRUNCATED = {"max_tokens", "model_context_window_exceeded"}


class AnthropicProvider(BaseProvider):
    """Claude models over ``AsyncAnthropic(...).messages.create``."""

    def __init__(self, conn: Connection, prices: PriceBook, models: list[str]) -> None:
        super().__init__(conn, prices, models)
        self._sdk: Any = None
        self._client: Any = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The one SDK client, built on first use (importing the SDK then)."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    sdk = await asyncio.to_thread(importlib.import_module, "anthropic")
                    self._sdk = sdk
                    # The SDK's own client settings, plus what every provider's has.
                    http = self.conn.http_client(sdk.DefaultAsyncHttpxClient)
                    self._client = sdk.AsyncAnthropic(
                        api_key=self.conn.key_value,
                        base_url=self.conn.base_url,
                        max_retries=0,
                        timeout=http.timeout,
                        http_client=http,
                    )
        return self._client

    async def _close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def params(self, request: ProviderRequest) -> dict[str, Any]:
        system = request.system or ""
        messages: list[dict[str, str]] = []
        for m in request.messages:
            if m.role == "system":  # the Messages API takes the system prompt apart
                system = f"{system}\n\n{m.content}" if system else m.content
            else:
                messages.append({"role": m.role, "content": m.content})
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
        }
        if system:
            params["system"] = system
        return params

    async def _send(self, request: ProviderRequest) -> Outcome:
        got = await self.in_time(request, self.client())  # the SDK imported on first use
        if isinstance(got, Outcome):
            return got
        client, request = got
        sdk = self._sdk
        try:
            raw = await client.messages.with_raw_response.create(
                **self.params(request), timeout=self.conn.timeout(request.timeout_s)
            )
            content = await raw.http_response.aread()
        except sdk.APIStatusError as exc:
            return self.status_error(request.model, exc)
        except sdk.APIConnectionError as exc:
            cause = find_cause(exc, (httpx2.HTTPError,))
            if cause is not None:
                return self.transport_failure(request, cause)
            if isinstance(exc, sdk.APITimeoutError):
                cls, sent = ErrorClass.TIMEOUT, True
            else:
                cls, sent = ErrorClass.CONNECTION_ERROR, True
            return failure(self.name, request.model, cls, sent=sent)
        except sdk.APIResponseValidationError:
            return failure(self.name, request.model, ErrorClass.MALFORMED_RESPONSE, sent=True)
        try:
            data = json.loads(content)
        except ValueError:
            return failure(
                self.name,
                request.model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                reason="not_json",
            )
        return self.parse(request.model, data)

    def status_error(self, model: str, exc: Any) -> Outcome:
        status = int(exc.status_code)
        body = exc.body if isinstance(exc.body, dict) else None
        err = body.get("error") if body else None
        kind = str(err.get("type") or "") if isinstance(err, dict) else ""
        message = str(err.get("message") or "") if isinstance(err, dict) else ""
        cls = _TYPES.get(kind) or status_class(status)
        reason = kind if kind in _TYPES else None
        if cls in {ErrorClass.INVALID_REQUEST, ErrorClass.REQUEST_TOO_LARGE}:
            cls, refined = refine_invalid(cls, message)
            reason = refined or reason
        headers = exc.response.headers if getattr(exc, "response", None) is not None else None
        hint = retry_hint(headers) if cls != ErrorClass.QUOTA_EXHAUSTED else None
        return failure(
            self.name, model, cls, sent=True, status=status, retry_after_s=hint, reason=reason
        )

    def parse(self, model: str, data: Any) -> Outcome:
        if isinstance(data, dict) and data.get("type") == "error":
            # An error event in a 200 body (an overload met after the status was sent):
            # classed by its type, as the same error with its own status would be.
            err = data.get("error")
            kind = str(err.get("type") or "") if isinstance(err, dict) else ""
            cls = _TYPES.get(kind)
            if cls is None and kind == "invalid_request_error":
                message = str(err.get("message") or "") if isinstance(err, dict) else ""
                cls, _ = refine_invalid(ErrorClass.INVALID_REQUEST, message)
            if cls is not None:
                return failure(self.name, model, cls, sent=True, status=200, reason=kind)
        if not isinstance(data, dict) or not isinstance(data.get("content"), list):
            return failure(
                self.name, model, ErrorClass.MALFORMED_RESPONSE, sent=True, reason="no_content"
            )
        usage = _usage(data.get("usage"))
        # Only "text" blocks are the answer; "thinking" blocks stay out of it.
        text = "".join(
            b["text"]
            for b in data["content"]
            if isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
        )
        stop = str(data.get("stop_reason") or "end_turn")
        if stop == "refusal":
            return failure(
                self.name,
                model,
                ErrorClass.CONTENT_REFUSED,
                sent=True,
                usage=usage,
                finish_reason="refusal",
                reason="refusal",
            )
        return finish_outcome(self.name, model, text, usage, stop, truncated=stop in _TRUNCATED)


def _usage(raw: Any) -> Usage | None:
    """The answer's usage; None without a usable ``input_tokens`` and ``output_tokens``
    (the attempt then stays charged at its worst case: see :func:`.http_errors.token_count`).
    Anthropic's ``input_tokens`` leaves out cache reads and writes; ours is the total."""
    if not isinstance(raw, dict):
        return None
    fresh = token_count(raw.get("input_tokens"))
    output = token_count(raw.get("output_tokens"))
    if fresh is None or output is None:
        return None
    cache_write = token_count(raw.get("cache_creation_input_tokens"))
    if cache_write is None and raw.get("cache_creation_input_tokens") is not None:
        return None  # cache writes cost more than input: not counted, it would be cheaper
    cache_read = detail_count(raw.get("cache_read_input_tokens"))
    return Usage(
        input_tokens=fresh + cache_read + (cache_write or 0),
        output_tokens=output,
        cached_input_tokens=cache_read,
    )


class AnthropicPlugin(ProviderPlugin):
    """Registers the ``anthropic`` provider (the SDK is imported on its first call)."""

    NAME = NAME
    KEY_ENV = "ANTHROPIC_API_KEY"
    DEFAULT_BASE_URL = "https://api.anthropic.com"
    BASE_URL_ENV = "ANTHROPIC_BASE_URL"
    GENAI_PROVIDER = "anthropic"

    def build(self, conn: Connection, prices: PriceBook, models: list[str]) -> BaseProvider:
        return AnthropicProvider(conn, prices, models)
