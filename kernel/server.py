"""The MCP server: ``llm_route``, ``llm_routing_info`` and the tools plugins register.

The gateway is built before the server (its task classes become the tool schemas'
enums) and closed by the server's lifespan. Nothing lives in module globals.
"""

# No `from __future__ import annotations` here: the tool functions' annotations are
# built at run time from the config and must be real objects for the schema.

import asyncio
import contextlib
import hmac
import inspect
import io
import ipaddress
import json
import os
import queue
import re
import stat
import sys
import threading
import typing
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
import structlog
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError, UnexpectedToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp_types import CallToolResult, TextContent, jsonrpc_message_adapter
from pydantic import Field, ValidationError

from . import __version__
from .envelope import Envelope
from .errors import ErrorClass
from .gateway import Gateway
from .tools import INFO_TOOL, ROUTE_TOOL, ToolSpec
from .types import Request

if sys.platform != "win32":
    import fcntl

log = structlog.get_logger("llmgw.server")

MAX_BODY_BYTES = 4 * 1024 * 1024
TOKEN_ENV = "LLM_GATEWAY_HTTP_TOKEN"  # noqa: S105 - a variable name, not a secret

ROUTE_DESCRIPTION = (
    "Send a prompt to the model the gateway assigns to a task class (you never pick the "
    "model). Panel classes answer with several independent members in data.members. "
    "Returns {status, data: {text}, meta: {provider, model, latency_ms, tokens, "
    "cost_usd_approx, task_class, ...}}; status is success, error or needs_human_review."
)
INFO_DESCRIPTION = (
    "Describe the active routing policy: version, task classes, providers (key present or "
    "not), panels and their visibility contracts, roles and depths, breaker states and "
    "month-to-date spend against caps."
)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _clean(value: Any) -> Any:
    """Replace lone surrogates, which cannot be encoded as UTF-8 on the wire."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_result(envelope: Envelope) -> CallToolResult:
    """An envelope as an MCP tool result: JSON text plus the same structured content."""
    body = envelope.to_dict()
    text = json.dumps(body, ensure_ascii=False, default=str)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # A caller's argument or an upstream answer held a lone surrogate: without this
        # the response could not be written and the client would wait forever.
        body = _clean(body)
        text = json.dumps(body, ensure_ascii=False, default=str)
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structured_content=body,
        is_error=envelope.status == "error",
    )


def _progress_of(ctx: Context | None) -> Callable[[float, float, str], Awaitable[None]] | None:
    if ctx is None:
        return None

    async def progress(done: float, total: float, message: str) -> None:
        await ctx.report_progress(done, total, message)

    return progress


def _enum(values: list[str], description: str, *, nullable: bool = False) -> Any:
    """A field limited to ``values``; ``nullable``: null is allowed too (an optional
    parameter whose default is null must validate against its own schema)."""
    enum: list[Any] = [*values, None] if nullable else list(values)
    return Field(description=description, json_schema_extra={"enum": enum})


class GatewayServer(MCPServer):
    """An MCPServer whose tools answer bad arguments with an envelope, as every other error.

    The SDK checks arguments against a tool's signature before the tool runs, ignores
    names it does not know and answers a mismatch with a bare error text. Here an unknown
    argument (a misspelled ``override_model`` would otherwise send and bill the call with
    the defaults) and every mismatch are a ``bad_argument`` envelope naming the field and
    the fix; nothing is sent. Values are never echoed back.
    """

    #: How long stdin's end waits for the calls in flight (set from gateway.deadline_s).
    drain_s = 120.0
    #: Tool calls running now; tools/call requests the transport has read, and those that
    #: reached call_tool; the event set at each start and end (see drained).
    _busy = 0
    _read = 0
    _started = 0
    _change: anyio.Event | None = None

    def request_read(self) -> None:
        """The transport read a tools/call request (it reaches call_tool a moment later)."""
        self._read += 1

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        self._busy += 1
        self._started += 1
        self._changed()
        try:
            return await self._call_tool(name, arguments, context)
        finally:
            self._busy -= 1
            self._changed()

    def _changed(self) -> None:
        if self._change is not None:
            self._change.set()

    async def _next_change(self) -> None:
        self._change = anyio.Event()
        await self._change.wait()

    @property
    def in_flight(self) -> int:
        """Tool calls read and not yet answered (started or about to start)."""
        return self._busy + max(0, self._read - self._started)

    async def drain(self) -> None:
        """At the end of stdin: wait (at most :attr:`drain_s`) for the calls in flight."""
        busy = self.in_flight
        if not busy:
            return
        log.info("stdio.draining", calls=busy, timeout_s=self.drain_s)
        left = await self.drained(self.drain_s)
        if left:
            log.warning("stdio.drain_timed_out", calls=left)

    async def drained(self, timeout_s: float, start_s: float = 2.0) -> int:
        """Wait until every tool call read has started (at most ``start_s``: a request the
        SDK answers itself never does) and none runs (at most ``timeout_s`` in all);
        returns the calls still running."""
        with anyio.move_on_after(timeout_s):
            with anyio.move_on_after(start_s):
                while self._started < self._read:
                    await self._next_change()
            while self._busy:
                await self._next_change()
        return self._busy

    async def _call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        tool = self._tool_manager.get_tool(name)
        if tool is None:
            # The SDK's "Unknown tool: <name>" echoed the whole name (100 KB of it).
            shown = name if len(name) <= 60 else name[:60] + "..."
            tools = ", ".join(t.name for t in self._tool_manager.list_tools())
            raise ToolError(f"Unknown tool: {shown!r}; the tools are {tools}")
        known = (tool.parameters or {}).get("properties", {})
        unknown = [a for a in arguments if a not in known]
        if unknown:
            return to_result(_unknown_arguments(name, unknown, list(known)))
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            cause = exc.__cause__
            if isinstance(exc, UnexpectedToolError) or not isinstance(cause, ValidationError):
                raise
            problems = [
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in cause.errors(include_url=False, include_input=False)
            ]
            log.info("tool.bad_arguments", tool=name, problems=problems)
            return to_result(
                Envelope.failure(
                    ErrorClass.BAD_ARGUMENT,
                    f"invalid arguments for {name}: {'; '.join(problems)}; nothing was sent "
                    "(tools/list shows each argument's type and bounds)",
                )
            )

    def streamable_http_app(self, **kwargs: Any) -> Any:
        """The SDK's app; stateless, a ``GET`` of the MCP path is answered 405 (as the
        transport's specification allows a server that offers no stream of its own): the
        SDK opened an event stream that never sent anything and never ended, one held
        connection and task per GET."""
        app = super().streamable_http_app(**kwargs)
        if kwargs.get("stateless_http"):
            app.add_middleware(_NoStreamOfItsOwn, path=kwargs.get("streamable_http_path", "/mcp"))
        return app


class _NoStreamOfItsOwn:
    """ASGI middleware: ``GET path`` is 405 (``Allow: POST``); everything else passes."""

    def __init__(self, app: Any, path: str) -> None:
        self.app = app
        self.path = path.rstrip("/")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "GET"
            and scope["path"].rstrip("/") == self.path
        ):
            body = b'{"error": "this server is stateless: POST JSON-RPC requests to it"}'
            await send(
                {
                    "type": "http.response.start",
                    "status": 405,
                    "headers": [
                        (b"allow", b"POST"),
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _unknown_arguments(tool: str, unknown: list[str], known: list[str]) -> Envelope:
    import difflib  # only here: not on every start

    parts = []
    for arg in unknown[:5]:
        shown = arg if len(arg) <= 40 else arg[:40] + "..."
        close = difflib.get_close_matches(arg, known, n=1)
        parts.append(f"{shown!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return Envelope.failure(
        ErrorClass.BAD_ARGUMENT,
        f"unknown argument{'s' if len(unknown) > 1 else ''} for {tool}: {', '.join(parts)}; "
        f"its arguments are {', '.join(known) or 'none'}; nothing was sent",
    )


def build_server(gateway: Gateway, *, own_gateway: bool = True, **server_kwargs: Any) -> MCPServer:
    """An MCP server exposing ``gateway``; it closes the gateway when it stops if it owns it."""

    @asynccontextmanager
    async def lifespan(_server: MCPServer) -> AsyncIterator[dict[str, Any]]:
        try:
            yield {"gateway": gateway}
        finally:
            if own_gateway:
                await gateway.aclose()

    server = GatewayServer(
        "llm-gateway-mcp",
        version=__version__,
        instructions=(
            "Route prompts by task class with llm_route; inspect the policy with llm_routing_info."
        ),
        lifespan=lifespan,
        **server_kwargs,
    )
    # A call outlives its deadline by at most its last after_call hooks.
    server.drain_s = gateway.settings.gateway.deadline_s + 5.0
    classes = sorted(gateway.settings.task_classes)
    class_help = "; ".join(
        f"{n}: {gateway.settings.task_classes[n].description}".rstrip(": ") for n in classes
    )
    TaskClass = Annotated[str, _enum(classes, f"The kind of task. {class_help}")]
    Prompt = Annotated[str, Field(description="The prompt to send.")]
    System = Annotated[str | None, Field(description="Optional system prompt.")]
    MaxTokens = Annotated[
        int | None,
        Field(
            description="Output token bound (defaults to the task class's).",
            ge=1,
            le=gateway.settings.gateway.max_output_tokens,
            strict=True,  # an integer: not true, 10.0 or "10"
        ),
    ]
    Override = Annotated[
        str | None,
        Field(description="A model declared in routing.yaml, as 'model' or 'provider/model'."),
    ]

    async def llm_route(
        task_class: TaskClass,
        prompt: Prompt,
        system: System = None,
        max_tokens: MaxTokens = None,
        override_model: Override = None,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> CallToolResult:
        request = Request(
            task_class=task_class,
            prompt=prompt,
            system=system,
            max_tokens=max_tokens,
            override_model=override_model,
        )
        try:
            envelope = await gateway.route(request, progress=_progress_of(ctx))
        except Exception:
            log.exception("tool.crashed", tool=ROUTE_TOOL)
            envelope = Envelope.failure(
                ErrorClass.INTERNAL_ERROR,
                "the gateway failed internally; see its log",
                {"task_class": task_class},
            )
        return to_result(envelope)

    async def llm_routing_info() -> CallToolResult:
        # In a worker thread: a plugin's report may wait on a file lock (the ledger, when
        # another process writes), and that must not stall every other request.
        info = await anyio.to_thread.run_sync(gateway.routing_info)
        body = _clean({"status": "success", "data": info, "meta": {"version": __version__}})
        return CallToolResult(
            content=[TextContent(type="text", text=json.dumps(body, default=str))],
            structured_content=body,
        )

    server.add_tool(llm_route, name=ROUTE_TOOL, description=ROUTE_DESCRIPTION)
    server.add_tool(llm_routing_info, name=INFO_TOOL, description=INFO_DESCRIPTION)
    for spec in gateway.tools:
        server.add_tool(_adapt(spec), name=spec.name, description=spec.description)
    return server


def _adapt(spec: ToolSpec) -> Callable[..., Awaitable[CallToolResult]]:
    """Wrap a plugin's tool: enums from ``choices``, progress from the MCP context."""
    sig = inspect.signature(spec.fn)
    wants_progress = "progress" in sig.parameters
    params = []
    for name, p in sig.parameters.items():
        if name == "progress":
            continue
        ann = p.annotation
        if name in spec.choices:
            values = list(spec.choices[name])
            base = ann if ann is not inspect.Parameter.empty else str
            nullable = type(None) in typing.get_args(base) or p.default is None
            ann = Annotated[base, _enum(values, f"One of: {', '.join(values)}", nullable=nullable)]
        params.append(p.replace(annotation=ann, kind=inspect.Parameter.KEYWORD_ONLY))
    params.append(
        inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context, default=None)
    )

    async def tool(**kwargs: Any) -> CallToolResult:
        ctx = kwargs.pop("ctx", None)
        if wants_progress:
            kwargs["progress"] = _progress_of(ctx)
        for name, values in spec.choices.items():
            value = kwargs.get(name)
            if value is not None and value not in values:
                return to_result(
                    Envelope.failure(
                        ErrorClass.BAD_ARGUMENT,
                        f"{name} must be one of: {', '.join(values)} (got {value!r:.40})",
                    )
                )
        try:
            envelope = await spec.fn(**kwargs)
        except Exception:
            log.exception("tool.crashed", tool=spec.name)
            envelope = Envelope.failure(
                ErrorClass.INTERNAL_ERROR, "the tool failed internally; see the gateway log"
            )
        return to_result(envelope)

    tool.__signature__ = inspect.Signature(params, return_annotation=CallToolResult)  # type: ignore[attr-defined]
    tool.__annotations__ = {p.name: p.annotation for p in params} | {"return": CallToolResult}
    tool.__name__ = spec.name
    tool.__doc__ = spec.description
    return tool


