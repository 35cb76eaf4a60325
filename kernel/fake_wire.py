"""The wire formats of the fake upstream (:mod:`.fake_upstream`): which provider a request
is for, what it asks, and each provider's answer, refusal and error shapes.

Answers echo ``echo[<model>]: <last user text>`` with plausible usage (cut at
``max_tokens`` like a real model); a system prompt that asks for a JSON ``"verdict"`` gets
``{"verdict": "ACCEPT", ...}``. Errors follow each provider's documented body and status.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any

__all__ = ["WireRequest", "wire_of"]

_GEMINI_PATH = re.compile(r"/models/([^/:]+):generateContent$")


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


def _texts(content: Any) -> list[str]:
    """Text parts of a message content in any of the three shapes."""
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
    return out


def wire_of(method: str, path: str, body: Any) -> tuple[str, str | None]:
    model = body.get("model") if isinstance(body, dict) else None
    model = model if isinstance(model, str) else None
    if method != "POST":
        return "unknown", model
    m = _GEMINI_PATH.search(path)
    if m:
        return "gemini", m.group(1)
    if path.endswith("/chat/completions"):
        return ("deepseek" if (model or "").startswith("deepseek") else "openai"), model
    if path.endswith("/v1/messages"):
        return "anthropic", model
    return "unknown", model


# --- the answers and errors -----------------------------------------------------------------------

# Per fault: HTTP status, OpenAI-style (type, code), Anthropic type, Gemini status.
_ERRORS: dict[str, tuple[int, str, str | None, str, str]] = {
    "rate_limited": (
        429,
        "requests",
        "rate_limit_exceeded",
        "rate_limit_error",
        "RESOURCE_EXHAUSTED",
    ),
    "overloaded": (503, "server_error", None, "overloaded_error", "UNAVAILABLE"),
    "overloaded_529": (529, "server_error", None, "overloaded_error", "UNAVAILABLE"),
    "server_error": (500, "server_error", None, "api_error", "INTERNAL"),
    "bad_gateway": (502, "server_error", None, "api_error", "UNAVAILABLE"),
    "gateway_timeout": (504, "server_error", None, "timeout_error", "DEADLINE_EXCEEDED"),
    "auth_error": (
        401,
        "invalid_request_error",
        "invalid_api_key",
        "authentication_error",
        "UNAUTHENTICATED",
    ),
    "forbidden": (
        403,
        "invalid_request_error",
        "unsupported_country_region_territory",
        "permission_error",
        "PERMISSION_DENIED",
    ),
    "model_not_found": (
        404,
        "invalid_request_error",
        "model_not_found",
        "not_found_error",
        "NOT_FOUND",
    ),
    "invalid_request": (
        400,
        "invalid_request_error",
        None,
        "invalid_request_error",
        "INVALID_ARGUMENT",
    ),
    "unprocessable": (
        422,
        "invalid_request_error",
        None,
        "invalid_request_error",
        "INVALID_ARGUMENT",
    ),
    "request_too_large": (
        413,
        "invalid_request_error",
        None,
        "request_too_large",
        "INVALID_ARGUMENT",
    ),
    "insufficient_quota": (
        429,
        "insufficient_quota",
        "insufficient_quota",
        "billing_error",
        "RESOURCE_EXHAUSTED",
    ),
    "payment_required": (
        402,
        "invalid_request_error",
        "invalid_request_error",
        "billing_error",
        "FAILED_PRECONDITION",
    ),
}

_CONTEXT_MESSAGES = {
    "openai": "This model's maximum context length is 128000 tokens. However, your messages "
    "resulted in 200000 tokens. Please reduce the length of the messages.",
    "deepseek": "This model's maximum context length is 65536 tokens. However, you requested "
    "70000 tokens (69000 in the messages, 1000 in the completion).",
    "anthropic": "prompt is too long: 210000 tokens > 200000 maximum",
    "gemini": "The input token count (1200000) exceeds the maximum number of tokens allowed "
    "(1048576).",
}


@dataclass
class WireRequest:
    wire: str
    model: str
    system: str
    last_user: str
    all_text: str
    max_tokens: int

    @classmethod
    def parse(cls, wire: str, model: str | None, body: Any) -> WireRequest:
        body = body if isinstance(body, dict) else {}
        texts: list[str] = []
        last_user = system = ""
        max_tokens = 1024
        if wire in {"openai", "deepseek"}:
            for msg in body.get("messages") or []:
                if not isinstance(msg, dict):
                    continue
                text = "".join(_texts(msg.get("content")))
                texts.append(text)
                if msg.get("role") == "user":
                    last_user = text
                elif msg.get("role") in {"system", "developer"}:
                    system = text
            max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 1024
        elif wire == "anthropic":
            system = "".join(_texts(body.get("system")))
            texts.append(system)
            for msg in body.get("messages") or []:
                if isinstance(msg, dict):
                    text = "".join(_texts(msg.get("content")))
                    texts.append(text)
                    if msg.get("role") == "user":
                        last_user = text
            max_tokens = body.get("max_tokens") or 1024
        elif wire == "gemini":
            si = body.get("systemInstruction") or body.get("system_instruction") or {}
            system = "".join(_texts(si.get("parts") if isinstance(si, dict) else None))
            texts.append(system)
            for content in body.get("contents") or []:
                if isinstance(content, dict):
                    text = "".join(_texts(content.get("parts")))
                    texts.append(text)
                    if content.get("role", "user") == "user":
                        last_user = text
            config = body.get("generationConfig") or {}
            max_tokens = (
                config.get("maxOutputTokens") if isinstance(config, dict) else None
            ) or 1024
        return cls(
            wire,
            model or "",
            system,
            last_user,
            "\n".join(texts),
            int(max_tokens) if isinstance(max_tokens, int) else 1024,
        )

    # answers ---------------------------------------------------------------------------

    def answer(self, *, cut: bool = False, empty: bool = False) -> dict[str, Any]:
        text = f"echo[{self.model}]: {self.last_user}"
        if '"verdict"' in self.system:  # a verifier asking for a JSON verdict (demo, roles)
            text = '{"verdict": "ACCEPT", "reasons": []}'
        cut = cut or _tokens(text) > self.max_tokens
        if cut:
            text = "" if empty else text[: max(1, min(len(text) - 1, self.max_tokens * 4))]
        in_tokens = _tokens(self.all_text) + 4
        out_tokens = min(self.max_tokens, _tokens(text)) if text else self.max_tokens
        if self.wire in {"openai", "deepseek"}:
            return self._openai(text, "length" if cut else "stop", in_tokens, out_tokens)
        if self.wire == "anthropic":
            return self._anthropic(text, "max_tokens" if cut else "end_turn", in_tokens, out_tokens)
        return self._gemini(text, "MAX_TOKENS" if cut else "STOP", in_tokens, out_tokens)

    def _openai(self, text: str, finish: str, n_in: int, n_out: int) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        reasoning = 0
        if self.wire == "deepseek" and "reasoner" in self.model:
            thought = f"Thinking about: {self.last_user}"
            message["reasoning_content"] = thought
            reasoning = _tokens(thought)
        elif self.model.startswith("o"):
            reasoning = 8
        usage: dict[str, Any] = {
            "prompt_tokens": n_in,
            "completion_tokens": n_out + reasoning,
            "total_tokens": n_in + n_out + reasoning,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": reasoning},
        }
        if self.wire == "deepseek":
            usage.update(prompt_cache_hit_tokens=0, prompt_cache_miss_tokens=n_in)
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model,
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
            ],
            "usage": usage,
        }

    def _anthropic(self, text: str, stop: str, n_in: int, n_out: int) -> dict[str, Any]:
        content = [{"type": "text", "text": text}] if text or stop != "max_tokens" else []
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": {
                "input_tokens": n_in,
                "output_tokens": n_out,
                "cache_read_input_tokens": 0,
                "cache_creation_input_tokens": 0,
            },
        }

    def _gemini(self, text: str, finish: str, n_in: int, n_out: int) -> dict[str, Any]:
        thoughts = 8 if "pro" in self.model else 0
        usage: dict[str, Any] = {
            "promptTokenCount": n_in,
            "candidatesTokenCount": n_out,
            "totalTokenCount": n_in + n_out + thoughts,
        }
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        parts = [{"text": text}] if text else []
        return {
            "candidates": [
                {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
            ],
            "usageMetadata": usage,
            "modelVersion": self.model,
            "responseId": "fake",
        }

    def odd_answer(self, name: str) -> dict[str, Any]:
        """A 200 answer a real upstream can send that is not a plain success: no text at a
        normal finish (``empty_answer``), a usage block without counts (``usage_missing``)
        or with negative ones (``usage_negative``), a fragment ended by a router's
        ``finish_reason: "error"`` (``finish_error``; the Chat Completions wire)."""
        body = self.answer()
        if name == "empty_answer":
            if self.wire in {"openai", "deepseek"}:
                body["choices"][0]["message"]["content"] = None
            elif self.wire == "anthropic":
                body["content"] = []
            else:
                body["candidates"][0]["content"]["parts"] = []
        elif name == "finish_error":
            if self.wire in {"openai", "deepseek"}:
                body["choices"][0]["finish_reason"] = "error"
        else:
            key = {"openai": "usage", "deepseek": "usage", "anthropic": "usage"}.get(
                self.wire, "usageMetadata"
            )
            if name == "usage_missing":
                body[key] = {}
            else:
                body[key] = {k: -abs(v) for k, v in body[key].items() if isinstance(v, int)}
        return body

    def empty(self) -> dict[str, Any]:
        if self.wire in {"openai", "deepseek"}:
            return {"id": "chatcmpl-fake", "object": "chat.completion", "choices": []}
        if self.wire == "anthropic":
            return {"id": "msg_fake", "type": "message", "role": "assistant"}
        return {"modelVersion": self.model}

    def refusal(self, *, prompt: bool = False) -> dict[str, Any]:
        n_in = _tokens(self.all_text) + 4
        if self.wire in {"openai", "deepseek"}:
            return self._openai("", "content_filter", n_in, 0)
        if self.wire == "anthropic":
            return self._anthropic("I can't help with that.", "refusal", n_in, 6)
        if prompt:
            return {
                "promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": {"promptTokenCount": n_in, "totalTokenCount": n_in},
            }
        return {
            "candidates": [
                {
                    "finishReason": "SAFETY",
                    "index": 0,
                    "safetyRatings": [
                        {
                            "category": "HARM_CATEGORY_DANGEROUS_CONTENT",
                            "probability": "HIGH",
                            "blocked": True,
                        }
                    ],
                }
            ],
            "usageMetadata": {"promptTokenCount": n_in, "totalTokenCount": n_in},
        }

    # errors --------------------------------------------------------------------------------

    def error(self, name: str, key: str) -> tuple[int, dict[str, str], dict[str, Any]]:
        headers: dict[str, str] = {}
        details: list[dict[str, Any]] = []
        message = f"fake upstream fault {name}"
        if name == "quota_exhausted":
            name = {
                "openai": "insufficient_quota",
                "deepseek": "payment_required",
                "anthropic": "payment_required",
                "gemini": "insufficient_quota",
            }[self.wire]
        if name.startswith("rate_limited"):
            if name == "rate_limited":
                headers["Retry-After"] = "2"
            elif name == "rate_limited_ms":
                headers["retry-after-ms"] = "1500"
                headers["Retry-After"] = "9"
            elif name == "rate_limited_date":
                headers["Retry-After"] = formatdate(time.time() + 30, usegmt=True)
            elif name == "rate_limited_retryinfo":
                details.append(
                    {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "4s"}
                )
            name = "rate_limited"
        if name == "overloaded" and self.wire == "anthropic":
            name = "overloaded_529"
        if name == "insufficient_quota":
            message = "You exceeded your current quota, please check your plan and billing details."
            if self.wire == "gemini":
                details.append(
                    {
                        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                        "violations": [
                            {
                                "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier",
                                "quotaMetric": "generativelanguage.googleapis.com/"
                                "generate_content_free_tier_requests",
                            }
                        ],
                    }
                )
        elif name == "payment_required":
            message = (
                "Insufficient Balance"
                if self.wire != "anthropic"
                else "Your credit balance is too low to access the Anthropic API."
            )
        if name == "context_length":
            status, otype, code, atype, gstatus = (
                400,
                "invalid_request_error",
                None,
                "invalid_request_error",
                "INVALID_ARGUMENT",
            )
            message = _CONTEXT_MESSAGES[self.wire]
            if self.wire == "openai":
                code = "context_length_exceeded"
        else:
            status, otype, code, atype, gstatus = _ERRORS[name]
        if name == "auth_error" and self.wire == "gemini":
            status, gstatus = 400, "INVALID_ARGUMENT"
            message = "API key not valid. Please pass a valid API key."
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            )
        if key:
            message = f"{message} Incorrect API key provided: {key}"
        if self.wire == "anthropic":
            return status, headers, {"type": "error", "error": {"type": atype, "message": message}}
        if self.wire == "gemini":
            return (
                status,
                headers,
                {
                    "error": {
                        "code": status,
                        "message": message,
                        "status": gstatus,
                        "details": details,
                    }
                },
            )
        return (
            status,
            headers,
            {"error": {"message": message, "type": otype, "param": None, "code": code}},
        )
