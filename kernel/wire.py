""" "On the wire": a provider tells the kernel that its request has been written out.

A panel starts its members one after another, the one expected to answer last first,
and starts the next member once the previous member's request is on the wire (or after
:data:`WIRE_WAIT_S`, or once the member ended). Started all at once, the members' tasks
take turns at every write of the HTTP client, so the slowest member's request body went
out only after every other member had built and half-written its own: on two cores that
put ~1-2 ms of the other members' work in front of the slowest member's upstream time.

The signal travels in a context variable, set for the task that runs one member, so a
provider needs no new argument:

- providers on ``httpx2`` pass :func:`request_hook` as a request event hook of their
  client (``event_hooks={"request": [request_hook]}``, which an SDK's own client accepts
  too); the hook asks ``httpcore2`` to trace the request only when a signal is wanted,
  and the body's ``send_request_body.complete`` event fires it;
- any other provider calls :func:`sent` once its request is written (a no-op outside a
  panel).

A provider that does neither loses nothing but the head start: the panel waits at most
:data:`WIRE_WAIT_S` before it starts the next member.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: The longest a panel waits for a member's request to go out before starting the next.
WIRE_WAIT_S = 0.004

_signal: ContextVar[Callable[[], None] | None] = ContextVar("llmgw_wire_signal", default=None)

_BODY_SENT = ("http11.send_request_body.complete", "http2.send_request_body.complete")


@contextmanager
def watching(signal: Callable[[], None]) -> Iterator[None]:
    """Call ``signal`` when a request made in this context is on the wire."""
    token = _signal.set(signal)
    try:
        yield
    finally:
        _signal.reset(token)


def sent() -> None:
    """Tell the kernel this task's request has been written out (idempotent)."""
    signal = _signal.get()
    if signal is not None:
        signal()


async def request_hook(request: Any) -> None:
    """An ``httpx2`` request event hook: trace the request's body write when watched.

    Free when nobody watches (one context-variable read). A ``trace`` extension the
    request already carries is kept and still called.
    """
    signal = _signal.get()
    if signal is None:
        return
    inner: Callable[[str, dict[str, Any]], Awaitable[None]] | None = request.extensions.get("trace")

    async def trace(event: str, info: dict[str, Any]) -> None:
        if event in _BODY_SENT:
            signal()
        if inner is not None:
            await inner(event, info)

    request.extensions["trace"] = trace


class Pacing:
    """The order a panel starts its members in: the one expected to answer last, first.

    Keeps a moving average of each member target's answer time (successful attempts,
    provider latency). Members never seen come first, in config order, then the others
    from slowest to fastest. Starting the slowest first matters because members start one
    after another (each once the previous one's request is on the wire): the panel's wall
    time is its slowest member's, and that member should not wait behind the others.
    """

    ALPHA = 0.3

    def __init__(self) -> None:
        self._ms: dict[str, float] = {}

    def record(self, key: str, latency_ms: float) -> None:
        old = self._ms.get(key)
        self._ms[key] = latency_ms if old is None else old + self.ALPHA * (latency_ms - old)

    def expected_ms(self, key: str) -> float | None:
        return self._ms.get(key)

    def order(self, keys: list[str]) -> list[int]:
        def rank(i: int) -> tuple[bool, float]:
            ms = self._ms.get(keys[i])
            return (ms is not None, -(ms or 0.0))

        return sorted(range(len(keys)), key=rank)