# --- stdio -----------------------------------------------------------------------------

_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def sanitize_frame(line: str) -> str:
    """Replace lone surrogates escaped in a JSON-RPC frame with U+FFFD.

    The SDK's JSON parser refuses them, drops the frame and never answers its id, so the
    client would wait forever; with the replacement the tool answers with a clear error.
    """
    if not _LONE_SURROGATE_ESCAPE.search(line):
        return line
    try:
        data = json.loads(line)
    except ValueError:
        return line
    return json.dumps(_clean(data)) + "\n"


#: The deepest nesting of a stdin frame passed on. The SDK's JSON parser drops a frame
#: nested ~200 deep without answering its id; no MCP message nests anywhere near this.
MAX_FRAME_DEPTH = 128
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKET = re.compile(r"[\[\]{}]")


def too_deep(line: str, limit: int = MAX_FRAME_DEPTH) -> bool:
    """Whether a JSON frame nests arrays and objects deeper than ``limit`` (brackets
    inside strings do not count). A frame with fewer brackets than that is not scanned."""
    if line.count("[") + line.count("{") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.finditer(_JSON_STRING.sub("", line)):
        if bracket.group() in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


class _SanitizedLines:
    """The stdin lines of the stdio transport, passed through :func:`sanitize_frame`.

    A frame nested deeper than :data:`MAX_FRAME_DEPTH` is dropped, and answered through
    ``reply`` (when there is one: the pipe transport) with a JSON-RPC error for its id:
    the SDK would drop it unanswered and leave the client waiting."""

    def __init__(
        self,
        inner: Any,
        reply: Callable[[str], Awaitable[None]] | None = None,
        calls: GatewayServer | None = None,
    ) -> None:
        self._inner = inner
        self._reply = reply
        #: The server whose tool calls are counted as read and drained at EOF.
        self._calls = calls

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        async for line in self._inner:
            if too_deep(line):
                await _answer_dropped(
                    self._reply,
                    line[:_ID_WINDOW].encode("utf-8", "replace"),
                    line[-_ID_WINDOW:].encode("utf-8", "replace"),
                    too_deep_reply,
                    "stdio.frame_too_deep",
                    limit=MAX_FRAME_DEPTH,
                )
                continue
            line = sanitize_frame(line)
            if not line.strip():
                continue  # a blank line between frames
            try:
                # As the SDK's reader does next (~5 us): a frame it refuses, it drops
                # without a word, and the client waits for an answer that never comes.
                message = jsonrpc_message_adapter.validate_json(line, by_name=False)
            except ValueError:
                await self._refused(line)
                continue
            if self._calls is not None and getattr(message, "method", None) == "tools/call":
                self._calls.request_read()  # counted before its handler starts (see drain)
            yield line
        if self._calls is not None:
            # stdin ended (MCP's way to ask a server to stop): the calls in flight are
            # answered before the transport closes, not cancelled with their answers lost
            # (paid for, charged at their worst case). A client that will not wait sends
            # SIGTERM, which cancels them (cli: Ctrl-C's path).
            await self._calls.drain()

    async def _refused(self, line: str) -> None:
        """Answer a frame the SDK would drop: -32700 when it is not JSON this server can
        read (a number over 4,300 digits among them), -32600 when it is JSON but no
        JSON-RPC 2.0 message (``jsonrpc`` not "2.0", a method that is not a string)."""
        try:
            data = json.loads(line)
        except ValueError:
            data, code = None, -32700
            message = "the message is not JSON this server can read (or holds a number too long)"
        else:
            code = -32600
            message = 'the message is not a JSON-RPC 2.0 request (jsonrpc "2.0", a string method)'
        request_id = data.get("id") if isinstance(data, dict) else None
        if isinstance(request_id, bool) or not isinstance(request_id, int | str):
            request_id = None
        if data is None:
            request_id = _frame_id(
                line[:_ID_WINDOW].encode("utf-8", "replace"),
                line[-_ID_WINDOW:].encode("utf-8", "replace"),
            )
        answered = request_id is not None and self._reply is not None
        log.warning("stdio.frame_refused", code=code, answered=answered)
        if self._reply is not None and request_id is not None:
            await self._reply(_error_reply(request_id, message, code))


