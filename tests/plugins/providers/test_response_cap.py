"""An upstream answer larger than gateway.max_response_bytes is not read on.

An OpenAI-compatible endpoint is any server a user points the gateway at: one that
answers without end (or with a small gzip body that inflates to gigabytes) filled the
gateway's memory, which every other caller shares.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import threading
import tracemalloc
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from provider_support import KEYS, PROVIDERS, gateway_yaml, request

from llmgw.kernel import ErrorClass, Request
from llmgw.kernel.fake_upstream import FakeUpstream
from llmgw.kernel.testing import gateway_from_yaml

#: 64 MiB of JSON once inflated, ~64 KiB on the wire.
BOMB = gzip.compress(b'{"choices": [{"message": {"content": "' + b"a" * (64 << 20) + b'"}}]}')


class _Gzipped(BaseHTTPRequestHandler):
    """Answers every POST with ``answer``: (status, gzip-encoded body, extra headers)."""

    answer: tuple[int, bytes, dict[str, str]] = (200, BOMB, {})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        status, body, extra = self.answer
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-encoding", "gzip")
        self.send_header("content-length", str(len(body)))
        for name, value in extra.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(answer: tuple[int, bytes, dict[str, str]]) -> Iterator[str]:
    handler = type("Handler", (_Gzipped,), {"answer": answer})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def bomb() -> Iterator[str]:
    with _serving((200, BOMB, {})) as url:
        yield url


@pytest.mark.anyio
async def test_an_answer_inflating_past_the_cap_is_not_read_on(bomb: str) -> None:
    urls = {name: bomb for name in PROVIDERS}
    gw = gateway_from_yaml(gateway_yaml(None, base_urls=urls), env=KEYS)
    async with gw:
        outcome = await gw.providers["local"].complete(request("local", model="llama3.2"))
    assert (outcome.ok, outcome.sent) == (False, True)
    assert outcome.error_class is ErrorClass.MALFORMED_RESPONSE
    assert outcome.details["reason"] == "response_too_large"
    assert outcome.usage is None  # charged at its worst case


@pytest.mark.anyio
async def test_an_inflating_answer_is_stopped_in_bounded_pieces(bomb: str) -> None:
    """The body is decoded a piece at a time (httpx2 drains its decompressor in 1 MiB
    pieces) and the cap is checked after each: ~64 KiB of gzip never becomes 64 MiB in
    memory at once, whatever the cap."""
    urls = {name: bomb for name in PROVIDERS}
    gw = gateway_from_yaml(
        gateway_yaml(None, base_urls=urls, extra="gateway: {max_response_bytes: 2000000}\n"),
        env=KEYS,
    )
    async with gw:
        tracemalloc.start()
        try:
            outcome = await gw.providers["local"].complete(request("local", model="llama3.2"))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    assert outcome.details["reason"] == "response_too_large"
    assert peak < 8 * 1024 * 1024, peak  # the 2 MB cap and a piece or two, not 64 MiB


@pytest.mark.anyio
async def test_the_cap_is_configured_and_ordinary_answers_pass(
    upstream: FakeUpstream, tmp_path: Path
) -> None:
    small = gateway_yaml(upstream, extra="gateway: {max_response_bytes: 200}\n")
    async with gateway_from_yaml(small, env=KEYS) as gw:
        refused = await gw.route(Request("ask_openai", "hello"))
    assert refused.meta["error_class"] == "malformed_response"
    async with gateway_from_yaml(gateway_yaml(upstream), env=KEYS) as gw:
        fine = await gw.route(Request("ask_openai", "hello"))
    assert fine.ok and fine.text == "echo[gpt-4o-mini]: hello"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "error", "headers", "cls", "hint"),
    [
        (
            429,
            {"message": "slow down", "code": "rate_limit_exceeded"},
            {"retry-after": "3"},
            ErrorClass.RATE_LIMITED,
            3.0,
        ),
        (
            400,
            {"message": "maximum context length is 8192 tokens", "code": "context_length_exceeded"},
            {},
            ErrorClass.CONTEXT_LENGTH_EXCEEDED,
            None,
        ),
    ],
)
async def test_a_compressed_error_answer_keeps_its_class(
    status: int, error: dict[str, str], headers: dict[str, str], cls: ErrorClass, hint: float | None
) -> None:
    """Servers behind a proxy compress their error bodies too. Read once for the cap, the
    body was then decoded a second time: every such error was an unreadable answer,
    charged at its worst case (a 429 is not billed)."""
    body = gzip.compress(json.dumps({"error": error}).encode())
    with _serving((status, body, headers)) as url:
        urls = {name: url for name in PROVIDERS}
        async with gateway_from_yaml(gateway_yaml(None, base_urls=urls), env=KEYS) as gw:
            outcome = await gw.providers["openai"].complete(request("openai"))
    assert (outcome.error_class, outcome.status_code, outcome.retry_after_s) == (cls, status, hint)
