"""The providers' connection pools with cheap idle checks (``plugins/providers/pool.py``).

What the check is for: a kept-alive connection the server has closed must not be reused.
A local HTTP/1.1 server (plain and TLS) answers and then closes the connection; the next
request through the wrapped client must open a new one and succeed. With the check
answering "not readable" the same request fails, which shows the test depends on it.
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from provider_support import PROVIDERS, Stack, request

from llmgw.plugins.providers import pool


class _CloseAfterAnswer(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless told otherwise

    def do_GET(self) -> None:
        body = b"ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True  # the client still thinks it may reuse it

    def log_message(self, *args: Any) -> None:
        pass


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp / "cert.pem", tmp / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.fixture(params=["http", "https"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _CloseAfterAnswer)
    verify: Any = True
    if request.param == "https":
        cert, key = _self_signed(tmp_path)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(cert, key)
        srv.socket = server_ctx.wrap_socket(srv.socket, server_side=True)
        verify = ssl.create_default_context(cafile=str(cert))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"{request.param}://127.0.0.1:{srv.server_address[1]}/", verify
    finally:
        srv.shutdown()
        srv.server_close()


async def _twice(url: str, verify: Any) -> list[int]:
    async with httpx2.AsyncClient(verify=verify) as client:
        assert pool.cheap_idle_checks(client)
        first = await client.get(url)
        await anyio.sleep(0.2)  # the server has closed the kept-alive connection by now
        second = await client.get(url)
        return [first.status_code, second.status_code]


def test_a_connection_the_server_closed_is_not_reused(
    server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, verify = server
    asked: list[Any] = []
    readable = pool._readable

    def counting(sock: Any) -> bool:
        asked.append(sock)
        assert sock.fileno() >= 0
        return readable(sock)

    monkeypatch.setattr(pool, "_readable", counting)
    assert anyio.run(_twice, url, verify) == [200, 200]
    # our check answered, on the connection's socket (under TLS too): at the time it
    # was asked it had a descriptor (checked in `counting`)
    assert asked


def test_without_the_check_the_closed_connection_would_be_reused(
    server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, verify = server
    monkeypatch.setattr(pool, "_readable", lambda sock: False)
    with pytest.raises(httpx2.RemoteProtocolError):
        anyio.run(_twice, url, verify)


def test_readable_is_true_for_data_and_for_the_end_of_the_stream() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not pool._readable(a)
        b.sendall(b"x")
        assert pool._readable(a)
        a.recv(1)
        b.close()
        assert pool._readable(a)  # EOF
    assert pool._readable(a)  # closed: fileno() is -1


class _KeepAlive(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    peers: set[tuple[str, int]] = set()

    def do_GET(self) -> None:
        type(self).peers.add(self.client_address)
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


def test_a_live_idle_connection_is_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    answers: list[bool] = []
    readable = pool._readable

    def recording(sock: Any) -> bool:
        answers.append(readable(sock))
        return answers[-1]

    monkeypatch.setattr(pool, "_readable", recording)

    async def three() -> None:
        async with httpx2.AsyncClient() as client:
            assert pool.cheap_idle_checks(client)
            for _ in range(3):
                assert (await client.get(f"http://127.0.0.1:{srv.server_address[1]}/")).text == "ok"

    try:
        anyio.run(three)
    finally:
        srv.shutdown()
        srv.server_close()
    assert len(_KeepAlive.peers) == 1  # one connection for all three
    assert answers and not any(answers)  # asked, and "not readable": alive


def test_proxy_pools_get_the_check_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")

    async def run() -> None:
        client = httpx2.AsyncClient()
        assert client._mounts  # type: ignore[attr-defined]
        assert pool.cheap_idle_checks(client)
        for mount in client._mounts.values():  # type: ignore[attr-defined]
            assert isinstance(mount._pool._network_backend, pool._Backend)
        await client.aclose()

    anyio.run(run)


def test_only_the_stock_transport_is_changed() -> None:
    async def run() -> None:
        stock = httpx2.AsyncClient()
        assert pool.cheap_idle_checks(stock)
        assert pool.cheap_idle_checks(stock)  # idempotent: wrapped once
        backend = stock._transport._pool._network_backend  # type: ignore[attr-defined]
        assert isinstance(backend, pool._Backend)
        assert not isinstance(backend.inner, pool._Backend)
        mock = httpx2.AsyncClient(transport=httpx2.MockTransport(lambda r: httpx2.Response(200)))
        assert not pool.cheap_idle_checks(mock)
        assert (await mock.get("http://x/")).status_code == 200
        # a backend of someone's own is left alone: its streams may answer differently
        import httpcore2

        own = httpx2.AsyncClient()
        theirs = httpcore2.AsyncMockBackend([])
        own._transport._pool._network_backend = theirs  # type: ignore[attr-defined]
        assert not pool.cheap_idle_checks(own)
        assert own._transport._pool._network_backend is theirs  # type: ignore[attr-defined]
        for client in (stock, mock, own):
            await client.aclose()

    anyio.run(run)


@pytest.mark.anyio
@pytest.mark.parametrize("provider", sorted(PROVIDERS))
async def test_every_shipped_provider_pools_with_the_cheap_check(
    stack: Stack, provider: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked: list[Any] = []
    readable = pool._readable

    def counting(sock: Any) -> bool:
        asked.append(sock)
        return readable(sock)

    monkeypatch.setattr(pool, "_readable", counting)
    for _ in range(2):  # the second request finds the first one's connection idle
        outcome = await stack.gw.providers[provider].complete(request(provider))
        assert outcome.ok, outcome.message
    assert asked, f"{provider}: its pool never used the cheap idle check"