#: The longest stdin frame the pipe transport reads; a longer one is dropped whole and
#: logged. A prompt and a system prompt at ``gateway.max_prompt_bytes`` (1 MiB) each fit
#: even fully escaped. The reader buffers at most twice this before it stops reading.
MAX_FRAME_BYTES = 16 * 1024 * 1024
#: How long a server that stops waits for the client to read the rest of a half-written
#: frame before it drops it.
DRAIN_S = 5.0


#: A JSON-RPC id (a number or a string) as a key of the frame's own object: in a frame's
#: head, before ``"params"``; in its tail, as the last key (the frame's closing brace
#: follows it).
_ID_VALUE = rb'(-?\d+(?![\d.eE])|"(?:[^"\\]|\\.)*")'
_HEAD_ID = re.compile(rb'"id"\s*:\s*' + _ID_VALUE)
_TAIL_ID = re.compile(rb'"id"\s*:\s*' + _ID_VALUE + rb"\s*\}\s*$")
#: How much of an over-long frame's head and tail is kept to find its id.
_ID_WINDOW = 4096


def _frame_id(head: bytes, tail: bytes) -> int | str | None:
    """The id of an over-long request frame, from the bytes kept of its head and tail
    (the frame itself is never parsed); None if it is not found where clients put it, or
    if the frame is not one request (a batch, or a response: no ``"method"`` key first)."""
    if not head.lstrip().startswith(b"{") or b'"method"' not in head:
        return None
    params = head.find(b'"params"')
    before = head if params < 0 else head[:params]
    found = _HEAD_ID.search(before)
    if found is not None and before[: found.start()].count(b"{") != 1:
        found = None  # inside a nested object, not the frame's own id
    if found is None:
        found = _TAIL_ID.search(tail)
    if found is None:
        return None
    try:
        value = json.loads(found.group(1))
    except ValueError:
        return None
    return value if isinstance(value, int | str) else None


