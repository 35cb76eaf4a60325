"""Cheaper idle-connection checks in the HTTP connection pool of every provider client.

Before it reuses a kept-alive connection, and every time it assigns requests to
connections, httpcore2's pool asks each idle connection whether its socket is readable
(a readable idle socket means the server closed it). The stock network stream answers by
rebuilding anyio's whole socket-attribute table, a ``getpeername`` system call included,
to reach the raw socket: ~8 us per question against ~1 us for the readability test
itself. At 50 calls in flight that is ~20 questions per call, ~10 % of the gateway's CPU
per call (bench/README.md).

:func:`cheap_idle_checks` wraps the pool's network backend so that each stream keeps its
raw socket from the moment it is connected (or wrapped in TLS) and answers ``is_readable``
with a zero-timeout ``poll`` on it; everything else goes to the stock stream unchanged.
The pool is reached through private attributes of httpx2 and httpcore2 (neither lets a
client choose its network backend), so the wrapper is applied only when they are exactly
what it expects; otherwise the client keeps the stock backend, which is merely slower.

httpcore2 is not imported here: httpx2 imports it when a client is first made, and a
server start that makes none should not pay its ~0.1 s and ~2.5 MB (the wrappers follow
its network interface without subclassing it).
"""

# The timeout parameters are httpcore2's network interface, not ours to change.
# ruff: noqa: ASYNC109

from __future__ import annotations

import select
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import httpx2


def _readable(sock: Any) -> bool:
    """True when a read would not block: data, or the end of the stream (a closed or
    unusable socket counts as readable, as in httpcore2)."""
    fd = -1 if sock is None else sock.fileno()
    if fd < 0:
        return True
    if not hasattr(select, "poll"):  # Windows
        ready, _, _ = select.select([fd], [], [], 0)
        return bool(ready)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _Stream:
    """A stock stream (httpcore2's ``AsyncNetworkStream``) that knows its raw socket."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self._socket: Any = inner.get_extra_info("socket")

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data: bytes = await self._inner.read(max_bytes, timeout)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> _Stream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._socket is not None:
            return _readable(self._socket)
        return self._inner.get_extra_info(info)


class _Backend:
    """The stock backend (httpcore2's ``AsyncNetworkBackend``), its streams wrapped in
    :class:`_Stream`."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> _Stream:
        return _Stream(
            await self.inner.connect_tcp(host, port, timeout, local_address, socket_options)
        )

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> _Stream:
        return _Stream(await self.inner.connect_unix_socket(path, timeout, socket_options))

    async def sleep(self, seconds: float) -> None:
        await self.inner.sleep(seconds)


#: httpcore2's own backends, whose streams answer ``is_readable`` from their raw socket.
_STOCK = frozenset({"AutoBackend", "AnyIOBackend", "TrioBackend"})


def _wrap(transport: Any, httpcore2: Any) -> bool:
    pool = getattr(transport, "_pool", None)
    if not isinstance(pool, httpcore2.AsyncConnectionPool):  # proxies' pools included
        return False
    backend = getattr(pool, "_network_backend", None)
    if isinstance(backend, _Backend):
        return True
    kind = type(backend)
    if kind.__module__.partition(".")[0] != "httpcore2" or kind.__name__ not in _STOCK:
        return False  # someone's own backend: its streams may answer differently
    cast(Any, pool)._network_backend = _Backend(backend)
    return True


def cheap_idle_checks(client: httpx2.AsyncClient) -> bool:
    """Give ``client``'s connection pools the cheaper idle checks: its own, and those of
    its proxy mounts (``HTTPS_PROXY`` and the like). True when its own transport got
    them; False, that pool unchanged, when it is not httpx2's stock transport over one of
    httpcore2's own backends. Call it before the client makes its first request."""
    httpcore2 = sys.modules.get("httpcore2")  # imported by httpx2 for the client's transport
    if httpcore2 is None:
        return False
    for mount in getattr(client, "_mounts", {}).values():
        if mount is not None:
            _wrap(mount, httpcore2)
    return _wrap(getattr(client, "_transport", None), httpcore2)
