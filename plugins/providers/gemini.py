"""The ``gemini`` plugin: Gemini through ``google-genai`` with an API key (not Vertex).

Only the SDK's async client (``client.aio``) is used, never the sync client in a thread.
``google.genai`` is imported on the first call, in a worker thread; importing this module
or building the plugin does not import it. We hand the SDK our own ``httpx2.AsyncClient``
(one per provider, closed in ``aclose``), turn its retries off
(``HttpRetryOptions(attempts=1)``) and pin ``api_version="v1beta"``. The key travels in
the ``x-goog-api-key`` header, never in the URL.

Key from ``GEMINI_API_KEY``; base URL from ``providers.gemini.base_url``, else
``GEMINI_BASE_URL``, else https://generativelanguage.googleapis.com (the SDK's form).
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
    gemini_retry_delay,
    refine_invalid,
    retry_hint,
    status_class,
    token_count,
)
from .pricing import PriceBook

NAME = "gemini"

# Finish and block reasons that mean the content was filtered.
_REFUSED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "MODEL_ARMOR",
    "JAILBREAK",
    "LANGUAGE",
    "OTHER",
}


def _name(value: Any) -> str:
    """An SDK enum member or a plain string, as its upper-case name."""
    if value is None:
        return ""
    return str(getattr(value, "name", value)).upper()


class GeminiProvider(BaseProvider):
    """Gemini models over ``client.aio.models.generate_content``."""

    def __init__(self, conn: Connection, prices: PriceBook, models: list[str]) -> None:
        super().__init__(conn, prices, models)
        self._genai: Any = None
        self._types: Any = None
        self._errors: Any = None
        self._client: Any = None
        self._http: httpx2.AsyncClient | None = None
        self._lock = asyncio.Lock()

    async def client(self) -> Any:
        """The one SDK client, built on first use (importing google.genai then)."""
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    await asyncio.to_thread(importlib.import_module, "google.genai")
                    genai = importlib.import_module("google.genai")
                    types = importlib.import_module("google.genai.types")
                    self._errors = importlib.import_module("google.genai.errors")
                    self._types = types
                    self._http = self.conn.http_client(follow_redirects=False)
                    self._client = genai.Client(
                        api_key=self.conn.key_value,
                        vertexai=False,
                        http_options=types.HttpOptions(
                            base_url=self.conn.base_url,
                            api_version="v1beta",
                            timeout=int(self.conn.timeout_s * 1000),
                            retry_options=types.HttpRetryOptions(attempts=1),
                            httpx_async_client=self._http,
                        ),
                    )
        return self._client

    async def _close(self) -> None:
        client, self._client = self._client, None
        http, self._http = self._http, None
        if client is not None:
            await client.aio.aclose()
        if http is not None:
            await http.aclose()

    def call_args(self, request: ProviderRequest) -> dict[str, Any]:
        types = self._types
        system = request.system or ""
        contents = []
        for m in request.messages:
            if m.role == "system":
                system = f"{system}\n\n{m.content}" if system else m.content
                continue
            role = "model" if m.role == "assistant" else "user"
            contents.append(types.Content(role=role, parts=[types.Part(text=m.content)]))
        timeout = self.conn.timeout(request.timeout_s)
        config = types.GenerateContentConfig(
            system_instruction=system or None,
            max_output_tokens=request.max_tokens,
            # No tools are sent, and the gateway must make exactly one upstream call per
            # attempt: turn the SDK's automatic function calling loop off.
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            # Per request: the remaining deadline when it is shorter (milliseconds).
            http_options=types.HttpOptions(timeout=max(1, int((timeout.read or 1) * 1000))),
        )
        return {"model": request.model, "contents": contents, "config": config}

    async def _send(self, request: ProviderRequest) -> Outcome:
        got = await self.in_time(request, self.client())  # the SDK imported on first use
        if isinstance(got, Outcome):
            return got
        client, request = got
        try:
            response = await client.aio.models.generate_content(**self.call_args(request))
        except self._errors.APIError as exc:
            return self.api_error(request.model, exc)
        except httpx2.HTTPError as exc:
            return self.transport_failure(request, exc)
        except (ValueError, TypeError) as exc:  # JSONDecodeError, pydantic ValidationError
            cause = find_cause(exc, (httpx2.HTTPError,))
            if cause is not None:
                return self.transport_failure(request, cause)
            return failure(
                self.name,
                request.model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                reason="not_json" if isinstance(exc, json.JSONDecodeError) else None,
            )
        return self.parse(request.model, response)

    def api_error(self, model: str, exc: Any) -> Outcome:
        status = int(exc.code or 0)
        body = exc.details if isinstance(exc.details, dict) else {}
        err = body.get("error", body)
        err = err if isinstance(err, dict) else {}
        gstatus = str(err.get("status") or exc.status or "")
        message = str(err.get("message") or "")
        raw_details = err.get("details")
        details: list[Any] = raw_details if isinstance(raw_details, list) else []
        reasons = {str(d.get("reason")) for d in details if isinstance(d, dict)}
        quota_ids = [
            str(v.get("quotaId", ""))
            for d in details
            if isinstance(d, dict) and str(d.get("@type", "")).endswith("QuotaFailure")
            for v in (d.get("violations") or [])
            if isinstance(v, dict)
        ]
        cls = status_class(status) if status else ErrorClass.SERVER_ERROR
        reason: str | None = None
        if "API_KEY_INVALID" in reasons or gstatus in {"UNAUTHENTICATED", "PERMISSION_DENIED"}:
            cls, reason = ErrorClass.AUTH_ERROR, "api_key_invalid"
        elif status == 429 and any("PerDay" in q for q in quota_ids):
            # A daily quota will not come back within any deadline: exhausted, not throttled.
            cls, reason = ErrorClass.QUOTA_EXHAUSTED, "daily_quota"
        elif gstatus == "DEADLINE_EXCEEDED":
            cls = ErrorClass.TIMEOUT
        else:
            cls, reason = refine_invalid(cls, message)
        hint = None
        if cls != ErrorClass.QUOTA_EXHAUSTED:
            response = getattr(exc, "response", None)
            headers = getattr(response, "headers", None)
            hint = retry_hint(headers)
            if hint is None:
                hint = gemini_retry_delay(body)
        return failure(
            self.name,
            model,
            cls,
            sent=True,
            status=status or None,
            retry_after_s=hint,
            reason=reason,
        )

    def parse(self, model: str, r: Any) -> Outcome:
        text = _answer_text(r)
        usage = _usage(getattr(r, "usage_metadata", None), text)
        feedback = getattr(r, "prompt_feedback", None)
        block = _name(getattr(feedback, "block_reason", None)) if feedback is not None else ""
        if block and block != "BLOCKED_REASON_UNSPECIFIED":
            return failure(
                self.name,
                model,
                ErrorClass.CONTENT_REFUSED,
                sent=True,
                usage=usage,
                finish_reason=block.lower(),
                reason="prompt_blocked",
            )
        candidates = getattr(r, "candidates", None) or []
        if not candidates:
            return failure(
                self.name,
                model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                usage=usage,
                reason="no_candidates",
            )
        cand = candidates[0]
        finish = _name(getattr(cand, "finish_reason", None)) or "STOP"
        if finish in _REFUSED:
            return failure(
                self.name,
                model,
                ErrorClass.CONTENT_REFUSED,
                sent=True,
                usage=usage,
                finish_reason=finish.lower(),
                reason=finish.lower(),
            )
        return finish_outcome(
            self.name, model, text, usage, finish.lower(), truncated=finish == "MAX_TOKENS"
        )


def _answer_text(r: Any) -> str:
    """The first candidate's text parts; thought summaries (``part.thought``) are not the
    answer."""
    candidates = getattr(r, "candidates", None) or []
    content = getattr(candidates[0], "content", None) if candidates else None
    parts = getattr(content, "parts", None) or []
    return "".join(
        p.text
        for p in parts
        if isinstance(getattr(p, "text", None), str) and not getattr(p, "thought", False)
    )


def _usage(meta: Any, text: str) -> Usage | None:
    """The answer's usage; None without a usable ``prompt_token_count``, or with output
    but no usable ``candidates_token_count`` (the attempt then stays charged at its
    worst case: see :func:`.http_errors.token_count`). Gemini leaves a count out when it
    is zero, so a missing candidates count is 0 only for an answer with no text; thinking
    tokens are billed as output but reported apart: added to it."""
    if meta is None:
        return None
    prompt = token_count(getattr(meta, "prompt_token_count", None))
    raw_out = getattr(meta, "candidates_token_count", None)
    output = token_count(raw_out) if raw_out is not None or text else 0
    raw_thoughts = getattr(meta, "thoughts_token_count", None)
    thoughts = token_count(raw_thoughts) if raw_thoughts is not None else 0
    if prompt is None or output is None or thoughts is None:
        return None
    return Usage(
        input_tokens=prompt,
        output_tokens=output + thoughts,
        cached_input_tokens=min(
            detail_count(getattr(meta, "cached_content_token_count", None)), prompt
        ),
        reasoning_tokens=thoughts,
    )


class GeminiPlugin(ProviderPlugin):
    """Registers the ``gemini`` provider (google.genai is imported on its first call)."""

    NAME = NAME
    KEY_ENV = "GEMINI_API_KEY"
    DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
    BASE_URL_ENV = "GEMINI_BASE_URL"
    GENAI_PROVIDER = "google"

    def build(self, conn: Connection, prices: PriceBook, models: list[str]) -> BaseProvider:
        return GeminiProvider(conn, prices, models)