def too_long_reply(request_id: int | str) -> str:
    """The JSON-RPC error answering a request frame over :data:`MAX_FRAME_BYTES`."""
    limit = MAX_FRAME_BYTES / (1024 * 1024)
    return _error_reply(
        request_id,
        f"the request is larger than this server reads ({limit:g} MiB per message) and was "
        "dropped unread; prompts are limited to gateway.max_prompt_bytes",
    )


def too_deep_reply(request_id: int | str) -> str:
    """The JSON-RPC error answering a request frame nested over :data:`MAX_FRAME_DEPTH`."""
    return _error_reply(
        request_id,
        f"the request nests arrays or objects deeper than {MAX_FRAME_DEPTH} levels and was "
        "dropped; send the prompt as text",
    )


def _error_reply(request_id: int | str, message: str, code: int = -32600) -> str:
    """A JSON-RPC error (Invalid Request by default) for a frame the server dropped, as
    one line."""
    body = {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}
    return json.dumps(body) + "\n"


async def _answer_dropped(
    reply: Callable[[str], Awaitable[None]] | None,
    head: bytes,
    tail: bytes,
    reply_for: Callable[[int | str], str],
    event: str,
    **fields: Any,
) -> None:
    """Log a frame dropped unread; answer it with ``reply_for(id)`` when its id is found
    (:func:`_frame_id`) and there is a way to reply."""
    request_id = _frame_id(head, tail)
    answered = request_id is not None and reply is not None
    log.warning(event, answered=answered, **fields)
    if reply is not None and request_id is not None:
        await reply(reply_for(request_id))


