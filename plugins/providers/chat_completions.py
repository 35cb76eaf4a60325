"""The Chat Completions wire format over one long-lived ``httpx2.AsyncClient``.

Shared by the ``openai``, ``deepseek`` and ``openai_compatible`` plugins; they differ only
in the :class:`Dialect` (output-bound field name, reasoning field, how a 402 reads).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import httpx2

from llmgw.kernel import ErrorClass, Outcome, ProviderRequest, Usage

from .base import BaseProvider, Connection
from .http_errors import (
    detail_count,
    failure,
    finish_outcome,
    read_capped,
    refine_invalid,
    retry_hint,
    status_class,
    token_count,
)
from .pricing import PriceBook

_REFUSED_CODES = {"content_filter", "content_policy_violation"}
#: Headers of an encoded body, dropped once the body is read and decoded.
_BODY_HEADERS = frozenset({"content-encoding", "content-length", "transfer-encoding"})


@dataclass(frozen=True)
class Dialect:
    """What differs between Chat Completions upstreams."""

    max_tokens_field: str = "max_tokens"
    #: A message field holding reasoning text to keep out of the answer (DeepSeek).
    reasoning_field: str | None = None
    #: Finish reasons that mean the upstream had no capacity (DeepSeek).
    overloaded_finish: frozenset[str] = frozenset()


OPENAI = Dialect(max_tokens_field="max_completion_tokens")
DEEPSEEK = Dialect(
    reasoning_field="reasoning_content",
    overloaded_finish=frozenset({"insufficient_system_resource"}),
)
GENERIC = Dialect()


class ChatCompletionsProvider(BaseProvider):
    """``POST {base_url}/chat/completions``; the key only in the Authorization header."""

    def __init__(
        self,
        conn: Connection,
        prices: PriceBook,
        models: list[str],
        *,
        dialect: Dialect,
        key_required: bool = True,
    ) -> None:
        super().__init__(conn, prices, models)
        self.dialect = dialect
        self.key_required = key_required
        self._client: httpx2.AsyncClient | None = None

    def client(self) -> httpx2.AsyncClient:
        """The provider's one HTTP client, made on first use and kept until ``aclose``."""
        if self._client is None:
            self._client = self.conn.http_client(
                limits=httpx2.Limits(max_connections=100, max_keepalive_connections=20),
                follow_redirects=False,
            )
        return self._client

    async def _close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def body(self, request: ProviderRequest) -> dict[str, Any]:
        messages: list[dict[str, str]] = []
        if request.system:
            messages.append({"role": "system", "content": request.system})
        messages.extend({"role": m.role, "content": m.content} for m in request.messages)
        return {
            "model": request.model,
            "messages": messages,
            self.dialect.max_tokens_field: request.max_tokens,
            "stream": False,
        }

    async def _send(self, request: ProviderRequest) -> Outcome:
        headers = {"content-type": "application/json", "accept": "application/json"}
        if self.conn.key is not None:
            headers["authorization"] = f"Bearer {self.conn.key_value}"
        client = self.client()
        outgoing = client.build_request(
            "POST",
            f"{self.conn.base_url}/chat/completions",
            json=self.body(request),
            headers=headers,
            timeout=self.conn.timeout(request.timeout_s),
        )
        limit = self.conn.max_response_bytes
        try:
            resp = await client.send(outgoing, stream=True)
            try:
                content = await read_capped(resp, limit)
            finally:
                await resp.aclose()
        except httpx2.HTTPError as exc:
            return self.transport_failure(request, exc)
        if content is None:
            return self.unreadable(request.model, resp.status_code, "response_too_large")
        if not 200 <= resp.status_code < 300:
            # The body is read (and decompressed) already: the headers that describe the
            # encoded body would have it decoded twice.
            kept = [(k, v) for k, v in resp.headers.items() if k.lower() not in _BODY_HEADERS]
            answer = httpx2.Response(resp.status_code, headers=kept, content=content)
            return self.http_error(request.model, answer)
        try:
            data = json.loads(content)
        except ValueError:
            return self.unreadable(request.model, resp.status_code, "not_json")
        return self.parse(request.model, data)

    def unreadable(self, model: str, status: int, reason: str) -> Outcome:
        """A sent request whose answer could not be read: charged at its worst case."""
        return failure(
            self.name, model, ErrorClass.MALFORMED_RESPONSE, sent=True, status=status, reason=reason
        )

    def http_error(self, model: str, resp: httpx2.Response) -> Outcome:
        status = resp.status_code
        try:
            body = resp.json()
        except ValueError:
            body = None
        cls, reason = self.error_class(status, body)
        hint = retry_hint(resp.headers) if cls != ErrorClass.QUOTA_EXHAUSTED else None
        return failure(
            self.name, model, cls, sent=True, status=status, retry_after_s=hint, reason=reason
        )

    def error_class(self, status: int, body: Any) -> tuple[ErrorClass, str | None]:
        """The class of an error answer from its status and its body (the OpenAI error
        shape, or the top-level message of servers that speak the wire but not its errors)."""
        cls = status_class(status)
        reason: str | None = None
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code, kind = str(err.get("code") or ""), str(err.get("type") or "")
            message = str(err.get("message") or "")
            if "insufficient_quota" in {code, kind}:
                cls, reason = ErrorClass.QUOTA_EXHAUSTED, "insufficient_quota"
            elif code == "context_length_exceeded":
                cls, reason = ErrorClass.CONTEXT_LENGTH_EXCEEDED, "context_length"
            elif code in _REFUSED_CODES:
                cls, reason = ErrorClass.CONTENT_REFUSED, "content_filter"
            elif code == "model_not_found":
                cls, reason = ErrorClass.MODEL_NOT_FOUND, "model_not_found"
            else:
                cls, reason = refine_invalid(cls, message)
        elif isinstance(body, dict):
            # Servers that speak the wire but not its error shape: vLLM puts the message at
            # the top level ({"object": "error", "message": ...}), Ollama the error as text.
            text = body.get("message") if err is None else err
            if isinstance(text, str):
                cls, reason = refine_invalid(cls, text)
        if status == 402:
            reason = "payment_required"
        return cls, reason

    def error_in_answer(self, model: str, err: dict[str, Any]) -> Outcome:
        """An error object in a 200 answer (a router that met the error after sending its
        status, OpenRouter among them): classed as the same error with its own status,
        the status taken from the object's numeric ``code`` (a server error without one)."""
        code = err.get("code")
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            status = code
        elif code == "rate_limit_exceeded" or err.get("type") == "rate_limit_error":
            status = 429
        else:
            status = 500
        cls, reason = self.error_class(status, {"error": err})
        return failure(
            self.name, model, cls, sent=True, status=200, reason=reason or "error_in_answer"
        )

    def parse(self, model: str, data: Any) -> Outcome:
        choices = data.get("choices") if isinstance(data, dict) else None
        if isinstance(data, dict) and isinstance(data.get("error"), dict) and not choices:
            return self.error_in_answer(model, data["error"])
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return failure(
                self.name,
                model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                reason="no_choices",
                usage=self.usage(data, None),
            )
        choice = choices[0]
        message = choice.get("message")
        if not isinstance(message, dict):
            return failure(
                self.name,
                model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                reason="no_message",
                usage=self.usage(data, None),
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str):
            return failure(
                self.name,
                model,
                ErrorClass.MALFORMED_RESPONSE,
                sent=True,
                reason="content_not_text",
                usage=self.usage(data, None),
            )
        text = content or ""
        finish = str(choice.get("finish_reason") or "stop")
        usage = self.usage(data, message)
        if message.get("refusal") or finish == "content_filter":
            return failure(
                self.name,
                model,
                ErrorClass.CONTENT_REFUSED,
                sent=True,
                usage=usage,
                finish_reason=finish,
                reason="content_filter",
            )
        if finish == "error":
            # A router's upstream failed after the router had answered 200 (OpenRouter):
            # whatever text came is a fragment. Sent, billed by its usage, retried.
            return failure(
                self.name,
                model,
                ErrorClass.SERVER_ERROR,
                sent=True,
                usage=usage,
                finish_reason=finish,
                reason="finish_error",
            )
        if finish in self.dialect.overloaded_finish:
            return failure(
                self.name,
                model,
                ErrorClass.OVERLOADED,
                sent=True,
                usage=usage,
                finish_reason=finish,
                reason=finish,
            )
        return finish_outcome(self.name, model, text, usage, finish, truncated=finish == "length")

    def usage(self, data: Any, message: dict[str, Any] | None) -> Usage | None:
        """The answer's usage; None when it has none or lacks a usable prompt or completion
        count (the attempt then stays charged at its worst case, as ``unknown``: a missing
        count read as 0 would settle a paid answer for nothing)."""
        raw = data.get("usage") if isinstance(data, dict) else None
        if not isinstance(raw, dict):
            return None
        prompt = token_count(raw.get("prompt_tokens"))
        output = token_count(raw.get("completion_tokens"))
        if prompt is None or output is None:
            return None
        prompt_details = raw.get("prompt_tokens_details")
        cached = (
            detail_count(prompt_details.get("cached_tokens"))
            if isinstance(prompt_details, dict)
            else 0
        )
        cached = cached or detail_count(raw.get("prompt_cache_hit_tokens"))  # DeepSeek's name
        out_details = raw.get("completion_tokens_details")
        reasoning = (
            detail_count(out_details.get("reasoning_tokens"))
            if isinstance(out_details, dict)
            else 0
        )
        field = self.dialect.reasoning_field
        thought = message.get(field) if (field and message) else None
        if not reasoning and isinstance(thought, str) and thought:
            # Reasoning text without a reported count: bound it like the tokenizer does
            # (at most a token per UTF-8 byte would overcount; ~4 bytes a token is typical).
            reasoning = math.ceil(len(thought.encode("utf-8")) / 4)
            output = max(output, reasoning)
        return Usage(
            input_tokens=prompt,
            output_tokens=output,
            cached_input_tokens=min(cached, prompt),
            reasoning_tokens=reasoning,
        )
