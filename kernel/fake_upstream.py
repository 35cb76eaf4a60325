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
:data:`FAULTS`; each is rendered in the provider's own error shape (the shapes are in
:mod:`.fake_wire`).

The server is stdlib ``ThreadingHTTPServer`` in a background thread, HTTP/1.1 keep-alive,
``disable_nagle_algorithm`` and a 256 listen backlog (see bench/README.md), so
connection reuse is observable through :attr:`ReceivedRequest.connection_id`.
"""

from __future__ import annotations

import json
import re
import socket
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .fake_wire import WireRequest, wire_of

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
        "empty_answer",  # 200, a normal finish with no text (content null, no text part)
        "usage_missing",  # 200, the answer with a usage block that has no counts
        "usage_negative",  # 200, the answer with negative token counts
        "error_in_answer",  # 200 carrying the wire's error object (a 429 rate limit)
        "finish_error",  # 200, a fragment with finish_reason "error" (OpenRouter)
    }
)

#: The marker that triggers a fault from inside a prompt.
MARKER = re.compile(r"\[\[fault:([a-z0-9_]+)(?::([0-9.]+))?\]\]")


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
        wire, model = wire_of(h.command, path, body)
        req = WireRequest.parse(wire, model, body)
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

    def _apply(self, h: _Handler, req: WireRequest, fault: Fault, key: str) -> None:
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
        elif name in {"empty_answer", "usage_missing", "usage_negative", "finish_error"}:
            _send_json(h, 200, req.odd_answer(name))
        elif name == "error_in_answer":
            status, _, payload = req.error("rate_limited", "")
            if req.wire in {"openai", "deepseek"}:  # a router's form: the status as code
                payload["error"]["code"] = status
            _send_json(h, 200, payload)
        else:
            if name == "echo_key":
                status, headers, payload = req.error("auth_error", key)
            else:
                status, headers, payload = req.error(name, key if self.echo_key_in_errors else "")
            if name == "bad_gateway":
                _send_raw(h, status, b"<html><body>502 Bad Gateway</body></html>", "text/html")
                return
            _send_json(h, status, payload, headers)


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