class _PipeLines:
    """stdin lines from an asyncio pipe reader: no worker thread per line.

    A line over :data:`MAX_FRAME_BYTES` is dropped unread; when its id can be found in
    its head or tail, ``reply`` answers it with a JSON-RPC error, so the client is not
    left waiting for an answer that never comes."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        reply: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self._reader = reader
        self._reply = reply

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        while True:
            line = await self._frame()
            if line is None:
                return  # EOF: the client is gone
            yield line.decode("utf-8", errors="replace")

    async def _frame(self) -> bytes | None:
        """The next line; a line over the limit is skipped to its end (its tail must not
        pass for a frame of its own). None at EOF."""
        head: bytes | None = None  # the start of a line over the limit
        tail = b""
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.LimitOverrunError as exc:
                dropped = await self._reader.readexactly(exc.consumed)  # what is buffered
                if head is None:
                    head = dropped[:_ID_WINDOW]
                tail = (tail + dropped)[-_ID_WINDOW:]
                continue
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # EOF: a last line without its newline, or nothing
                if not line:
                    return None
            if head is None:
                return line
            await _answer_dropped(
                self._reply,
                head,
                (tail + line)[-_ID_WINDOW:],
                too_long_reply,
                "stdio.frame_too_long",
                limit_bytes=MAX_FRAME_BYTES,
            )
            head, tail = None, b""
            if not line.endswith(b"\n"):
                return None  # EOF in the middle of the long line


class _PipeOut(asyncio.BaseProtocol):
    """stdout as an asyncio pipe writer. ``flush`` returns once the kernel has every byte
    written so far (no write buffer of its own: see :func:`_pipe_stdio`); no worker
    thread per frame."""

    def __init__(self) -> None:
        self._room = asyncio.Event()
        self._room.set()
        self._lost: BaseException | None = None
        self.transport: asyncio.WriteTransport | None = None

    def pause_writing(self) -> None:
        self._room.clear()

    def resume_writing(self) -> None:
        self._room.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc or BrokenPipeError()
        self._room.set()

    def _check(self) -> None:
        if self._lost is not None:
            raise BrokenPipeError(f"stdout is closed ({self._lost!r})")

    async def write(self, text: str) -> None:
        self._check()
        assert self.transport is not None
        self.transport.write(text.encode("utf-8"))

    async def flush_quietly(self) -> None:
        """Wait until the kernel took every byte or the pipe closed."""
        await self._room.wait()

    async def flush(self) -> None:
        await self.flush_quietly()
        self._check()


def _is_pipe(fd: int) -> os.stat_result | None:
    """fd's status if it is a pipe or a socket (how MCP clients connect a server)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) else None


