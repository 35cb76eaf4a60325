"""A fake LLM upstream on loopback that speaks the four wire formats, for tests and the demo.

::

    with FakeUpstream() as up:
        base = up.base_url("openai")            # http://127.0.0.1:PORT/v1
        up.fail_next(2, "overloaded")           # the next two requests answer 503
        up.script("gpt-4o", ["rate_limited", None])   # per model, in order (None = answer)
        ...
        up.requests[-1].headers["authorization"]

Routes: OpenAI and DeepSeek ``POST …/chat/completions``, Anthropic ``POST /v1/messages``,
Gemini ``POST /v1beta/models/{model}:generateContent``. A normal answer echoes
``echo[<model>]: <last user text>`` with plausible usage (cut at ``max_tokens`` like a real
model; a system prompt that asks for a JSON ``"verdict"`` gets ``{"verdict": "ACCEPT", …}``).
A prompt containing ``[[fault:<name>]]`` (or ``[[fault:slow:0.5]]``) gets that
fault, so an end-to-end test through MCP can trigger one. Faults are listed in
:data:`FAULTS`; each is rendered in the provider's own error shape.

The server is stdlib ``ThreadingHTTPServer`` in a background thread, HTTP/1.1 keep-alive,
``disable_nagle_algorithm`` and a 256 listen backlog (see notes/benchmarking.md), so
connection reuse is observable through :attr:`ReceivedRequest.connection_id`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["FAULTS", "MARKER", "FakeUpstream", "Fault", "ReceivedRequest"]

#: Every fault the upstream can inject, by name.
FAULTS: frozenset[str] = frozenset(
    {
        "rate_limited",  # 429, Retry-After: 2 (seconds)
        "rate_limited_ms",  # 429, retry-after-ms: 1500 and Retry-After: 9 (ms wins)
        "rate_limited_date",  # 429, Retry-After as an HTTP date 30 s ahead
        "rate_limited_retryinfo",  # 429 with Gemini RetryInfo.retryDelay "4s" in the body
        "rate_limited_nohint",  # 429 without any hint
        "overloaded",  # 503 (Anthropic: 529 overloaded_error)
        "overloaded_529",  # 529 on every wire
        "server_error",  # 500
        "bad_gateway",  # 502 with an HTML body
        "gateway_timeout",  # 504
        "auth_error",  # 401 (Gemini: 400 API_KEY_INVALID)
        "forbidden",  # 403
        "model_not_found",  # 404
        "invalid_request",  # 400
        "unprocessable",  # 422
        "context_length",  # 400 with each provider's context-length body
        "request_too_large",  # 413
        "quota_exhausted",  # the provider's own form (OpenAI 429 insufficient_quota, …)
        "insufficient_quota",  # 429 with code insufficient_quota (OpenAI form)
        "payment_required",  # 402 (DeepSeek "Insufficient Balance")
        "non_json",  # 200 with an HTML body
        "truncated",  # 200, JSON cut in half (consistent Content-Length)
        "empty",  # 200, valid JSON without any choice / candidate / content
        "reset",  # headers sent, then the connection closes mid-body
        "drop",  # the connection closes without any response
        "slow",  # answer after a delay (default 5 s; "[[fault:slow:0.2]]")
        "safety",  # 200 refusal in the provider's form (Gemini SAFETY, Anthropic refusal, …)
        "refusal",  # alias of safety
        "prompt_blocked",  # Gemini promptFeedback.blockReason SAFETY (others: as safety)
        "length",  # 200, answer cut at max_tokens
        "length_empty",  # 200, cut at max_tokens with no text at all
        "echo_key",  # 401 whose body echoes the API key it received
    }
)

#: The marker that triggers a fault from inside a prompt.
MARKER = re.compile(r"\[\[fault:([a-z0-9_]+)(?::([0-9.]+))?\]\]")

_GEMINI_PATH = re.compile(r"/models/([^/:]+):generateContent$")


@dataclass(frozen=True)
class Fault:
    """A fault to inject; ``delay_s`` applies to ``slow``."""

    name: str
    delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.name not in FAULTS:
            raise ValueError(f"unknown fault {self.name!r}; known: {', '.join(sorted(FAULTS))}")


FaultLike = Fault | str | None


def _as_fault(value: FaultLike) -> Fault | None:
    if value is None or isinstance(value, Fault):
        return value
    return Fault(value)


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the upstream saw it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-cased names
    body: Any  # parsed JSON, or None
    raw: bytes
    connection_id: int
    peer_port: int
    wire: str  # openai | deepseek | anthropic | gemini | unknown
    model: str | None
    fault: str | None

    @property
    def url(self) -> str:
        return f"{self.path}?{self.query}" if self.query else self.path


@dataclass
class _State:
    global_queue: deque[Fault | None] = field(default_factory=deque)
    scripts: dict[str, deque[Fault | None]] = field(default_factory=dict)
    persistent: dict[str, Fault] = field(default_factory=dict)
    latency: dict[str, float] = field(default_factory=dict)


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


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
    allow_reuse_address = True
    upstream: FakeUpstream


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _Server
    connection_id = 0

    def setup(self) -> None:
        super().setup()
        self.connection_id = self.server.upstream._opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.upstream._closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        return  # quiet: tests capture stderr

    def do_POST(self) -> None:
        self.server.upstream._handle(self)

    def do_GET(self) -> None:
        self.server.upstream._handle(self)


class FakeUpstream:
    """An HTTP server on 127.0.0.1 (free port) imitating OpenAI, DeepSeek, Anthropic, Gemini.

    Use as a context manager. Fault plans: :meth:`fail_next` (a global queue),
    :meth:`script` (per model, in order), :meth:`fail_model` (every request to a model),
    and the ``[[fault:name]]`` prompt marker, which wins over the others.
    """

    def __init__(self, *, echo_key_in_errors: bool = False) -> None:
        self.echo_key_in_errors = echo_key_in_errors
        self.requests: list[ReceivedRequest] = []
        self._state = _State()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._conns: dict[int, socket.socket] = {}
        self._next_conn = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.upstream = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.01},
            daemon=True,
            name="fake-upstream",
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._server is None:
            return
        self._server.shutdown()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:  # keep-alive handler threads are blocked reading; wake them
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the fake upstream is not running; use it as a context manager")
        return int(self._server.server_address[1])

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def base_url(self, provider: str = "openai") -> str:
        """The base URL in the form each SDK documents (OpenAI and DeepSeek include /v1)."""
        if provider in {"anthropic", "gemini"}:
            return self.root
        return f"{self.root}/v1"

    # --- fault plans ----------------------------------------------------------------------

    def fail_next(self, n: int, fault: FaultLike) -> None:
        """The next ``n`` requests (any model) get ``fault``."""
        f = _as_fault(fault)
        with self._lock:
            self._state.global_queue.extend([f] * n)

    def script(self, model: str, faults: Iterable[FaultLike]) -> None:
        """Requests for ``model`` get these faults in order (``None`` = a normal answer)."""
        with self._lock:
            self._state.scripts.setdefault(model, deque()).extend(_as_fault(f) for f in faults)

    def fail_model(self, model: str, fault: FaultLike) -> None:
        """Every request for ``model`` gets ``fault`` until cleared (``None`` clears)."""
        f = _as_fault(fault)
        with self._lock:
            if f is None:
                self._state.persistent.pop(model, None)
            else:
                self._state.persistent[model] = f

    def set_latency(self, model: str, seconds: float) -> None:
        """Delay every answer for ``model`` (panel benchmarks)."""
        with self._lock:
            self._state.latency[model] = seconds

    def reset(self) -> None:
        """Forget recorded requests and every fault plan and latency."""
        with self._lock:
            self.requests.clear()
            self._state = _State()

    def connections(self) -> set[int]:
        """Connection ids that carried the recorded requests."""
        return {r.connection_id for r in self.requests}

    # --- server side ----------------------------------------------------------------------

    def _opened(self, conn: socket.socket) -> int:
        with self._lock:
            self._next_conn += 1
            self._conns[self._next_conn] = conn
            return self._next_conn

    def _closed(self, conn: socket.socket) -> None:
        with self._lock:
            for cid, c in list(self._conns.items()):
                if c is conn:
                    del self._conns[cid]

    def _pick_fault(self, model: str | None, prompt: str) -> Fault | None:
        m = MARKER.search(prompt)
        if m and m.group(1) in FAULTS:
            return Fault(m.group(1), float(m.group(2)) if m.group(2) else 5.0)
        with self._lock:
            queue = self._state.scripts.get(model or "")
            if queue:
                return queue.popleft()
            if model in self._state.persistent:
                return self._state.persistent[model or ""]
            if self._state.global_queue:
                return self._state.global_queue.popleft()
        return None

    def _handle(self, h: _Handler) -> None:
        path, _, query = h.path.partition("?")
        length = int(h.headers.get("content-length") or 0)
        raw = h.rfile.read(length) if length else b""
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        wire, model = _wire_of(h.command, path, body)
        req = _WireRequest.parse(wire, model, body)
        fault = self._pick_fault(model, req.all_text) if wire != "unknown" else None
        headers = {k.lower(): v for k, v in h.headers.items()}
        record = ReceivedRequest(
            method=h.command,
            path=path,
            query=query,
            headers=headers,
            body=body,
            raw=raw,
            connection_id=h.connection_id,
            peer_port=int(h.client_address[1]),
            wire=wire,
            model=model,
            fault=fault.name if fault else None,
        )
        with self._lock:
            self.requests.append(record)
            latency = self._state.latency.get(model or "", 0.0)
        if wire == "unknown":
            _send_json(h, 404, {"error": {"message": f"no route for {h.command} {path}"}})
            return
        if latency > 0:
            self._stop.wait(latency)
        key = _received_key(headers, query)
        if fault is None:
            _send_json(h, 200, req.answer())
        else:
            self._apply(h, req, fault, key)

    def _apply(self, h: _Handler, req: _WireRequest, fault: Fault, key: str) -> None:
        name = fault.name
        if name == "slow":
            if self._stop.wait(fault.delay_s):
                return
            _send_json(h, 200, req.answer())
        elif name == "drop":
            h.close_connection = True
        elif name == "reset":
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", "4096")
            h.end_headers()
            h.wfile.write(b'{"id": "partial"')
            h.wfile.flush()
            h.close_connection = True
        elif name == "non_json":
            _send_raw(h, 200, b"<html><body>Service page</body></html>", "text/html")
        elif name == "truncated":
            data = json.dumps(req.answer()).encode()
            _send_raw(h, 200, data[: len(data) // 2], "application/json")
        elif name == "empty":
            _send_json(h, 200, req.empty())
        elif name in {"safety", "refusal", "prompt_blocked"}:
            _send_json(h, 200, req.refusal(prompt=name == "prompt_blocked"))
        elif name in {"length", "length_empty"}:
            _send_json(h, 200, req.answer(cut=True, empty=name == "length_empty"))
        else:
            if name == "echo_key":
                status, headers, payload = req.error("auth_error", key)
            else:
                status, headers, payload = req.error(name, key if self.echo_key_in_errors else "")
            if name == "bad_gateway":
                _send_raw(h, status, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                return
            _send_json(h, status, payload, headers)


def _wire_of(method: str, path: str, body: Any) -> tuple[str, str | None]:
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


def _received_key(headers: dict[str, str], query: str) -> str:
    auth = headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:]
    for name in ("x-api-key", "x-goog-api-key"):
        if headers.get(name):
            return headers[name]
    m = re.search(r"(?:^|&)key=([^&]+)", query)
    return m.group(1) if m else ""


def _send_raw(
    h: _Handler, status: int, data: bytes, ctype: str, headers: dict[str, str] | None = None
) -> None:
    h.send_response(status)
    h.send_header("Content-Type", ctype)
    h.send_header("Content-Length", str(len(data)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(data)


def _send_json(
    h: _Handler, status: int, payload: Any, headers: dict[str, str] | None = None
) -> None:
    _send_raw(h, status, json.dumps(payload).encode(), "application/json", headers)


# --- the wire formats -----------------------------------------------------------------------

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
class _WireRequest:
    wire: str
    model: str
    system: str
    last_user: str
    all_text: str
    max_tokens: int

    @classmethod
    def parse(cls, wire: str, model: str | None, body: Any) -> _WireRequest:
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