class _Wires:
    """The wire moved to private descriptors while serving: fd 0 reads the null device,
    fd 1 writes to stderr (the null device if there is none), so a stray ``print`` or a
    child process can neither read the client's frames nor corrupt the replies."""

    def __init__(self) -> None:
        self.fd_in = self.fd_out = -1
        self.blocking: tuple[bool, bool] = (True, True)
        self.diverted = False

    def divert(self) -> None:
        """Raises OSError with everything put back as it was."""
        try:
            self.fd_in = fcntl.fcntl(0, fcntl.F_DUPFD_CLOEXEC, 3)
            self.fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, 3)
            self.blocking = (os.get_blocking(self.fd_in), os.get_blocking(self.fd_out))
            null = os.open(os.devnull, os.O_RDWR)
            try:
                self.diverted = True
                os.dup2(null, 0)
                try:
                    os.dup2(2, 1)
                except OSError:
                    os.dup2(null, 1)
            finally:
                os.close(null)
        except OSError:
            self.restore()
            raise

    def restore(self, *, keep_in: bool = False) -> None:
        """fd 0 and fd 1 back on the wire, with the blocking mode they had; the private
        descriptors closed, except the input one with ``keep_in`` (a thread still blocked
        reading it: closed, its number could go to the next file opened, which that
        thread would then read). Safe to call after a partial :meth:`divert`."""
        with contextlib.suppress(Exception):
            sys.stdout.flush()  # a stray print still buffered goes to stderr, not the wire
        pairs = ((0, self.fd_in, self.blocking[0]), (1, self.fd_out, self.blocking[1]))
        for fd, wire, blocking in pairs:
            if wire < 0:
                continue
            with contextlib.suppress(OSError):
                os.set_blocking(wire, blocking)
            if self.diverted:
                with contextlib.suppress(OSError):
                    os.dup2(wire, fd)
            if fd == 0 and keep_in:
                continue
            with contextlib.suppress(OSError):
                os.close(wire)
        self.fd_in = self.fd_out = -1
        self.diverted = False


async def _connect(wires: _Wires, out: _PipeOut) -> tuple[asyncio.BaseTransport, _PipeLines]:
    """Both pipe transports; on any failure neither is left open."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=MAX_FRAME_BYTES, loop=loop)
    read_transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
        os.fdopen(wires.fd_in, "rb", buffering=0, closefd=False),
    )
    try:
        out.transport, _ = await loop.connect_write_pipe(
            lambda: out, os.fdopen(wires.fd_out, "wb", buffering=0, closefd=False)
        )
    except BaseException:
        read_transport.close()
        raise
    # No buffer of its own: flush() waits until the kernel took every byte, as the SDK's
    # blocking write did, so nothing is left queued when the server exits.
    out.transport.set_write_buffer_limits(high=0)
    return read_transport, _PipeLines(reader, reply=out.write)


@asynccontextmanager
async def _pipe_stdio() -> AsyncIterator[tuple[_PipeLines, _PipeOut] | None]:
    """stdin and stdout as asyncio pipes, or None where that cannot be (Windows, a file,
    a terminal, one socket for both): the caller then uses the SDK's transport
    (:func:`_sdk_files`), a thread hop per line read and per frame written and flushed.

    The wire moves to private descriptors while serving (:class:`_Wires`, as it does for
    the SDK's transport, :func:`_sdk_files`); they are put back, with their blocking mode,
    on every exit.
    """
    if sys.platform == "win32":
        yield None
        return
    st_in, st_out = _is_pipe(0), _is_pipe(1)
    if st_in is None or st_out is None or os.path.samestat(st_in, st_out):
        # One socket on both (inetd, socat EXEC): asyncio's write transport watches its
        # descriptor for the peer closing and would take the first request for that.
        yield None
        return
    wires = _Wires()
    out = _PipeOut()
    try:
        wires.divert()
        read_transport, lines = await _connect(wires, out)
    except (OSError, ValueError) as exc:
        wires.restore()
        log.warning("stdio.pipes_unavailable", error=str(exc))
        yield None
        return
    except BaseException:
        wires.restore()
        raise
    try:
        yield lines, out
    finally:
        read_transport.close()
        assert out.transport is not None
        if out.transport.get_write_buffer_size():
            # Stopped in the middle of a frame (the client was not reading): finish it,
            # for a while, rather than leave the client half a frame.
            with anyio.CancelScope(shield=True), anyio.move_on_after(DRAIN_S):
                await out.flush_quietly()
        if out.transport.get_write_buffer_size():
            out.transport.abort()  # still not read: dropped before the fd is closed
        else:
            out.transport.close()
        wires.restore()


async def run_stdio(server: MCPServer) -> None:
    """Serve ``server`` over stdin/stdout (stdout carries nothing but JSON-RPC).

    On POSIX pipes (how MCP clients start a server) both ends are asyncio pipe transports.
    Otherwise the SDK's transport writes and flushes each frame in a worker thread and
    :class:`_DaemonLines` reads each line in a thread: three thread hops per tool call
    (~0.6 ms of a call's p50 on two cores, see docs/performance.md).
    """
    from mcp.server.stdio import stdio_server

    lowlevel = server._lowlevel_server
    calls = server if isinstance(server, GatewayServer) else None
    try:
        async with _pipe_stdio() as pipes:
            log.info("stdio.serving", transport="pipes" if pipes is not None else "sdk")
            with contextlib.ExitStack() as stack:
                if pipes is not None:
                    lines, out = pipes
                    reader = _SanitizedLines(lines, out.write, calls)
                    streams = stdio_server(stdin=reader, stdout=out)  # type: ignore[arg-type]
                else:
                    stdin, stdout = stack.enter_context(_sdk_files())
                    reader = _SanitizedLines(stdin, calls=calls)
                    streams = stdio_server(stdin=reader, stdout=stdout)  # type: ignore[arg-type]
                async with streams as (read_stream, write_stream):
                    options = lowlevel.create_initialization_options()
                    await lowlevel.run(read_stream, write_stream, options)
    except* (BrokenPipeError, ConnectionResetError):
        # The client went away (its process died, both pipes closed) while a reply was
        # due: nobody is left to answer. The calls in flight are cancelled and settled as
        # the server stops, as on EOF; not a crash.
        log.warning("stdio.client_gone", note="the client closed the pipes mid-call")


@contextlib.contextmanager
def _sdk_files() -> Iterator[tuple[AsyncIterable[str], anyio.AsyncFile[str] | None]]:
    """stdin and stdout for the SDK's transport, on private descriptors as the pipe
    transport's are (:class:`_Wires`: a child process reads the null device, not the
    client's frames). Where they cannot move (Windows, a failure), stdin is read in place
    and stdout left to the SDK, which moves fd 1 itself."""
    wires = _Wires()
    if sys.platform != "win32":
        try:
            wires.divert()
        except OSError as exc:
            log.warning("stdio.divert_failed", error=str(exc))
    if not wires.diverted:
        stdin = io.TextIOWrapper(sys.stdin.buffer, "utf-8", errors="replace", newline="")
        try:
            yield anyio.wrap_file(stdin), None
        finally:
            with contextlib.suppress(ValueError):
                stdin.detach()  # sys.stdin's buffer stays open
        return
    # Buffered files (a raw write to a socket may take only part of a frame) over the
    # private descriptors, which wires.restore() closes (closefd=False here). stdin is not
    # closed: its reader thread may still be blocked in readline, holding the buffer.
    stdout: io.TextIOWrapper | None = None
    lines: _DaemonLines | None = None
    try:
        raw_in = os.fdopen(wires.fd_in, "rb", closefd=False)
        lines = _DaemonLines(io.TextIOWrapper(raw_in, "utf-8", errors="replace", newline=""))
        stdout = io.TextIOWrapper(os.fdopen(wires.fd_out, "wb", closefd=False), "utf-8")
        yield lines, anyio.wrap_file(stdout)
    finally:
        if stdout is not None:
            # A peer gone mid-frame fails this flush too: the error that ended the
            # serving is the one to report, not this one.
            with contextlib.suppress(OSError, ValueError):
                stdout.close()
        wires.restore(keep_in=lines is not None and lines.reading())


class _DaemonLines:
    """The lines of a blocking text file, read by a daemon thread of their own.

    A terminal or a socket gives no EOF on Ctrl-C: a reader that must be waited for (the
    SDK's, a worker thread per line) held ``llmgw serve`` up until the client sent a line
    or closed. This thread is left blocked instead, and the process exits without it.
    Left behind in a process that goes on, it may still take one buffered read (up to
    8 KiB, several lines maybe) from the stream it was reading (its private descriptor is
    then left open for it). Iterate it once.
    """

    def __init__(self, file: io.TextIOWrapper) -> None:
        self._file = file
        self._asking = False  # a line asked for and not answered: the thread reads

    def reading(self) -> bool:
        """Whether the thread may be reading (its descriptor must stay open for it)."""
        return self._asking

    def __aiter__(self) -> AsyncIterator[str]:
        return self._lines()

    async def _lines(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        asks: queue.SimpleQueue[asyncio.Future[str] | None] = queue.SimpleQueue()
        threading.Thread(
            target=self._serve, args=(loop, asks), name="llmgw-stdin", daemon=True
        ).start()
        try:
            while True:
                answer: asyncio.Future[str] = loop.create_future()
                self._asking = True
                asks.put(answer)
                try:
                    line = await answer  # cancelled here, the thread is left reading
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    self._asking = False  # readline failed: the thread has ended
                    raise
                self._asking = False
                if not line:
                    return
                yield line
        finally:
            asks.put(None)

    def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        asks: queue.SimpleQueue[asyncio.Future[str] | None],
    ) -> None:
        """On the thread: one line per future asked for, until EOF, an error or None."""
        while (asked := asks.get()) is not None:
            error: BaseException | None = None
            try:
                line = self._file.readline()
            except Exception as exc:  # handed to the loop, which raises it
                line, error = "", exc
            try:
                loop.call_soon_threadsafe(_answer, asked, line, error)
            except RuntimeError:  # the loop is closed: nobody is reading any more
                return
            if error is not None or not line:
                return


def _answer(asked: asyncio.Future[str], line: str, error: BaseException | None) -> None:
    if asked.done():  # its reader was cancelled meanwhile
        return
    if error is not None:
        asked.set_exception(error)
    else:
        asked.set_result(line)


# --- HTTP ------------------------------------------------------------------------------


class StaticTokenVerifier(TokenVerifier):
    """Accepts exactly one bearer token, compared in constant time."""

    def __init__(self, token: str) -> None:
        self._token = token.encode("utf-8")

    async def verify_token(self, token: str) -> AccessToken | None:
        if hmac.compare_digest(token.encode("utf-8"), self._token):
            return AccessToken(token="bearer", client_id="llmgw-client", scopes=[])  # noqa: S106
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def http_security(
    host: str, port: int, extra_hosts: list[str], extra_origins: list[str]
) -> TransportSecuritySettings:
    """Host and Origin allow-lists, checked on every request (DNS-rebinding protection)."""
    hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*", *extra_hosts]
    origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*", *extra_origins]
    if host not in {"0.0.0.0", "::", "[::]", "127.0.0.1", "localhost", "::1"}:  # noqa: S104
        # The address served on is a Host clients will send: 127.0.0.2 is loopback too.
        bare = host.strip("[]")
        named = f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"
        hosts.append(named)
        origins.append(f"http://{named}")
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins
    )


class HttpConfigError(ValueError):
    """The HTTP transport was asked to start in an unsafe way."""


def http_server(
    gateway: Gateway,
    *,
    token: str | None,
    host: str,
    port: int,
    allow_remote: bool = False,
    extra_hosts: list[str] | None = None,
    extra_origins: list[str] | None = None,
) -> tuple[MCPServer, dict[str, Any]]:
    """A server guarded by a bearer token, and the ``run`` keyword arguments for HTTP."""
    if not token:
        raise HttpConfigError(
            f"{TOKEN_ENV} is not set; the HTTP transport always requires a bearer token. "
            f"Set it to a long random value (e.g. `openssl rand -hex 32`)"
        )
    if len(token) < 16:
        raise HttpConfigError(f"{TOKEN_ENV} is too short; use at least 16 random characters")
    if not is_loopback(host) and not allow_remote:
        raise HttpConfigError(
            f"refusing to bind {host}: not a loopback address. Pass --allow-remote to accept "
            "connections from other machines (the bearer token is still required)"
        )
    if host in {"0.0.0.0", "::", "[::]"} and not extra_hosts:  # noqa: S104 - checking, not binding
        raise HttpConfigError(
            f"binding {host} accepts any address: name the host names clients will use with "
            "--allowed-host NAME:PORT (repeatable), so Host headers can be checked"
        )
    server = build_server(
        gateway,
        token_verifier=StaticTokenVerifier(token),
        auth=AuthSettings(issuer_url=f"http://127.0.0.1:{port}", resource_server_url=None),  # type: ignore[arg-type]
    )
    run_kwargs: dict[str, Any] = {
        "host": host,
        "port": port,
        "streamable_http_path": "/mcp",
        "stateless_http": True,
        "json_response": False,
        "max_request_body_size": MAX_BODY_BYTES,
        "transport_security": http_security(host, port, extra_hosts or [], extra_origins or []),
    }
    return server, run_kwargs
